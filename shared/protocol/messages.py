"""The messages of the RISE wire protocol, their limits, and the JSON text-frame codec.

Pure data and pure functions: :func:`encode` turns a message into the JSON text of one
websocket text frame, :func:`decode_text` turns an untrusted text frame back into a
validated message or raises :class:`ProtocolError`. Which peer may send which message,
and when, is :mod:`shared.protocol.connection`'s business.

Validation happens in two layers:

* every message checks its own fields when it is built (``__post_init__``): types (a
  bool is not an int), finite numbers, ranges that hold whatever the server's
  configuration, printable identifiers; so a peer can never *send* an invalid message;
* :func:`check_limits` checks what depends on the server's :class:`ProtocolLimits`
  (prompt length, steps, image sizes, payload sizes); :func:`decode_text` applies it,
  and a client applies the limits it got in :class:`Welcome` before it sends.

Error codes (:data:`ERROR_CODES`) say who should act: ``bad_message`` = the frame breaks
the protocol (fix the peer's code); ``invalid_request`` = a well-formed request asks for
something out of range (fix the input); ``too_large`` = over a size limit; the rest are
named for their cause.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, NoReturn, TypeVar, cast, get_args, overload

from shared.errors import ConfigError, FieldFailure, HandoffError, RiseError
from shared.handoff import Handoff
from shared.relay_plan import MAX_STEPS, RelayPlan
from shared.validation import (
    check_choice,
    check_family_id,
    check_float,
    check_identifier,
    check_int,
    check_str,
    is_int,
    loads_strict,
)
from shared.validation import show as _show
from shared.validation import type_name as _type_name

#: Protocol versions this code speaks, oldest first; ``hello`` negotiates the highest common one.
#: Version 2 names the fields that came after the first release (:data:`ADDED_IN_V2`).
PROTOCOL_VERSIONS: tuple[int, ...] = (1, 2)

#: The fields version 2 adds, by message type (``"relay_plan"``: the keys of a plan object). A sender
#: leaves them out of a frame for a peer that speaks only version 1 (:func:`for_peer`), because the
#: first release rejects a frame with a field it does not know. A receiver accepts them under either
#: version: peers released before version 2 already sent some while announcing version 1 (an edge
#: naming its family, a device asking for previews). ``progress.preview`` needs no gate: it answers
#: only a request that asked for it with ``preview_every``, so its peer knows it.
ADDED_IN_V2: Mapping[str, frozenset[str]] = MappingProxyType({
    "generate": frozenset({"preview_every"}),
    "plan": frozenset({"notice", "family_id", "loading_s"}),
    "relay_plan": frozenset({"handoff_tau", "min_split", "speculative"}),
})

ErrorCode = Literal[
    "bad_message",  # not JSON, unknown type, missing/unknown field, wrong type, out of order
    "too_large",  # a frame or payload over a size limit
    "unauthorized",  # missing or wrong token (fatal)
    "unsupported_version",  # no common protocol version (fatal)
    "wrong_family",  # the device's bundle is for another model family (fatal in hello)
    "invalid_request",  # well-formed, but a value is out of range or not allowed
    "busy",  # the server's queue is full; retry_after_s says when to retry
    "rate_limited",  # this connection is over its request rate; retry_after_s says when
    "too_many_in_flight",  # this connection already has max_in_flight open requests
    "cancelled",  # the request was cancelled at the client's request
    "bad_handoff",  # a handoff/result payload that fails to decode or disagrees with its plan
    "internal",  # the sender failed (a bug, a device runtime error)
    "shutting_down",  # the server is going away (fatal)
]
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)
#: Codes whose :class:`Error` must carry ``retry_after_s`` (and the only ones that may).
RETRY_CODES: frozenset[str] = frozenset({"busy", "rate_limited"})

Stage = Literal["edge", "device"]
STAGES: tuple[str, ...] = get_args(Stage)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_MAX_SEED = 2**64  # exclusive, as in shared.handoff
_MAX_SIDE = 16384  # image side in pixels
#: The longest duration any field on the wire may say (a day).
MAX_SECONDS = 86400.0
_MAX_RTT_S = 600.0
_MAX_BANDWIDTH_BPS = 1e13
_MAX_PAYLOAD_BYTES = 2**31
_MAX_VERSION = 65535

_TOKEN = re.compile(r"[\x21-\x7e]{1,512}", re.ASCII)  # printable ASCII, no spaces
# C0/C1 control characters other than tab, newline, carriage return; format chars (emoji ZWJ) are fine.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


# --------------------------------------------------------------------------- errors


class ProtocolError(RiseError, ValueError):
    """A frame or message breaks the protocol; :meth:`to_error` is the :class:`Error` to answer with.

    ``code`` is one of :data:`ERROR_CODES`, ``field`` names the offending field (or
    ``None``), ``request_id`` the request the error is about when known, and
    ``retry_after_s`` is set for the codes in :data:`RETRY_CODES`. Also raised by the
    connections' ``send_*`` methods when the local caller breaks the protocol (code
    ``internal``) or a request fails the server's limits before it is sent.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "bad_message",
        field: str | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    @classmethod
    def for_field(cls, message: str, *, field: str, kind: FieldFailure) -> ProtocolError:
        """A failed field check: out of range is the input's fault (``invalid_request``), the rest the peer's."""
        return cls(message, code="invalid_request" if kind == "range" else "bad_message", field=field)

    def to_error(self) -> Error:
        """The :class:`Error` message that reports this failure to the peer."""
        # ERROR_CODES is get_args(ErrorCode): membership is exactly the Literal's narrowing.
        code: ErrorCode = cast(ErrorCode, self.code) if self.code in ERROR_CODES else "internal"
        retry = self.retry_after_s if code in RETRY_CODES else None
        if code in RETRY_CODES and retry is None:
            retry = 1.0  # a retry code without a delay would be an invalid Error
        return Error(
            code=code,
            message=_clip(str(self), _MAX_ERROR_CHARS),
            request_id=self.request_id if _valid(_identifier, "request_id", self.request_id) else None,
            field=_clip(self.field, _MAX_FIELD_CHARS) if _valid(_field_name, "field", self.field) else None,
            retry_after_s=None if retry is None else min(max(float(retry), 0.0), MAX_SECONDS),
        )


def protocol_error_from_handoff(exc: HandoffError, request_id: str | None = None) -> ProtocolError:
    """Turn a :mod:`shared.handoff` error into a :class:`ProtocolError` with a wire code."""
    handoff_code = getattr(exc, "code", "")
    code = {"too_large": "too_large", "wrong_family": "wrong_family"}.get(handoff_code, "bad_handoff")
    return ProtocolError(f"handoff: {exc}", code=code, field=getattr(exc, "field", None), request_id=request_id)


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class ProtocolLimits:
    """Every bound the server enforces; sent to the client in :class:`Welcome`. All inclusive.

    ``max_message_bytes`` bounds a text frame (UTF-8 bytes) and ``max_payload_bytes`` a
    binary frame (handoff or PNG); set the websocket library's ``max_size`` to the larger
    of the two the side receives. ``allowed_sizes`` lists the ``(height, width)`` pairs a
    request may ask for; empty means only the family's default size. Rate limiting is a
    token bucket per connection: ``burst`` generates at once, refilled at
    ``requests_per_minute``. After ``max_violations`` rejected frames (flow control aside)
    the connection is closed.

    Floods (see ``shared.protocol.connection``): a refused generate (``busy``,
    ``rate_limited``, ``too_many_in_flight``) that did not wait the ``retry_after_s`` it was
    told spends one of ``max_refusals`` tokens, refilled at ``refusals_per_minute``; every
    frame from the peer, pings included, spends one of ``frame_burst`` tokens refilled at
    ``frames_per_s``; frames queued for a peer that does not read are bounded by
    ``max_outbox_bytes``; a connection must say hello within ``hello_timeout_s``. Past any of
    these the connection is closed (1008).
    """

    max_message_bytes: int = 64 * 2**10
    max_payload_bytes: int = 64 * 2**20
    max_prompt_chars: int = 1000
    max_prompt_bytes: int = 4000
    max_steps: int = 100
    allowed_sizes: tuple[tuple[int, int], ...] = ((512, 512), (512, 768), (768, 512), (768, 768))
    max_in_flight: int = 4
    requests_per_minute: float = 30.0
    burst: int = 5
    max_violations: int = 32
    max_refusals: int = 32  # early refusals (not waiting retry_after_s) at once ...
    refusals_per_minute: float = 30.0  # ... and sustained
    frames_per_s: float = 20.0  # every frame from the peer (pings, pongs and fragments too) ...
    frame_burst: int = 100  # ... with this many at once
    max_outbox_bytes: int = 16 * 2**20  # queued for the peer and not yet taken by the writer
    hello_timeout_s: float = 10.0  # from the websocket upgrade to the hello

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("max_message_bytes", 1024, 2**30),  # >= 1 KiB: an Error or a Welcome must always fit
            ("max_payload_bytes", 1, _MAX_PAYLOAD_BYTES),
            ("max_prompt_chars", 1, 10**6),
            ("max_prompt_bytes", 1, 4 * 10**6),
            ("max_steps", 1, MAX_STEPS),
            ("max_in_flight", 1, 1024),
            ("burst", 1, 10**6),
            ("max_violations", 1, 10**6),
            ("max_refusals", 1, 10**6),
            ("frame_burst", 1, 10**6),
            ("max_outbox_bytes", 1024, 2**34),
        ):
            check_int(name, getattr(self, name), lo=lo, hi=hi, error=ConfigError)
        for name, top in (("requests_per_minute", 1e6), ("refusals_per_minute", 1e6), ("frames_per_s", 1e6),
                          ("hello_timeout_s", MAX_SECONDS)):
            value = check_float(name, getattr(self, name), lo=0.0, hi=top, lo_open=True, error=ConfigError)
            object.__setattr__(self, name, value)
        sizes = self.allowed_sizes
        if not isinstance(sizes, (tuple, list)) or len(sizes) > 64:
            raise ConfigError(f"allowed_sizes must be a list of at most 64 [height, width] pairs, got {_show(sizes)}")
        pairs = []
        for pair in sizes:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(is_int(s) for s in pair)) or not all(
                8 <= s <= _MAX_SIDE and s % 8 == 0 for s in pair
            ):
                raise ConfigError(
                    f"allowed_sizes entries must be [height, width] with multiples of 8 in [8, {_MAX_SIDE}], "
                    f"got {_show(pair)}"
                )
            pairs.append((pair[0], pair[1]))
        if len(set(pairs)) != len(pairs):
            raise ConfigError(f"allowed_sizes has duplicates: {_show(sizes)}")
        object.__setattr__(self, "allowed_sizes", tuple(pairs))  # TOML/JSON give lists

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProtocolLimits:
        """Build from a mapping (an ``edge.toml`` table, a :class:`Welcome`); unknown keys are a ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"limits must be a table, got {_type_name(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"unknown limit {_show(unknown[0])}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``allowed_sizes`` as lists)."""
        data = dataclasses.asdict(self)
        data["allowed_sizes"] = [list(pair) for pair in self.allowed_sizes]
        return data

    def to_wire(self) -> dict[str, Any]:
        """What a ``welcome`` carries: :meth:`to_dict` without the edge's own flood limits
        (:data:`EDGE_ONLY_LIMITS`), which only it enforces, so a device of the version before them
        (which refuses unknown welcome fields) still talks to an edge of this one."""
        return {k: v for k, v in self.to_dict().items() if k not in EDGE_ONLY_LIMITS}

    @property
    def websocket_max_size(self) -> int:
        """The ``max_size`` to give the websocket library: the largest frame either side may send."""
        return max(self.max_message_bytes, self.max_payload_bytes)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class _Message:
    """Base of every message: ``TYPE`` is the wire ``"type"``; fields validate on construction."""

    TYPE: ClassVar[str] = ""
    #: Ignore unknown fields when decoding (only ``hello``, which precedes version negotiation).
    LENIENT: ClassVar[bool] = False
    #: Converters from JSON values to field values (lists -> tuples, objects -> dataclasses).
    WIRE_IN: ClassVar[Mapping[str, Callable[[str, Any], Any]]] = {}
    #: Optional fields left out of the frame while ``None``: fields added after the first
    #: release, so a peer that predates them reads every frame that does not use them.
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        raise NotImplementedError

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalize (e.g. int -> float) in a frozen dataclass


@dataclass(frozen=True)
class Hello(_Message):
    """Client -> server, first frame: the versions it speaks, its token, its bundle's family and device.

    ``device_class`` is a short free-form speed class (e.g. ``"low"``/``"mid"``/``"high"``),
    ``device_step_s`` the measured seconds per small-UNet step at the default size,
    ``device_load`` the device's CPU load as a fraction in [0, 1]. The token is never
    shown in ``repr``.
    """

    TYPE: ClassVar[str] = "hello"
    LENIENT: ClassVar[bool] = True
    versions: tuple[int, ...]
    family_id: str
    client: str
    token: str | None = field(default=None, repr=False)
    device_class: str | None = None
    device_step_s: float | None = None
    device_load: float | None = None

    def _validate(self) -> None:
        versions = self.versions
        if not isinstance(versions, (tuple, list)) or not 1 <= len(versions) <= 16:
            _fail("bad_message", "versions", "a list of 1 to 16 versions", _show(versions))
        self._set("versions", tuple(_int(f"versions[{i}]", v, 1, _MAX_VERSION) for i, v in enumerate(versions)))
        _family_id("family_id", self.family_id)
        _name("client", self.client)
        if self.token is not None and (not isinstance(self.token, str) or not _TOKEN.fullmatch(self.token)):
            # Never echo a token, not even a malformed one.
            _fail("bad_message", "token", "printable ASCII without spaces, 1 to 512 characters", "something else")
        _opt(_identifier, "device_class", self.device_class)
        self._set("device_step_s", _opt(_float, "device_step_s", self.device_step_s, 0.0, 3600.0, lo_open=True))
        self._set("device_load", _opt(_float, "device_load", self.device_load, 0.0, 1.0))


@dataclass(frozen=True)
class Welcome(_Message):
    """Server -> client, the answer to an accepted hello: the chosen version, the family, the limits."""

    TYPE: ClassVar[str] = "welcome"
    WIRE_IN: ClassVar[Mapping[str, Callable[[str, Any], Any]]] = {}  # set below: needs _limits_in
    version: int
    family_id: str
    server: str
    limits: ProtocolLimits

    def _validate(self) -> None:
        _int("version", self.version, 1, _MAX_VERSION)
        _family_id("family_id", self.family_id)
        _name("server", self.server)
        if not isinstance(self.limits, ProtocolLimits):
            _fail("bad_message", "limits", "ProtocolLimits", _type_name(self.limits))


@dataclass(frozen=True)
class Generate(_Message):
    """Client -> server: generate one image.

    ``preference`` is the user's weight in [0, 1] (0 = fastest, 1 = best quality).
    ``height``/``width`` go together (both or neither; ``None`` = the family's default)
    and must be one of the server's ``allowed_sizes``. ``pinned`` fixes the relay
    configuration instead of letting the scheduler choose; ``steps`` fixes only ``N``.
    ``device_load``, ``rtt_s`` and ``bandwidth_bps`` are the device's current context
    for the scheduler. ``preview_every`` asks for a live preview on every that-many edge
    steps (:class:`Progress` ``preview``); ``None``: no previews.
    """

    TYPE: ClassVar[str] = "generate"
    WIRE_IN: ClassVar[Mapping[str, Callable[[str, Any], Any]]] = {}  # set below
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"preview_every"})
    request_id: str
    prompt: str
    preference: float = 0.5
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    pinned: RelayPlan | None = None
    device_load: float | None = None
    rtt_s: float | None = None
    bandwidth_bps: float | None = None
    preview_every: int | None = None

    def _validate(self) -> None:
        _identifier("request_id", self.request_id)
        _text("prompt", self.prompt, max_chars=None, allow_empty=True)
        self._set("preference", _float("preference", self.preference, 0.0, 1.0))
        _opt(_int, "seed", self.seed, 0, _MAX_SEED - 1)
        _opt(_int, "height", self.height, 8, _MAX_SIDE)
        _opt(_int, "width", self.width, 8, _MAX_SIDE)
        if (self.height is None) != (self.width is None):
            missing = "width" if self.width is None else "height"
            _fail("invalid_request", missing, "height and width together (or neither)", "only one of them")
        _opt(_int, "steps", self.steps, 1, MAX_STEPS)
        if self.pinned is not None:
            _relay_plan("pinned", self.pinned)
            if self.steps is not None and self.steps != self.pinned.num_inference_steps:
                expected = f"the pinned configuration's {self.pinned.num_inference_steps} (or no steps)"
                _fail("invalid_request", "steps", expected, str(self.steps))
        self._set("device_load", _opt(_float, "device_load", self.device_load, 0.0, 1.0))
        self._set("rtt_s", _opt(_float, "rtt_s", self.rtt_s, 0.0, _MAX_RTT_S))
        bandwidth = _opt(_float, "bandwidth_bps", self.bandwidth_bps, 0.0, _MAX_BANDWIDTH_BPS, lo_open=True)
        self._set("bandwidth_bps", bandwidth)
        _opt(_int, "preview_every", self.preview_every, 1, MAX_STEPS)


@dataclass(frozen=True)
class Plan(_Message):
    """Server -> client: the configuration chosen for a request and why.

    ``seed``, ``height`` and ``width`` are the values actually used (the server fills in
    what the request left open); ``scheduler`` names the policy that chose (``"linucb"``,
    ``"pinned"``, ``"edge_only"``...); ``why`` is one short human-readable line. ``notice``
    is one line for the user about the prompt itself (words the family did not understand,
    an item it placed), ``None`` when it was read as written. ``family_id`` is the family that
    serves the request (an edge may serve several; the connection's hello chose it).
    ``loading_s`` is the edge's estimate of the seconds it spends loading that family before the
    request's first step (the family was not in memory: a first use, or it was evicted), ``None``
    when the family is loaded; the device shows it and waits that much longer for the first step.
    """

    TYPE: ClassVar[str] = "plan"
    WIRE_IN: ClassVar[Mapping[str, Callable[[str, Any], Any]]] = {}  # set below
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"notice", "family_id", "loading_s"})
    request_id: str
    plan: RelayPlan
    seed: int
    height: int
    width: int
    scheduler: str
    why: str
    notice: str | None = None
    family_id: str | None = None
    loading_s: float | None = None

    def _validate(self) -> None:
        _identifier("request_id", self.request_id)
        _relay_plan("plan", self.plan)
        _int("seed", self.seed, 0, _MAX_SEED - 1)
        _int("height", self.height, 8, _MAX_SIDE)
        _int("width", self.width, 8, _MAX_SIDE)
        _identifier("scheduler", self.scheduler)
        _text("why", self.why, max_chars=512, allow_empty=True)
        if self.notice is not None:
            _text("notice", self.notice, max_chars=512, allow_empty=False)
        if self.family_id is not None:
            _family_id("family_id", self.family_id)
        self._set("loading_s", _opt(_float, "loading_s", self.loading_s, 0.0, MAX_SECONDS, lo_open=True))


@dataclass(frozen=True)
class Progress(_Message):
    """Server -> client: ``step`` of ``total`` steps done at ``stage`` (the edge sends ``"edge"``;
    a client reports its own ORT steps to its UI with the same type and ``"device"``).

    ``preview`` is a small PNG of the picture forming (the predicted clean latent through the
    family's linear latent-to-RGB projection), base64 in the frame; only when the request asked
    (``Generate.preview_every``), at most :data:`MAX_PREVIEW_BYTES` decoded.
    """

    TYPE: ClassVar[str] = "progress"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"preview"})
    request_id: str
    stage: Stage
    step: int
    total: int
    preview: str | None = None

    def _validate(self) -> None:
        _identifier("request_id", self.request_id)
        _choice("stage", self.stage, STAGES)
        _int("total", self.total, 1, MAX_STEPS)
        _int("step", self.step, 0, MAX_STEPS)
        if self.step > self.total:
            _fail("invalid_request", "step", f"at most total={self.total}", str(self.step))
        if self.preview is not None:
            _preview_png("preview", self.preview)

    @classmethod
    def with_preview(cls, request_id: str, stage: Stage, step: int, total: int, png: bytes) -> Progress:
        """A progress message carrying ``png`` (encoded for the text frame)."""
        return cls(request_id, stage, step, total, preview=encode_preview(png))

    def preview_png(self) -> bytes | None:
        """The preview's PNG bytes (validated when the message was built), or ``None``."""
        return None if self.preview is None else base64.b64decode(self.preview, validate=True)


@dataclass(frozen=True)
class HandoffAnnouncement(_Message):
    """Server -> client: the very next frame is a binary frame of ``nbytes`` bytes, the
    safetensors handoff (:mod:`shared.handoff`) of ``request_id``.

    ``edge_compute_s`` is the edge's compute time for the request, ``queue_s`` the time
    it waited in the edge's queue.
    """

    TYPE: ClassVar[str] = "handoff"
    request_id: str
    nbytes: int
    edge_compute_s: float | None = None
    queue_s: float | None = None

    def _validate(self) -> None:
        _identifier("request_id", self.request_id)
        _int("nbytes", self.nbytes, 1, _MAX_PAYLOAD_BYTES)
        self._set("edge_compute_s", _opt(_float, "edge_compute_s", self.edge_compute_s, 0.0, MAX_SECONDS))
        self._set("queue_s", _opt(_float, "queue_s", self.queue_s, 0.0, MAX_SECONDS))


@dataclass(frozen=True)
class ResultAnnouncement(_Message):
    """Server -> client, for ``decode_on="edge"``: the very next frame is a binary frame of
    ``nbytes`` bytes, the edge-decoded ``height`` x ``width`` image as PNG."""

    TYPE: ClassVar[str] = "result"
    request_id: str
    nbytes: int
    height: int
    width: int
    format: Literal["png"] = "png"
    edge_compute_s: float | None = None
    queue_s: float | None = None

    def _validate(self) -> None:
        _identifier("request_id", self.request_id)
        _int("nbytes", self.nbytes, len(PNG_SIGNATURE), _MAX_PAYLOAD_BYTES)
        _int("height", self.height, 8, _MAX_SIDE)
        _int("width", self.width, 8, _MAX_SIDE)
        _choice("format", self.format, ("png",))
        self._set("edge_compute_s", _opt(_float, "edge_compute_s", self.edge_compute_s, 0.0, MAX_SECONDS))
        self._set("queue_s", _opt(_float, "queue_s", self.queue_s, 0.0, MAX_SECONDS))


@dataclass(frozen=True)
class Report(_Message):
    """Client -> server, once per delivered request: what the device measured (the bandit's feedback).

    Durations in seconds: ``device_compute_s`` (ORT steps + decode), ``transfer_s`` (the
    binary frame's transfer), ``total_latency_s`` (generate sent -> image ready).
    ``rating`` is the user's -1/0/+1 if already given (or later, with :class:`Rating`).
    """

    TYPE: ClassVar[str] = "report"
    request_id: str
    device_compute_s: float
    transfer_s: float
    total_latency_s: float
    device_load: float | None = None
    rtt_s: float | None = None
    bandwidth_bps: float | None = None
    rating: int | None = None

    def _validate(self) -> None:
        _identifier("request_id", self.request_id)
        for name in ("device_compute_s", "transfer_s", "total_latency_s"):
            self._set(name, _float(name, getattr(self, name), 0.0, MAX_SECONDS))
        self._set("device_load", _opt(_float, "device_load", self.device_load, 0.0, 1.0))
        self._set("rtt_s", _opt(_float, "rtt_s", self.rtt_s, 0.0, _MAX_RTT_S))
        bandwidth = _opt(_float, "bandwidth_bps", self.bandwidth_bps, 0.0, _MAX_BANDWIDTH_BPS, lo_open=True)
        self._set("bandwidth_bps", bandwidth)
        _opt(_int, "rating", self.rating, -1, 1)


@dataclass(frozen=True)
class Rating(_Message):
    """Client -> server: the user's -1/0/+1 for a delivered request, sent whenever the user gives it."""

    TYPE: ClassVar[str] = "rating"
    request_id: str
    rating: int

    def _validate(self) -> None:
        _identifier("request_id", self.request_id)
        _int("rating", self.rating, -1, 1)


@dataclass(frozen=True)
class Cancel(_Message):
    """Client -> server: stop ``request_id``; the server ends it with an ``Error(code="cancelled")``."""

    TYPE: ClassVar[str] = "cancel"
    request_id: str

    def _validate(self) -> None:
        _identifier("request_id", self.request_id)


_MAX_ERROR_CHARS = 1024
_MAX_FIELD_CHARS = 128


@dataclass(frozen=True)
class Error(_Message):
    """Either direction: something failed. ``request_id`` set = that request is over; ``None`` =
    about the connection. ``retry_after_s`` is required for ``busy``/``rate_limited`` only.

    Its format, like :class:`Hello`'s, is the same in every protocol version, since it
    may be sent before a version is agreed.
    """

    TYPE: ClassVar[str] = "error"
    code: ErrorCode
    message: str
    request_id: str | None = None
    field: str | None = None
    retry_after_s: float | None = None

    def _validate(self) -> None:
        _choice("code", self.code, ERROR_CODES)
        _text("message", self.message, max_chars=_MAX_ERROR_CHARS, allow_empty=False)
        _opt(_identifier, "request_id", self.request_id)
        _opt(_field_name, "field", self.field)
        if self.code in RETRY_CODES:
            if self.retry_after_s is None:
                _fail("bad_message", "retry_after_s", f"a delay for code {self.code!r}", "nothing")
            self._set("retry_after_s", _float("retry_after_s", self.retry_after_s, 0.0, MAX_SECONDS))
        elif self.retry_after_s is not None:
            _fail("bad_message", "retry_after_s", f"null for code {self.code!r}", _show(self.retry_after_s))


Message = (
    Hello
    | Welcome
    | Generate
    | Plan
    | Progress
    | HandoffAnnouncement
    | ResultAnnouncement
    | Report
    | Rating
    | Cancel
    | Error
)
MessageT = TypeVar("MessageT", bound=_Message)
MESSAGE_TYPES: dict[str, type[_Message]] = {
    cls.TYPE: cls for cls in get_args(Message)
}


# --------------------------------------------------------------------------- codec


def encode(message: Message) -> str:
    """The JSON text frame for ``message`` (``{"type": ..., <fields>}``; ``None`` as ``null``).

    Messages validate themselves when built, so what this returns always decodes.
    Binary payloads are not messages: a connection sends them as their own frame.
    """
    if not isinstance(message, _Message) or type(message).TYPE not in MESSAGE_TYPES:
        raise ProtocolError(f"message: expected a protocol message, got {_type_name(message)}", code="internal")
    obj: dict[str, Any] = {"type": message.TYPE}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if value is None and f.name in message.OMIT_IF_NONE:
            continue
        obj[f.name] = _to_wire(value)
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def decode_text(frame: str, limits: ProtocolLimits | None = None) -> Message:
    """Parse and fully validate one text frame from an untrusted peer.

    Checks, in order: the size (before parsing), strict JSON (no NaN, no duplicate keys),
    a JSON object with a known ``type``, the field set (missing or unknown fields are
    ``bad_message``; ``hello`` alone ignores unknown fields), every field's type and
    range, then :func:`check_limits` (default: ``ProtocolLimits()``). Any failure raises :class:`ProtocolError`, with
    the request id attached when the frame had a valid one; nothing else escapes.
    """
    limits = _DEFAULT_LIMITS if limits is None else limits
    if not isinstance(frame, str):
        _fail("bad_message", "frame", "a text frame", _type_name(frame))
    # len() first: it bounds the work of encoding; UTF-8 is at least one byte per character.
    if len(frame) > limits.max_message_bytes or _utf8_len(frame) > limits.max_message_bytes:
        _fail("too_large", "frame", f"at most {limits.max_message_bytes} bytes", f"{_utf8_len(frame)} bytes")
    obj = _strict_json(frame)
    if not isinstance(obj, dict):
        _fail("bad_message", "frame", "a JSON object", _type_name(obj))
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        _fail("bad_message", "type", f"one of {sorted(MESSAGE_TYPES)}", _show(kind))
    cls = MESSAGE_TYPES[kind]
    rid = obj.get("request_id")
    try:
        message = _from_wire(cls, obj)
        check_limits(message, limits)  # type: ignore[arg-type]
    except ProtocolError as exc:
        if exc.request_id is None and _valid(_identifier, "request_id", rid):
            exc.request_id = rid  # lets the peer fail just that request
        raise
    return message  # type: ignore[return-value]


def check_limits(message: Message, limits: ProtocolLimits) -> None:
    """Raise :class:`ProtocolError` if ``message`` exceeds one of the server's ``limits``."""
    if isinstance(message, Generate):
        chars = len(message.prompt)
        if chars > limits.max_prompt_chars:
            _fail("invalid_request", "prompt", f"at most {limits.max_prompt_chars} characters", f"{chars}")
        nbytes = _utf8_len(message.prompt)
        if nbytes > limits.max_prompt_bytes:
            _fail("invalid_request", "prompt", f"at most {limits.max_prompt_bytes} UTF-8 bytes", f"{nbytes}")
        if message.steps is not None and message.steps > limits.max_steps:
            _fail("invalid_request", "steps", f"at most {limits.max_steps}", str(message.steps))
        if message.pinned is not None and message.pinned.num_inference_steps > limits.max_steps:
            got = str(message.pinned.num_inference_steps)
            _fail("invalid_request", "pinned", f"num_inference_steps at most {limits.max_steps}", got)
        if message.height is not None and (message.height, message.width) not in limits.allowed_sizes:
            if limits.allowed_sizes:
                expected = "a size among " + ", ".join(f"{h}x{w}" for h, w in limits.allowed_sizes)
            else:
                expected = "no height/width (this server serves only the family's default size)"
            _fail("invalid_request", "height", expected, f"{message.height}x{message.width}")
    elif isinstance(message, Plan):
        if message.plan.num_inference_steps > limits.max_steps:
            _fail("invalid_request", "plan", f"num_inference_steps at most {limits.max_steps}", str(message.plan))
    elif isinstance(message, Progress):
        if message.total > limits.max_steps:
            _fail("invalid_request", "total", f"at most {limits.max_steps}", str(message.total))
    elif isinstance(message, (HandoffAnnouncement, ResultAnnouncement)):
        if message.nbytes > limits.max_payload_bytes:
            _fail("too_large", "nbytes", f"at most {limits.max_payload_bytes}", str(message.nbytes))


def plan_conflict(request: Generate, plan: Plan) -> str | None:
    """Why ``plan`` does not honour what ``request`` fixed (pinned plan, steps, seed, size), or ``None``."""
    if request.pinned is not None and plan.plan != request.pinned:
        return f"plan: expected the pinned configuration {request.pinned}, got {plan.plan}"
    if request.steps is not None and plan.plan.num_inference_steps != request.steps:
        return f"plan: expected {request.steps} steps as requested, got {plan.plan.num_inference_steps}"
    if request.seed is not None and plan.seed != request.seed:
        return f"seed: expected {request.seed} as requested, got {plan.seed}"
    if request.height is not None and (plan.height, plan.width) != (request.height, request.width):
        return f"height: expected {request.height}x{request.width} as requested, got {plan.height}x{plan.width}"
    return None


def for_peer(message: MessageT, version: int) -> MessageT:
    """``message`` as a peer of protocol ``version`` reads it: under version 1 a plan's ``notice``,
    ``family_id`` and ``loading_s`` and a request's ``preview_every`` are left out (they inform or
    ask; the frame means the same without them). A relay mode (:func:`newer_fields`) cannot be left
    out, since it changes what the plan does; the caller refuses it."""
    if version >= 2 or not isinstance(message, (Plan, Generate)):
        return message
    cleared: dict[str, Any] = {name: None for name in ADDED_IN_V2[message.TYPE]}
    return dataclasses.replace(message, **cleared)


def newer_fields(message: Message, version: int) -> tuple[str, ...]:
    """The fields ``message`` uses that a peer of protocol ``version`` does not know (:data:`ADDED_IN_V2`;
    ``"plan.speculative"`` for a key of a plan object), in field order; ``()`` when it reads them all."""
    if version >= 2:
        return ()
    names = ADDED_IN_V2.get(message.TYPE, frozenset())
    newer: list[str] = []
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if isinstance(value, RelayPlan):
            newer += [f"{f.name}.{key}" for key in _to_wire(value) if key in ADDED_IN_V2["relay_plan"]]
        elif f.name in names and value is not None:
            newer.append(f.name)
    return tuple(newer)


def handoff_conflict(handoff: Handoff, plan: Plan) -> str | None:
    """Why a decoded handoff is not the one ``plan`` announced (request, steps, split, sampler...), or ``None``."""
    p = plan.plan
    if not p.accepts_split(handoff.split):
        allowed = str(p.split) if not p.adaptive else f"a step in [{p.first_split}, {p.split}]"
        return f"split: expected {allowed} (from the plan), got {_show(handoff.split)}"
    for name, got, want in (
        ("request_id", handoff.request_id, plan.request_id),
        ("num_inference_steps", handoff.num_inference_steps, p.num_inference_steps),
        ("sampler", handoff.sampler, p.sampler),
        ("guidance_scale", float(handoff.guidance_scale), float(p.guidance_scale)),
        ("seed", handoff.seed, plan.seed),
    ):
        if got != want:
            return f"{name}: expected {_show(want)} (from the plan), got {_show(got)}"
    return None


# --------------------------------------------------------------------------- wire conversion


def _to_wire(value: Any) -> Any:
    if isinstance(value, RelayPlan):
        wire: dict[str, int | float | str | bool] = {
            "num_inference_steps": value.num_inference_steps,
            "split": value.split,
            "sampler": value.sampler,
            "guidance_scale": float(value.guidance_scale),
            "decode_on": value.decode_on,
        }
        # The newer keys only when used: a fixed-split plan reads as it always did.
        if value.handoff_tau is not None:
            wire["handoff_tau"] = float(value.handoff_tau)
        if value.min_split is not None:
            wire["min_split"] = value.min_split
        if value.speculative:
            wire["speculative"] = True
        return wire
    if isinstance(value, ProtocolLimits):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


_PLAN_FIELDS = frozenset({"num_inference_steps", "split", "sampler", "guidance_scale", "decode_on"})
_PLAN_OPTIONAL = frozenset({"handoff_tau", "min_split", "speculative"})


def _plan_in(name: str, value: Any) -> RelayPlan | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail("bad_message", name, "a JSON object", _type_name(value))
    _check_keys(value, required=_PLAN_FIELDS, known=_PLAN_FIELDS | _PLAN_OPTIONAL, where=name, prefix=f"{name}.")
    try:
        return RelayPlan(**value)
    except ConfigError as exc:
        raise ProtocolError(f"{name}: {_clip(str(exc), 300)}", code="invalid_request", field=name) from None


#: Limits only the edge enforces (on frames it receives): not sent in a welcome, optional in one.
EDGE_ONLY_LIMITS = frozenset({"max_refusals", "refusals_per_minute", "frames_per_s", "frame_burst",
                              "max_outbox_bytes", "hello_timeout_s"})


def _limits_in(name: str, value: Any) -> ProtocolLimits:
    if not isinstance(value, dict):
        _fail("bad_message", name, "a JSON object", _type_name(value))
    known = frozenset(f.name for f in dataclasses.fields(ProtocolLimits))
    _check_keys(value, required=known - EDGE_ONLY_LIMITS, known=known, where=name, prefix=f"{name}.")
    try:
        return ProtocolLimits.from_dict(value)
    except ConfigError as exc:
        raise ProtocolError(f"{name}: {_clip(str(exc), 300)}", code="bad_message", field=name) from None


Welcome.WIRE_IN = {"limits": _limits_in}
Generate.WIRE_IN = {"pinned": _plan_in}
Plan.WIRE_IN = {"plan": _plan_in}


def _from_wire(cls: type[_Message], obj: dict[str, Any]) -> _Message:
    """Check the field set of a decoded JSON object and build ``cls`` from it."""
    fields = dataclasses.fields(cls)
    known = frozenset(f.name for f in fields)
    required = frozenset(
        f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    # Within a negotiated version every field is known: an unknown one is a bug (e.g. a
    # misspelt optional field silently ignored). Hello precedes negotiation, so it is lenient.
    _check_keys(obj, required=required, known=None if cls.LENIENT else known | {"type"}, where=cls.TYPE)
    kwargs = {name: obj[name] for name in known if name in obj}
    for name, convert in cls.WIRE_IN.items():
        if name in kwargs:
            kwargs[name] = convert(name, kwargs[name])
    return cls(**kwargs)


def _check_keys(
    obj: dict[str, Any], *, required: frozenset[str], known: frozenset[str] | None, where: str, prefix: str = ""
) -> None:
    """Missing or (unless ``known`` is None) unknown keys are ``bad_message``; ``prefix`` names a nested object."""
    missing = sorted(required - set(obj))
    if missing:
        name = prefix + missing[0]
        raise ProtocolError(f"{name}: missing field of {where!r}", field=name)
    if known is not None:
        extra = sorted(set(obj) - known)
        if extra:
            name = prefix + _safe_name(extra[0])
            raise ProtocolError(f"{name}: unknown field of {where!r}", field=name)



def _strict_json(text: str) -> Any:
    try:
        return loads_strict(text)
    except ValueError as exc:  # JSONDecodeError, int-digit limit, deep nesting, duplicates, NaN
        raise ProtocolError(f"frame: not valid JSON ({_show(str(exc))})", code="bad_message", field="frame") from None


# --------------------------------------------------------------------------- field checks


def _fail(code: str, field: str, expected: str, got: str) -> NoReturn:
    raise ProtocolError(f"{field}: expected {expected}, got {got}", code=code, field=field)


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    return check_int(name, value, lo=lo, hi=hi, error=ProtocolError)


def _float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    return check_float(name, value, lo=lo, hi=hi, lo_open=lo_open, error=ProtocolError)


def _opt(check: Callable[..., Any], name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    return None if value is None else check(name, value, *args, **kwargs)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    return check_choice(name, value, choices, error=ProtocolError)


def _identifier(name: str, value: Any) -> str:
    return check_identifier(name, value, error=ProtocolError)


def _family_id(name: str, value: Any) -> str:
    # The rule shared.handoff and the bundle manifest use too: a family id valid here is valid there.
    return check_family_id(name, value, error=ProtocolError)


def _name(name: str, value: Any) -> str:
    return check_str(name, value, min_len=1, max_len=128, printable=True, error=ProtocolError)


def _field_name(name: str, value: Any) -> str:
    return check_str(name, value, min_len=1, max_len=_MAX_FIELD_CHARS, printable=True, error=ProtocolError)


def _text(name: str, value: Any, *, max_chars: int | None, allow_empty: bool) -> str:
    """Free text (prompt, why, error message): no control characters but tab/newline, valid Unicode."""
    text = check_str(name, value, error=ProtocolError)
    if not text and not allow_empty:
        _fail("bad_message", name, "a non-empty string", "''")
    if max_chars is not None and len(text) > max_chars:
        _fail("invalid_request", name, f"at most {max_chars} characters", str(len(text)))
    bad = _CONTROL.search(text)
    if bad:
        _fail("invalid_request", name, "no control characters", f"{ascii(bad.group())} at {bad.start()}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800" escapes decode to lone surrogates
        _fail("invalid_request", name, "valid Unicode", f"a lone surrogate at {exc.start}")
    return text


def _relay_plan(name: str, value: Any) -> RelayPlan:
    if not isinstance(value, RelayPlan):
        _fail("bad_message", name, "a RelayPlan", _type_name(value))
    # A latent finished on the device cannot be decoded on the edge: v1 sends nothing back.
    if value.decode_on == "edge" and value.split != value.num_inference_steps:
        expected = "decode_on='edge' only with split == num_inference_steps (edge-only)"
        _fail("invalid_request", name, expected, f"split={value.split} of {value.num_inference_steps}")
    return value


#: The largest preview a progress message may carry (decoded PNG bytes): "a few KB".
MAX_PREVIEW_BYTES = 16 * 1024


def encode_preview(png: bytes) -> str:
    """A preview's PNG as :class:`Progress` carries it in the text frame (base64)."""
    return base64.b64encode(png).decode("ascii")


def _preview_png(name: str, value: Any) -> bytes:
    text = check_str(name, value, max_len=4 * ((MAX_PREVIEW_BYTES + 2) // 3), error=ProtocolError)
    try:
        png = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _fail("bad_message", name, "base64 of a PNG", "text that is not base64")
    if not png.startswith(PNG_SIGNATURE):
        _fail("bad_message", name, "base64 of a PNG", "bytes without the PNG signature")
    return png


def _valid(check: Callable[[str, Any], Any], name: str, value: Any) -> bool:
    if value is None:
        return False
    try:
        check(name, value)
    except ProtocolError:
        return False
    return True


# --------------------------------------------------------------------------- helpers



def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))  # surrogatepass: sizing must not fail




def _safe_name(name: str) -> str:
    """A peer-supplied field name as it may appear in an error: itself if short printable ASCII."""
    return name if name.isascii() and name.isprintable() and 0 < len(name) <= 64 else _show(name, 64)


@overload
def _clip(text: str, limit: int) -> str: ...
@overload
def _clip(text: None, limit: int) -> None: ...
@overload
def _clip(text: str | None, limit: int) -> str | None: ...
def _clip(text: str | None, limit: int) -> str | None:
    """``text`` made fit for an Error message: no control characters or lone surrogates, at most ``limit``."""
    if text is None:
        return None
    text = _CONTROL.sub("?", text).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


_DEFAULT_LIMITS = ProtocolLimits()  # last: the limits' checks use the helpers above
