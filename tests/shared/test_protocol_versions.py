"""Version 2 of the wire protocol: a device or edge of the first release (version 1) keeps working with this one.

The first release checks every frame's keys exactly, so anything it does not know fails the frame. The key sets
below are that release's (shared/protocol/messages.py before the relay modes, previews, notices and families).
"""

from __future__ import annotations

import json

import pytest

from shared.protocol import (
    ADDED_IN_V2,
    PROTOCOL_VERSIONS,
    ClientConnection,
    Generate,
    Plan,
    Progress,
    ProtocolError,
    ServerConnection,
    Welcome,
    decode_text,
    encode,
    for_peer,
    newer_fields,
)
from shared.relay_plan import RelayPlan
from tests.helpers import pump

FAMILY = "demo-0123456789ab"
PLAN = RelayPlan(10, 5)
SPECULATIVE = RelayPlan(10, 5, speculative=True)
ADAPTIVE = RelayPlan(10, 8, handoff_tau=0.05, min_split=2)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16

#: What a first-release peer accepts, frame by frame (it refuses any other key).
FIRST_RELEASE_KEYS = {
    "plan": {"type", "request_id", "plan", "seed", "height", "width", "scheduler", "why"},
    "generate": {"type", "request_id", "prompt", "preference", "seed", "height", "width", "steps", "pinned",
                 "device_load", "rtt_s", "bandwidth_bps"},
    "progress": {"type", "request_id", "stage", "step", "total"},
}
FIRST_RELEASE_PLAN_KEYS = {"num_inference_steps", "split", "sampler", "guidance_scale", "decode_on"}


def first_release_reads(frame: str) -> bool:
    """Whether a first-release peer would accept ``frame``'s keys (the frames this file checks)."""
    obj = json.loads(frame)
    keys = FIRST_RELEASE_KEYS[obj["type"]]
    plan = obj.get("plan") if obj["type"] == "plan" else obj.get("pinned")
    return set(obj) <= keys and (plan is None or set(plan) <= FIRST_RELEASE_PLAN_KEYS)


def open_pair(device_versions: tuple[int, ...] = PROTOCOL_VERSIONS,
              edge_versions: tuple[int, ...] = PROTOCOL_VERSIONS) -> tuple[ServerConnection, ClientConnection]:
    server = ServerConnection(family_id=FAMILY, versions=edge_versions)
    client = ClientConnection(family_id=FAMILY, versions=device_versions)
    pump(client, server)
    [welcome] = pump(server, client)
    assert isinstance(welcome, Welcome)
    return server, client


def ask(server: ServerConnection, frame: str, now: float = 0.0) -> Generate:
    [request] = server.receive_text(frame, now)
    assert isinstance(request, Generate)
    return request


def test_this_code_speaks_both_versions_and_version_2_is_what_came_after_the_first_release():
    assert PROTOCOL_VERSIONS == (1, 2)
    assert ADDED_IN_V2["plan"] == {"notice", "family_id", "loading_s"}
    assert ADDED_IN_V2["generate"] == {"preview_every"}
    assert ADDED_IN_V2["relay_plan"] == {"handoff_tau", "min_split", "speculative"}
    server, client = open_pair()
    assert server.version == client.welcome.version == 2 and server.relay_modes
    server, client = open_pair(device_versions=(1,))
    assert server.version == client.welcome.version == 1 and not server.relay_modes


def test_a_first_release_device_gets_plans_it_reads_and_a_new_one_gets_everything():
    for versions, readable in (((1,), True), ((1, 2), False)):
        server, client = open_pair(device_versions=versions)
        client.send_generate(Generate("r1", "a red bag"))
        pump(client, server)
        server.send_plan("r1", PLAN, seed=1, height=48, width=48, scheduler="linucb", why="w",
                         notice="placed the bag in the middle", loading_s=2.5)
        [frame] = server.data_to_send()
        assert first_release_reads(frame) is readable
        [plan] = client.receive_text(frame, 0.0)
        assert isinstance(plan, Plan) and plan.plan == PLAN
        if readable:
            assert (plan.notice, plan.family_id, plan.loading_s) == (None, None, None)
        else:
            assert (plan.notice, plan.family_id, plan.loading_s) == ("placed the bag in the middle", FAMILY, 2.5)


def test_a_relay_mode_a_first_release_device_cannot_run_is_never_sent_unless_it_asked_for_it():
    server, client = open_pair(device_versions=(1,))
    client.send_generate(Generate("r1", "a red bag"))
    pump(client, server)
    with pytest.raises(ProtocolError, match="speculative: the device speaks protocol version 1, which cannot") as info:
        server.send_plan("r1", SPECULATIVE, seed=1, height=48, width=48, scheduler="linucb", why="w")
    assert info.value.code == "internal" and server.data_to_send() == []
    server.send_plan("r1", PLAN, seed=1, height=48, width=48, scheduler="linucb", why="w")  # the request lives on
    assert first_release_reads(server.data_to_send()[0])
    # A version-1 device that pinned a mode (released before version 2, announcing version 1) knows it.
    wire = json.loads(encode(Generate("r2", "a red bag", pinned=ADAPTIVE)))
    ask(server, json.dumps(wire))
    server.send_plan("r2", ADAPTIVE, seed=1, height=48, width=48, scheduler="pinned", why="w")
    assert json.loads(server.data_to_send()[0])["plan"]["handoff_tau"] == 0.05


def test_a_device_released_before_version_2_keeps_its_previews_and_modes_under_version_1():
    """Such a device announced only version 1 yet sent preview_every: the edge accepts it and answers."""
    server, _ = open_pair(device_versions=(1,))
    request = ask(server, encode(Generate("r1", "a red bag", preview_every=2)))
    assert request.preview_every == 2
    server.send_plan("r1", PLAN, seed=1, height=48, width=48, scheduler="linucb", why="w")
    server.send_progress("r1", 2, 5, preview_png=PNG)
    frames = server.data_to_send()
    assert isinstance(decode_text(frames[1]), Progress) and json.loads(frames[1])["preview"]


def test_a_new_device_asks_a_first_release_edge_nothing_it_does_not_know():
    server, client = open_pair(edge_versions=(1,))
    client.send_generate(Generate("r1", "a red bag", preview_every=2))
    [frame] = client.data_to_send()
    assert first_release_reads(frame) and "preview_every" not in json.loads(frame)
    with pytest.raises(ProtocolError, match="the edge speaks protocol version 1") as info:
        client.send_generate(Generate("r2", "a red bag", pinned=SPECULATIVE))
    assert (info.value.code, info.value.field, info.value.request_id) == ("invalid_request", "pinned.speculative",
                                                                          "r2")
    assert client.data_to_send() == []
    client.send_generate(Generate("r2", "a red bag", pinned=PLAN))  # the id was not used up by the refusal
    assert first_release_reads(client.data_to_send()[0])
    # the same device asks a version-2 edge for previews
    server, client = open_pair()
    client.send_generate(Generate("r1", "a red bag", preview_every=2))
    assert json.loads(client.data_to_send()[0])["preview_every"] == 2


@pytest.mark.parametrize(
    ("message", "newer"),
    [
        (Plan("r1", PLAN, seed=1, height=48, width=48, scheduler="s", why=""), ()),
        (Plan("r1", ADAPTIVE, seed=1, height=48, width=48, scheduler="s", why="", notice="n", family_id=FAMILY,
              loading_s=1.0), ("plan.handoff_tau", "plan.min_split", "notice", "family_id", "loading_s")),
        (Generate("r1", "x", pinned=SPECULATIVE, preview_every=3), ("pinned.speculative", "preview_every")),
        (Generate("r1", "x"), ()),
    ],
)
def test_newer_fields_names_what_a_first_release_peer_would_refuse(message, newer):
    assert newer_fields(message, 1) == newer and newer_fields(message, 2) == ()
    kept = for_peer(message, 1)
    assert all(name.count(".") for name in newer_fields(kept, 1))  # only a relay mode is left to refuse
    assert for_peer(message, 2) is message
