"""The handoff codec: what the edge sends the device to continue a relayed generation.

The edge runs the first ``k`` (``split``) of ``N`` denoising steps with the large model
and hands over everything the device needs to finish the remaining ``N - k`` steps
exactly: the latent after ``k`` steps, the conditional text embeddings (the unconditional
ones are a per-family constant in the device bundle), the sampler state, the schedule,
the guidance scale and the seed.

Wire format
-----------
A standard `safetensors <https://github.com/huggingface/safetensors>`_ document (never
pickle). Tensors:

* ``latents``          float32 ``(B, C, H, W)``, the latent after ``k`` steps;
* ``cond_embeddings``  float32 ``(B, L, D)``;
* ``timesteps``        float32 ``(N,)``, the schedule the edge used (Euler's may be fractional);
* ``state.<name>``     float32, one per :attr:`SamplerState.tensors` entry (multistep
  history has the latent's shape; LCM's noise for the device's steps, ``noise.<i>``, too);
* ``added_cond.<name>``   float32 ``(B, D)``, the denoiser's extra inputs for the conditional
  rows, named as the device's UNet graph names them, one per name in the header's
  ``added_cond`` list (SDXL: ``text_embeds``, the pooled text embedding, and ``time_ids``, the
  size/crop conditioning; LCM-distilled UNets: ``timestep_cond``, the guidance embedding);
* ``added_uncond.<name>`` the same names and shapes for the unconditional rows, present
  exactly when classifier-free guidance is on.

The scalar fields travel as one JSON document under the ``"rise"`` key of safetensors'
``__metadata__`` map::

    {"version": 1, "family_id": "...", "request_id": "...", "sampler": "dpmpp_2m",
     "num_inference_steps": 20, "split": 8, "guidance_scale": 7.5, "seed": 42,
     "state": {"step_index": 8, "scalars": {"lower_order_nums": 2},
               "tensors": ["model_outputs.0", "model_outputs.1"]}}

Decoding is defensive, since the bytes come from a network peer: the size, the header
length, the header JSON, tensor names, dtypes, shapes (against :class:`HandoffLimits`)
and data offsets are all checked by this module *before* any tensor byte is handed to
``safetensors``; anything ``json`` or ``safetensors`` could raise becomes a
:class:`~shared.errors.HandoffError` subclass with a stable :attr:`code`:

* :class:`HandoffTooLarge` (``too_large``): over a :class:`HandoffLimits` bound (bytes,
  header, steps, batch, latent sides/channels, tokens, text width, state counts);
* :class:`HandoffMalformed` (``malformed``): not a well-formed handoff document:
  truncated, bad header length, bad JSON, bad safetensors, missing/extra tensors or
  fields, wrong tensor dtype;
* :class:`HandoffInvalid` (``invalid``): well-formed, but a value breaks the contract:
  wrong field type (a bool is not an int), NaN/Inf, shape inconsistencies, ``k > N``,
  ``step_index != k``, unknown sampler, unsupported version;
* :class:`HandoffFamilyMismatch` (``wrong_family``): for another model family than the
  receiver's.

Each message reads ``<field>: expected <what>, got <what>``; the field is also in ``.field``.

Two optional header fields, present only when they say something (so an SD1.x handoff is
byte-for-byte what it was): ``"added_cond": ["text_embeds", "time_ids"]`` (sorted names of
the ``added_cond.*`` tensors) and ``"guidance": "embedding"``.

Guidance: with ``guidance`` ``"cfg"`` (the default), ``guidance_scale > 1`` means
classifier-free guidance (the denoiser also runs on the family's unconditional embedding and
the outputs are mixed) and ``guidance_scale <= 1`` none (conditional output only), as in
diffusers. With ``"embedding"`` (LCM-distilled denoisers, ``time_cond_proj_dim``), the
guidance scale is fed to the denoiser as ``timestep_cond`` (``shared.guidance``) and there
is never a second, unconditional pass.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import numpy as np
import safetensors.numpy

from shared.errors import FieldFailure, HandoffError
from shared.samplers import SAMPLER_NAMES, SamplerState
from shared.validation import (
    MAX_ID_CHARS,
    check_family_id,
    check_float,
    check_int,
    check_str,
    is_int,
    is_real,
    loads_strict,
)
from shared.validation import show as _show
from shared.validation import type_name as _type_name

__all__ = [
    "ADDED_COND_PREFIX",
    "ADDED_UNCOND_PREFIX",
    "GUIDANCE_MODES",
    "HANDOFF_VERSION",
    "METADATA_KEY",
    "Handoff",
    "HandoffFamilyMismatch",
    "HandoffInvalid",
    "HandoffLimits",
    "HandoffMalformed",
    "HandoffTooLarge",
    "decode_handoff",
    "encode_handoff",
]

HANDOFF_VERSION: int = 1

#: The ``__metadata__`` key holding the JSON document with the scalar fields.
METADATA_KEY = "rise"

LATENTS = "latents"
COND_EMBEDDINGS = "cond_embeddings"
TIMESTEPS = "timesteps"
STATE_PREFIX = "state."
ADDED_COND_PREFIX = "added_cond."
ADDED_UNCOND_PREFIX = "added_uncond."
#: Guidance modes (the ``guidance`` field): classifier-free guidance, or the scale embedded (LCM).
GUIDANCE_MODES = ("cfg", "embedding")

_MAX_SEED = 2**64  # exclusive; diffusers/numpy generators take 64-bit seeds
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_STATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}", re.ASCII)

# safetensors dtype names for the only two dtypes a handoff carries.
# Every tensor is float32: diffusers' Euler timesteps can be fractional, and float32 holds
# every integer timestep (< 2**24) exactly.
_F32 = "F32"
_DTYPE_NAMES: dict[np.dtype[Any], str] = {np.dtype("<f4"): _F32}
_ITEMSIZE = {_F32: 4}

_TOP_FIELDS = frozenset(
    {
        "version",
        "family_id",
        "request_id",
        "sampler",
        "num_inference_steps",
        "split",
        "guidance_scale",
        "seed",
        "state",
    }
)
_OPTIONAL_TOP_FIELDS = frozenset({"added_cond", "guidance"})
_STATE_FIELDS = frozenset({"step_index", "scalars", "tensors"})
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


# --------------------------------------------------------------------------- errors


class _CodedHandoffError(HandoffError):
    """A :class:`HandoffError` with a stable short :attr:`code` and the offending field."""

    code: ClassVar[str] = "handoff"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @classmethod
    def for_field(cls, message: str, *, field: str, kind: FieldFailure) -> _CodedHandoffError:
        return cls(message, field=field)


class HandoffTooLarge(_CodedHandoffError):
    """The payload, or one of its dimensions or counts, exceeds a :class:`HandoffLimits` bound."""

    code = "too_large"


class HandoffMalformed(_CodedHandoffError):
    """The bytes are not a well-formed handoff (framing, JSON, safetensors, tensor set, dtype)."""

    code = "malformed"


class HandoffInvalid(_CodedHandoffError):
    """A well-formed handoff whose values break the contract (types, ranges, shapes, NaN/Inf)."""

    code = "invalid"


class HandoffFamilyMismatch(_CodedHandoffError):
    """The handoff is for another model family than the one the receiver runs."""

    code = "wrong_family"


# --------------------------------------------------------------------------- limits / type


@dataclass(frozen=True)
class HandoffLimits:
    """What a receiver accepts; every bound is inclusive. Exceeding one raises :class:`HandoffTooLarge`.

    ``max_header_bytes`` bounds the safetensors JSON header (a real header is ~1 KiB) and
    ``max_state_scalars`` the number of :attr:`SamplerState.scalars` entries.
    """

    max_bytes: int = 64 * 2**20
    max_steps: int = 1000
    max_batch: int = 8
    max_latent_side: int = 256  # H and W of the latent
    max_latent_channels: int = 16
    max_text_tokens: int = 512
    max_text_dim: int = 4096
    max_state_tensors: int = 64  # LCM carries one noise tensor per device step (diffusers allows up to 50)
    max_header_bytes: int = 64 * 2**10
    max_state_scalars: int = 32
    max_added_cond: int = 4  # SDXL has 2 (text_embeds, time_ids)


@dataclass(frozen=True, eq=False, repr=False)  # eq=False: numpy arrays have no truth value
class Handoff:
    """Everything the device needs to continue a generation at step ``split`` of ``num_inference_steps``.

    ``split`` (k) is the number of steps the edge already ran: 0 = device-only (``latents``
    is the initial noise), ``num_inference_steps`` = edge-only (the device only decodes).
    ``sampler_state.step_index`` must equal ``split``. ``guidance_scale <= 1`` means no
    classifier-free guidance. Call :meth:`validate` to check every invariant;
    :func:`encode_handoff` and :func:`decode_handoff` always do.
    """

    family_id: str
    sampler: str  # one of shared.samplers.SAMPLER_NAMES
    num_inference_steps: int  # N
    split: int  # k: steps already run on the edge, 0..N
    guidance_scale: float
    seed: int
    timesteps: np.ndarray  # float32, shape (N,): the schedule the edge used
    latents: np.ndarray  # float32 (B, C, H, W), the latent after k steps
    cond_embeddings: np.ndarray  # float32 (B, L, D)
    sampler_state: SamplerState  # step_index must equal split
    request_id: str = ""
    #: The denoiser's extra per-sample inputs by graph input name (SDXL: ``text_embeds`` (B, P),
    #: ``time_ids`` (B, 6); LCM: ``timestep_cond`` (B, time_cond_proj_dim)).
    added_cond: dict[str, np.ndarray] = field(default_factory=dict)
    #: The same names for the unconditional rows; exactly when :attr:`uses_cfg` and ``added_cond``.
    added_uncond: dict[str, np.ndarray] = field(default_factory=dict)
    guidance: str = "cfg"  # one of GUIDANCE_MODES

    def __repr__(self) -> str:
        # Shapes, not values: a handoff is logged on both sides and its tensors are large.
        state = self.sampler_state
        tensors = {name: getattr(arr, "shape", None) for name, arr in state.tensors.items()}
        return (
            f"Handoff(family_id={self.family_id!r}, sampler={self.sampler!r}, "
            f"num_inference_steps={self.num_inference_steps!r}, split={self.split!r}, "
            f"guidance_scale={self.guidance_scale!r}, seed={self.seed!r}, request_id={self.request_id!r}, "
            f"latents={getattr(self.latents, 'shape', None)}, "
            f"cond_embeddings={getattr(self.cond_embeddings, 'shape', None)}, guidance={self.guidance!r}, "
            f"added_cond={ {n: getattr(a, 'shape', None) for n, a in self.added_cond.items()} }, "
            f"state=(step_index={state.step_index!r}, tensors={tensors}, scalars={state.scalars!r}))"
        )

    @property
    def uses_cfg(self) -> bool:
        """Whether classifier-free guidance is on (``guidance_scale > 1`` in ``"cfg"`` mode, the diffusers rule)."""
        return self.guidance == "cfg" and self.guidance_scale > 1.0

    def validate(self, limits: HandoffLimits = HandoffLimits()) -> None:
        """Raise a :class:`HandoffError` subclass naming the first field that breaks the contract."""
        _check_fields(
            family_id=self.family_id,
            sampler=self.sampler,
            num_inference_steps=self.num_inference_steps,
            split=self.split,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            request_id=self.request_id,
            limits=limits,
        )
        _check_guidance(self.guidance)
        state = self.sampler_state
        if not isinstance(state, SamplerState):
            _fail(HandoffInvalid, "sampler_state", "a SamplerState", _type_name(state))
        _check_state_scalars(state.step_index, state.scalars, self.split, limits)
        if not isinstance(state.tensors, dict):
            _fail(HandoffInvalid, "sampler_state.tensors", "a dict", _type_name(state.tensors))
        arrays: dict[str, Any] = {
            LATENTS: self.latents,
            COND_EMBEDDINGS: self.cond_embeddings,
            TIMESTEPS: self.timesteps,
        }
        for name, arr in state.tensors.items():
            if not isinstance(name, str) or not _STATE_NAME.fullmatch(name):
                _fail(HandoffInvalid, "sampler_state.tensors", "names matching " + _STATE_NAME.pattern, _show(name))
            arrays[STATE_PREFIX + name] = arr
        for prefix, added in ((ADDED_COND_PREFIX, self.added_cond), (ADDED_UNCOND_PREFIX, self.added_uncond)):
            if not isinstance(added, dict):
                _fail(HandoffInvalid, prefix.rstrip("."), "a dict", _type_name(added))
            for name, arr in added.items():
                if not isinstance(name, str) or not _STATE_NAME.fullmatch(name):
                    _fail(HandoffInvalid, prefix.rstrip("."), "names matching " + _STATE_NAME.pattern, _show(name))
                arrays[prefix + name] = arr
        _check_added_names(sorted(self.added_cond), sorted(self.added_uncond), self.uses_cfg, limits)
        specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, arr in arrays.items():
            if not isinstance(arr, np.ndarray):
                _fail(HandoffInvalid, name, "a numpy array", _type_name(arr))
            specs[name] = (_DTYPE_NAMES.get(arr.dtype, str(arr.dtype)), tuple(arr.shape))
        _check_specs(specs, self.num_inference_steps, limits)
        _check_values(arrays)

    def check_timesteps(self, computed: np.ndarray) -> None:
        """Raise :class:`HandoffInvalid` unless ``computed`` (the device's schedule) equals :attr:`timesteps`."""
        computed = np.asarray(computed)
        if computed.shape != self.timesteps.shape:
            expected = f"the device's schedule of shape {computed.shape}"
            _fail(HandoffInvalid, "timesteps", expected, f"shape {self.timesteps.shape}")
        # 1e-3: the numpy port's Karras timesteps may differ from torch's by one float32 ulp.
        diff = np.flatnonzero(np.abs(computed.astype(np.float64) - self.timesteps) > 1e-3)
        if diff.size:
            i = int(diff[0])
            _fail(
                HandoffInvalid,
                "timesteps",
                f"the device's schedule ({float(computed[i]):g} at index {i})",
                f"{float(self.timesteps[i]):g} ({diff.size} of {computed.size} differ)",
            )


# --------------------------------------------------------------------------- encode


def encode_handoff(handoff: Handoff, *, limits: HandoffLimits = HandoffLimits()) -> bytes:
    """Validate ``handoff`` against ``limits`` (the receiver's) and serialize it to safetensors bytes.

    Raises the same :class:`HandoffError` subclasses the decoder would, so the edge never
    sends what the device would reject.
    """
    handoff.validate(limits)
    state = handoff.sampler_state
    doc = {
        "version": HANDOFF_VERSION,
        "family_id": handoff.family_id,
        "request_id": handoff.request_id,
        "sampler": handoff.sampler,
        "num_inference_steps": handoff.num_inference_steps,
        "split": handoff.split,
        "guidance_scale": float(handoff.guidance_scale),
        "seed": handoff.seed,
        "state": {
            "step_index": state.step_index,
            "scalars": dict(state.scalars),
            "tensors": sorted(state.tensors),
        },
    }
    if handoff.added_cond:
        doc["added_cond"] = sorted(handoff.added_cond)
    if handoff.guidance != "cfg":
        doc["guidance"] = handoff.guidance
    tensors = {
        LATENTS: np.ascontiguousarray(handoff.latents),
        COND_EMBEDDINGS: np.ascontiguousarray(handoff.cond_embeddings),
        TIMESTEPS: np.ascontiguousarray(handoff.timesteps),
    }
    for name, arr in state.tensors.items():
        tensors[STATE_PREFIX + name] = np.ascontiguousarray(arr)
    for name, arr in handoff.added_cond.items():
        tensors[ADDED_COND_PREFIX + name] = np.ascontiguousarray(arr)
    for name, arr in handoff.added_uncond.items():
        tensors[ADDED_UNCOND_PREFIX + name] = np.ascontiguousarray(arr)
    metadata = {METADATA_KEY: json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=False)}
    data = safetensors.numpy.save(tensors, metadata=metadata)
    header_len = int.from_bytes(data[:8], "little")
    if header_len > limits.max_header_bytes:
        _fail(HandoffTooLarge, "header", f"at most {limits.max_header_bytes} bytes", f"{header_len} bytes")
    if len(data) > limits.max_bytes:
        _fail(HandoffTooLarge, "payload", f"at most {limits.max_bytes} bytes", f"{len(data)} bytes")
    return data


# --------------------------------------------------------------------------- decode


def decode_handoff(
    data: bytes,
    *,
    limits: HandoffLimits = HandoffLimits(),
    expected_family: str | None = None,
) -> Handoff:
    """Parse and fully validate handoff bytes from an untrusted peer.

    Every failure is a :class:`HandoffError` subclass (see the module docstring); the
    returned arrays are writable copies owned by the caller. ``expected_family``, when
    given, must equal the payload's ``family_id`` (else :class:`HandoffFamilyMismatch`).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        _fail(HandoffMalformed, "payload", "bytes", _type_name(data))
    data = bytes(data)
    if len(data) > limits.max_bytes:
        _fail(HandoffTooLarge, "payload", f"at most {limits.max_bytes} bytes", f"{len(data)} bytes")
    header, body_len = _read_header(data, limits)

    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict):
        _fail(HandoffMalformed, "__metadata__", "a JSON object", _show(metadata))
    if set(metadata) != {METADATA_KEY}:
        _fail(HandoffMalformed, "__metadata__", f"exactly the key {METADATA_KEY!r}", _show(sorted(metadata)))
    doc_text = metadata[METADATA_KEY]
    if not isinstance(doc_text, str):
        _fail(HandoffMalformed, METADATA_KEY, "a JSON document in a string", _type_name(doc_text))
    doc = _strict_json(doc_text, METADATA_KEY)
    if not isinstance(doc, dict):
        _fail(HandoffMalformed, METADATA_KEY, "a JSON object", _type_name(doc))

    # Version first: a newer peer may have changed everything else.
    version = doc.get("version")
    if type(version) is not int or version != HANDOFF_VERSION:
        _fail(HandoffInvalid, "version", f"{HANDOFF_VERSION} (unsupported version)", _show(version))
    _check_keys(doc, _TOP_FIELDS, METADATA_KEY, optional=_OPTIONAL_TOP_FIELDS)
    state_doc = doc["state"]
    if not isinstance(state_doc, dict):
        _fail(HandoffMalformed, "state", "a JSON object", _type_name(state_doc))
    _check_keys(state_doc, _STATE_FIELDS, "state")

    family_id = doc["family_id"]
    _check_family_id(family_id)
    if expected_family is not None and family_id != expected_family:
        raise HandoffFamilyMismatch(
            f"family_id: expected {expected_family!r}, got {_show(family_id)}", field="family_id"
        )

    state_names = state_doc["tensors"]
    scalars = state_doc["scalars"]
    if not isinstance(state_names, list) or not all(isinstance(n, str) for n in state_names):
        _fail(HandoffMalformed, "state.tensors", "a list of names", _show(state_names))
    if not isinstance(scalars, dict):
        _fail(HandoffMalformed, "state.scalars", "a JSON object", _type_name(scalars))
    if len(state_names) > limits.max_state_tensors:
        _fail(HandoffTooLarge, "state.tensors", f"at most {limits.max_state_tensors} tensors", str(len(state_names)))
    if len(set(state_names)) != len(state_names):
        _fail(HandoffMalformed, "state.tensors", "distinct names", _show(state_names))

    guidance = doc.get("guidance", "cfg")
    _check_guidance(guidance)
    added_names = doc.get("added_cond", [])
    if "added_cond" in doc and (
        not isinstance(added_names, list) or not added_names or not all(isinstance(n, str) for n in added_names)
    ):
        _fail(HandoffMalformed, "added_cond", "a non-empty list of names", _show(added_names))
    if len(added_names) > limits.max_added_cond:
        _fail(HandoffTooLarge, "added_cond", f"at most {limits.max_added_cond} names", str(len(added_names)))
    if len(set(added_names)) != len(added_names) or added_names != sorted(added_names):
        _fail(HandoffMalformed, "added_cond", "distinct sorted names", _show(added_names))
    for name in added_names:
        if not _STATE_NAME.fullmatch(name):
            _fail(HandoffInvalid, "added_cond", "names matching " + _STATE_NAME.pattern, _show(name))
    cfg = guidance == "cfg" and is_real(doc["guidance_scale"]) and doc["guidance_scale"] > 1.0
    uncond_names = added_names if cfg else []
    expected_names = (
        {LATENTS, COND_EMBEDDINGS, TIMESTEPS}
        | {STATE_PREFIX + n for n in state_names}
        | {ADDED_COND_PREFIX + n for n in added_names}
        | {ADDED_UNCOND_PREFIX + n for n in uncond_names}
    )
    specs = _check_entries(header, expected_names, body_len)

    _check_fields(
        family_id=family_id,
        sampler=doc["sampler"],
        num_inference_steps=doc["num_inference_steps"],
        split=doc["split"],
        guidance_scale=doc["guidance_scale"],
        seed=doc["seed"],
        request_id=doc["request_id"],
        limits=limits,
    )
    _check_state_scalars(state_doc["step_index"], scalars, doc["split"], limits)
    for name in state_names:
        if not _STATE_NAME.fullmatch(name):
            _fail(HandoffInvalid, "state.tensors", "names matching " + _STATE_NAME.pattern, _show(name))
    _check_specs(specs, doc["num_inference_steps"], limits)

    # Only now, with every size proven consistent with len(data), let safetensors read it.
    try:
        loaded = safetensors.numpy.load(data)
    except Exception as exc:  # the Rust binding raises SafetensorError, but any failure here is bad input
        raise HandoffMalformed(f"payload: safetensors rejected it ({type(exc).__name__}: {_show(str(exc))})") from None
    if set(loaded) != set(specs):
        _fail(HandoffMalformed, "payload", f"tensors {sorted(specs)}", _show(sorted(loaded)))
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, shape) in specs.items():
        arr = loaded[name]
        if _DTYPE_NAMES.get(arr.dtype) != dtype or arr.shape != shape:
            _fail(HandoffMalformed, name, f"{dtype} {shape} as declared", f"{arr.dtype} {arr.shape}")
        arrays[name] = np.array(arr, copy=True)  # safetensors' arrays are read-only views of bytes
    _check_values(arrays)

    return Handoff(
        family_id=family_id,
        sampler=doc["sampler"],
        num_inference_steps=doc["num_inference_steps"],
        split=doc["split"],
        guidance_scale=float(doc["guidance_scale"]),
        seed=doc["seed"],
        timesteps=arrays[TIMESTEPS],
        latents=arrays[LATENTS],
        cond_embeddings=arrays[COND_EMBEDDINGS],
        sampler_state=SamplerState(
            step_index=state_doc["step_index"],
            tensors={n: arrays[STATE_PREFIX + n] for n in sorted(state_names)},
            scalars=dict(scalars),
        ),
        request_id=doc["request_id"],
        added_cond={n: arrays[ADDED_COND_PREFIX + n] for n in added_names},
        added_uncond={n: arrays[ADDED_UNCOND_PREFIX + n] for n in uncond_names},
        guidance=guidance,
    )


def _read_header(data: bytes, limits: HandoffLimits) -> tuple[dict[str, Any], int]:
    """Check the 8-byte length prefix and parse the header JSON; return it and the data-section length."""
    if len(data) < 8:
        _fail(HandoffMalformed, "header length", "8 bytes (truncated payload)", f"{len(data)} bytes")
    header_len = int.from_bytes(data[:8], "little")
    available = len(data) - 8
    if header_len > available:
        _fail(
            HandoffMalformed,
            "header length",
            f"at most the {available} bytes that follow (truncated payload?)",
            str(header_len),
        )
    if header_len > limits.max_header_bytes:
        _fail(HandoffTooLarge, "header", f"at most {limits.max_header_bytes} bytes", f"{header_len} bytes")
    if header_len < 2:
        _fail(HandoffMalformed, "header length", "at least 2 (a JSON object)", str(header_len))
    try:
        text = data[8 : 8 + header_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HandoffMalformed(f"header: not UTF-8 ({exc.reason} at byte {exc.start})", field="header") from None
    header = _strict_json(text, "header")
    if not isinstance(header, dict):
        _fail(HandoffMalformed, "header", "a JSON object", _type_name(header))
    return header, available - header_len


def _check_entries(
    header: dict[str, Any], expected_names: set[str], body_len: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check the tensor set, each entry's dtype and shape syntax, and that offsets tile the data exactly."""
    for name in sorted(expected_names - set(header)):
        _fail(HandoffMalformed, name, "a tensor (missing tensor)", "nothing")
    for name in sorted(set(header) - expected_names):
        _fail(HandoffMalformed, name, "no such tensor (unexpected tensor)", "a tensor")
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name in sorted(header):
        entry = header[name]
        if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
            _fail(HandoffMalformed, name, f"an object with keys {sorted(_ENTRY_FIELDS)}", _show(entry))
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        want = _F32
        if dtype != want:
            _fail(HandoffMalformed, name, f"dtype {want}", _show(dtype))
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            _fail(HandoffMalformed, name, "a shape of non-negative ints", _show(shape))
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
            _fail(HandoffMalformed, name, "data_offsets [begin, end]", _show(offsets))
        begin, end = offsets
        nbytes = math.prod(shape) * _ITEMSIZE[want]
        if not 0 <= begin <= end <= body_len or end - begin != nbytes:
            _fail(
                HandoffMalformed,
                name,
                f"data_offsets spanning {nbytes} bytes within the {body_len}-byte data section",
                _show(offsets),
            )
        specs[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    # safetensors requires the tensors to cover the data section with no gap or overlap.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            _fail(HandoffMalformed, name, f"data starting at byte {position} (no gap or overlap)", str(begin))
        position = end
    if position != body_len:
        _fail(HandoffMalformed, "payload", f"a {position}-byte data section", f"{body_len} bytes")
    return specs


# --------------------------------------------------------------------------- shared checks


def _check_fields(
    *,
    family_id: object,
    sampler: object,
    num_inference_steps: object,
    split: object,
    guidance_scale: object,
    seed: object,
    request_id: object,
    limits: HandoffLimits,
) -> None:
    """Check the scalar header fields (types first: a bool is not an int)."""
    _check_family_id(family_id)
    if not isinstance(sampler, str) or sampler not in SAMPLER_NAMES:
        _fail(HandoffInvalid, "sampler", f"one of {list(SAMPLER_NAMES)}", _show(sampler))
    steps = check_int("num_inference_steps", num_inference_steps, lo=1, error=HandoffInvalid)
    check_int("num_inference_steps", steps, hi=limits.max_steps, error=HandoffTooLarge)
    k = check_int("split", split, error=HandoffInvalid)
    if not 0 <= k <= steps:
        _fail(HandoffInvalid, "split", f"0 <= split <= num_inference_steps={steps}", str(k))
    check_float("guidance_scale", guidance_scale, lo=0.0, error=HandoffInvalid)
    if not 0 <= check_int("seed", seed, error=HandoffInvalid) < _MAX_SEED:
        _fail(HandoffInvalid, "seed", "an int in [0, 2**64)", _show(seed))
    rid = check_str("request_id", request_id, error=HandoffInvalid)
    if len(rid) > MAX_ID_CHARS or not rid.isprintable():
        expected = f"a printable string of at most {MAX_ID_CHARS} characters"
        _fail(HandoffInvalid, "request_id", expected, _show(rid))


def _check_family_id(family_id: object) -> None:
    check_family_id("family_id", family_id, error=HandoffInvalid)


def _check_guidance(guidance: object) -> None:
    if not isinstance(guidance, str) or guidance not in GUIDANCE_MODES:
        _fail(HandoffInvalid, "guidance", f"one of {list(GUIDANCE_MODES)}", _show(guidance))


def _check_added_names(cond: list[str], uncond: list[str], cfg: bool, limits: HandoffLimits) -> None:
    """The unconditional extras mirror the conditional ones exactly when classifier-free guidance is on."""
    if len(cond) > limits.max_added_cond:
        _fail(HandoffTooLarge, "added_cond", f"at most {limits.max_added_cond} names", str(len(cond)))
    want = cond if cfg else []
    if uncond != want:
        why = "the added_cond names (classifier-free guidance is on)" if cfg else "none (no classifier-free guidance)"
        _fail(HandoffInvalid, "added_uncond", why, _show(uncond))


def _check_state_scalars(step_index: object, scalars: object, split: int, limits: HandoffLimits) -> None:
    """Check ``sampler_state.step_index`` (== split) and the state scalars (finite ints/floats)."""
    if check_int("sampler_state.step_index", step_index, error=HandoffInvalid) != split:
        _fail(HandoffInvalid, "sampler_state.step_index", f"split={split}", str(step_index))
    if not isinstance(scalars, dict):
        _fail(HandoffInvalid, "sampler_state.scalars", "a dict", _type_name(scalars))
    if len(scalars) > limits.max_state_scalars:
        expected = f"at most {limits.max_state_scalars} entries"
        _fail(HandoffTooLarge, "sampler_state.scalars", expected, str(len(scalars)))
    for name, value in scalars.items():
        if not isinstance(name, str) or not _STATE_NAME.fullmatch(name):
            _fail(HandoffInvalid, "sampler_state.scalars", "names matching " + _STATE_NAME.pattern, _show(name))
        where = f"sampler_state.scalars[{name!r}]"
        if is_int(value):
            if not _INT64_MIN <= value <= _INT64_MAX:
                _fail(HandoffInvalid, where, "an int within int64", _show(value))
        elif isinstance(value, float):
            if not math.isfinite(value):
                _fail(HandoffInvalid, where, "a finite number", _show(value))
        else:
            _fail(HandoffInvalid, where, "an int or float", _type_name(value))


def _check_specs(specs: Mapping[str, tuple[str, tuple[int, ...]]], steps: int, limits: HandoffLimits) -> None:
    """Check dtypes, ndims, limits and cross-tensor consistency of (dtype, shape) per tensor name."""
    for name, (dtype, _) in specs.items():
        want = _F32
        if dtype != want:
            _fail(HandoffMalformed, name, f"dtype {want}", dtype)

    shape = specs[TIMESTEPS][1]
    if len(shape) != 1:
        _fail(HandoffInvalid, TIMESTEPS, "1 dimension (N,)", f"shape {shape}")
    if shape[0] > limits.max_steps:
        _fail(HandoffTooLarge, TIMESTEPS, f"at most {limits.max_steps} steps", f"shape {shape}")
    if shape != (steps,):
        _fail(HandoffInvalid, TIMESTEPS, f"shape ({steps},) (num_inference_steps)", f"shape {shape}")

    latent = specs[LATENTS][1]
    if len(latent) != 4:
        _fail(HandoffInvalid, LATENTS, "4 dimensions (B, C, H, W)", f"shape {latent}")
    _check_dims(
        LATENTS,
        latent,
        (
            ("batch", limits.max_batch),
            ("channels", limits.max_latent_channels),
            ("height", limits.max_latent_side),
            ("width", limits.max_latent_side),
        ),
    )

    cond = specs[COND_EMBEDDINGS][1]
    if len(cond) != 3:
        _fail(HandoffInvalid, COND_EMBEDDINGS, "3 dimensions (B, L, D)", f"shape {cond}")
    _check_dims(
        COND_EMBEDDINGS,
        cond,
        (("batch", limits.max_batch), ("tokens", limits.max_text_tokens), ("width", limits.max_text_dim)),
    )
    if cond[0] != latent[0]:
        _fail(HandoffInvalid, COND_EMBEDDINGS, f"batch {latent[0]} (the latent batch)", f"shape {cond}")

    for name, (_, shape) in specs.items():
        if not name.startswith((ADDED_COND_PREFIX, ADDED_UNCOND_PREFIX)):
            continue
        if len(shape) != 2:
            _fail(HandoffInvalid, name, "2 dimensions (B, D)", f"shape {shape}")
        _check_dims(name, shape, (("batch", limits.max_batch), ("width", limits.max_text_dim)))
        if shape[0] != latent[0]:
            _fail(HandoffInvalid, name, f"batch {latent[0]} (the latent batch)", f"shape {shape}")
        if name.startswith(ADDED_UNCOND_PREFIX):
            pair = ADDED_COND_PREFIX + name[len(ADDED_UNCOND_PREFIX):]
            if pair in specs and specs[pair][1] != shape:
                _fail(HandoffInvalid, name, f"the shape of {pair}, {specs[pair][1]}", f"shape {shape}")

    state_names = [n for n in specs if n.startswith(STATE_PREFIX)]
    if len(state_names) > limits.max_state_tensors:
        expected = f"at most {limits.max_state_tensors} tensors"
        _fail(HandoffTooLarge, "sampler_state.tensors", expected, str(len(state_names)))
    latent_size = math.prod(latent)
    for name in state_names:
        shape = specs[name][1]
        # History tensors are latent-shaped; smaller per-sample state must still lead with the batch.
        ok = 1 <= len(shape) <= 4 and shape[0] == latent[0] and 0 < math.prod(shape) <= latent_size
        if len(shape) == 4 and shape != latent:
            ok = False
        if not ok:
            expected = f"the latent's shape {latent} (or a smaller batch-first shape)"
            _fail(HandoffInvalid, name, expected, f"shape {shape}")


def _check_dims(name: str, shape: tuple[int, ...], bounds: tuple[tuple[str, int], ...]) -> None:
    for size, (axis, bound) in zip(shape, bounds, strict=True):  # ndim checked by the caller
        if size < 1:
            _fail(HandoffInvalid, name, f"{axis} >= 1", f"shape {shape}")
        if size > bound:
            _fail(HandoffTooLarge, name, f"{axis} <= {bound}", f"shape {shape}")


def _check_values(arrays: Mapping[str, np.ndarray]) -> None:
    """Float tensors must be finite; timesteps non-negative."""
    for name, arr in arrays.items():
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            _fail(HandoffInvalid, name, "finite values", f"{bad} NaN/Inf of {arr.size}")
        if name == TIMESTEPS and arr.size and float(arr.min()) < 0:
            _fail(HandoffInvalid, name, "non-negative timesteps", f"min {float(arr.min()):g}")


# --------------------------------------------------------------------------- helpers


def _check_keys(obj: dict[str, Any], required: frozenset[str], where: str,
                optional: frozenset[str] = frozenset()) -> None:
    missing = sorted(required - set(obj))
    if missing:
        _fail(HandoffMalformed, f"{where}.{missing[0]}", "a field (missing field)", "nothing")
    extra = sorted(set(obj) - required - optional)
    if extra:
        _fail(HandoffMalformed, f"{where}.{extra[0]}", "no such field (unexpected field)", _show(extra[0]))



def _strict_json(text: str, where: str) -> Any:
    """Parse standard JSON only (no NaN/Infinity, no duplicate keys); any failure is HandoffMalformed."""
    try:
        return loads_strict(text)
    except ValueError as exc:  # JSONDecodeError, int-digit limit, deep nesting, duplicates, NaN
        raise HandoffMalformed(f"{where}: not valid JSON ({_show(str(exc))})", field=where) from None





def _fail(cls: type[_CodedHandoffError], field: str, expected: str, got: str) -> NoReturn:
    # Field names can come from the payload (tensor names): keep messages one printable ASCII line.
    shown = field if field.isascii() and field.isprintable() and len(field) <= 80 else _show(field)
    raise cls(f"{shown}: expected {expected}, got {got}", field=shown)
