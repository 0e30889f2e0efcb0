"""The relay modes beyond a fixed split on the wire: adaptive handoff, speculative relay, previews, notices."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from shared.errors import ConfigError
from shared.handoff import decode_handoff
from shared.protocol import Generate, Plan, ProtocolError, decode_text, encode
from shared.protocol.messages import MAX_PREVIEW_BYTES, Progress, handoff_conflict
from shared.relay_plan import RelayPlan
from tests.shared.test_protocol import make_payload


def _png(side: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_adaptive_plan_bounds_and_derived_values():
    plan = RelayPlan(20, 12, "dpmpp_2m", 4.0, handoff_tau=0.05, min_split=4)
    assert plan.adaptive and plan.first_split == 4 and plan.edge_steps == 12
    assert [plan.accepts_split(k) for k in (3, 4, 12, 13)] == [False, True, True, False]
    assert RelayPlan(20, 12, handoff_tau=0.05).first_split == 1
    fixed = RelayPlan(20, 12)
    assert not fixed.adaptive and fixed.first_split == 12
    assert [fixed.accepts_split(k) for k in (11, 12)] == [False, True]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(handoff_tau=0.0), r"handoff_tau must be .*\(0, 1\]"),
        (dict(handoff_tau=float("nan")), "handoff_tau"),
        (dict(handoff_tau=1.5), "handoff_tau"),
        (dict(min_split=3), "min_split needs handoff_tau"),
        (dict(handoff_tau=0.1, min_split=13), r"min_split must be .*\[1, split=12\]"),
        (dict(handoff_tau=0.1, min_split=0), "min_split"),
        (dict(speculative=1), "speculative must be true or false"),
    ],
)
def test_invalid_relay_modes_say_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RelayPlan(20, 12, **kwargs)


def test_modes_that_make_no_sense_are_refused():
    with pytest.raises(ConfigError, match="adaptive handoff needs 1 <= split < steps"):
        RelayPlan(20, 20, handoff_tau=0.1)
    with pytest.raises(ConfigError, match="speculative relay needs edge steps"):
        RelayPlan(20, 0, speculative=True)
    with pytest.raises(ConfigError, match="decode on the device"):
        RelayPlan(20, 20, decode_on="edge", speculative=True)


def test_fixed_plans_are_written_as_before_and_new_modes_round_trip():
    fixed = Plan("r1", RelayPlan(20, 10), seed=1, height=48, width=48, scheduler="linucb", why="w")
    obj = json.loads(encode(fixed))
    # An older device checks the plan's keys exactly: a fixed split and no notice add none.
    assert set(obj["plan"]) == {"num_inference_steps", "split", "sampler", "guidance_scale", "decode_on"}
    assert "notice" not in obj
    rich = Plan("r1", RelayPlan(20, 10, handoff_tau=0.05, min_split=3, speculative=True), seed=1, height=48,
                width=48, scheduler="linucb", why="w", notice="placed the bag in the top left")
    back = decode_text(encode(rich))
    assert back == rich
    generate = Generate("r2", "a red bag in the middle", preview_every=2)
    assert decode_text(encode(generate)) == generate
    assert "preview_every" not in json.loads(encode(Generate("r3", "x")))


def test_bad_modes_from_a_peer_are_protocol_errors():
    obj = json.loads(encode(Plan("r1", RelayPlan(20, 10), seed=1, height=48, width=48, scheduler="s", why="")))
    obj["plan"]["handoff_tau"] = -1
    with pytest.raises(ProtocolError, match="handoff_tau") as caught:
        decode_text(json.dumps(obj))
    assert caught.value.request_id == "r1"
    with pytest.raises(ProtocolError, match="preview_every"):
        decode_text(json.dumps({**json.loads(encode(Generate("r2", "x"))), "preview_every": 0}))


def test_a_preview_is_a_small_png():
    png = _png()
    progress = Progress.with_preview("r1", "edge", 3, 20, png)
    back = decode_text(encode(progress))
    assert isinstance(back, Progress) and back.preview_png() == png
    assert Progress("r1", "edge", 3, 20).preview_png() is None
    with pytest.raises(ProtocolError, match="PNG signature"):
        Progress("r1", "edge", 3, 20, preview=base64.b64encode(b"GIF89a....").decode())
    with pytest.raises(ProtocolError, match="not base64"):
        Progress("r1", "edge", 3, 20, preview="%%%")
    with pytest.raises(ProtocolError, match="preview"):
        Progress("r1", "edge", 3, 20, preview=base64.b64encode(png + bytes(MAX_PREVIEW_BYTES)).decode())


def test_an_adaptive_handoff_is_accepted_anywhere_in_its_window():
    announced = RelayPlan(20, 12, "dpmpp_2m", 7.5, handoff_tau=0.05, min_split=4)
    plan = Plan("r1", announced, seed=7, height=64, width=64, scheduler="linucb", why="")
    for step, ok in ((3, False), (4, True), (9, True), (12, True), (13, False)):
        handoff = decode_handoff(make_payload(plan=RelayPlan(20, step, "dpmpp_2m", 7.5)))
        problem = handoff_conflict(handoff, plan)
        assert (problem is None) == ok, (step, problem)
        if not ok:
            assert problem is not None and "a step in [4, 12]" in problem
    fixed = Plan("r1", RelayPlan(20, 12, "dpmpp_2m", 7.5), seed=7, height=64, width=64, scheduler="s", why="")
    assert "split: expected 12" in str(handoff_conflict(decode_handoff(make_payload(plan=RelayPlan(20, 9))), fixed))


def test_the_server_sends_a_notice_and_previews_only_to_a_request_that_asked():
    from shared.protocol import ProtocolError as UsageError
    from tests.shared.test_protocol import connected, make_server

    server = make_server()
    connected(server)
    server.receive_text(encode(Generate("r1", "a green bag", preview_every=2)), 0.0)
    server.receive_text(encode(Generate("r2", "a red bag in the middle")), 0.0)
    server.data_to_send()
    server.send_plan("r1", RelayPlan(20, 10), seed=1, height=48, width=48, scheduler="linucb", why="w",
                     notice="placed the bag in the top left")
    server.send_plan("r2", RelayPlan(20, 10), seed=1, height=48, width=48, scheduler="linucb", why="w")
    server.send_progress("r1", 2, 10, preview_png=_png())
    with pytest.raises(UsageError, match="asked for no previews"):
        server.send_progress("r2", 2, 10, preview_png=_png())
    sent = [decode_text(frame) for frame in server.data_to_send() if isinstance(frame, str)]
    plans = [m for m in sent if isinstance(m, Plan)]
    assert [p.notice for p in plans] == ["placed the bag in the top left", None]
    previews = [m.preview_png() for m in sent if isinstance(m, Progress)]
    assert previews == [_png()]
