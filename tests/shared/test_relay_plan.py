from __future__ import annotations

import pytest

from shared.errors import ConfigError
from shared.relay_plan import RelayPlan


def test_valid_plan_and_derived_counts():
    plan = RelayPlan(20, 5, "euler", 7.5)
    assert (plan.edge_steps, plan.device_steps, plan.uses_guidance) == (5, 15, True)
    assert not RelayPlan(4, 0, "ddim", 1.0).uses_guidance


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_inference_steps=0, split=0), "steps must be"),
        (dict(num_inference_steps=True, split=0), "steps must be"),
        (dict(num_inference_steps=10, split=11), r"split must be .*\[0, steps=10\]"),
        (dict(num_inference_steps=10, split=-1), "split must be"),
        (dict(num_inference_steps=10, split=2, sampler="pndm"), "unknown sampler 'pndm'"),
        (dict(num_inference_steps=10, split=2, guidance_scale=float("nan")), "guidance"),
        (dict(num_inference_steps=10, split=2, decode_on="cloud"), "decode_on"),
    ],
)
def test_invalid_plans_say_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RelayPlan(**kwargs)
