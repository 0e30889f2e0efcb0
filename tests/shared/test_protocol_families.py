"""An edge serving several families: the hello picks one, the welcome and every plan name it, and a device
is never handed a plan of another family's."""

from __future__ import annotations

import json

from shared.protocol import ClientConnection, Error, FrameRejected, Generate, Plan, ServerConnection, Welcome
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
