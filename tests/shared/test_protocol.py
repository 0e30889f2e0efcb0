"""Tests of the sans-I/O wire protocol: the codec, every rejection category, both state machines, fuzzing.

No sockets: frames are handed from one connection object to the other by ``pump``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError, RiseError
from shared.handoff import Handoff, encode_handoff
from shared.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    ERROR_CODES,
    MESSAGE_TYPES,
    PNG_SIGNATURE,
    PROTOCOL_VERSIONS,
    Cancel,
    ClientConnection,
    Error,
    FrameRejected,
    Generate,
    HandoffAnnouncement,
    HandoffReceived,
    Hello,
    Plan,
    Progress,
    ProtocolError,
    ProtocolLimits,
    Rating,
    Report,
    ResultAnnouncement,
    ResultReceived,
    ServerConnection,
    TokenBucket,
    Welcome,
    decode_text,
    encode,
)
from shared.relay_plan import RelayPlan
from shared.samplers import SamplerState
from tests.helpers import pump

FAMILY = "tiny-sd"
TOKEN = "s3cret-Token_42"
PLAN = RelayPlan(num_inference_steps=10, split=4, sampler="dpmpp_2m", guidance_scale=7.5)
EDGE_PLAN = RelayPlan(num_inference_steps=6, split=6, sampler="euler", guidance_scale=5.0, decode_on="edge")
PNG = PNG_SIGNATURE + b"\x00\x00\x00\rIHDR fake png body"


# --------------------------------------------------------------------------- builders


def make_payload(request_id: str = "r1", plan: RelayPlan = PLAN, seed: int = 7, family: str = FAMILY) -> bytes:
    """A valid safetensors handoff for ``plan`` (tiny tensors), as the edge relay would encode it."""
    rng = np.random.default_rng(seed)
    shape = (1, 4, 8, 8)
    handoff = Handoff(
        family_id=family,
        sampler=plan.sampler,
        num_inference_steps=plan.num_inference_steps,
        split=plan.split,
        guidance_scale=plan.guidance_scale,
        seed=seed,
        timesteps=np.linspace(999, 0, plan.num_inference_steps).round().astype(np.float32),
        latents=rng.standard_normal(shape, dtype=np.float32),
        cond_embeddings=rng.standard_normal((1, 7, 16), dtype=np.float32),
        sampler_state=SamplerState(
            step_index=plan.split,
            tensors={"model_outputs.0": rng.standard_normal(shape, dtype=np.float32)},
            scalars={"lower_order_nums": 1},
        ),
        request_id=request_id,
    )
    return encode_handoff(handoff)


def make_server(**kwargs: Any) -> ServerConnection:
    kwargs.setdefault("family_id", FAMILY)
    kwargs.setdefault("token", TOKEN)
    return ServerConnection(**kwargs)


def make_client(**kwargs: Any) -> ClientConnection:
    kwargs.setdefault("family_id", FAMILY)
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("client_name", "test-device/1.0")
    return ClientConnection(**kwargs)


def connected(
    server: ServerConnection | None = None, client: ClientConnection | None = None
) -> tuple[ServerConnection, ClientConnection]:
    server = server or make_server()
    client = client or make_client()
    [hello] = pump(client, server)
    assert isinstance(hello, Hello)
    [welcome] = pump(server, client)
    assert isinstance(welcome, Welcome) and client.state == "open"
    return server, client


def sent(conn: ServerConnection | ClientConnection) -> list[Any]:
    """Drain and decode what ``conn`` queued (binary frames as bytes)."""
    return [decode_text(f) if isinstance(f, str) else f for f in conn.data_to_send()]


def rejected(events: list[Any]) -> Error:
    """The error of the single FrameRejected event in ``events``."""
    [event] = events
    assert isinstance(event, FrameRejected), event
    return event.error


def frame(**obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def generate_obj(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": "generate", "request_id": "r1", "prompt": "a red bicycle"}
    obj.update(overrides)
    return obj


# --------------------------------------------------------------------------- codec: round trips

EXAMPLES: list[Any] = [
    Hello(versions=(1,), family_id=FAMILY, client="rise-device/0.1"),
    Hello(
        versions=(1, 2),
        family_id=FAMILY,
        client="kivy app",
        token=TOKEN,
        device_class="mid",
        device_step_s=0.35,
        device_load=0.2,
    ),
    Welcome(version=1, family_id=FAMILY, server="rise-edge/0.1", limits=ProtocolLimits()),
    Welcome(
        version=1,
        family_id=FAMILY,
        server="edge",
        limits=ProtocolLimits(max_steps=50, allowed_sizes=((64, 64),), requests_per_minute=2.5, burst=1),
    ),
    Generate(request_id="r1", prompt="a red bicycle"),
    Generate(
        request_id="req-2:x.y",
        prompt="un vélo rouge 🚲\nsur la plage, style «aquarelle»",
        preference=1,
        seed=2**64 - 1,
        height=512,
        width=768,
        steps=10,
        pinned=PLAN,
        device_load=0.0,
        rtt_s=0.042,
        bandwidth_bps=2.5e7,
    ),
    Generate(request_id="r3", prompt="", pinned=EDGE_PLAN),
    Plan(request_id="r1", plan=PLAN, seed=0, height=512, width=512, scheduler="linucb", why="mid complexity, good link"),
    Plan(request_id="r1", plan=PLAN, seed=0, height=512, width=512, scheduler="linucb", why="", loading_s=7.5),
    Progress(request_id="r1", stage="edge", step=0, total=4),
    Progress(request_id="r1", stage="device", step=6, total=6),
    HandoffAnnouncement(request_id="r1", nbytes=12345),
    HandoffAnnouncement(request_id="r1", nbytes=1, edge_compute_s=0.5, queue_s=0.01),
    ResultAnnouncement(request_id="r1", nbytes=100, height=64, width=64, edge_compute_s=1.25),
    Report(request_id="r1", device_compute_s=1.5, transfer_s=0.02, total_latency_s=2.0),
    Report(
        request_id="r1",
        device_compute_s=0,
        transfer_s=0.0,
        total_latency_s=86400,
        device_load=1.0,
        rtt_s=0.0,
        bandwidth_bps=1e6,
        rating=-1,
    ),
    Rating(request_id="r1", rating=1),
    Cancel(request_id="r1"),
    Error(code="bad_message", message="frame: not valid JSON"),
    Error(code="busy", message="queue full", request_id="r9", retry_after_s=2.5),
    Error(code="invalid_request", message="prompt: too long", request_id="r1", field="prompt"),
]


def test_examples_cover_every_message_type():
    assert {type(m).TYPE for m in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    text = encode(message)
    obj = json.loads(text)
    assert obj["type"] == message.TYPE
    omitted = {name for name in message.OMIT_IF_NONE if getattr(message, name) is None}
    assert set(obj) == {"type"} | {f.name for f in dataclasses.fields(message)} - omitted  # every field written
    back = decode_text(text)
    assert back == message and type(back) is type(message)
    assert encode(back) == text


@pytest.mark.parametrize("code", ERROR_CODES)
def test_every_error_code_round_trips(code):
    retry = 1.5 if code in ("busy", "rate_limited") else None
    error = Error(code=code, message=f"{code} happened", request_id="r1", retry_after_s=retry)
    assert decode_text(encode(error)) == error
    assert ProtocolError("x", code=code, retry_after_s=retry).to_error().code == code


def test_numbers_normalize_and_token_is_not_in_repr():
    report = Report(request_id="r1", device_compute_s=1, transfer_s=0, total_latency_s=3)
    assert isinstance(report.device_compute_s, float) and report.device_compute_s == 1.0
    hello = Hello(versions=[1], family_id=FAMILY, client="c", token=TOKEN)
    assert hello.versions == (1,)
    assert TOKEN not in repr(hello)


def test_hello_ignores_unknown_fields_but_other_messages_reject_them():
    hello = decode_text(frame(type="hello", versions=[1, 7], family_id=FAMILY, client="c", future_field={"x": 1}))
    assert isinstance(hello, Hello) and hello.versions == (1, 7)
    with pytest.raises(ProtocolError) as info:
        decode_text(frame(**generate_obj(sede=3)))
    assert (info.value.code, info.value.field) == ("bad_message", "sede")


def test_optional_fields_may_be_omitted_or_null():
    a = decode_text(frame(**generate_obj()))
    b = decode_text(frame(**generate_obj(seed=None, pinned=None, height=None, width=None)))
    assert a == b == Generate(request_id="r1", prompt="a red bicycle")


# --------------------------------------------------------------------------- codec: rejections

LIMITS = ProtocolLimits(max_prompt_chars=20, max_prompt_bytes=30, max_steps=50, max_payload_bytes=10_000)

# (frame text, expected code, expected field, fragment of the message)
BAD_FRAMES: list[tuple[str, str, str | None, str, str]] = [
    ("not-json", "{not json", "bad_message", "frame", "not valid JSON"),
    ("nan", '{"type": "progress", "request_id": "r1", "stage": "edge", "step": NaN, "total": 4}', "bad_message", "frame", "NaN"),
    ("duplicate-key", '{"type": "cancel", "request_id": "r1", "request_id": "r2"}', "bad_message", "frame", "duplicate key"),
    ("deep-nesting", '{"type": "cancel", "request_id": ' + "[" * 20000 + "]" * 20000 + "}", "bad_message", "frame", "JSON"),
    ("array", "[1, 2]", "bad_message", "frame", "a JSON object"),
    ("no-type", '{"request_id": "r1"}', "bad_message", "type", "one of"),
    ("type-not-str", '{"type": 3}', "bad_message", "type", "one of"),
    ("unknown-type", '{"type": "ping"}', "bad_message", "type", "'ping'"),
    ("missing-field", frame(type="generate", request_id="r1"), "bad_message", "prompt", "missing field"),
    ("unknown-field", frame(**generate_obj(colour="red")), "bad_message", "colour", "unknown field"),
    ("bool-not-int", frame(**generate_obj(steps=True)), "bad_message", "steps", "an integer, got bool"),
    ("bool-not-number", frame(**generate_obj(preference=False)), "bad_message", "preference", "a number, got bool"),
    ("str-not-number", frame(**generate_obj(preference="0.5")), "bad_message", "preference", "a number, got str"),
    ("float-not-int", frame(**generate_obj(seed=1.0)), "bad_message", "seed", "an integer, got float"),
    ("overflow-inf", frame(**generate_obj()).replace('"r1"', '"r1", "preference": 1e400'), "invalid_request", "preference", "finite"),
    ("huge-int-float", frame(**generate_obj(preference=10**400)), "invalid_request", "preference", "finite"),
    ("huge-int", frame(**generate_obj(seed=10**30)), "invalid_request", "seed", "[0, 18446744073709551615]"),
    ("preference-range", frame(**generate_obj(preference=1.5)), "invalid_request", "preference", "[0, 1]"),
    ("negative-seed", frame(**generate_obj(seed=-1)), "invalid_request", "seed", "got -1"),
    ("prompt-chars", frame(**generate_obj(prompt="x" * 21)), "invalid_request", "prompt", "at most 20 characters"),
    ("prompt-bytes", frame(**generate_obj(prompt="é" * 16)), "invalid_request", "prompt", "at most 30 UTF-8 bytes"),
    ("prompt-control", frame(**generate_obj(prompt="a\x00b")), "invalid_request", "prompt", "control"),
    ("prompt-surrogate", '{"type": "generate", "request_id": "r1", "prompt": "a\\ud800"}', "invalid_request", "prompt", "surrogate"),
    ("prompt-type", frame(**generate_obj(prompt=["a"])), "bad_message", "prompt", "a string"),
    ("id-empty", frame(**generate_obj(request_id="")), "bad_message", "request_id", "1-64"),
    ("id-space", frame(**generate_obj(request_id="r 1")), "bad_message", "request_id", "1-64"),
    ("id-long", frame(**generate_obj(request_id="r" * 65)), "bad_message", "request_id", "1-64"),
    ("id-unprintable", frame(**generate_obj(request_id="r\n1")), "bad_message", "request_id", "1-64"),
    ("steps-limit", frame(**generate_obj(steps=51)), "invalid_request", "steps", "at most 50"),
    ("steps-zero", frame(**generate_obj(steps=0)), "invalid_request", "steps", "[1, 1000]"),
    ("size-not-allowed", frame(**generate_obj(height=512, width=1024)), "invalid_request", "height", "512x768"),
    ("size-half", frame(**generate_obj(height=512)), "invalid_request", "width", "together"),
    ("pinned-split", frame(**generate_obj(pinned={**dataclasses.asdict(PLAN), "split": 11})), "invalid_request", "pinned", "split must be"),
    ("pinned-sampler", frame(**generate_obj(pinned={**dataclasses.asdict(PLAN), "sampler": "pndm"})), "invalid_request", "pinned", "unknown sampler"),
    ("pinned-missing", frame(**generate_obj(pinned={"num_inference_steps": 10, "split": 4})), "bad_message", "pinned.decode_on", "missing field"),
    ("pinned-extra", frame(**generate_obj(pinned={**dataclasses.asdict(PLAN), "eta": 0})), "bad_message", "pinned.eta", "unknown field"),
    ("pinned-type", frame(**generate_obj(pinned=[10, 4])), "bad_message", "pinned", "a JSON object"),
    ("pinned-edge-decode", frame(**generate_obj(pinned={**dataclasses.asdict(PLAN), "decode_on": "edge"})), "invalid_request", "pinned", "decode_on='edge'"),
    ("pinned-steps-limit", frame(**generate_obj(pinned={**dataclasses.asdict(PLAN), "num_inference_steps": 60})), "invalid_request", "pinned", "at most 50"),
    ("pinned-vs-steps", frame(**generate_obj(pinned=dataclasses.asdict(PLAN), steps=12)), "invalid_request", "steps", "pinned"),
    ("rtt-range", frame(**generate_obj(rtt_s=-0.1)), "invalid_request", "rtt_s", "[0, 600]"),
    ("bandwidth-zero", frame(**generate_obj(bandwidth_bps=0)), "invalid_request", "bandwidth_bps", "(0,"),
    ("progress-order", frame(type="progress", request_id="r1", stage="edge", step=5, total=4), "invalid_request", "step", "total=4"),
    ("progress-stage", frame(type="progress", request_id="r1", stage="cloud", step=1, total=4), "bad_message", "stage", "'edge'"),
    ("payload-size", frame(type="handoff", request_id="r1", nbytes=10_001), "too_large", "nbytes", "at most 10000"),
    ("report-negative", frame(type="report", request_id="r1", device_compute_s=-1, transfer_s=0, total_latency_s=1), "invalid_request", "device_compute_s", "[0, 86400]"),
    ("rating-range", frame(type="rating", request_id="r1", rating=2), "invalid_request", "rating", "[-1, 1]"),
    ("error-code", frame(type="error", code="oops", message="m"), "bad_message", "code", "one of"),
    ("error-retry-missing", frame(type="error", code="busy", message="m"), "bad_message", "retry_after_s", "a delay"),
    ("error-retry-extra", frame(type="error", code="internal", message="m", retry_after_s=1), "bad_message", "retry_after_s", "null"),
    ("hello-versions", frame(type="hello", versions=[], family_id=FAMILY, client="c"), "bad_message", "versions", "1 to 16"),
    ("hello-version-type", frame(type="hello", versions=["1"], family_id=FAMILY, client="c"), "bad_message", "versions[0]", "an integer"),
    ("welcome-limits", frame(type="welcome", version=1, family_id=FAMILY, server="s", limits={"max_steps": 5}), "bad_message", "limits.allowed_sizes", "missing field"),
    ("plan-scheduler", frame(type="plan", request_id="r1", plan=dataclasses.asdict(PLAN), seed=1, height=64, width=64, scheduler="", why=""), "bad_message", "scheduler", "1-64"),
]


@pytest.mark.parametrize(("text", "code", "field", "fragment"), [c[1:] for c in BAD_FRAMES], ids=[c[0] for c in BAD_FRAMES])
def test_decode_rejections_carry_code_and_field(text, code, field, fragment):
    with pytest.raises(ProtocolError) as info:
        decode_text(text, LIMITS)
    exc = info.value
    assert isinstance(exc, RiseError) and isinstance(exc, ValueError)
    assert (exc.code, exc.field) == (code, field), str(exc)
    assert fragment in str(exc)
    error = exc.to_error()  # always a valid Error, fit to send
    assert error.code == code and decode_text(encode(error)) == error
    assert str(exc).isascii()  # peer values are echoed with ascii()


def test_bad_frame_list_covers_every_decode_code():
    assert {c[2] for c in BAD_FRAMES} == {"bad_message", "invalid_request", "too_large"}


def test_size_limit_comes_first_and_counts_utf8_bytes():
    limits = ProtocolLimits(max_message_bytes=1024)
    # Under the limit in characters but over it in UTF-8 bytes: rejected before parsing.
    text = frame(**generate_obj(prompt="é" * 600))
    assert len(text) < 1024 < len(text.encode())
    with pytest.raises(ProtocolError) as info:
        decode_text(text, limits)
    assert info.value.code == "too_large"
    assert decode_text(frame(**generate_obj(prompt="é" * 400)), limits).prompt == "é" * 400


def test_request_id_is_attached_to_a_rejected_request():
    with pytest.raises(ProtocolError) as info:
        decode_text(frame(**generate_obj(request_id="r7", steps="ten")))
    assert info.value.request_id == "r7" and info.value.to_error().request_id == "r7"


def test_a_malformed_token_is_never_echoed():
    with pytest.raises(ProtocolError) as info:
        decode_text(frame(type="hello", versions=[1], family_id=FAMILY, client="c", token="my secret"))
    assert info.value.field == "token" and "secret" not in str(info.value)


def test_messages_validate_on_construction():
    with pytest.raises(ProtocolError, match="preference"):
        Generate(request_id="r1", prompt="x", preference=2.0)
    with pytest.raises(ProtocolError, match="retry_after_s"):
        Error(code="rate_limited", message="slow down")
    with pytest.raises(ProtocolError, match="decode_on='edge'"):
        Plan(request_id="r1", plan=RelayPlan(10, 4, decode_on="edge"), seed=1, height=64, width=64, scheduler="x", why="")


def test_limits_validate_and_load_from_a_table():
    limits = ProtocolLimits.from_dict({"allowed_sizes": [[64, 64], [64, 128]], "max_steps": 20})
    assert limits.allowed_sizes == ((64, 64), (64, 128)) and limits.max_steps == 20
    assert limits.websocket_max_size == limits.max_payload_bytes
    for bad in (
        {"max_steps": 0},
        {"max_steps": 1001},
        {"max_in_flight": True},
        {"requests_per_minute": float("inf")},
        {"allowed_sizes": [[63, 64]]},
        {"allowed_sizes": [[64, 64], [64, 64]]},
        {"max_message_bytes": 100},
        {"max_prompt_char": 10},  # misspelt
    ):
        with pytest.raises(ConfigError):
            ProtocolLimits.from_dict(bad)


# --------------------------------------------------------------------------- state machines: happy paths


def test_full_happy_path_relay():
    server, client = connected()
    assert server.version == client.welcome.version == max(PROTOCOL_VERSIONS)
    assert server.hello is not None and server.hello.family_id == FAMILY

    request = Generate(request_id=client.new_request_id(), prompt="a red bicycle", preference=0.3, rtt_s=0.02)
    client.send_generate(request)
    [event] = pump(client, server, now=1.0)
    assert event == request and server.in_flight == (request.request_id,)
    rid = request.request_id

    server.send_plan(rid, PLAN, seed=7, height=512, width=512, scheduler="linucb", why="simple prompt, fast link")
    for step in range(1, PLAN.split + 1):
        server.send_progress(rid, step, PLAN.split)
    payload = make_payload(rid, PLAN, seed=7)
    server.send_handoff(rid, payload, edge_compute_s=0.8, queue_s=0.1)
    assert server.in_flight == () and server.awaiting_report == (rid,)

    frames = server.data_to_send()
    kinds = [json.loads(f)["type"] if isinstance(f, str) else "binary" for f in frames]
    assert kinds == ["plan"] + ["progress"] * PLAN.split + ["handoff", "binary"]
    events = []
    for _i, f in enumerate(frames):  # the binary frame arrives 0.25 s after its announcement
        now = 2.0 + (0.25 if isinstance(f, bytes) else 0.0)
        events += client.receive_text(f, now) if isinstance(f, str) else client.receive_bytes(f, now)
    plan, *progress, received = events
    assert isinstance(plan, Plan) and plan.plan == PLAN and plan.why.startswith("simple")
    assert [p.step for p in progress] == [1, 2, 3, 4] and all(isinstance(p, Progress) for p in progress)
    assert isinstance(received, HandoffReceived) and received.request_id == rid
    assert received.payload == payload and received.transfer_s == pytest.approx(0.25)
    assert received.announcement.edge_compute_s == 0.8
    assert received.handoff.split == PLAN.split and received.handoff.latents.shape == (1, 4, 8, 8)
    assert client.in_flight == () and client.delivered == (rid,)

    report = Report(
        request_id=rid, device_compute_s=1.2, transfer_s=received.transfer_s, total_latency_s=2.5,
        device_load=0.4, rtt_s=0.02, bandwidth_bps=len(payload) / received.transfer_s,
    )
    client.send_report(report)
    client.send_rating(rid, 1)
    assert pump(client, server, now=3.0) == [report, Rating(request_id=rid, rating=1)]
    assert server.awaiting_report == () and server.violations == client.violations == 0
    assert server.close is None and client.close is None


def test_edge_decoded_result_path():
    server, client = connected()
    client.send_generate(Generate(request_id="r1", prompt="x", pinned=EDGE_PLAN))
    pump(client, server)
    server.send_plan("r1", EDGE_PLAN, seed=3, height=64, width=64, scheduler="pinned", why="pinned by the user")
    with pytest.raises(ProtocolError, match="decodes on the edge"):
        server.send_handoff("r1", make_payload("r1", EDGE_PLAN, seed=3))
    with pytest.raises(ProtocolError, match="PNG"):
        server.send_result("r1", b"GIF89a...")
    server.send_result("r1", PNG, edge_compute_s=1.0)
    plan, result = pump(server, client, now=5.0)
    assert isinstance(result, ResultReceived) and result.png == PNG
    assert (result.announcement.height, result.announcement.width) == (64, 64)
    client.send_report(Report(request_id="r1", device_compute_s=0, transfer_s=0.01, total_latency_s=1.5))
    assert isinstance(pump(client, server)[0], Report)


def test_version_negotiation_picks_the_highest_common_version():
    server = make_server(versions=(1, 2))
    client = make_client(versions=(1, 2, 3))
    server, client = connected(server, client)
    assert server.version == client.welcome.version == 2


def test_no_token_configured_accepts_any_client():
    server, client = connected(make_server(token=None), make_client(token=None))
    assert server.state == "open"


# --------------------------------------------------------------------------- state machines: hello failures


@pytest.mark.parametrize(
    ("client_kwargs", "code", "close_code"),
    [
        (dict(token="wrong-token"), "unauthorized", CLOSE_POLICY_VIOLATION),
        (dict(token=None), "unauthorized", CLOSE_POLICY_VIOLATION),
        (dict(versions=(3, 4)), "unsupported_version", CLOSE_PROTOCOL_ERROR),
        (dict(family_id="sdxl"), "wrong_family", CLOSE_POLICY_VIOLATION),
    ],
)
def test_hello_failures_are_fatal(client_kwargs, code, close_code):
    server, client = make_server(), make_client(**client_kwargs)
    error = rejected(pump(client, server))
    assert error.code == code and server.close is not None and server.close.code == close_code
    assert server.state == "hello" and server.hello is None
    [to_client] = pump(server, client)
    assert isinstance(to_client, Error) and to_client.code == code
    assert server.receive_text(encode(Generate(request_id="r1", prompt="x")), 0.0) == []  # closing: ignored
    assert TOKEN not in error.message


@pytest.mark.parametrize(
    ("send", "close_code"),
    [
        (lambda s: s.receive_text(encode(Generate(request_id="r1", prompt="x")), 0.0), CLOSE_PROTOCOL_ERROR),
        (lambda s: s.receive_text(encode(Cancel(request_id="r1")), 0.0), CLOSE_PROTOCOL_ERROR),
        (lambda s: s.receive_text("garbage", 0.0), CLOSE_PROTOCOL_ERROR),
        (lambda s: s.receive_bytes(b"\x00\x01", 0.0), CLOSE_PROTOCOL_ERROR),
        (lambda s: s.receive_text(" " * 70_000, 0.0), CLOSE_MESSAGE_TOO_BIG),
    ],
    ids=["generate", "cancel", "garbage", "binary", "oversized"],
)
def test_anything_before_hello_is_fatal(send, close_code):
    server = make_server()
    error = rejected(send(server))
    assert error.code in ("bad_message", "too_large") and server.close.code == close_code
    assert [type(m) for m in sent(server)] == [Error]


def test_a_second_hello_is_rejected_but_not_fatal():
    server, client = connected()
    error = rejected(server.receive_text(encode(client.hello), 0.0))
    assert error.code == "bad_message" and "second hello" in error.message and server.close is None


# --------------------------------------------------------------------------- state machines: requests


def accept(server: ServerConnection, rid: str, now: float = 0.0, **kwargs: Any) -> list[Any]:
    return server.receive_text(encode(Generate(request_id=rid, prompt="p", **kwargs)), now)


def test_duplicate_request_id_is_rejected_without_ending_the_live_request():
    server, _ = connected()
    assert isinstance(accept(server, "r1")[0], Generate)
    error = rejected(accept(server, "r1"))
    assert error.code == "invalid_request" and error.field == "request_id" and error.request_id is None
    assert server.in_flight == ("r1",)
    # The same holds for an invalid frame that reuses the live id.
    error = rejected(server.receive_text(frame(**generate_obj(request_id="r1", steps="x")), 0.0))
    assert error.request_id is None and server.in_flight == ("r1",)


def test_in_flight_limit():
    server, client = connected(make_server(limits=ProtocolLimits(max_in_flight=2)))
    for rid in ("a", "b"):
        assert isinstance(accept(server, rid)[0], Generate)
    error = rejected(accept(server, "c"))
    assert (error.code, error.request_id) == ("too_many_in_flight", "c") and server.violations == 0
    server.send_error("a", "busy", "queue full", retry_after_s=3.0)  # ends "a": a slot frees up
    assert isinstance(accept(server, "c")[0], Generate)
    assert server.in_flight == ("b", "c")


def test_rate_limit_with_a_fake_clock():
    limits = ProtocolLimits(requests_per_minute=60.0, burst=2, max_in_flight=100)
    server, _ = connected(make_server(limits=limits))
    assert isinstance(accept(server, "r1", now=100.0)[0], Generate)
    assert isinstance(accept(server, "r2", now=100.0)[0], Generate)
    error = rejected(accept(server, "r3", now=100.0))
    assert error.code == "rate_limited" and error.request_id == "r3"
    assert error.retry_after_s == pytest.approx(1.0)
    error = rejected(accept(server, "r3", now=100.5))
    assert error.retry_after_s == pytest.approx(0.5)
    assert isinstance(accept(server, "r3", now=101.0)[0], Generate)
    assert server.violations == 0 and server.close is None  # flow control is not a violation


def test_token_bucket_refills_to_burst_and_ignores_a_clock_going_back():
    bucket = TokenBucket(rate_per_s=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(-10.0) == pytest.approx(0.5)  # no refill from a backwards clock
    assert bucket.take(100.0) == 0.0  # refilled, but only to burst
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


def test_bad_requests_fail_alone_and_the_connection_carries_on():
    server, client = connected()
    error = rejected(server.receive_text(frame(**generate_obj(prompt="x" * 5000)), 0.0))
    assert (error.code, error.request_id, error.field) == ("invalid_request", "r1", "prompt")
    error = rejected(server.receive_text("{" * 10 + " " * 70_000, 0.0))
    assert error.code == "too_large"
    error = rejected(server.receive_bytes(b"\x89PNG...", 0.0))
    assert error.code == "bad_message" and "binary" in error.message
    error = rejected(server.receive_text(encode(Plan(request_id="r1", plan=PLAN, seed=1, height=64, width=64, scheduler="x", why="")), 0.0))
    assert error.code == "bad_message" and "only a server sends" in error.message
    assert server.close is None and server.violations == 4
    assert isinstance(accept(server, "r1")[0], Generate)
    replies = pump(server, client)
    assert [type(m) for m in replies] == [Error] * 4  # the client sees the errors as events
    assert client.violations == 0


def test_too_many_violations_close_the_connection():
    server, _ = connected(make_server(limits=ProtocolLimits(max_violations=3)))
    for _ in range(2):
        [event] = server.receive_text("nope", 0.0)
        assert not event.fatal
    [event] = server.receive_text("nope", 0.0)
    assert event.fatal and server.close.code == CLOSE_POLICY_VIOLATION


def test_cancel_drops_updates_and_ends_with_cancelled():
    server, client = connected()
    client.send_generate(Generate(request_id="r1", prompt="p"))
    pump(client, server)
    server.send_plan("r1", PLAN, seed=1, height=512, width=512, scheduler="linucb", why="w")
    client.send_cancel("r1")
    client.send_cancel("nope")  # not in flight: nothing sent
    [cancel] = pump(client, server)
    assert cancel == Cancel(request_id="r1")
    assert server.receive_text(encode(Cancel(request_id="r1")), 0.0) == []  # repeated: ignored
    assert server.receive_text(encode(Cancel(request_id="zz")), 0.0) == []  # unknown (a race): ignored
    server.send_progress("r1", 1, 4)  # dropped
    server.send_handoff("r1", make_payload("r1", PLAN, seed=1))  # becomes the cancellation
    assert server.in_flight == () and server.awaiting_report == ()
    plan, error = pump(server, client)
    assert isinstance(plan, Plan) and isinstance(error, Error)
    assert (error.code, error.request_id) == ("cancelled", "r1") and client.in_flight == ()


REPORT = Report(request_id="r1", device_compute_s=1.5, transfer_s=0.02, total_latency_s=2.0)


def test_reports_and_ratings_need_a_delivered_request():
    server, client = connected()
    error = rejected(server.receive_text(encode(REPORT), 0.0))
    assert error.code == "invalid_request" and "awaiting a report" in error.message
    error = rejected(server.receive_text(encode(Rating(request_id="r1", rating=1)), 0.0))
    assert error.code == "invalid_request"
    accept(server, "r1")
    server.send_plan("r1", PLAN, seed=7, height=512, width=512, scheduler="s", why="")
    server.send_handoff("r1", make_payload("r1"))
    assert isinstance(server.receive_text(encode(Rating(request_id="r1", rating=0)), 0.0)[0], Rating)
    assert isinstance(server.receive_text(encode(REPORT), 0.0)[0], Report)
    assert rejected(server.receive_text(encode(REPORT), 0.0)).code == "invalid_request"  # only once
    assert isinstance(server.receive_text(encode(Rating(request_id="r1", rating=-1)), 0.0)[0], Rating)
    assert rejected(accept(server, "r1")).field == "request_id"  # a finished id is not reused


def test_device_error_for_a_delivered_request_ends_it():
    server, client = connected()
    client.send_generate(Generate(request_id="r1", prompt="p"))
    pump(client, server)
    server.send_plan("r1", PLAN, seed=7, height=512, width=512, scheduler="s", why="")
    server.send_handoff("r1", make_payload("r1"))
    pump(server, client)
    client.send_error("r1", "internal", "onnxruntime failed")
    [error] = pump(client, server)
    assert isinstance(error, Error) and error.request_id == "r1" and server.awaiting_report == ()
    assert client.delivered == ()
    client.send_generate(Generate(request_id="r2", prompt="p"))
    with pytest.raises(ProtocolError, match="in flight") as info:
        client.send_error("r2", "internal", "x")
    assert info.value.code == "internal"


def test_server_send_side_checks_catch_adapter_bugs():
    server, _ = connected()
    accept(server, "r1", seed=5)
    accept(server, "r2", pinned=PLAN)
    with pytest.raises(ProtocolError, match="send the plan") as info:
        server.send_handoff("r1", make_payload("r1"))
    assert info.value.code == "internal"
    with pytest.raises(ProtocolError, match="not in flight"):
        server.send_progress("zz", 1, 2)
    with pytest.raises(ProtocolError, match="seed"):
        server.send_plan("r1", PLAN, seed=6, height=512, width=512, scheduler="s", why="")  # the request fixed 5
    with pytest.raises(ProtocolError, match="pinned"):
        server.send_plan("r2", RelayPlan(10, 5), seed=1, height=512, width=512, scheduler="s", why="")
    with pytest.raises(ProtocolError, match="internal|at most"):
        server.send_plan("r1", RelayPlan(200, 5), seed=5, height=512, width=512, scheduler="s", why="")
    server.send_plan("r1", PLAN, seed=5, height=512, width=512, scheduler="s", why="")
    server.send_plan("r2", PLAN, seed=5, height=512, width=512, scheduler="s", why="")
    with pytest.raises(ProtocolError, match="already has a plan"):
        server.send_plan("r1", PLAN, seed=5, height=512, width=512, scheduler="s", why="")
    with pytest.raises(ProtocolError, match="step: expected at most total"):
        server.send_progress("r1", 5, 4)
    # Cross-wired batch: r2's latent sent as r1's, or a payload for another family or seed.
    for payload in (make_payload("r2", seed=5), make_payload("r1", seed=6), make_payload("r1", seed=5, family="sdxl")):
        with pytest.raises(ProtocolError) as info:
            server.send_handoff("r1", payload)
        assert info.value.code == "internal"
    with pytest.raises(ProtocolError, match="decodes on the device"):
        server.send_result("r1", PNG)
    assert server.in_flight == ("r1", "r2")  # nothing was sent but the two plans
    assert [type(m) for m in sent(server)] == [Plan, Plan]
    server.send_handoff("r1", make_payload("r1", seed=5))
    assert server.in_flight == ("r2",)


def test_shutting_down_closes_and_later_sends_are_dropped():
    server, _ = connected()
    accept(server, "r1")
    server.data_to_send()
    server.send_error(None, "shutting_down", "restarting")
    assert server.close.code == CLOSE_GOING_AWAY
    server.send_plan("r1", PLAN, seed=1, height=512, width=512, scheduler="s", why="")  # dropped, no raise
    assert [m.code for m in sent(server)] == ["shutting_down"]
    assert server.connection_closed() == ("r1",) and server.in_flight == ()


# --------------------------------------------------------------------------- client side


def planned_client(plan: RelayPlan = PLAN) -> tuple[ServerConnection, ClientConnection]:
    server, client = connected()
    client.send_generate(Generate(request_id="r1", prompt="p"))
    pump(client, server)
    server.send_plan("r1", plan, seed=7, height=512, width=512, scheduler="s", why="")
    pump(server, client)
    return server, client


def test_client_checks_requests_against_the_server_limits_before_sending():
    limits = ProtocolLimits(max_prompt_chars=10, max_in_flight=1, allowed_sizes=())
    server, client = connected(make_server(limits=limits))
    assert client.server_limits == limits
    with pytest.raises(ProtocolError) as info:
        client.send_generate(Generate(request_id="r1", prompt="a very long prompt"))
    assert (info.value.code, info.value.field, info.value.request_id) == ("invalid_request", "prompt", "r1")
    with pytest.raises(ProtocolError, match="only the family's default size"):
        client.send_generate(Generate(request_id="r1", prompt="short", height=512, width=512))
    client.send_generate(Generate(request_id="r1", prompt="short"))
    with pytest.raises(ProtocolError) as info:
        client.send_generate(Generate(request_id="r2", prompt="short"))
    assert info.value.code == "too_many_in_flight"
    with pytest.raises(ProtocolError) as info:
        client.send_generate(Generate(request_id="r1", prompt="short"))
    assert info.value.code == "invalid_request"
    assert [type(m) for m in sent(client)] == [Generate]


def test_client_cannot_generate_before_the_welcome():
    client = make_client()
    with pytest.raises(ProtocolError, match="welcome"):
        client.send_generate(Generate(request_id="r1", prompt="p"))
    assert [type(m) for m in sent(client)] == [Hello]


def test_client_rejects_a_bad_welcome():
    client = make_client()
    client.data_to_send()
    welcome = Welcome(version=1, family_id="other", server="s", limits=ProtocolLimits())
    error = rejected(client.receive_text(encode(welcome), 0.0))
    assert error.code == "wrong_family" and client.close.code == CLOSE_POLICY_VIOLATION
    client = make_client()
    error = rejected(client.receive_text(encode(Progress(request_id="r1", stage="edge", step=1, total=2)), 0.0))
    assert error.code == "bad_message" and client.close.code == CLOSE_PROTOCOL_ERROR


def test_client_passes_on_a_refused_hello():
    server, client = make_server(), make_client(token="bad-token")
    pump(client, server)
    [error] = pump(server, client)
    assert isinstance(error, Error) and error.code == "unauthorized" and client.welcome is None


def test_client_rejects_an_unannounced_binary_frame():
    _, client = planned_client()
    error = rejected(client.receive_bytes(make_payload(), 0.0))
    assert error.code == "bad_message" and client.in_flight == ("r1",)


def test_client_fails_a_request_whose_binary_frame_does_not_follow_its_announcement():
    server, client = planned_client()
    client.receive_text(encode(HandoffAnnouncement(request_id="r1", nbytes=100)), 0.0)
    events = client.receive_text(encode(Error(code="internal", message="late")), 0.0)
    assert isinstance(events[0], FrameRejected) and events[0].request_id == "r1" and isinstance(events[1], Error)
    assert client.in_flight == ()
    [error] = [m for m in sent(client) if isinstance(m, Error)]
    assert error.request_id == "r1" and error.code == "bad_message"


FULL = make_payload("r1", seed=7)


@pytest.mark.parametrize(
    ("payload", "nbytes", "code"),
    [
        (FULL[:-4], len(FULL), "bad_handoff"),  # shorter than announced
        (make_payload("r2", seed=7), None, "bad_handoff"),  # another request's handoff
        (make_payload("r1", seed=8), None, "bad_handoff"),  # disagrees with the plan's seed
        (make_payload("r1", RelayPlan(10, 5), seed=7), None, "bad_handoff"),  # another split
        (make_payload("r1", seed=7, family="sdxl"), None, "wrong_family"),
        (b"\x00" * 64, None, "bad_handoff"),  # not a handoff at all
    ],
    ids=["truncated", "other-request", "other-seed", "other-split", "other-family", "garbage"],
)
def test_client_checks_the_handoff_against_its_announcement_and_plan(payload, nbytes, code):
    server, client = planned_client()
    announcement = HandoffAnnouncement(request_id="r1", nbytes=nbytes or len(payload))
    assert client.receive_text(encode(announcement), 0.0) == []
    error = rejected(client.receive_bytes(payload, 0.5))
    assert (error.code, error.request_id) == (code, "r1")
    assert client.in_flight == () and client.delivered == ()
    # The error reaches the server as an event and closes the request there too.
    server.send_handoff("r1", FULL)
    server.data_to_send()
    assert server.awaiting_report == ("r1",)
    [event] = pump(client, server)
    assert isinstance(event, Error) and event.code == code and server.awaiting_report == ()


def test_client_discards_the_binary_frame_of_a_bogus_announcement():
    _, client = planned_client(EDGE_PLAN)
    error = rejected(client.receive_text(encode(HandoffAnnouncement(request_id="r1", nbytes=10)), 0.0))
    assert error.request_id == "r1" and client.in_flight == ()
    assert client.receive_bytes(b"x" * 10, 0.0) == []  # consumed silently: pairing stays in step
    error = rejected(client.receive_text(encode(ResultAnnouncement(request_id="zz", nbytes=10, height=8, width=8)), 0.0))
    assert error.request_id is None
    assert client.receive_bytes(b"y" * 10, 0.0) == []


def test_client_rejects_frames_only_a_client_sends_and_unknown_requests():
    _, client = planned_client()
    assert rejected(client.receive_text(encode(Cancel(request_id="r1")), 0.0)).code == "bad_message"
    assert rejected(client.receive_text(encode(Progress(request_id="zz", stage="edge", step=1, total=2)), 0.0)).code == "bad_message"
    error = rejected(client.receive_text(frame(type="plan", request_id="r1"), 0.0))
    assert error.request_id is None and client.in_flight == ("r1",)  # garbled: the request lives on


# --------------------------------------------------------------------------- fuzzing

FIELD_NAMES = sorted({f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)})
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.just(10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["r1", "r2", FAMILY, TOKEN, "edge", "device", "png", "busy", "dpmpp_2m", "euler", "\ud800"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)
structured_frames = st.builds(
    lambda kind, fields: json.dumps({"type": kind, **fields}),
    st.sampled_from(sorted(MESSAGE_TYPES) + ["bogus"]),
    st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=8),
)
# Valid frames for this test's connections: the examples, and a welcome/plan/progress the fuzzed client can accept.
VALID_OBJS = [json.loads(encode(m)) for m in EXAMPLES] + [
    json.loads(encode(m))
    for m in (
        Welcome(version=1, family_id=FAMILY, server="s", limits=ProtocolLimits()),
        Progress(request_id="r1", stage="edge", step=1, total=4),
        HandoffAnnouncement(request_id="r1", nbytes=len(FULL)),
    )
]


def _paths(obj: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every field of a frame object, nested objects (plan, pinned, limits) included."""
    paths: list[tuple[str, ...]] = []
    for key, value in obj.items():
        paths.append((key,))
        if isinstance(value, dict):
            paths += [(key, inner) for inner in value]
    return paths


def _mutated(obj: dict[str, Any], path: tuple[str, ...], value: Any, delete: bool) -> str:
    obj = json.loads(json.dumps(obj))
    target = obj
    for key in path[:-1]:
        target = target[key]
    if delete:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return json.dumps(obj)


# One field of a valid frame replaced by a random JSON value (or removed): reaches the deep checks.
near_valid_frames = st.sampled_from(VALID_OBJS).flatmap(
    lambda obj: st.builds(_mutated, st.just(obj), st.sampled_from(_paths(obj)), json_values, st.booleans())
)
valid_frames = st.sampled_from([json.dumps(obj) for obj in VALID_OBJS])
frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    structured_frames,
    near_valid_frames,
    valid_frames,
    st.just(encode(Hello(versions=(1,), family_id=FAMILY, client="fuzz", token=TOKEN))),  # opens a fresh server
    st.just(FULL[: len(FULL) // 2]),
    st.just(FULL),
    st.just("x" * 70_000),
)


def _feed(conn: ServerConnection | ClientConnection, items: list[str | bytes]) -> list[Any]:
    """Feed frames; check the answers are lists and that everything queued for the peer is well-formed."""
    events: list[Any] = []
    for i, item in enumerate(items):
        got = conn.receive_text(item, float(i)) if isinstance(item, str) else conn.receive_bytes(item, float(i))
        assert isinstance(got, list)
        events += got
    rejections = sum(isinstance(e, FrameRejected) for e in events)
    errors = 0
    for out in conn.data_to_send():
        if isinstance(out, str):
            message = decode_text(out, ProtocolLimits(max_steps=1000))  # what we send always decodes
            errors += isinstance(message, Error)
    assert errors >= rejections  # every rejected frame was answered with an error
    return events


def _stats(events: list[Any], stats: Counter[str]) -> None:
    for event in events:
        if isinstance(event, FrameRejected):
            stats["rejected:" + event.error.code] += 1
            stats["fatal"] += event.fatal
        else:
            stats[type(event).__name__] += 1


FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def test_server_answers_any_frames_with_events_never_exceptions():
    stats: Counter[str] = Counter()

    # The random mix may or may not reach an accepted generate (it shifts whenever a message
    # gains a field); this explicit case makes sure the checks below are exercised on one.
    accepted = [encode(next(m for m in EXAMPLES if isinstance(m, Generate)))]

    @FUZZ
    @given(items=st.lists(frames, min_size=1, max_size=6), handshake=st.booleans())
    @example(items=accepted, handshake=True)
    def run(items: list[str | bytes], handshake: bool) -> None:
        server = make_server(limits=ProtocolLimits(max_in_flight=2, burst=2))
        if handshake:
            connected(server)
        events = _feed(server, items)
        assert all(isinstance(e, (Hello, Generate, Cancel, Report, Rating, Error, FrameRejected)) for e in events)
        assert len(server.in_flight) <= 2
        _stats(events, stats)

    run()
    # Not vacuous: the mix reaches acceptance, every decode rejection category, and fatal closes.
    assert stats["Generate"] and stats["Hello"] and stats["fatal"], stats
    assert stats["rejected:bad_message"] and stats["rejected:invalid_request"] and stats["rejected:too_large"]


def test_client_answers_any_frames_with_events_never_exceptions():
    stats: Counter[str] = Counter()

    # As for the server: the random mix shifts whenever a message gains a field; these explicit cases make sure
    # a welcome is accepted and a frame the client cannot take closes it.
    welcome = encode(Welcome(version=1, family_id=FAMILY, server="s", limits=ProtocolLimits()))

    @FUZZ
    @given(items=st.lists(frames, min_size=1, max_size=6), state=st.sampled_from(["hello", "planned", "announced"]))
    @example(items=[welcome], state="hello")
    @example(items=[FULL], state="hello")
    def run(items: list[str | bytes], state: str) -> None:
        if state == "hello":
            client = make_client()
            client.data_to_send()
        else:
            _, client = planned_client()
        if state == "announced":  # the client now expects a binary frame: random bytes hit the handoff decoder
            client.receive_text(encode(HandoffAnnouncement(request_id="r1", nbytes=len(FULL))), 0.0)
        events = _feed(client, items)
        allowed = (Welcome, Plan, Progress, HandoffReceived, ResultReceived, Error, FrameRejected)
        assert all(isinstance(e, allowed) for e in events)
        _stats(events, stats)

    run()
    assert stats["HandoffReceived"] and stats["Welcome"] and stats["fatal"]
    assert stats["rejected:bad_handoff"] and stats["rejected:bad_message"] and stats["rejected:too_large"]
