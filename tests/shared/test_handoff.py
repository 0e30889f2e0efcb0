"""Tests of the handoff codec: exact round trips, every rejection category, and fuzzing."""

from __future__ import annotations

import json
import math
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import HandoffError, RiseError
from shared.handoff import (
    HANDOFF_VERSION,
    METADATA_KEY,
    Handoff,
    HandoffFamilyMismatch,
    HandoffInvalid,
    HandoffLimits,
    HandoffMalformed,
    HandoffTooLarge,
    decode_handoff,
    encode_handoff,
)
from shared.samplers import SamplerState

FAMILY = "sd15-test"


# --------------------------------------------------------------------------- builders


def make_handoff(
    *,
    batch: int = 1,
    latent_shape: tuple[int, int, int] = (4, 8, 8),
    text_shape: tuple[int, int] = (7, 16),
    steps: int = 10,
    split: int = 4,
    history: int = 2,
    sampler: str = "dpmpp_2m",
    seed: int = 1234,
) -> Handoff:
    """A valid handoff with random tensors (``history`` latent-shaped state tensors)."""
    rng = np.random.default_rng(seed)
    shape = (batch, *latent_shape)
    return Handoff(
        family_id=FAMILY,
        sampler=sampler,
        num_inference_steps=steps,
        split=split,
        guidance_scale=7.5,
        seed=seed,
        timesteps=np.linspace(999, 0, steps).round().astype(np.float32),
        latents=rng.standard_normal(shape, dtype=np.float32),
        cond_embeddings=rng.standard_normal((batch, *text_shape), dtype=np.float32),
        sampler_state=SamplerState(
            step_index=split,
            tensors={f"model_outputs.{i}": rng.standard_normal(shape, dtype=np.float32) for i in range(history)},
            scalars={"lower_order_nums": min(split, history), "last_sigma": 0.0123456789} if history else {},
        ),
        request_id="req-0001",
    )


def parts(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Split a valid payload into its tensors and its ``rise`` JSON document, to tamper with."""
    tensors = {name: np.array(arr) for name, arr in safetensors.numpy.load(data).items()}
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return tensors, json.loads(header["__metadata__"][METADATA_KEY])


def save(tensors: dict[str, np.ndarray], doc: dict[str, Any] | str) -> bytes:
    """Serialize with safetensors directly, bypassing the encoder's validation."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return safetensors.numpy.save(tensors, metadata={METADATA_KEY: text})


def split_raw(data: bytes) -> tuple[dict[str, Any], bytes]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]), data[8 + header_len :]


def assemble(header: dict[str, Any] | str | bytes, body: bytes) -> bytes:
    """Frame an arbitrary header (dict, JSON text or raw bytes) and body as safetensors does."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode("utf-8") if isinstance(header, str) else header
    return len(raw).to_bytes(8, "little") + raw + body


@pytest.fixture(scope="module")
def valid() -> bytes:
    return encode_handoff(make_handoff())


def reject(
    data: bytes, cls: type[HandoffError], *fragments: str, **kwargs: Any
) -> HandoffError:
    """Assert decoding raises exactly ``cls`` and that its message contains every fragment."""
    with pytest.raises(HandoffError) as info:
        decode_handoff(data, **kwargs)
    err = info.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    message = str(err)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return err


def assert_same(a: Handoff, b: Handoff) -> None:
    """Field-by-field, bitwise equality (dtype, shape and bytes of every tensor)."""
    for name in ("family_id", "sampler", "num_inference_steps", "split", "guidance_scale", "seed", "request_id"):
        va, vb = getattr(a, name), getattr(b, name)
        assert va == vb and type(va) is type(vb), name
    for name in ("timesteps", "latents", "cond_embeddings"):
        _assert_bitwise(getattr(a, name), getattr(b, name))
    sa, sb = a.sampler_state, b.sampler_state
    assert sa.step_index == sb.step_index
    assert sorted(sa.tensors) == sorted(sb.tensors)
    for name in sa.tensors:
        _assert_bitwise(sa.tensors[name], sb.tensors[name])
    assert sa.scalars == sb.scalars
    assert {k: type(v) for k, v in sa.scalars.items()} == {k: type(v) for k, v in sb.scalars.items()}


def _assert_bitwise(x: np.ndarray, y: np.ndarray) -> None:
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("sampler", "history", "split"),
    [("dpmpp_2m", 2, 4), ("ddim", 0, 4), ("euler", 0, 0), ("dpmpp_2m", 2, 10), ("dpmpp_2m", 1, 1)],
)
def test_round_trip_is_bitwise_exact(sampler: str, history: int, split: int) -> None:
    original = make_handoff(sampler=sampler, history=history, split=split)
    # Values whose bits a lossy path would change: -0.0, a subnormal, float32 extremes.
    original.latents.flat[:4] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max, np.finfo(np.float32).tiny]
    decoded = decode_handoff(encode_handoff(original), expected_family=FAMILY)
    assert_same(original, decoded)
    assert len(decoded.sampler_state.tensors) == history
    assert np.signbit(decoded.latents.flat[0]) and decoded.latents.flat[1] != 0


def test_decoded_arrays_are_writable_copies(valid: bytes) -> None:
    decoded = decode_handoff(valid)
    decoded.latents[0, 0, 0, 0] = 42.0  # would raise on a read-only view of the payload
    for arr in decoded.sampler_state.tensors.values():
        assert arr.flags.writeable and arr.flags.owndata
    assert decode_handoff(valid).latents[0, 0, 0, 0] != 42.0


def test_round_trip_batch_and_large_seed() -> None:
    original = replace(make_handoff(batch=3, history=2), seed=2**64 - 1, guidance_scale=1.0, request_id="")
    decoded = decode_handoff(encode_handoff(original))
    assert_same(original, decoded)
    assert not decoded.uses_cfg and make_handoff().uses_cfg


def test_payload_is_tensor_bytes_plus_small_header() -> None:
    handoff = make_handoff(latent_shape=(4, 64, 64), text_shape=(77, 768), steps=20, split=8)
    data = encode_handoff(handoff)
    state = handoff.sampler_state.tensors.values()
    tensor_bytes = sum(a.nbytes for a in (handoff.latents, handoff.cond_embeddings, handoff.timesteps, *state))
    assert tensor_bytes == 433_232
    assert tensor_bytes < len(data) <= tensor_bytes + 1024


def test_repr_shows_shapes_not_values() -> None:
    text = repr(make_handoff())
    assert "latents=(1, 4, 8, 8)" in text and "model_outputs.0" in text and len(text) < 600


def test_check_timesteps() -> None:
    handoff = make_handoff()
    handoff.check_timesteps(handoff.timesteps.copy())
    other = handoff.timesteps.copy()
    other[3] += 1
    with pytest.raises(HandoffInvalid, match=r"timesteps.*index 3"):
        handoff.check_timesteps(other)
    with pytest.raises(HandoffInvalid, match="timesteps"):
        handoff.check_timesteps(handoff.timesteps[:-1])


# --------------------------------------------------------------------------- error classes


def test_error_classes_and_codes() -> None:
    codes = {
        HandoffTooLarge: "too_large",
        HandoffMalformed: "malformed",
        HandoffInvalid: "invalid",
        HandoffFamilyMismatch: "wrong_family",
    }
    for cls, code in codes.items():
        assert issubclass(cls, HandoffError) and issubclass(cls, RiseError) and issubclass(cls, ValueError)
        assert cls.code == code
    assert len(set(codes.values())) == len(codes)


# --------------------------------------------------------------------------- framing


@pytest.mark.parametrize("where", ["0", "4", "7", "8", "mid_header", "header_end", "mid_data", "last_byte"])
def test_truncated(valid: bytes, where: str) -> None:
    header_len = int.from_bytes(valid[:8], "little")
    cut = {
        "0": 0,
        "4": 4,
        "7": 7,
        "8": 8,
        "mid_header": 8 + header_len // 2,
        "header_end": 8 + header_len,
        "mid_data": 8 + header_len + 300,
        "last_byte": len(valid) - 1,
    }[where]
    err = reject(valid[:cut], HandoffMalformed)
    assert err.code == "malformed"
    # Cut inside the framing the header length is blamed, cut in the data a tensor or the data section.
    if cut < 8 + header_len:
        assert "header length" in str(err)
    else:
        assert any(name in str(err) for name in ("latents", "cond_embeddings", "timesteps", "state.", "payload"))


def test_header_length_larger_than_data(valid: bytes) -> None:
    header_len = int.from_bytes(valid[:8], "little")
    data = (len(valid) - 8 + 1).to_bytes(8, "little") + valid[8:]
    reject(data, HandoffMalformed, "header length", str(len(valid) - 7))
    assert header_len < len(valid)


@pytest.mark.parametrize("header_len", [2**64 - 1, 2**63, 2**40])
def test_header_length_huge(valid: bytes, header_len: int) -> None:
    start = time.perf_counter()
    reject(header_len.to_bytes(8, "little") + valid[8:], HandoffMalformed, "header length", str(header_len))
    assert time.perf_counter() - start < 30.0  # refused from the 8 bytes: no allocation of that size was tried


def test_header_length_zero(valid: bytes) -> None:
    reject(b"\0" * 8 + valid[8:], HandoffMalformed, "header length")


def test_header_over_limit_is_too_large(valid: bytes) -> None:
    header, body = split_raw(valid)
    padded = json.dumps(header) + " " * 70_000  # trailing spaces are valid JSON, as safetensors pads
    reject(assemble(padded, body), HandoffTooLarge, "header", "65536")


def test_payload_over_max_bytes(valid: bytes) -> None:
    reject(valid, HandoffTooLarge, "payload", str(len(valid)), limits=HandoffLimits(max_bytes=len(valid) - 1))
    decode_handoff(valid, limits=HandoffLimits(max_bytes=len(valid)))


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"{not json", "header: not valid JSON"),
        (b"\xff\xfe{}", "header: not UTF-8"),
        (b"[1, 2, 3]", "header: expected a JSON object, got list"),
        (b'"a string"', "header: expected a JSON object, got str"),
        (b'{"a": NaN}', "header: not valid JSON"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b"[" * 60_000, "header: not valid JSON"),  # nesting deep enough to exhaust recursion
    ],
)
def test_bad_header_json(valid: bytes, header: bytes, fragment: str) -> None:
    _, body = split_raw(valid)
    reject(assemble(header, body), HandoffMalformed, fragment)


def test_not_bytes() -> None:
    reject("a text frame", HandoffMalformed, "payload", "str")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        (None, "__metadata__"),
        ({}, "__metadata__"),
        ({"rise": "{}", "other": "x"}, "__metadata__"),
        ({"rise": "not json"}, "rise: not valid JSON"),
        ({"rise": "[]"}, "rise: expected a JSON object"),
    ],
)
def test_bad_metadata(valid: bytes, metadata: dict[str, str] | None, fragment: str) -> None:
    header, body = split_raw(valid)
    if metadata is None:
        del header["__metadata__"]
    else:
        header["__metadata__"] = metadata
    reject(assemble(header, body), HandoffMalformed, fragment)


def test_rise_doc_not_a_string(valid: bytes) -> None:
    header, body = split_raw(valid)
    header["__metadata__"]["rise"] = {"version": 1}
    reject(assemble(header, body), HandoffMalformed, "rise", "dict")


# --------------------------------------------------------------------------- tensor set, dtype, offsets


@pytest.mark.parametrize("name", ["latents", "cond_embeddings", "timesteps", "state.model_outputs.1"])
def test_missing_tensor(valid: bytes, name: str) -> None:
    tensors, doc = parts(valid)
    del tensors[name]
    reject(save(tensors, doc), HandoffMalformed, name, "missing tensor")


def test_missing_state_tensor_listed_in_json(valid: bytes) -> None:
    tensors, doc = parts(valid)
    doc["state"]["tensors"].append("model_outputs.2")
    reject(save(tensors, doc), HandoffMalformed, "state.model_outputs.2", "missing tensor")


@pytest.mark.parametrize("name", ["extra", "state.unlisted", "uncond_embeddings"])
def test_extra_tensor(valid: bytes, name: str) -> None:
    tensors, doc = parts(valid)
    tensors[name] = np.zeros((1, 4, 8, 8), np.float32)
    reject(save(tensors, doc), HandoffMalformed, name, "unexpected tensor")


def test_messages_stay_one_ascii_line_whatever_the_names(valid: bytes) -> None:
    header, body = split_raw(valid)
    header["evil\nname\ud800\u00e9" + "x" * 200] = header.pop("latents")
    data = assemble(json.dumps(header), body)  # json.dumps escapes the lone surrogate as \ud800
    err = reject(data, HandoffMalformed, "missing tensor")
    other = reject(assemble(header | {"latents": header["cond_embeddings"]}, body), HandoffMalformed)
    for message in (str(err), str(other)):
        assert message.isascii() and message.isprintable() and len(message) < 300, message


def test_error_field_attribute(valid: bytes) -> None:
    assert reject(_doc_case(valid, _set("split", 11)), HandoffInvalid).field == "split"
    tensors, doc = parts(valid)
    tensors["latents"].flat[0] = np.nan
    assert reject(save(tensors, doc), HandoffInvalid).field == "latents"


@pytest.mark.parametrize(
    ("name", "dtype", "got"),
    [
        ("latents", np.float64, "F64"),
        ("latents", np.float16, "F16"),
        ("cond_embeddings", np.float64, "F64"),
        ("state.model_outputs.0", np.int32, "I32"),
        ("timesteps", np.int32, "I32"),
        ("timesteps", np.int64, "I64"),
    ],
)
def test_wrong_dtype(valid: bytes, name: str, dtype: type, got: str) -> None:
    tensors, doc = parts(valid)
    tensors[name] = tensors[name].astype(dtype)
    reject(save(tensors, doc), HandoffMalformed, name, got)


@pytest.mark.parametrize(
    ("name", "shape", "fragment"),
    [
        ("latents", (4, 8, 8), "4 dimensions"),
        ("latents", (1, 1, 4, 8, 8), "4 dimensions"),
        ("cond_embeddings", (7, 16), "3 dimensions"),
        ("timesteps", (1, 10), "1 dimension"),
    ],
)
def test_wrong_ndim(valid: bytes, name: str, shape: tuple[int, ...], fragment: str) -> None:
    tensors, doc = parts(valid)
    tensors[name] = tensors[name].reshape(shape)
    reject(save(tensors, doc), HandoffInvalid, name, fragment)


@pytest.mark.parametrize(
    ("name", "new", "fragment"),
    [
        ("cond_embeddings", np.zeros((2, 7, 16), np.float32), "batch 1"),
        ("timesteps", np.arange(9, dtype=np.float32), "shape (10,)"),
        ("state.model_outputs.0", np.zeros((1, 4, 8, 4), np.float32), "latent's shape"),
        ("state.model_outputs.0", np.zeros((2, 4, 8, 8), np.float32), "latent's shape"),
        ("latents", np.zeros((1, 4, 0, 8), np.float32), "height >= 1"),
    ],
)
def test_shape_inconsistency(valid: bytes, name: str, new: np.ndarray, fragment: str) -> None:
    tensors, doc = parts(valid)
    tensors[name] = new
    reject(save(tensors, doc), HandoffInvalid, name, fragment)


def test_small_batch_first_state_tensor_is_accepted(valid: bytes) -> None:
    tensors, doc = parts(valid)
    tensors["state.sigma"] = np.ones((1,), np.float32)
    doc["state"]["tensors"].append("sigma")
    decoded = decode_handoff(save(tensors, doc))
    assert decoded.sampler_state.tensors["sigma"].shape == (1,)


def _tamper_entry(valid: bytes, name: str, **changes: Any) -> bytes:
    header, body = split_raw(valid)
    header[name].update(changes)
    return assemble(header, body)


def test_data_offsets_inconsistent_with_shape(valid: bytes) -> None:
    header, _ = split_raw(valid)
    begin, end = header["latents"]["data_offsets"]
    reject(_tamper_entry(valid, "latents", data_offsets=[begin, end - 4]), HandoffMalformed, "latents", "data_offsets")


def test_data_offsets_out_of_bounds(valid: bytes) -> None:
    header, body = split_raw(valid)
    begin, end = header["latents"]["data_offsets"]
    data = _tamper_entry(valid, "latents", data_offsets=[len(body), len(body) + end - begin])
    reject(data, HandoffMalformed, "latents", "data_offsets")


def test_data_offsets_overlap(valid: bytes) -> None:
    header, _ = split_raw(valid)
    # Point both history tensors at the same bytes: sizes are right, coverage is not.
    data = _tamper_entry(valid, "state.model_outputs.1", data_offsets=header["state.model_outputs.0"]["data_offsets"])
    reject(data, HandoffMalformed, "no gap or overlap")


@pytest.mark.parametrize("offsets", [[-4, 0], [5, 1], "0-4", [0, 4, 8], [0.0, 4.0], [True, 4]])
def test_data_offsets_malformed(valid: bytes, offsets: Any) -> None:
    reject(_tamper_entry(valid, "timesteps", data_offsets=offsets), HandoffMalformed, "timesteps")


@pytest.mark.parametrize("shape", [[-1, 10], [1.5], "10", [True] * 10, None])
def test_shape_malformed(valid: bytes, shape: Any) -> None:
    reject(_tamper_entry(valid, "timesteps", shape=shape), HandoffMalformed, "timesteps", "shape")


def test_entry_with_extra_key(valid: bytes) -> None:
    reject(_tamper_entry(valid, "latents", extra=1), HandoffMalformed, "latents", "keys")


def test_huge_declared_shape_allocates_nothing(valid: bytes) -> None:
    header, body = split_raw(valid)
    header["latents"]["shape"] = [2**20, 2**20, 2**20, 2**20]
    data = assemble(header, body)
    tracemalloc.start()
    try:
        reject(data, HandoffMalformed, "latents", "data_offsets")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", ["latents", "cond_embeddings", "state.model_outputs.0", "state.model_outputs.1"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tensor(valid: bytes, name: str, bad: float) -> None:
    tensors, doc = parts(valid)
    tensors[name].flat[5] = bad
    reject(save(tensors, doc), HandoffInvalid, name, "finite", "1 NaN/Inf")


def test_negative_timestep(valid: bytes) -> None:
    tensors, doc = parts(valid)
    tensors["timesteps"][-1] = -1
    reject(save(tensors, doc), HandoffInvalid, "timesteps", "non-negative")


def _doc_case(valid: bytes, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    tensors, doc = parts(valid)
    mutate(doc)
    return save(tensors, doc)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, leaf = path.split("/")
        target = doc
        for key in parents:
            target = target[key]
        target[leaf] = value

    return mutate


@pytest.mark.parametrize(
    ("path", "value", "cls", "fragments"),
    [
        ("split", 11, HandoffInvalid, ("split", "num_inference_steps=10", "11")),
        ("split", -1, HandoffInvalid, ("split", "-1")),
        ("state/step_index", 3, HandoffInvalid, ("step_index", "split=4", "3")),
        ("sampler", "heun", HandoffInvalid, ("sampler", "dpmpp_2m", "'heun'")),
        ("sampler", 3, HandoffInvalid, ("sampler",)),
        ("num_inference_steps", 0, HandoffInvalid, ("num_inference_steps", ">= 1")),
        ("guidance_scale", -0.5, HandoffInvalid, ("guidance_scale", ">= 0")),
        ("guidance_scale", "7.5", HandoffInvalid, ("guidance_scale", "str")),
        ("seed", -1, HandoffInvalid, ("seed", "[0, 2**64)", "-1")),
        ("seed", 2**64, HandoffInvalid, ("seed", "[0, 2**64)")),
        ("seed", 1.0, HandoffInvalid, ("seed", "an int", "float")),
        ("request_id", "a\nb", HandoffInvalid, ("request_id", "printable")),
        ("request_id", "x" * 129, HandoffInvalid, ("request_id", "128")),
        ("request_id", None, HandoffInvalid, ("request_id", "NoneType")),
        ("family_id", "", HandoffInvalid, ("family_id", "non-empty")),
        ("family_id", 7, HandoffInvalid, ("family_id", "int")),
        ("state/scalars", {"lower_order_nums": "2"}, HandoffInvalid, ("lower_order_nums", "int or float")),
        ("state/scalars", {"bad name!": 1}, HandoffInvalid, ("sampler_state.scalars", "bad name!")),
        ("state/scalars", {"big": 2**70}, HandoffInvalid, ("big", "int64")),
        ("state/scalars", [], HandoffMalformed, ("state.scalars",)),
        ("state/tensors", "model_outputs.0", HandoffMalformed, ("state.tensors",)),
        ("state/tensors", ["model_outputs.0", "model_outputs.0"], HandoffMalformed, ("state.tensors", "distinct")),
        ("state", [], HandoffMalformed, ("state", "JSON object")),
        ("extra_field", 1, HandoffMalformed, ("rise.extra_field", "unexpected field")),
        ("state/extra", 1, HandoffMalformed, ("state.extra", "unexpected field")),
    ],
)
def test_bad_field(valid: bytes, path: str, value: Any, cls: type[HandoffError], fragments: tuple[str, ...]) -> None:
    err = reject(_doc_case(valid, _set(path, value)), cls, *fragments)
    assert err.code == cls.code


@pytest.mark.parametrize(
    "path",
    ["seed", "split", "num_inference_steps", "state/step_index", "guidance_scale", "state/scalars/lower_order_nums"],
)
def test_bool_is_not_an_int(valid: bytes, path: str) -> None:
    field = path.replace("state/scalars/", "").replace("state/", "")
    reject(_doc_case(valid, _set(path, True)), HandoffInvalid, field, "bool")


@pytest.mark.parametrize("field", ["family_id", "sampler", "seed", "split", "state"])
def test_missing_field(valid: bytes, field: str) -> None:
    reject(_doc_case(valid, lambda doc: doc.pop(field)), HandoffMalformed, field, "missing field")


def test_non_finite_guidance_in_json(valid: bytes) -> None:
    tensors, doc = parts(valid)
    text = json.dumps(doc).replace('"guidance_scale": 7.5', '"guidance_scale": 1e999')
    assert "1e999" in text
    reject(save(tensors, text), HandoffInvalid, "guidance_scale", "finite")
    reject(save(tensors, text.replace("1e999", "NaN")), HandoffMalformed, "rise: not valid JSON")


@pytest.mark.parametrize("version", [2, 0, "1", 1.0, True, None])
def test_wrong_version(valid: bytes, version: Any) -> None:
    reject(_doc_case(valid, _set("version", version)), HandoffInvalid, "version", "unsupported version", repr(version))


def test_missing_version(valid: bytes) -> None:
    reject(_doc_case(valid, lambda doc: doc.pop("version")), HandoffInvalid, "version", "None")


def test_version_checked_before_the_rest(valid: bytes) -> None:
    # A future version may rename everything; the receiver must say "version", not "missing tensor".
    tensors, doc = parts(valid)
    del tensors["latents"]
    doc = {"version": HANDOFF_VERSION + 1}
    reject(save(tensors, doc), HandoffInvalid, "version")


def test_wrong_family(valid: bytes) -> None:
    err = reject(valid, HandoffFamilyMismatch, "family_id", "'sdxl'", repr(FAMILY), expected_family="sdxl")
    assert err.code == "wrong_family"
    assert decode_handoff(valid, expected_family=FAMILY).family_id == FAMILY


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("limits", "fragments"),
    [
        (HandoffLimits(max_steps=9), ("num_inference_steps", "<= 9")),
        (HandoffLimits(max_batch=1), ("latents", "batch <= 1")),
        (HandoffLimits(max_latent_side=7), ("latents", "height <= 7")),
        (HandoffLimits(max_latent_channels=3), ("latents", "channels <= 3")),
        (HandoffLimits(max_text_tokens=6), ("cond_embeddings", "tokens <= 6")),
        (HandoffLimits(max_text_dim=15), ("cond_embeddings", "width <= 15")),
        (HandoffLimits(max_state_tensors=1), ("state.tensors", "at most 1")),
        (HandoffLimits(max_state_scalars=1), ("sampler_state.scalars", "at most 1")),
        (HandoffLimits(max_header_bytes=100), ("header", "at most 100")),
    ],
)
def test_oversized_vs_limits(limits: HandoffLimits, fragments: tuple[str, ...]) -> None:
    handoff = make_handoff(batch=2)
    data = encode_handoff(handoff)  # fits the defaults
    err = reject(data, HandoffTooLarge, *fragments, limits=limits)
    assert err.code == "too_large"
    with pytest.raises(HandoffTooLarge):  # the edge checks against the receiver's limits too
        encode_handoff(handoff, limits=limits)


def test_default_limits_accept_sdxl_sized_payload() -> None:
    handoff = make_handoff(latent_shape=(4, 128, 128), text_shape=(77, 2048), steps=50, split=20)
    assert decode_handoff(encode_handoff(handoff)).latents.shape == (1, 4, 128, 128)


# --------------------------------------------------------------------------- encode-side validation


@pytest.mark.parametrize(
    ("change", "cls", "fragment"),
    [
        ({"seed": True}, HandoffInvalid, "seed"),
        ({"seed": np.int64(3)}, HandoffInvalid, "seed"),
        ({"seed": -5}, HandoffInvalid, "seed"),
        ({"split": 11}, HandoffInvalid, "split"),
        ({"sampler": "lms"}, HandoffInvalid, "sampler"),
        ({"guidance_scale": float("nan")}, HandoffInvalid, "guidance_scale"),
        ({"family_id": " padded "}, HandoffInvalid, "family_id"),
        ({"latents": np.zeros((1, 4, 8, 8), np.float64)}, HandoffMalformed, "latents"),
        ({"latents": np.zeros((1, 4, 8, 8), ">f4")}, HandoffMalformed, "latents"),
        ({"latents": [[0.0]]}, HandoffInvalid, "latents"),
        ({"latents": np.full((1, 4, 8, 8), np.nan, np.float32)}, HandoffInvalid, "latents"),
        ({"timesteps": np.arange(10, dtype=np.int32)}, HandoffMalformed, "timesteps"),
        ({"sampler_state": SamplerState(step_index=3)}, HandoffInvalid, "step_index"),
        ({"sampler_state": SamplerState(4, {"a/b": np.zeros((1, 4, 8, 8), np.float32)})}, HandoffInvalid, "a/b"),
        ({"sampler_state": SamplerState(4, scalars={"x": np.float32(1)})}, HandoffInvalid, "numpy.float32"),
        ({"sampler_state": {"step_index": 4}}, HandoffInvalid, "sampler_state"),
    ],
)
def test_encode_rejects_what_decode_would(change: dict[str, Any], cls: type[HandoffError], fragment: str) -> None:
    bad = replace(make_handoff(), **change)
    with pytest.raises(cls, match=None) as info:
        encode_handoff(bad)
    assert type(info.value) is cls and fragment in str(info.value)


def test_encode_accepts_non_contiguous_arrays() -> None:
    handoff = make_handoff()
    strided = np.asfortranarray(handoff.latents)
    decoded = decode_handoff(encode_handoff(replace(handoff, latents=strided)))
    _assert_bitwise(decoded.latents, handoff.latents)


# --------------------------------------------------------------------------- fuzzing

_FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # reproducible in CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _decode_or_handoff_error(data: bytes) -> str:
    """Decode; the only acceptable outcomes are a valid Handoff or a HandoffError subclass."""
    try:
        decoded = decode_handoff(data)
    except HandoffError as err:
        assert type(err) in (HandoffTooLarge, HandoffMalformed, HandoffInvalid, HandoffFamilyMismatch)
        assert isinstance(err.code, str) and str(err)
        return err.code
    decoded.validate()
    assert_same(decoded, decode_handoff(encode_handoff(decoded)))  # what we accept we can re-send
    return "ok"


@st.composite
def _framed_garbage(draw: st.DrawFn) -> bytes:
    """Random bytes, or a plausible frame: a true length prefix around random (JSON) text."""
    kind = draw(st.sampled_from(["bytes", "json", "text", "entries"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600))
    body = draw(st.binary(max_size=200))
    if kind == "json":
        header = json.dumps(draw(_json_values)).encode()
    elif kind == "text":
        header = draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    else:  # the right shape of header with random entries, to get past the JSON checks
        names = ["latents", "cond_embeddings", "timesteps"]
        names += draw(st.lists(st.sampled_from(["state.h", "x"]), unique=True))
        entries: dict[str, Any] = {}
        position = 0
        for name in names:
            right = "F32"
            dtype = draw(st.sampled_from([right] * 4 + ["F64", "BOOL", "X"]))
            shape = draw(st.lists(st.integers(0, 3), min_size=1, max_size=5))
            size = math.prod(shape) * (8 if dtype in ("I64", "F64") else 4)
            entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
            position += size
        body = draw(st.binary(min_size=position, max_size=position))  # random values, consistent framing
        doc = {"version": 1, "family_id": "f", "request_id": "", "sampler": "ddim", "num_inference_steps": 2,
               "split": 1, "guidance_scale": 1.0, "seed": 0,
               "state": {"step_index": 1, "scalars": {}, "tensors": ["h"] if "state.h" in names else []}}
        header = json.dumps({"__metadata__": {METADATA_KEY: json.dumps(doc)}, **entries}).encode()
    return assemble(header, body)


def test_fuzz_random_bytes() -> None:
    outcomes: Counter[str] = Counter()

    @_FUZZ
    @given(_framed_garbage())
    def check(data: bytes) -> None:
        outcomes[_decode_or_handoff_error(data)] += 1

    check()
    # Not vacuous: some random frames get past the framing and JSON checks into the value checks.
    assert outcomes["malformed"] > 100 and outcomes["invalid"] + outcomes["too_large"] > 0, outcomes


_SMALL = encode_handoff(make_handoff(latent_shape=(4, 4, 4), text_shape=(3, 8), steps=6, split=2))
_SMALL_HEADER, _SMALL_BODY = split_raw(_SMALL)
_HEADER_END = 8 + int.from_bytes(_SMALL[:8], "little")


@st.composite
def _mutated_payload(draw: st.DrawFn) -> bytes:
    """A valid payload with bytes flipped, cut, inserted, or one header/JSON value replaced."""
    kinds = ["flip", "flip_header", "flip_data", "truncate", "insert", "length", "header", "field", "field"]
    kind = draw(st.sampled_from(kinds))
    data = bytearray(_SMALL)
    if kind.startswith("flip"):
        lo, hi = {"flip": (0, len(data)), "flip_header": (0, _HEADER_END), "flip_data": (_HEADER_END, len(data))}[kind]
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(lo, hi - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:])
    if kind == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + bytes(data[8:])
    header = json.loads(json.dumps(_SMALL_HEADER))
    if kind == "header":  # replace or drop one tensor-entry field, or a whole entry
        name = draw(st.sampled_from(sorted(header)))
        if name == "__metadata__" or draw(st.booleans()):
            header[name] = draw(_json_values)
        else:
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            header[name][key] = draw(_json_values)
        return assemble(header, _SMALL_BODY)
    doc = json.loads(header["__metadata__"][METADATA_KEY])
    target = doc["state"] if draw(st.booleans()) else doc
    key = draw(st.sampled_from(sorted(target)))
    if draw(st.integers(0, 9)) == 0:
        del target[key]
    else:
        plausible = st.integers(0, 12) | st.floats(0, 20) | st.sampled_from(["ddim", "euler", "dpmpp_2m", "x"])
        target[key] = draw(plausible | _json_values)
    header["__metadata__"][METADATA_KEY] = json.dumps(doc)  # json.dumps writes NaN as NaN: exercise it
    return assemble(header, _SMALL_BODY)


def test_fuzz_mutated_payloads() -> None:
    outcomes: Counter[str] = Counter()

    @_FUZZ
    @given(_mutated_payload())
    def check(data: bytes) -> None:
        outcomes[_decode_or_handoff_error(data)] += 1

    check()
    # Not vacuous: mutations both survive (e.g. flipped data bytes) and get rejected, in several ways.
    assert outcomes["ok"] >= 5 and outcomes["malformed"] >= 50 and outcomes["invalid"] >= 5, outcomes
