"""Scheduler configs as the hub ships them: the numpy port reads them exactly as diffusers' ``from_config``.

Hub ``scheduler_config.json`` files omit keys; a loaded scheduler's ``config`` then holds its own class's
defaults for them, listed in ``_use_default_values``, and diffusers drops those keys when another class is
built from it. The port must do the same, or a DPM-Solver++ relay on an SD1.5 family (a PNDM config)
ends with a timestep mismatch after the edge has spent its steps. And where the two still disagree, the
edge refuses before any step, naming the key.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

import shared.samplers.schedule as schedule
from edge_server.scheduler_bridge import diffusers_scheduler
from lab.hub_families import SD1_SCHEDULER, SD21_BASE_SCHEDULER, SD21_V_SCHEDULER, SDXL_SCHEDULER
from shared.errors import ConfigError
from shared.samplers import SAMPLER_NAMES, make_sampler

# As published (scheduler/scheduler_config.json of each checkpoint), keys of other schedulers included.
_SD1, _SD21_V, _SD21_BASE, _SDXL = SD1_SCHEDULER, SD21_V_SCHEDULER, SD21_BASE_SCHEDULER, SDXL_SCHEDULER
HUB_CONFIGS: dict[str, dict[str, Any]] = {"sd1": _SD1, "sd2.1-v": _SD21_V, "sd2.1-base": _SD21_BASE, "sdxl": _SDXL}
_LOADERS = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler,
            "EulerDiscreteScheduler": EulerDiscreteScheduler}


def as_loaded(raw: dict[str, Any]) -> dict[str, Any]:
    """The config a pipeline's scheduler holds after ``from_pretrained`` (defaults filled, ``_use_default_values``)."""
    return dict(_LOADERS[raw["_class_name"]].from_config(raw).config)


@pytest.mark.parametrize("steps", [4, 20, 50])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("family", sorted(HUB_CONFIGS))
def test_the_port_schedules_a_hub_config_as_diffusers_does(family: str, sampler: str, steps: int) -> None:
    raw = HUB_CONFIGS[family]
    for config in (raw, as_loaded(raw)):
        edge = diffusers_scheduler(sampler, config, steps)  # raises if the schedules differ
        port = make_sampler(sampler, config)
        port.set_timesteps(steps)
        np.testing.assert_allclose(np.asarray(port.timesteps, np.float64), edge.timesteps.numpy().astype(np.float64),
                                   rtol=0, atol=1e-3)
        if hasattr(port, "sigmas"):
            np.testing.assert_allclose(port.sigmas, edge.sigmas.numpy(), rtol=1e-5, atol=1e-6)


def test_a_loaded_sd1_config_lists_the_spacing_it_did_not_ship() -> None:
    loaded = as_loaded(_SD1)
    assert "timestep_spacing" in loaded["_use_default_values"] and loaded["timestep_spacing"] == "leading"
    port = make_sampler("dpmpp_2m", loaded)
    port.set_timesteps(20)
    assert int(port.timesteps[0]) == 999  # DPM-Solver++'s own "linspace" default, not PNDM's "leading" (951)


def test_a_schedule_the_port_would_not_reproduce_is_refused_before_any_step_naming_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def ignores_use_default_values(config: Any, defaults: Any) -> dict[str, Any]:  # the old port's reading
        return {key: (config or {}).get(key, default) for key, default in defaults.items()}

    monkeypatch.setattr(schedule, "resolve_config", ignores_use_default_values)
    import shared.samplers as samplers
    import shared.samplers.dpmpp_2m as dpmpp_2m
    monkeypatch.setattr(samplers, "resolve_config", ignores_use_default_values)
    monkeypatch.setattr(dpmpp_2m, "resolve_config", ignores_use_default_values)
    with pytest.raises(ConfigError, match=r"dpmpp_2m: the edge's timesteps differ .*timestep_spacing: edge 'linspace', "
                                          r"device 'leading'.*refused before any step"):
        diffusers_scheduler("dpmpp_2m", as_loaded(_SD1), 20)


def test_a_malformed_use_default_values_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="_use_default_values"):
        make_sampler("ddim", {**_SD1, "_use_default_values": "timestep_spacing"})
