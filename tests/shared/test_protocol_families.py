"""An edge serving several families: the hello picks one, the welcome and every plan name it, and a device
is never handed a plan of another family's."""

from __future__ import annotations

import json
import math

import pytest

from shared.protocol import (
    ClientConnection,
    Error,
    FrameRejected,
    Generate,
    Plan,
    ProtocolError,
    ServerConnection,
    Welcome,
    decode_text,
    encode,
)
from shared.relay_plan import RelayPlan
from tests.helpers import pump

DEMO, SD15, OTHER = "demo-0123456789ab", "sd15-0123456789ab", "sdxl-0123456789ab"
PLAN = RelayPlan(10, 5, "dpmpp_2m", 7.5)


def _connect(family: str) -> tuple[ServerConnection, ClientConnection, list[object]]:
    server = ServerConnection(family_id=DEMO, families=(DEMO, SD15))
    client = ClientConnection(family_id=family)
    pump(client, server)
    return server, client, pump(server, client)


def test_the_hello_picks_one_of_the_served_families_and_plans_name_it():
    server, client, events = _connect(SD15)
    assert server.family_id == SD15 and isinstance(events[0], Welcome) and events[0].family_id == SD15
    rid = client.new_request_id()
    client.send_generate(Generate(request_id=rid, prompt="a red sneaker"))
    pump(client, server)
    server.send_plan(rid, PLAN, seed=1, height=512, width=512, scheduler="fixed", why="w")
    [frame] = server.data_to_send()
    assert json.loads(frame)["family_id"] == SD15
    [plan] = client.receive_text(frame, 0.0)
    assert isinstance(plan, Plan) and plan.family_id == SD15


def test_a_family_the_edge_does_not_serve_is_refused_naming_those_it_does():
    server, client, events = _connect(OTHER)
    [error] = [e for e in events if isinstance(e, Error)]
    assert error.code == "wrong_family" and DEMO in error.message and SD15 in error.message
    assert server.close is not None


def test_a_device_refuses_a_plan_for_another_family():
    server, client, _ = _connect(DEMO)
    rid = client.new_request_id()
    client.send_generate(Generate(request_id=rid, prompt="a red sneaker"))
    pump(client, server)
    server.family_id = SD15  # an edge that mixed its families up
    server.send_plan(rid, PLAN, seed=1, height=512, width=512, scheduler="fixed", why="w")
    events = pump(server, client)
    [rejected] = events
    assert isinstance(rejected, FrameRejected) and rejected.fatal and rejected.error.code == "wrong_family"
    assert client.close is not None  # an edge that serves the wrong family cannot serve this device at all


def test_a_plan_says_the_load_its_family_waits_for_and_a_loaded_familys_says_nothing():
    server, client, _ = _connect(SD15)
    first, second = client.new_request_id(), client.new_request_id()
    for rid in (first, second):
        client.send_generate(Generate(request_id=rid, prompt="a red sneaker"))
    pump(client, server)
    server.send_plan(first, PLAN, seed=1, height=512, width=512, scheduler="fixed", why="w", loading_s=7.5)
    server.send_plan(second, PLAN, seed=2, height=512, width=512, scheduler="fixed", why="w")
    frames = server.data_to_send()
    assert json.loads(frames[0])["loading_s"] == 7.5 and "loading_s" not in json.loads(frames[1])
    plans = [event for frame in frames for event in client.receive_text(frame, 0.0)]
    assert [p.loading_s for p in plans] == [7.5, None]


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "7", True, 1e9])
def test_a_plan_with_an_impossible_load_time_is_refused_naming_the_field(value):
    with pytest.raises(ProtocolError, match="loading_s"):
        Plan(request_id="r1", plan=PLAN, seed=1, height=64, width=64, scheduler="fixed", why="", loading_s=value)
    if isinstance(value, float) and not math.isfinite(value):
        return  # not JSON: the frame never parses
    frame = json.loads(encode(Plan(request_id="r1", plan=PLAN, seed=1, height=64, width=64, scheduler="fixed",
                                   why="", loading_s=1.0)))
    frame["loading_s"] = value  # what an edge of another make might send
    with pytest.raises(ProtocolError, match="loading_s"):
        decode_text(json.dumps(frame))
