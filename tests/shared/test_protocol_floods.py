"""The flood bounds of the server's protocol state machine, sans I/O, with a fake clock: refusals,
the frame rate (pings included), the outbox cap and the hello deadline (see shared/protocol/connection.py)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import ConfigError
from shared.protocol import (
    CLOSE_POLICY_VIOLATION,
    Cancel,
    Error,
    FrameRejected,
    Generate,
    ProtocolLimits,
    ServerConnection,
    decode_text,
    encode,
)
from shared.protocol.connection import Close
from tests.helpers import pump
from tests.shared.test_protocol import FAMILY, TOKEN, connected, make_client, make_server


def generate(server: ServerConnection, rid: str, now: float) -> list[Any]:
    return server.receive_text(encode(Generate(request_id=rid, prompt="p")), now)


def refused_code(events: list[Any]) -> str | None:
    """The error code of a single FrameRejected, or None when the generate was accepted."""
    [event] = events
    if isinstance(event, Generate):
        return None
    assert isinstance(event, FrameRejected), event
    return event.error.code


# --------------------------------------------------------------------------- refusals


def test_a_client_that_waits_as_advised_is_refused_forever_for_free():
    limits = ProtocolLimits(requests_per_minute=6.0, burst=1, max_in_flight=1024, max_refusals=2)
    server, _ = connected(make_server(limits=limits))
    now, accepted, refused = 0.0, 0, 0
    for i in range(1000):
        events = generate(server, f"r{i}", now)
        if refused_code(events) is None:
            accepted += 1
            now += 0.001  # the next one comes at once: refused, but nothing was advised yet
        else:
            refused += 1
            now += events[0].error.retry_after_s  # exactly as told
    assert server.close is None and server.refusals == 0 and server.violations == 0
    assert refused >= 499 and accepted >= 499


def test_early_retries_spend_the_refusal_budget_then_close():
    limits = ProtocolLimits(requests_per_minute=60.0, burst=1, max_in_flight=100, max_refusals=3,
                            refusals_per_minute=60.0)
    server, _ = connected(make_server(limits=limits))
    assert refused_code(generate(server, "r0", 10.0)) is None
    codes = [refused_code(generate(server, f"r{i}", 10.0)) for i in range(1, 5)]
    assert codes == ["rate_limited"] * 4 and server.close is None  # one free (nothing advised yet), 3 charged
    assert server.refusals == 3 and server.violations == 0
    [event] = generate(server, "r5", 10.0)
    assert isinstance(event, FrameRejected) and event.fatal and event.error.code == "rate_limited"
    assert server.close == Close(CLOSE_POLICY_VIOLATION, "too many refused requests", abort=True)
    # The refusal itself went out before the close.
    assert decode_text(server.data_to_send()[-1]).code == "rate_limited"


def test_the_refusal_budget_refills():
    limits = ProtocolLimits(requests_per_minute=60.0, burst=1, max_in_flight=100, max_refusals=2,
                            refusals_per_minute=60.0)
    server, _ = connected(make_server(limits=limits))
    for start in (0.0, 100.0):  # the same burst twice, 100 s apart: the budget is back in full
        codes = [refused_code(generate(server, f"r{start:g}-{i}", start)) for i in range(4)]
        assert codes == [None, "rate_limited", "rate_limited", "rate_limited"]  # accepted, free, 2 charged
        assert server.close is None
    assert server.refusals == 4
    generate(server, "last", 100.0)
    assert server.close is not None


def test_too_many_in_flight_is_always_charged():
    limits = ProtocolLimits(max_in_flight=1, burst=100, max_refusals=2)
    server, _ = connected(make_server(limits=limits))
    assert refused_code(generate(server, "a", 0.0)) is None
    for i, now in enumerate([100.0, 200.0]):  # however long it waited: the client knows its in-flight count
        assert refused_code(generate(server, f"x{i}", now)) == "too_many_in_flight"
    assert server.refusals == 2 and server.close is None
    assert refused_code(generate(server, "x2", 200.0)) == "too_many_in_flight" and server.close is None
    [event] = generate(server, "x3", 200.0)  # the budget (2, refilled meanwhile) is spent
    assert event.fatal and server.close is not None and server.close.reason == "too many refused requests"


def test_busy_sent_by_the_adapter_is_charged_when_the_retry_came_early():
    limits = ProtocolLimits(burst=100, requests_per_minute=6000.0, max_refusals=1)
    server, _ = connected(make_server(limits=limits))
    generate(server, "a", 0.0)
    server.send_error("a", "busy", "queue full", retry_after_s=2.0)  # nothing advised before: free
    generate(server, "b", 2.5)  # waited as told
    server.send_error("b", "busy", "queue full", retry_after_s=2.0)  # free
    assert server.refusals == 0
    generate(server, "c", 3.0)  # 0.5 s after being told 2 s
    server.send_error("c", "busy", "queue full", retry_after_s=2.0)
    assert server.refusals == 1 and server.close is None
    generate(server, "d", 3.1)
    server.send_error("d", "busy", "queue full", retry_after_s=2.0)
    assert server.close == Close(CLOSE_POLICY_VIOLATION, "too many refused requests", abort=True)
    assert [decode_text(f).code for f in server.data_to_send() if isinstance(f, str)][-1] == "busy"


def test_other_errors_the_adapter_sends_are_not_refusals():
    server, _ = connected(make_server(limits=ProtocolLimits(max_refusals=1)))
    for i in range(5):
        generate(server, f"r{i}", 0.0)
        server.send_error(f"r{i}", "internal", "the engine failed")
    assert server.refusals == 0 and server.close is None


# --------------------------------------------------------------------------- frames


def test_pings_before_hello_spend_the_frame_budget():
    server = make_server(limits=ProtocolLimits(frames_per_s=10.0, frame_burst=5))
    assert server.receive_control(0.0, 5) == []
    [event] = server.receive_control(0.0)
    assert isinstance(event, FrameRejected) and event.fatal and event.error.code == "rate_limited"
    assert event.error.retry_after_s == pytest.approx(0.1)
    assert server.close == Close(CLOSE_POLICY_VIOLATION, "too many frames", abort=True)
    assert server.receive_control(1.0) == [] and server.receive_text("{}", 1.0) == []  # after the close: dropped


def test_every_frame_kind_counts_after_hello_and_the_budget_refills():
    server, client = connected(make_server(limits=ProtocolLimits(frames_per_s=10.0, frame_burst=4)))  # hello: 1
    assert server.receive_text(encode(Cancel(request_id="zz")), 0.0) == []  # 2 (ignored, but counted)
    assert server.receive_control(0.0) == []  # 3: a ping
    assert isinstance(server.receive_bytes(b"x", 0.0)[0], FrameRejected) and server.close is None  # 4
    assert server.receive_control(0.1) == []  # one token refilled in 0.1 s
    [event] = server.receive_text(encode(Cancel(request_id="zz")), 0.1)
    assert event.fatal and server.close is not None and server.close.reason == "too many frames"


def test_a_normal_device_conversation_stays_far_inside_the_frame_budget():
    server, client = connected(make_server())
    now = 0.0
    for i in range(200):  # a generate, a report-sized frame and a keepalive ping every 2 s
        now += 1.0
        server.receive_control(now)
        client_frame = encode(Generate(request_id=f"r{i}", prompt="p"))
        server.receive_text(client_frame, now)
        server.send_error(f"r{i}", "internal", "x")
    assert server.close is None


# --------------------------------------------------------------------------- outbox


def test_an_outbox_past_its_cap_is_freed_and_closes():
    server, _ = connected(make_server(limits=ProtocolLimits(max_outbox_bytes=2048)))
    sizes = []
    while server.close is None:
        server.send_error(None, "internal", "x" * 200)
        sizes.append(server.outbox_bytes)
    assert server.close == Close(CLOSE_POLICY_VIOLATION, "peer is not reading", abort=True)
    assert max(sizes[:-1]) > 2048 and server.outbox_bytes == 0 and server.data_to_send() == []
    server.send_error(None, "internal", "later")  # done: nothing more is queued
    assert server.data_to_send() == []


def test_an_outbox_that_is_drained_never_closes():
    server, client = connected(make_server(limits=ProtocolLimits(max_outbox_bytes=2048)))
    for _ in range(100):
        server.send_error(None, "internal", "x" * 500)
        [error] = pump(server, client)
        assert isinstance(error, Error)
    assert server.close is None


def test_one_payload_larger_than_the_cap_still_goes_out():
    from tests.shared.test_protocol import EDGE_PLAN, PNG

    server, client = connected(make_server(limits=ProtocolLimits(max_outbox_bytes=1024, max_in_flight=2)))
    client.send_generate(Generate(request_id="r1", prompt="p", pinned=EDGE_PLAN))
    pump(client, server)
    server.send_plan("r1", EDGE_PLAN, seed=1, height=512, width=512, scheduler="s", why="w")
    server.send_result("r1", PNG + b"\x00" * 4000)
    assert server.close is None and server.outbox_bytes > 4000
    frames = server.data_to_send()
    assert isinstance(frames[-1], bytes) and len(frames[-1]) > 4000


# --------------------------------------------------------------------------- hello deadline


def test_no_hello_by_the_deadline_closes():
    server = make_server(limits=ProtocolLimits(hello_timeout_s=10.0), opened_at=100.0)
    assert server.deadline == 110.0
    assert server.tick(109.9) == [] and server.close is None
    [event] = server.tick(110.0)
    assert isinstance(event, FrameRejected) and event.fatal and event.error.code == "bad_message"
    assert "hello: none within 10 s" in event.error.message
    assert server.close == Close(CLOSE_POLICY_VIOLATION, "no hello in time", abort=True)
    assert server.deadline is None and server.tick(200.0) == []


def test_a_hello_in_time_clears_the_deadline():
    server = make_server(limits=ProtocolLimits(hello_timeout_s=10.0), opened_at=0.0)
    server, _ = connected(server, make_client())
    assert server.deadline is None and server.tick(1e6) == [] and server.close is None


def test_without_opened_at_there_is_no_deadline():
    server = ServerConnection(family_id=FAMILY, token=TOKEN)
    assert server.deadline is None and server.tick(1e9) == []


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("frames_per_s", 0, "frames_per_s: expected a finite number in (0, 1e+06], got 0"),
        ("frame_burst", 0, "frame_burst: expected an integer in [1, 1000000], got 0"),
        ("max_refusals", True, "max_refusals: expected an integer, got bool"),
        ("refusals_per_minute", float("nan"), "refusals_per_minute: expected a finite number"),
        ("max_outbox_bytes", 100, "max_outbox_bytes: expected an integer in [1024, 17179869184], got 100"),
        ("hello_timeout_s", -1.0, "hello_timeout_s: expected a finite number in (0, 86400], got -1.0"),
    ],
)
def test_new_limits_are_checked_with_one_clear_line(field: str, value: Any, fragment: str):
    with pytest.raises(ConfigError) as info:
        ProtocolLimits(**{field: value})
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_welcome_leaves_the_edge_only_limits_out_so_older_devices_still_connect():
    import dataclasses
    import json

    from shared.protocol.messages import EDGE_ONLY_LIMITS, Welcome

    limits = ProtocolLimits(frames_per_s=7.0, hello_timeout_s=3.0, max_in_flight=3)
    server, client = connected(make_server(limits=limits))
    # the client sees the request limits; the flood limits are the edge's own business
    assert client.server_limits.max_in_flight == 3
    assert client.server_limits == dataclasses.replace(limits, frames_per_s=ProtocolLimits().frames_per_s,
                                                       hello_timeout_s=ProtocolLimits().hello_timeout_s)
    wire = json.loads(encode(Welcome(version=1, family_id="f", server="rise-edge", limits=limits)))
    assert not EDGE_ONLY_LIMITS & set(wire["limits"])  # what a device of the previous version reads, exactly
    assert EDGE_ONLY_LIMITS <= {f.name for f in dataclasses.fields(ProtocolLimits)}
