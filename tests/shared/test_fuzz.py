"""Property-based fuzzing of the two decoders a network peer can reach: the protocol's text
frames (and the connection state machines around them) and the handoff codec.

Structured mutations: start from valid frames / payloads and change one thing at a time
(a field's type, NaN/Inf, huge numbers, control characters, truncation at every offset
class, oversize, duplicate keys, a wrong family, a replayed request id, a handoff frame
with no announcement...). The properties, for every case:

* nothing but the documented error comes out (``ProtocolError`` with a code from
  ``ERROR_CODES``; a ``HandoffError`` subclass with a stable ``code``), never a crash;
* every decode finishes fast (no hang, no quadratic blow-up): ``MAX_DECODE_S`` each;
* a rejected frame's error is itself a sendable, decodable ``error`` frame;
* what is accepted re-encodes to a frame that decodes to the same message.

The normal suite runs ``EXAMPLES`` cases in all (>= 10,000, ~40 s on one core);
``bench/fuzz.py --examples 200000`` runs more and prints counts per error code.
Set ``RISE_FUZZ_SCALE`` (a float, default 1) to scale every test's example count.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import HandoffError
from shared.handoff import METADATA_KEY, Handoff, HandoffLimits, decode_handoff, encode_handoff
from shared.protocol import (
    ERROR_CODES,
    MESSAGE_TYPES,
    PNG_SIGNATURE,
    Cancel,
    ClientConnection,
    Error,
    FrameRejected,
    Generate,
    HandoffAnnouncement,
    HandoffReceived,
    Hello,
    Message,
    Plan,
    Progress,
    ProtocolError,
    ProtocolLimits,
    Rating,
    Report,
    ResultAnnouncement,
    ResultReceived,
    ServerConnection,
    Welcome,
    decode_text,
    encode,
    protocol_error_from_handoff,
)
from shared.relay_plan import RelayPlan
from shared.samplers import SamplerState

FAMILY = "tiny-sd"
TOKEN = "fuzz-Token_1"
MAX_DECODE_S = 2.0  # per decode (a hang detector on a shared CPU); real ones take microseconds to milliseconds
SLOWEST: dict[str, float] = {}  # the slowest decode seen per test, printed by bench/fuzz.py
SCALE = float(os.environ.get("RISE_FUZZ_SCALE", "1"))
HANDOFF_CODES = frozenset({"too_large", "malformed", "invalid", "wrong_family"})

#: Examples per test in the normal suite (sum >= 10,000).
EXAMPLES = {"text": 4000, "handoff": 3500, "server": 1500, "client": 1500}


def _settings(kind: str) -> settings:
    return settings(
        max_examples=max(1, int(EXAMPLES[kind] * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def _timed(fn: Callable[[], Any], kind: str = "decode") -> tuple[Any, float]:
    started = time.perf_counter()
    try:
        out = fn()
    except BaseException as exc:
        out = exc
    seconds = time.perf_counter() - started
    if seconds > 0.02 and kind in ("text", "handoff"):  # pure decoders: re-time, so a scheduler stall
        again = time.perf_counter()                     # on a shared CPU is not taken for a slow input
        try:
            fn()
        except BaseException:
            pass
        seconds = min(seconds, time.perf_counter() - again)
    SLOWEST[kind] = max(SLOWEST.get(kind, 0.0), seconds)
    return out, seconds


# --------------------------------------------------------------------------- values

HUGE_INTS = [2**31, 2**63, 2**64, -(2**63) - 1, 10**30, -1, 0]
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 5000, "1.0e-400", "-0", "0.0"]
BAD_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x1bb",
    "\x7f",
    "\u0085",
    "\ud800",  # a lone surrogate (json.dumps escapes it; the decoder must reject, not crash)
    "\u200d",
    "x" * 2000,
    "é" * 700,
    "../../etc/passwd",
    "r1",
    "tiny-sd",
    "sdxl",
]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.sampled_from(HUGE_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(BAD_STRINGS),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)
RAW = "\x01RAW\x01"  # a placeholder string replaced by a raw JSON token after dumping
weird_value = st.one_of(json_value, st.sampled_from(RAW_TOKENS).map(lambda t: RAW + t))


def _dumps(obj: Any, ensure_ascii: bool = False) -> str:
    text = json.dumps(obj, ensure_ascii=ensure_ascii)
    for token in RAW_TOKENS:  # splice raw tokens (NaN, 1e400, 5000-digit ints) in place of their placeholder
        text = text.replace(json.dumps(RAW + token, ensure_ascii=ensure_ascii), token)
    return text


# --------------------------------------------------------------------------- valid protocol frames

PLAN = RelayPlan(num_inference_steps=10, split=4, sampler="dpmpp_2m", guidance_scale=7.5)
EDGE_PLAN = RelayPlan(num_inference_steps=6, split=6, sampler="euler", guidance_scale=5.0, decode_on="edge")

VALID_MESSAGES: list[Message] = [
    Hello(versions=(1,), family_id=FAMILY, client="fuzz/1.0", token=TOKEN, device_class="mid", device_step_s=0.2,
          device_load=0.3),
    Welcome(version=1, family_id=FAMILY, server="rise-edge", limits=ProtocolLimits()),
    Generate(request_id="r1", prompt="a red sneaker", preference=0.7, seed=3, height=512, width=512, steps=10,
             device_load=0.1, rtt_s=0.02, bandwidth_bps=1e7),
    Generate(request_id="r2", prompt="p", pinned=PLAN),
    Plan(request_id="r1", plan=PLAN, seed=7, height=512, width=512, scheduler="linucb", why="because"),
    Plan(request_id="r3", plan=EDGE_PLAN, seed=7, height=512, width=512, scheduler="pinned", why=""),
    Progress(request_id="r1", stage="edge", step=2, total=4),
    HandoffAnnouncement(request_id="r1", nbytes=1000, edge_compute_s=0.5, queue_s=0.01),
    ResultAnnouncement(request_id="r3", nbytes=100, height=512, width=512, edge_compute_s=1.0),
    Report(request_id="r1", device_compute_s=0.4, transfer_s=0.01, total_latency_s=1.2, device_load=0.4,
           rtt_s=0.01, bandwidth_bps=5e6, rating=1),
    Rating(request_id="r1", rating=-1),
    Cancel(request_id="r1"),
    Error(code="busy", message="queue full", request_id="r1", retry_after_s=1.5),
    Error(code="bad_message", message="frame: x", field="frame"),
]
VALID_OBJECTS = [json.loads(encode(m)) for m in VALID_MESSAGES]


@st.composite
def mutated_frame(draw: st.DrawFn) -> tuple[str, str]:
    """A valid frame changed in one structured way; returns (kind of mutation, frame)."""
    obj = json.loads(json.dumps(draw(st.sampled_from(VALID_OBJECTS))))  # deep copy
    keys = sorted(obj)
    kind = draw(
        st.sampled_from(
            ["valid", "value", "value", "delete", "unknown", "type", "nested", "truncate", "dup_key", "oversize",
             "prompt_limit", "deep", "garbage", "non_object"]
        )
    )
    if kind == "valid":
        return kind, json.dumps(obj)
    if kind == "value":
        obj[draw(st.sampled_from(keys))] = draw(weird_value)
    elif kind == "delete":
        del obj[draw(st.sampled_from([k for k in keys if k != "type"]))]
    elif kind == "unknown":
        obj[draw(st.sampled_from(["extra", "Type", "request_id ", "__proto__", "\u00e9"]))] = draw(json_leaf)
    elif kind == "type":
        obj["type"] = draw(st.one_of(st.sampled_from(sorted(MESSAGE_TYPES)), weird_value))
    elif kind == "nested":
        # Fields with an inner object: a relay plan or the limits.
        target = next((k for k in ("plan", "pinned", "limits") if isinstance(obj.get(k), dict)), None)
        if target is None:
            obj["pinned"] = {"num_inference_steps": 4, "split": 2, "sampler": "ddim", "guidance_scale": 5.0,
                             "decode_on": "device"}
            target = "pinned"
        inner = obj[target]
        op = draw(st.sampled_from(["value", "delete", "unknown"]))
        key = draw(st.sampled_from(sorted(inner)))
        if op == "value":
            inner[key] = draw(weird_value)
        elif op == "delete":
            del inner[key]
        else:
            inner["bogus"] = 1
    elif kind == "truncate":
        text = json.dumps(obj)
        return kind, text[: draw(st.integers(0, len(text) - 1))]
    elif kind == "dup_key":
        text = json.dumps(obj)
        key = draw(st.sampled_from(keys))
        return kind, text[:-1] + f", {json.dumps(key)}: {json.dumps(draw(json_leaf))}}}"
    elif kind == "oversize":
        return kind, json.dumps({**obj, "pad": "x" * draw(st.sampled_from([65_530, 65_536, 70_000, 300_000]))})
    elif kind == "prompt_limit":
        obj = json.loads(encode(VALID_MESSAGES[2]))
        obj["prompt"] = draw(st.sampled_from(["a" * 1001, "é" * 1001, "\U0001f600" * 1001, "a" * 999 + "\x00"]))
    elif kind == "deep":
        depth = draw(st.sampled_from([50, 1000, 20_000]))
        return kind, "[" * depth + "]" * depth
    elif kind == "garbage":
        return kind, draw(st.text(max_size=200))
    elif kind == "non_object":
        return kind, json.dumps(draw(json_value))
    return kind, _dumps(obj)


def classify_text(frame: str, limits: ProtocolLimits | None = None) -> str:
    """Decode one frame and check the properties; return ``"ok:<type>"`` or the error code."""
    out, seconds = _timed(lambda: decode_text(frame, limits), "text")
    assert seconds < MAX_DECODE_S, f"decode took {seconds:.3f} s for a {len(frame)}-char frame"
    if isinstance(out, ProtocolError):
        assert out.code in ERROR_CODES, out.code
        error = out.to_error()  # every rejection is answerable ...
        assert decode_text(encode(error)) == error  # ... with a frame that decodes
        return out.code
    assert not isinstance(out, BaseException), f"{type(out).__name__}: {out} for {frame[:200]!r}"
    assert decode_text(encode(out), limits) == out  # what is accepted round-trips
    return "ok:" + out.TYPE


TEXT_COUNTS: Counter[str] = Counter()


@_settings("text")
@given(case=mutated_frame())
def test_protocol_decoder_gives_a_protocol_error_or_a_message_for_any_frame(case: tuple[str, str]) -> None:
    kind, frame = case
    TEXT_COUNTS[classify_text(frame)] += 1
    TEXT_COUNTS["cases"] += 1


def test_text_fuzz_was_not_vacuous() -> None:
    # Runs after the fuzz test (file order): every outcome class was reached.
    if not TEXT_COUNTS:
        return  # the fuzz test was deselected
    for code in ("bad_message", "invalid_request", "too_large", "ok:generate", "ok:hello"):
        assert TEXT_COUNTS[code] > 0, (code, TEXT_COUNTS)


def test_non_text_frames_and_exact_limits() -> None:
    assert classify_text(b"{}") == "bad_message"  # type: ignore[arg-type]
    limits = ProtocolLimits()
    ok = json.loads(encode(VALID_MESSAGES[2]))
    ok["prompt"] = "a" * limits.max_prompt_chars
    assert classify_text(json.dumps(ok)) == "ok:generate"
    ok["prompt"] += "a"
    assert classify_text(json.dumps(ok)) == "invalid_request"
    for token in RAW_TOKENS[:5]:
        assert classify_text(f'{{"type":"rating","request_id":"r1","rating":{token}}}') in {"bad_message", "invalid_request"}


# --------------------------------------------------------------------------- handoff payloads


def make_handoff(request_id: str = "r1", plan: RelayPlan = PLAN, seed: int = 7, family: str = FAMILY) -> Handoff:
    rng = np.random.default_rng(seed)
    shape = (1, 4, 8, 8)
    k = plan.split
    return Handoff(
        family_id=family, sampler=plan.sampler, num_inference_steps=plan.num_inference_steps, split=k,
        guidance_scale=plan.guidance_scale, seed=seed,
        timesteps=np.linspace(999, 0, plan.num_inference_steps).round().astype(np.float32),
        latents=rng.standard_normal(shape, dtype=np.float32),
        cond_embeddings=rng.standard_normal((1, 7, 16), dtype=np.float32),
        sampler_state=SamplerState(
            step_index=k,
            tensors={f"model_outputs.{i}": rng.standard_normal(shape, dtype=np.float32) for i in range(2)}
            if plan.sampler == "dpmpp_2m" else {},
            scalars={"lower_order_nums": min(k, 2)} if plan.sampler == "dpmpp_2m" else {},
        ),
        request_id=request_id,
    )


BASE = make_handoff()
BASE_BYTES = encode_handoff(BASE)
BASE_TENSORS = {n: np.array(a) for n, a in safetensors.numpy.load(BASE_BYTES).items()}
_HLEN = int.from_bytes(BASE_BYTES[:8], "little")
BASE_HEADER = json.loads(BASE_BYTES[8 : 8 + _HLEN])
BASE_DOC = json.loads(BASE_HEADER["__metadata__"][METADATA_KEY])


def _with_doc(doc_text: str, tensors: dict[str, np.ndarray] | None = None) -> bytes:
    return safetensors.numpy.save(tensors or BASE_TENSORS, metadata={METADATA_KEY: doc_text})


def _with_header(header: Any, body: bytes | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + (BASE_BYTES[8 + _HLEN :] if body is None else body)


@st.composite
def mutated_payload(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """A valid handoff changed in one structured way: (kind, bytes, expected_family)."""
    kind = draw(
        st.sampled_from(
            ["valid", "truncate", "truncate", "flip", "length", "doc_value", "doc_value", "doc_delete", "doc_extra",
             "state_value", "doc_text", "tensor_values", "tensor_dtype", "tensor_shape", "tensor_set",
             "entry", "metadata", "wrong_family", "oversize", "random"]
        )
    )
    family: str | None = draw(st.sampled_from([FAMILY, None]))
    data = BASE_BYTES
    if kind == "truncate":
        # Offset classes: inside the length prefix, inside the header, inside the data section.
        region = draw(st.sampled_from(["prefix", "header", "data"]))
        lo, hi = {"prefix": (0, 8), "header": (8, 8 + _HLEN), "data": (8 + _HLEN, len(data) - 1)}[region]
        data = data[: draw(st.integers(lo, hi))]
    elif kind == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            # Mostly in the header (where the parsing is), sometimes anywhere.
            pos = draw(st.one_of(st.integers(0, 8 + _HLEN - 1), st.integers(0, len(buf) - 1)))
            buf[pos] = draw(st.integers(0, 255))
        data = bytes(buf)
    elif kind == "length":
        value = draw(st.sampled_from([0, 1, 2, _HLEN - 1, _HLEN + 1, len(data) - 8, len(data), 2**63, 2**64 - 1]))
        data = value.to_bytes(8, "little") + data[8:]
    elif kind in ("doc_value", "doc_delete", "doc_extra", "state_value"):
        doc = json.loads(json.dumps(BASE_DOC))
        if kind == "doc_value":
            doc[draw(st.sampled_from(sorted(doc)))] = draw(weird_value)
        elif kind == "doc_delete":
            del doc[draw(st.sampled_from(sorted(doc)))]
        elif kind == "doc_extra":
            doc["extra"] = draw(json_leaf)
        else:
            state = doc["state"]
            key = draw(st.sampled_from(["step_index", "scalars", "tensors", "scalar_value", "scalar_name"]))
            if key == "scalar_value":
                state["scalars"]["lower_order_nums"] = draw(weird_value)
            elif key == "scalar_name":
                state["scalars"][draw(st.sampled_from(BAD_STRINGS))] = 1
            else:
                state[key] = draw(weird_value)
        data = _with_doc(_dumps(doc, ensure_ascii=True))  # safetensors needs encodable str
    elif kind == "doc_text":
        text = st.text(st.characters(exclude_categories=["Cs"]), max_size=50)  # no lone surrogates
        data = _with_doc(draw(st.one_of(text, st.sampled_from(["[" * 5000, "{}", "null", "NaN"]))))
    elif kind == "tensor_values":
        tensors = dict(BASE_TENSORS)
        name = draw(st.sampled_from(sorted(tensors)))
        arr = tensors[name].copy()
        arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 3e38]))
        tensors[name] = arr
        data = _with_doc(BASE_HEADER["__metadata__"][METADATA_KEY], tensors)
    elif kind == "tensor_dtype":
        tensors = dict(BASE_TENSORS)
        name = draw(st.sampled_from(sorted(tensors)))
        tensors[name] = tensors[name].astype(draw(st.sampled_from([np.float16, np.float64, np.int32, np.uint8])))
        data = _with_doc(BASE_HEADER["__metadata__"][METADATA_KEY], tensors)
    elif kind == "tensor_shape":
        tensors = dict(BASE_TENSORS)
        name = draw(st.sampled_from(sorted(tensors)))
        arr = tensors[name]
        new = draw(st.sampled_from(["add_dim", "drop_dim", "flat", "batch2", "empty", "big"]))
        if new == "add_dim":
            arr = arr[None]
        elif new == "drop_dim":
            arr = arr.reshape(-1) if arr.ndim == 1 else arr[0]
        elif new == "flat":
            arr = arr.reshape(-1)
        elif new == "batch2":
            arr = np.concatenate([arr, arr]) if arr.ndim > 1 else np.concatenate([arr, arr[:1]])
        elif new == "empty":
            arr = arr[:0]
        else:
            arr = np.zeros((1, 4, 300, 8), np.float32) if name == "latents" else np.zeros((1, 600, 16), np.float32)
        tensors[name] = np.ascontiguousarray(arr)
        data = _with_doc(BASE_HEADER["__metadata__"][METADATA_KEY], tensors)
    elif kind == "tensor_set":
        tensors = dict(BASE_TENSORS)
        if draw(st.booleans()):
            del tensors[draw(st.sampled_from(sorted(tensors)))]
        else:
            tensors[draw(st.sampled_from(["extra", "state.extra", "state.", "latents2"]))] = np.zeros(4, np.float32)
        data = _with_doc(BASE_HEADER["__metadata__"][METADATA_KEY], tensors)
    elif kind == "entry":
        header = json.loads(json.dumps(BASE_HEADER))
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"]))
        if field == "whole":
            header[name] = draw(weird_value)
        else:
            header[name][field] = draw(
                st.one_of(weird_value, st.lists(st.integers(-5, 2**40), max_size=5), st.sampled_from(["F16", "I64", "BOOL"]))
            )
        data = _with_header(header)
    elif kind == "metadata":
        header = json.loads(json.dumps(BASE_HEADER))
        header["__metadata__"] = draw(
            st.one_of(weird_value, st.dictionaries(st.sampled_from([METADATA_KEY, "other"]), json_leaf, max_size=2))
        )
        data = _with_header(header)
    elif kind == "wrong_family":
        family = FAMILY
        data = encode_handoff(make_handoff(family=draw(st.sampled_from(["sdxl", "tiny-sd2", "TINY-SD"]))))
    elif kind == "oversize":
        data = BASE_BYTES + b"\x00" * draw(st.sampled_from([1, 4, 1000]))
    elif kind == "random":
        data = draw(st.binary(max_size=300))
    return kind, data, family


def classify_handoff(data: bytes, family: str | None, limits: HandoffLimits = HandoffLimits()) -> str:
    """Decode one payload and check the properties; return ``"ok"`` or the error's code."""
    out, seconds = _timed(lambda: decode_handoff(data, limits=limits, expected_family=family), "handoff")
    assert seconds < MAX_DECODE_S, f"decode took {seconds:.3f} s for {len(data)} bytes"
    if isinstance(out, HandoffError):
        code = getattr(out, "code", None)
        assert code in HANDOFF_CODES, (type(out).__name__, out)
        msg = str(out)
        assert msg.isascii() and msg.isprintable() and len(msg) < 2000, msg[:300]
        assert protocol_error_from_handoff(out, "r1").to_error().code in ERROR_CODES
        return code
    assert not isinstance(out, BaseException), f"{type(out).__name__}: {out}"
    assert isinstance(out, Handoff)
    out.validate(limits)  # what is accepted holds every invariant
    if family is not None:
        assert out.family_id == family
    return "ok"


HANDOFF_COUNTS: Counter[str] = Counter()
SMALL_LIMITS = HandoffLimits(max_bytes=2000, max_header_bytes=600, max_steps=8, max_latent_side=4, max_state_tensors=1)


@_settings("handoff")
@given(case=mutated_payload(), small=st.integers(0, 9))
def test_handoff_decoder_gives_a_handoff_error_or_a_valid_handoff_for_any_bytes(
    case: tuple[str, bytes, str | None], small: int
) -> None:
    kind, data, family = case
    limits = SMALL_LIMITS if small == 0 else HandoffLimits()  # one in ten against tight limits
    HANDOFF_COUNTS[classify_handoff(data, family, limits)] += 1
    HANDOFF_COUNTS["cases"] += 1


def test_handoff_fuzz_was_not_vacuous() -> None:
    if not HANDOFF_COUNTS:
        return
    for code in ("ok", *HANDOFF_CODES):
        assert HANDOFF_COUNTS[code] > 0, (code, HANDOFF_COUNTS)


def test_every_truncation_of_a_valid_handoff_is_rejected() -> None:
    # Exhaustive, not sampled: every prefix of a valid payload (a few thousand offsets).
    codes = Counter(classify_handoff(BASE_BYTES[:n], FAMILY) for n in range(0, len(BASE_BYTES), 7))
    assert codes["ok"] == 0 and set(codes) <= HANDOFF_CODES
    assert classify_handoff(BASE_BYTES, FAMILY) == "ok"


# --------------------------------------------------------------------------- connection state machines


def _payload_for(server: ServerConnection, rid: str) -> tuple[RelayPlan, int, int, int]:
    gen = server._requests[rid].generate
    plan = gen.pinned or RelayPlan(gen.steps or 4, min(2, gen.steps or 4), "ddim", 5.0)
    return plan, (gen.seed if gen.seed is not None else 7), gen.height or 512, gen.width or 512


server_op = st.one_of(
    st.tuples(st.just("generate"), st.integers(0, 3)),  # a fresh request (0-3: how many extras to vary)
    st.tuples(st.just("replay"), st.integers(0, 50)),  # a generate reusing an id already used
    st.tuples(st.just("deliver"), st.integers(0, 50)),  # the daemon finishes an in-flight request
    st.tuples(st.just("report"), st.integers(0, 50)),  # a report for a used (or unknown) id
    st.tuples(st.just("rating"), st.integers(-2, 2)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("frame"), mutated_frame()),
    st.tuples(st.just("binary"), st.binary(max_size=64)),
    st.tuples(st.just("error"), st.sampled_from(ERROR_CODES)),
)


def _check_events(conn: ServerConnection | ClientConnection, events: list[Any], allowed: tuple[type, ...]) -> None:
    for event in events:
        assert isinstance(event, allowed), event
        if isinstance(event, FrameRejected):
            assert event.error.code in ERROR_CODES
    for frame in conn.data_to_send():
        if isinstance(frame, str):  # everything a connection sends decodes on the other side
            decode_text(frame, ProtocolLimits(max_steps=1000))


SERVER_COUNTS: Counter[str] = Counter()


@_settings("server")
@given(hello=st.one_of(st.just("ok"), st.just("ok"), st.just("ok"), mutated_frame()), ops=st.lists(server_op, max_size=14))
def test_server_connection_survives_any_conversation(hello: Any, ops: list[tuple[str, Any]]) -> None:
    limits = ProtocolLimits(max_in_flight=3, burst=6, max_violations=12)
    server = ServerConnection(family_id=FAMILY, token=TOKEN, limits=limits)
    allowed = (Hello, Generate, Cancel, Report, Rating, Error, FrameRejected)
    now = 0.0

    def feed(frame: str | bytes) -> list[Any]:
        out, seconds = _timed(lambda: server.receive_text(frame, now) if isinstance(frame, str)
                              else server.receive_bytes(frame, now), "server")
        assert not isinstance(out, BaseException), f"{type(out).__name__}: {out}"
        assert seconds < MAX_DECODE_S
        _check_events(server, out, allowed)
        for event in out:
            SERVER_COUNTS["rejected:" + event.error.code if isinstance(event, FrameRejected) else type(event).__name__] += 1
        return out

    first = encode(Hello(versions=(1,), family_id=FAMILY, client="fuzz", token=TOKEN)) if hello == "ok" else hello[1]
    feed(first)
    used: list[str] = []
    accepted: set[str] = set()  # ids the server took as requests (in flight, delivered or failed since)
    delivered: list[str] = []
    for op, arg in ops:
        now += 0.25
        if server.done:
            assert feed(encode(Cancel(request_id="r1"))) == []  # frames after the close are dropped
            break
        if op == "generate":
            rid = f"g{len(used)}"
            extras = [{}, {"seed": 5}, {"steps": 6}, {"pinned": EDGE_PLAN}][arg]
            events = feed(encode(Generate(request_id=rid, prompt="p", **extras)))
            used.append(rid)
            if server.state == "open" and events and isinstance(events[0], Generate):
                assert rid in server.in_flight
                accepted.add(rid)
        elif op == "replay" and used:
            rid = used[arg % len(used)]
            live = rid in server.in_flight
            events = feed(encode(Generate(request_id=rid, prompt="again")))
            if server.state == "open" and rid in accepted:
                # A replayed id is refused without ending the live request it names.
                assert len(events) == 1 and isinstance(events[0], FrameRejected), events
                assert events[0].error.request_id is None
                assert (rid in server.in_flight) == live
        elif op == "deliver" and server.in_flight:
            rid = server.in_flight[arg % len(server.in_flight)]
            if server._requests[rid].cancelling:
                server.send_error(rid, "cancelled", "cancelled")
                continue
            plan, seed, h, w = _payload_for(server, rid)
            server.send_plan(rid, plan, seed=seed, height=h, width=w, scheduler="fuzz", why="")
            if plan.decode_on == "edge":
                server.send_result(rid, PNG_SIGNATURE + b"body")
            else:
                server.send_handoff(rid, encode_handoff(make_handoff(rid, plan, seed)))
            delivered.append(rid)
            assert rid not in server.in_flight
            _check_events(server, [], allowed)
        elif op == "report":
            pool = delivered or ["nobody"]
            rid = pool[arg % len(pool)]
            feed(encode(Report(request_id=rid, device_compute_s=0.1, transfer_s=0.01, total_latency_s=0.5)))
        elif op == "rating":
            rid = delivered[-1] if delivered else "nobody"
            if -1 <= arg <= 1:
                feed(encode(Rating(request_id=rid, rating=arg)))
            else:
                feed(json.dumps({"type": "rating", "request_id": rid, "rating": arg}))
        elif op == "cancel":
            pool = used or ["nobody"]
            feed(encode(Cancel(request_id=pool[arg % len(pool)])))
        elif op == "frame":
            feed(arg[1])
        elif op == "binary":
            feed(arg)
        elif op == "error":
            feed(json.dumps({"type": "error", "code": arg, "message": "device says",
                             "request_id": delivered[-1] if delivered else None,
                             "retry_after_s": 1.0 if arg in ("busy", "rate_limited") else None}))
        assert len(server.in_flight) <= limits.max_in_flight
        assert server.violations <= limits.max_violations
    SERVER_COUNTS["cases"] += 1


CLIENT_COUNTS: Counter[str] = Counter()

client_op = st.one_of(
    st.tuples(st.just("handoff"), st.sampled_from(["r1", "r2", "zz"])),  # announcement + its payload
    st.tuples(st.just("announce_only"), st.sampled_from(["r1", "r2"])),  # announcement, then a text frame
    st.tuples(st.just("binary_alone"), st.binary(max_size=32)),  # a handoff frame without an announcement
    st.tuples(st.just("wrong_nbytes"), st.integers(-3, 3)),
    st.tuples(st.just("bad_payload"), mutated_payload()),
    st.tuples(st.just("wrong_family"), st.just(0)),
    st.tuples(st.just("result"), st.sampled_from(["r2", "r1"])),
    st.tuples(st.just("plan"), st.sampled_from(["r1", "r2", "r9"])),  # second plan / unknown request
    st.tuples(st.just("progress"), st.integers(0, 12)),
    st.tuples(st.just("frame"), mutated_frame()),
)


@_settings("client")
@given(ops=st.lists(client_op, max_size=10))
def test_client_connection_survives_any_server(ops: list[tuple[str, Any]]) -> None:
    client = ClientConnection(family_id=FAMILY, token=TOKEN, client_name="fuzz")
    client.data_to_send()
    allowed = (Welcome, Plan, Progress, HandoffReceived, ResultReceived, Error, FrameRejected)
    now = 0.0

    def feed(frame: str | bytes) -> list[Any]:
        out, seconds = _timed(lambda: client.receive_text(frame, now) if isinstance(frame, str)
                              else client.receive_bytes(frame, now), "client")
        assert not isinstance(out, BaseException), f"{type(out).__name__}: {out}"
        assert seconds < MAX_DECODE_S
        _check_events(client, out, allowed)
        for event in out:
            CLIENT_COUNTS["rejected:" + event.error.code if isinstance(event, FrameRejected) else type(event).__name__] += 1
        return out

    feed(encode(Welcome(version=1, family_id=FAMILY, server="edge", limits=ProtocolLimits())))
    client.send_generate(Generate(request_id="r1", prompt="p"))
    client.send_generate(Generate(request_id="r2", prompt="p", pinned=EDGE_PLAN))
    client.data_to_send()
    feed(encode(Plan(request_id="r1", plan=PLAN, seed=7, height=512, width=512, scheduler="s", why="")))
    feed(encode(Plan(request_id="r2", plan=EDGE_PLAN, seed=7, height=512, width=512, scheduler="s", why="")))
    good = encode_handoff(make_handoff("r1"))
    for op, arg in ops:
        now += 0.1
        if client.done:
            break
        if op == "handoff":
            was_delivered = arg in client.delivered
            feed(encode(HandoffAnnouncement(request_id=arg, nbytes=len(good))))
            events = feed(good)
            if was_delivered:  # a replayed handoff for a delivered request is refused
                assert not any(isinstance(e, HandoffReceived) for e in events)
        elif op == "announce_only":
            feed(encode(HandoffAnnouncement(request_id=arg, nbytes=len(good))))
            feed(encode(Progress(request_id=arg, stage="edge", step=1, total=4)))
        elif op == "binary_alone":
            events = feed(good if not arg else arg)
            assert not any(isinstance(e, HandoffReceived) for e in events)
        elif op == "wrong_nbytes":
            feed(encode(HandoffAnnouncement(request_id="r1", nbytes=max(1, len(good) + arg))))
            feed(good)
        elif op == "bad_payload":
            _, data, _ = arg
            feed(encode(HandoffAnnouncement(request_id="r1", nbytes=max(1, len(data)))))
            events = feed(data)
            for event in events:
                if isinstance(event, HandoffReceived):
                    assert event.handoff.family_id == FAMILY
        elif op == "wrong_family":
            other = encode_handoff(make_handoff("r1", family="sdxl"))
            feed(encode(HandoffAnnouncement(request_id="r1", nbytes=len(other))))
            events = feed(other)
            assert not any(isinstance(e, HandoffReceived) for e in events)
        elif op == "result":
            png = PNG_SIGNATURE + b"img"
            feed(encode(ResultAnnouncement(request_id=arg, nbytes=len(png), height=512, width=512)))
            feed(png)
        elif op == "plan":
            feed(encode(Plan(request_id=arg, plan=PLAN, seed=7, height=512, width=512, scheduler="s", why="")))
        elif op == "progress":
            feed(json.dumps({"type": "progress", "request_id": "r1", "stage": "edge", "step": arg, "total": 10}))
        elif op == "frame":
            feed(arg[1])
    CLIENT_COUNTS["cases"] += 1


def test_fuzz_case_count_meets_the_target() -> None:
    # The cases the fuzz tests above counted in this process: make test's --dist loadfile runs a file on one worker,
    # in order.
    counted = sum(c["cases"] for c in (TEXT_COUNTS, HANDOFF_COUNTS, SERVER_COUNTS, CLIENT_COUNTS))
    if counted == 0 or SCALE < 1:
        return  # deselected or scaled down on purpose
    assert counted >= 10_000, (TEXT_COUNTS["cases"], HANDOFF_COUNTS["cases"], SERVER_COUNTS["cases"], CLIENT_COUNTS["cases"])


def test_ids_of_failed_requests_cannot_be_replayed():
    # Found by the server fuzzer: an id whose request ended with an error (the edge's or the
    # device's) used to be forgotten, so a replayed generate with it was accepted as new work.
    server = ServerConnection(family_id=FAMILY, token=TOKEN)
    server.receive_text(encode(Hello(versions=(1,), family_id=FAMILY, client="t", token=TOKEN)), 0.0)
    for rid in ("busy1", "gone1"):
        [event] = server.receive_text(encode(Generate(request_id=rid, prompt="p")), 0.0)
        assert isinstance(event, Generate)
    server.send_error("busy1", "busy", "queue full", retry_after_s=1.0)  # the edge failed it
    server.send_plan("gone1", SHORT_PLAN, seed=7, height=512, width=512, scheduler="s", why="")
    server.send_handoff("gone1", encode_handoff(make_handoff("gone1", SHORT_PLAN, 7)))
    server.receive_text(encode(Error(code="internal", message="ORT failed", request_id="gone1")), 0.0)  # the device
    for rid in ("busy1", "gone1"):
        [event] = server.receive_text(encode(Generate(request_id=rid, prompt="again")), 1.0)
        assert isinstance(event, FrameRejected) and event.error.code == "invalid_request"
        assert event.error.request_id is None and rid not in server.in_flight


SHORT_PLAN = RelayPlan(4, 2, "ddim", 5.0)
