"""Per-connection state machines of the RISE protocol, sans I/O: frames in, events and frames out.

Modelled on the ``websockets`` library's own sans-I/O core. A connection object never
touches a socket, a clock or a thread:

* ``receive_text(frame, now)`` / ``receive_bytes(data, now)`` take one frame the
  websocket delivered and the adapter's monotonic time, and return the list of
  **events** for the adapter (validated messages from the peer, received payloads,
  :class:`FrameRejected` notices);
* ``send_*`` methods validate an outgoing message against the protocol state and queue
  its frame(s);
* :meth:`data_to_send` drains the queued frames (``str`` = text, ``bytes`` = binary);
* :attr:`close` becomes a :class:`Close` (websocket close code and reason) when the
  connection must end: the adapter sends the queued frames, then closes.

A frame from the peer that breaks the protocol never raises: its :class:`Error` is queued
for the peer and a :class:`FrameRejected` event is returned. Fatal violations (a bad or
missing hello, a wrong token, no common version, a wrong family, too many violations)
also set :attr:`close`; a bad request only fails that request and the connection carries on.

Adapter loop (server side)::

    conn = ServerConnection(family_id=..., token=..., limits=...)
    async for frame in ws:                         # websockets max_size=limits.max_message_bytes
        now = time.monotonic()
        events = conn.receive_text(frame, now) if isinstance(frame, str) else conn.receive_bytes(frame, now)
        await flush()                              # send conn.data_to_send(); close if conn.close
        for event in events: dispatch(event)       # Generate -> queue work; Cancel -> drop it; Report -> bandit

**One writer.** ``send_handoff``/``send_result`` queue an announcement and its binary
frame back to back; the peer pairs them by adjacency, so the adapter must send the
drained frames in order from one task (or under one lock), never interleaving two drains.

**Floods cost the flooder** (server side; every bound is in :class:`ProtocolLimits`):

* *Frames.* Every frame the peer sends spends a token of a bucket of ``frame_burst``
  refilled at ``frames_per_s``, before and after the hello: text and binary frames in
  ``receive_text``/``receive_bytes``, and the frames the websocket library answers itself
  (pings, pongs, continuation fragments), which the adapter reports with
  :meth:`ServerConnection.receive_control`. An empty bucket closes the connection.
* *Refusals.* ``busy``, ``rate_limited`` and ``too_many_in_flight`` are not violations, but
  they are not free either. A refused generate that arrived no earlier than the
  ``retry_after_s`` the server last advised costs nothing: a client that waits as told
  (or longer, backing off) can be refused forever. A refused generate that arrived early,
  and every ``too_many_in_flight`` (a client knows its own in-flight count from the
  welcome), spends a token of a second bucket, ``max_refusals`` refilled at
  ``refusals_per_minute``; when it is empty the refusal closes the connection. Jitter
  between concurrent requests of one client may make a few retries early: that is what
  the bucket's size absorbs.
* *Outbox.* Frames queued and not yet taken by :meth:`data_to_send` are bounded by
  ``max_outbox_bytes``: queueing onto an outbox already past it drops the queued frames
  and closes (the peer is not reading). One payload larger than the bound still goes out
  when the outbox is under it.
* *Hello deadline.* With ``opened_at``, :attr:`ServerConnection.deadline` is when the hello
  is due (``hello_timeout_s`` later); :meth:`ServerConnection.tick` closes a connection
  still without one.

These closes use code 1008 and set :attr:`Close.abort`: the adapter stops reading from
the peer at once (no more pongs for a ping flood) and drops the TCP connection if the
goodbye has not left within a short grace, rather than waiting for a closing handshake
that a flooding or non-reading peer never completes.
"""

from __future__ import annotations

import hmac
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from shared.errors import ConfigError, HandoffError
from shared.handoff import Handoff, HandoffLimits, decode_handoff
from shared.protocol.messages import (
    PNG_SIGNATURE,
    PROTOCOL_VERSIONS,
    Cancel,
    Error,
    Generate,
    HandoffAnnouncement,
    Hello,
    Plan,
    Progress,
    ProtocolError,
    ProtocolLimits,
    Rating,
    Report,
    ResultAnnouncement,
    Welcome,
    _Message,
    check_limits,
    decode_text,
    encode,
    encode_preview,
    for_peer,
    handoff_conflict,
    newer_fields,
    plan_conflict,
    protocol_error_from_handoff,
)
from shared.relay_plan import RelayPlan

# Websocket close codes (RFC 6455, section 7.4.1).
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009

#: Close code for each error code that ends a connection when sent without a request id.
FATAL_CLOSE_CODES: dict[str, int] = {
    "unauthorized": CLOSE_POLICY_VIOLATION,
    "unsupported_version": CLOSE_PROTOCOL_ERROR,
    "wrong_family": CLOSE_POLICY_VIOLATION,
    "shutting_down": CLOSE_GOING_AWAY,
}
# Refusals a well-behaved peer can meet in normal operation: not counted as violations.
_FLOW_CONTROL = frozenset({"busy", "rate_limited", "too_many_in_flight", "cancelled"})
# ... of which these refuse a generate: counted against the refusal bucket when the peer did not wait.
_REFUSALS = frozenset({"busy", "rate_limited", "too_many_in_flight"})
_REMEMBERED = 256  # finished request ids kept per connection (for reports, ratings, duplicate checks)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Close:
    """The websocket close the adapter must perform after sending the queued frames.

    ``abort``: the peer floods or does not read; stop reading from it now and drop the TCP
    connection if the goodbye has not left within a short grace (no closing handshake wait).
    """

    code: int
    reason: str  # short ASCII: a close reason must fit in 123 bytes
    abort: bool = False


@dataclass(frozen=True)
class FrameRejected:
    """A frame from the peer was refused; :attr:`error` is already queued for the peer.

    ``fatal`` = the connection is closing (see :attr:`close`). With a request id the
    request is over on this side (the error ends it on both).
    """

    error: Error
    fatal: bool = False

    @property
    def request_id(self) -> str | None:
        return self.error.request_id


@dataclass(frozen=True, eq=False)
class HandoffReceived:
    """Client event: a request's handoff arrived, decoded and checked against its plan.

    ``transfer_s`` is the time between its announcement and its binary frame, which the
    server sends back to back: about the binary frame's time on the wire.
    """

    announcement: HandoffAnnouncement
    handoff: Handoff = field(repr=False)
    payload: bytes = field(repr=False)  # the raw safetensors bytes, e.g. to save for debugging
    transfer_s: float

    @property
    def request_id(self) -> str:
        return self.announcement.request_id


@dataclass(frozen=True)
class ResultReceived:
    """Client event: an edge-decoded image (PNG bytes) arrived for a ``decode_on="edge"`` request."""

    announcement: ResultAnnouncement
    png: bytes = field(repr=False)
    transfer_s: float

    @property
    def request_id(self) -> str:
        return self.announcement.request_id


ServerEvent = Hello | Generate | Cancel | Report | Rating | Error | FrameRejected
ClientEvent = Welcome | Plan | Progress | HandoffReceived | ResultReceived | Error | FrameRejected
Event = ServerEvent | ClientEvent
Frame = str | bytes


# --------------------------------------------------------------------------- rate limiting


class TokenBucket:
    """A token bucket: ``burst`` tokens, refilled at ``rate_per_s``; the time is passed in.

    :meth:`take` returns 0.0 and spends a token, or the seconds until one is available.
    A clock that goes backwards refills nothing (monotonic clocks do not, but be safe).
    """

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0) or burst < 1:
            raise ValueError(f"need rate_per_s > 0 and burst >= 1, got {rate_per_s!r}, {burst!r}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float) -> float:
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time, got {now!r}")
        if self._last is not None and now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate_per_s)
        self._last = now if self._last is None else max(self._last, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s


# --------------------------------------------------------------------------- base


class _Connection:
    """Outbox, close flag and violation counting shared by both sides."""

    def __init__(self, limits: ProtocolLimits) -> None:
        if not isinstance(limits, ProtocolLimits):
            raise TypeError(f"limits must be ProtocolLimits, got {type(limits).__name__}")
        self.limits = limits
        #: Set when the connection must end; the adapter sends :meth:`data_to_send` first.
        self.close: Close | None = None
        #: Frames from the peer rejected so far, flow control aside.
        self.violations = 0
        self._outbox: list[Frame] = []
        self._outbox_bytes = 0
        self._closed = False  # the adapter reported the socket closed

    def data_to_send(self) -> list[Frame]:
        """The frames queued since the last call, in order (``str`` = text, ``bytes`` = binary)."""
        frames, self._outbox = self._outbox, []
        self._outbox_bytes = 0
        return frames

    @property
    def outbox_bytes(self) -> int:
        """The size of the frames queued and not yet taken by :meth:`data_to_send` (characters for text)."""
        return self._outbox_bytes

    @property
    def done(self) -> bool:
        """No more frames will be accepted or sent (closing or closed)."""
        return self.close is not None or self._closed

    def _queue(self, message: _Message) -> None:
        self._push(encode(message))  # type: ignore[arg-type]

    def _push(self, frame: Frame) -> None:
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)

    def _reject(self, exc: ProtocolError, *, close: Close | None = None) -> list[FrameRejected]:
        error = exc.to_error()
        self._queue(error)
        if error.code not in _FLOW_CONTROL:
            self.violations += 1
            if close is None and self.violations >= self.limits.max_violations:
                close = Close(CLOSE_POLICY_VIOLATION, "too many protocol violations")
        if close is not None:
            self.close = close
        return [FrameRejected(error, fatal=close is not None)]


def _remember(store: OrderedDict[str, None], request_id: str) -> None:
    store[request_id] = None
    store.move_to_end(request_id)
    while len(store) > _REMEMBERED:
        store.popitem(last=False)  # forget the oldest: memory per connection stays bounded


def _usage(message: str, request_id: str | None = None) -> ProtocolError:
    """The error raised to a local caller that breaks the protocol (a bug in the adapter)."""
    return ProtocolError(message, code="internal", request_id=request_id)


def _built(cls: type[_Message], **kwargs: object) -> _Message:
    """Build an outgoing message; a bad argument is the caller's bug, so the code becomes ``internal``."""
    try:
        return cls(**kwargs)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), code="internal", field=exc.field) from None


# --------------------------------------------------------------------------- server


@dataclass
class _ServerRequest:
    generate: Generate
    arrived: float = 0.0  # the adapter's time when its frame came
    early: bool = False  # it came before the retry time the server last advised
    plan: Plan | None = None
    cancelling: bool = False


class ServerConnection(_Connection):
    """The edge's side of one websocket connection.

    States: ``"hello"`` (only a :class:`Hello` is accepted; anything else is fatal), then
    ``"open"``. The hello is checked in this order: token (``hmac.compare_digest``
    against ``token``; ``None`` = no authentication), version (the highest common one),
    family. Then the client may send ``generate``, ``cancel``, ``report``, ``rating`` and
    ``error``.

    A request's life: :class:`Generate` accepted (it is *in flight*; at most
    ``limits.max_in_flight``; the rate limit spends a token) -> :meth:`send_plan` ->
    :meth:`send_progress` ... -> exactly one terminal frame: :meth:`send_handoff`,
    :meth:`send_result` or :meth:`send_error`. After a handoff or result the client may
    send one :class:`Report` and any number of :class:`Rating`. A :class:`Cancel` event
    asks the daemon to drop the request; plans and progress for it are then dropped
    silently and its terminal frame becomes ``Error(code="cancelled")``. A cancel for a
    request that is not in flight (a race with its end) is ignored.

    Flood bounds (module doc): :attr:`refusals` counts the refusals charged to the peer;
    ``opened_at`` (the adapter's time at the websocket upgrade; ``None``: no deadline)
    starts the hello deadline.
    """

    def __init__(
        self,
        *,
        family_id: str,
        server_name: str = "rise-edge",
        token: str | None = None,
        limits: ProtocolLimits = ProtocolLimits(),
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        opened_at: float | None = None,
        families: Sequence[str] = (),
    ) -> None:
        super().__init__(limits)
        # Validate our own configuration with the message rules: it goes out in the welcome.
        try:
            for served in (family_id, *families):
                Hello(versions=tuple(versions), family_id=served, client=server_name, token=token)
            Welcome(version=max(versions), family_id=family_id, server=server_name, limits=limits)
        except ProtocolError as exc:
            raise ConfigError(f"ServerConnection: {exc}") from None
        #: The connection's family: ``family_id`` until the hello chose one of ``families`` (an edge serving several).
        self.family_id = family_id
        self.families = (family_id, *(f for f in families if f != family_id))
        self.server_name = server_name
        self.versions = tuple(versions)
        self._token = None if token is None else token.encode("ascii")
        self.state: Literal["hello", "open"] = "hello"
        self.hello: Hello | None = None
        self.version: int | None = None
        self._bucket = TokenBucket(limits.requests_per_minute / 60.0, limits.burst)
        self._frames = TokenBucket(limits.frames_per_s, limits.frame_burst)
        self._refusal_bucket = TokenBucket(limits.refusals_per_minute / 60.0, limits.max_refusals)
        self._retry_at = -math.inf  # no generate is early before the first advised retry time
        #: Refused generates charged to the peer (early retries and ``too_many_in_flight``).
        self.refusals = 0
        self.opened_at = opened_at
        self._overflowed = False  # the outbox passed max_outbox_bytes: nothing more is queued
        self._requests: dict[str, _ServerRequest] = {}
        self._reportable: OrderedDict[str, None] = OrderedDict()  # delivered, no report yet
        self._rateable: OrderedDict[str, None] = OrderedDict()  # reported; may still be rated
        self._failed: OrderedDict[str, None] = OrderedDict()  # ended by an error: only a replay would reuse the id

    # ----------------------------------------------------------------- state

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Request ids accepted and not yet ended by a terminal frame, oldest first."""
        return tuple(self._requests)

    @property
    def awaiting_report(self) -> tuple[str, ...]:
        """Delivered request ids whose report has not arrived (bounded; oldest forgotten)."""
        return tuple(self._reportable)

    def connection_closed(self) -> tuple[str, ...]:
        """The adapter saw the socket close: returns the in-flight ids the daemon must drop."""
        self._closed = True
        ids = tuple(self._requests)
        self._requests.clear()
        return ids

    @property
    def deadline(self) -> float | None:
        """When the adapter must call :meth:`tick`: the hello deadline (``None``: nothing is due)."""
        if self.done or self.state != "hello" or self.opened_at is None:
            return None
        return self.opened_at + self.limits.hello_timeout_s

    def tick(self, now: float) -> list[ServerEvent]:
        """Let time pass: a connection still without a hello at its :attr:`deadline` is closed."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return []
        exc = ProtocolError(f"hello: none within {self.limits.hello_timeout_s:g} s of connecting", field="type")
        return list(self._reject(exc, close=Close(CLOSE_POLICY_VIOLATION, "no hello in time", abort=True)))

    # ----------------------------------------------------------------- receiving

    def receive_control(self, now: float, frames: int = 1) -> list[ServerEvent]:
        """Count ``frames`` frames the websocket library handled itself (pings, pongs, continuation
        fragments) against the frame rate; returns the fatal rejection when it is exceeded."""
        if self.done:
            return []
        return self._count_frames(now, frames)

    def _count_frames(self, now: float, frames: int = 1) -> list[ServerEvent]:
        for _ in range(frames):
            wait = self._frames.take(now)
            if wait > 0.0:
                exc = ProtocolError(
                    f"frames: at most {self.limits.frames_per_s:g} per second (burst {self.limits.frame_burst}) "
                    "on one connection, pings included",
                    code="rate_limited",
                    retry_after_s=wait,
                )
                return list(self._reject(exc, close=Close(CLOSE_POLICY_VIOLATION, "too many frames", abort=True)))
        return []

    def receive_text(self, frame: str, now: float) -> list[ServerEvent]:
        """Handle one text frame received at monotonic time ``now``; return the events."""
        if self.done:
            return []  # frames racing the close are dropped
        flood = self._count_frames(now)
        if flood:
            return flood
        try:
            message = decode_text(frame, self.limits)
        except ProtocolError as exc:
            if self.state == "hello":
                code = CLOSE_MESSAGE_TOO_BIG if exc.code == "too_large" else CLOSE_PROTOCOL_ERROR
                return list(self._reject(exc, close=Close(code, "bad hello")))
            if exc.request_id is not None and self._known(exc.request_id):
                exc.request_id = None  # a bad frame reusing a live id must not end that request
            return list(self._reject(exc))
        if self.state == "hello":
            return self._on_hello(message)
        if isinstance(message, Generate):
            return self._on_generate(message, now)
        if isinstance(message, Cancel):
            return self._on_cancel(message)
        if isinstance(message, Report):
            return self._on_report(message)
        if isinstance(message, Rating):
            return self._on_rating(message)
        if isinstance(message, Error):
            if message.request_id is not None:
                if message.request_id in self._reportable:  # the device failed: no report is coming
                    del self._reportable[message.request_id]
                    _remember(self._failed, message.request_id)
            return [message]
        what = "a second hello" if isinstance(message, Hello) else f"{message.TYPE!r}, which only a server sends"
        return list(self._reject(ProtocolError(f"type: unexpected {what}", field="type")))

    def receive_bytes(self, data: bytes, now: float) -> list[ServerEvent]:
        """Handle one binary frame: a client sends none in protocol v1, so it is always rejected."""
        if self.done:
            return []
        flood = self._count_frames(now)
        if flood:
            return flood
        exc = ProtocolError("frame: unexpected binary frame (a client sends only text frames)", field="frame")
        if self.state == "hello":
            return list(self._reject(exc, close=Close(CLOSE_PROTOCOL_ERROR, "expected hello")))
        return list(self._reject(exc))

    def _on_hello(self, hello: _Message) -> list[ServerEvent]:
        if not isinstance(hello, Hello):
            exc = ProtocolError(f"type: expected 'hello' first, got {hello.TYPE!r}", field="type")
            return list(self._reject(exc, close=Close(CLOSE_PROTOCOL_ERROR, "expected hello")))
        if self._token is not None:
            given = b"" if hello.token is None else hello.token.encode("ascii")
            if not hmac.compare_digest(given, self._token):  # constant time: no timing oracle on the token
                exc = ProtocolError("token: missing or wrong", code="unauthorized", field="token")
                return list(self._reject(exc, close=Close(CLOSE_POLICY_VIOLATION, "unauthorized")))
        common = set(hello.versions) & set(self.versions)
        if not common:
            exc = ProtocolError(
                f"versions: expected one of {list(self.versions)}, got {list(hello.versions)}",
                code="unsupported_version",
                field="versions",
            )
            return list(self._reject(exc, close=Close(CLOSE_PROTOCOL_ERROR, "unsupported version")))
        if hello.family_id not in self.families:
            served = (f"{self.family_id!r} (this server's family)" if len(self.families) == 1
                      else f"one of {', '.join(repr(f) for f in self.families)} (the families this server serves)")
            exc = ProtocolError(
                f"family_id: expected {served}, got {hello.family_id!r}",
                code="wrong_family",
                field="family_id",
            )
            return list(self._reject(exc, close=Close(CLOSE_POLICY_VIOLATION, "wrong family")))
        self.family_id = hello.family_id
        self.hello, self.version, self.state = hello, max(common), "open"
        self._queue(
            Welcome(version=self.version, family_id=self.family_id, server=self.server_name, limits=self.limits)
        )
        return [hello]

    def _on_generate(self, request: Generate, now: float) -> list[ServerEvent]:
        rid = request.request_id
        if self._known(rid):
            exc = ProtocolError(
                f"request_id: {rid!r} is already used on this connection", code="invalid_request", field="request_id"
            )
            return list(self._reject(exc))  # no request_id in the error: it would end the live request
        early = now < self._retry_at
        if len(self._requests) >= self.limits.max_in_flight:
            exc = ProtocolError(
                f"request_id: {self.limits.max_in_flight} requests already in flight on this connection",
                code="too_many_in_flight",
                request_id=rid,
            )
            return self._refuse(exc, now, charged=True)  # the client knows its in-flight count: never excusable
        wait = self._bucket.take(now)
        if wait > 0.0:
            exc = ProtocolError(
                f"rate limit: at most {self.limits.requests_per_minute:g} requests per minute "
                f"(burst {self.limits.burst}); retry in {wait:.3g} s",
                code="rate_limited",
                request_id=rid,
                retry_after_s=wait,
            )
            return self._refuse(exc, now, charged=early)
        self._requests[rid] = _ServerRequest(request, arrived=now, early=early)
        return [request]

    def _refuse(self, exc: ProtocolError, arrived: float, *, charged: bool) -> list[ServerEvent]:
        """Reject a generate with a refusal code; charge it (module doc) and close when the peer is out of refusals."""
        self._charge(exc.retry_after_s, arrived, charged=charged)
        return list(self._reject(exc, close=self.close))

    def _on_cancel(self, cancel: Cancel) -> list[ServerEvent]:
        request = self._requests.get(cancel.request_id)
        if request is None or request.cancelling:
            return []  # already ended (a race with its terminal frame) or already cancelling
        request.cancelling = True
        return [cancel]

    def _on_report(self, report: Report) -> list[ServerEvent]:
        rid = report.request_id
        if rid not in self._reportable:
            exc = ProtocolError(
                f"request_id: no delivered request {rid!r} awaiting a report",
                code="invalid_request",
                field="request_id",
            )
            return list(self._reject(exc))
        del self._reportable[rid]
        _remember(self._rateable, rid)
        return [report]

    def _on_rating(self, rating: Rating) -> list[ServerEvent]:
        rid = rating.request_id
        if rid not in self._rateable and rid not in self._reportable:
            exc = ProtocolError(
                f"request_id: no delivered request {rid!r} to rate", code="invalid_request", field="request_id"
            )
            return list(self._reject(exc))
        return [rating]

    def _known(self, rid: str) -> bool:
        return rid in self._requests or rid in self._reportable or rid in self._rateable or rid in self._failed

    def _push(self, frame: Frame) -> None:
        if self._overflowed:
            return
        if self._outbox_bytes > self.limits.max_outbox_bytes:
            # The peer is not taking what it is sent (the writer is stuck): free what waits and close.
            self._overflowed = True
            self._outbox.clear()
            self._outbox_bytes = 0
            if self.close is None:
                self.close = Close(CLOSE_POLICY_VIOLATION, "peer is not reading", abort=True)
            return
        super()._push(frame)

    @property
    def peer_version(self) -> int:
        """The version frames go out in: the negotiated one (this side's highest before the hello)."""
        return self.version if self.version is not None else max(self.versions)

    @property
    def relay_modes(self) -> bool:
        """Whether the device's protocol version has adaptive and speculative plans (a first-release
        device's has not: plan it fixed splits only; version 2 added them, :data:`ADDED_IN_V2`)."""
        return self.peer_version >= 2

    # ----------------------------------------------------------------- sending

    def send_plan(
        self, request_id: str, plan: RelayPlan, *, seed: int, height: int, width: int, scheduler: str, why: str,
        notice: str | None = None, loading_s: float | None = None,
    ) -> None:
        """Queue the chosen configuration; it must honour what the request pinned (plan, steps, seed, size).

        ``notice`` is the one line for the user about how the prompt was read (``Plan.notice``); ``loading_s``
        the seconds the edge expects to load the family first (``Plan.loading_s``; None: it is loaded).
        """
        request = self._live(request_id)
        if request is None or request.cancelling:
            return
        if request.plan is not None:
            raise _usage(f"send_plan: request {request_id!r} already has a plan", request_id)
        message = _built(
            Plan, request_id=request_id, plan=plan, seed=seed, height=height, width=width, scheduler=scheduler,
            why=why, notice=notice, family_id=self.family_id, loading_s=loading_s,
        )
        assert isinstance(message, Plan)
        version = self.peer_version
        message = for_peer(message, version)  # a first-release device rejects fields it does not know
        newer = newer_fields(message, version)
        if newer and request.generate.pinned != plan:  # a device that pinned a relay mode knows it
            raise _usage(f"send_plan: {newer[0]}: the device speaks protocol version {version}, which cannot run "
                         "that relay mode (plan with PlanContext.relay_modes=False)", request_id)
        self._check_outgoing(message, request_id)
        conflict = plan_conflict(request.generate, message)
        if conflict is not None:
            raise _usage(f"send_plan: {conflict}", request_id)
        request.plan = message
        self._queue(message)

    def send_progress(self, request_id: str, step: int, total: int, stage: str = "edge", *,
                      preview_png: bytes | None = None) -> None:
        """Queue a progress update (dropped if the request is being cancelled), with a preview if one is given.

        A preview goes only to a request that asked for one (``Generate.preview_every``).
        """
        request = self._live(request_id)
        if request is None or request.cancelling:
            return
        if request.plan is None:
            raise _usage(f"send_progress: send the plan of {request_id!r} first", request_id)
        if preview_png is not None and request.generate.preview_every is None:
            raise _usage(f"send_progress: request {request_id!r} asked for no previews", request_id)
        preview = None if preview_png is None else encode_preview(preview_png)
        message = _built(Progress, request_id=request_id, stage=stage, step=step, total=total, preview=preview)
        self._check_outgoing(message, request_id)
        self._queue(message)

    def send_handoff(
        self, request_id: str, payload: bytes, *, edge_compute_s: float | None = None, queue_s: float | None = None
    ) -> None:
        """Queue the handoff announcement and, right after it, ``payload`` (from ``encode_handoff``).

        The payload is decoded once here and checked against the plan (request id,
        steps, split, sampler, guidance, seed), so a batching bug cannot send one
        request's latent to another. Ends the request (it then awaits a report).
        """
        request = self._live(request_id)
        if request is None:
            return
        if request.cancelling:
            self._end_cancelled(request_id)
            return
        plan = self._planned(request, request_id, "send_handoff", "device")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise _usage(f"send_handoff: payload must be bytes, got {type(payload).__name__}", request_id)
        payload = bytes(payload)
        try:
            handoff = decode_handoff(
                payload, limits=HandoffLimits(max_bytes=self.limits.max_payload_bytes), expected_family=self.family_id
            )
        except HandoffError as exc:
            raise _usage(f"send_handoff: {exc}", request_id) from exc
        conflict = handoff_conflict(handoff, plan)
        if conflict is not None:
            raise _usage(f"send_handoff: {conflict}", request_id)
        announcement = _built(
            HandoffAnnouncement,
            request_id=request_id,
            nbytes=len(payload),
            edge_compute_s=edge_compute_s,
            queue_s=queue_s,
        )
        self._deliver(request_id, announcement, payload)

    def send_result(
        self, request_id: str, png: bytes, *, edge_compute_s: float | None = None, queue_s: float | None = None
    ) -> None:
        """Queue the result announcement and, right after it, the PNG of an edge-decoded request."""
        request = self._live(request_id)
        if request is None:
            return
        if request.cancelling:
            self._end_cancelled(request_id)
            return
        plan = self._planned(request, request_id, "send_result", "edge")
        if not isinstance(png, (bytes, bytearray, memoryview)) or not bytes(png[:8]) == PNG_SIGNATURE:
            raise _usage("send_result: png must be PNG bytes (signature \\x89PNG...)", request_id)
        png = bytes(png)
        announcement = _built(
            ResultAnnouncement,
            request_id=request_id,
            nbytes=len(png),
            height=plan.height,
            width=plan.width,
            edge_compute_s=edge_compute_s,
            queue_s=queue_s,
        )
        self._deliver(request_id, announcement, png)

    def send_error(
        self,
        request_id: str | None,
        code: str,
        message: str,
        *,
        retry_after_s: float | None = None,
        field: str | None = None,
    ) -> None:
        """Queue an :class:`Error`. With an in-flight ``request_id`` it ends that request
        (``busy`` when the queue is full, ``cancelled`` after a :class:`Cancel`, ``internal``...).
        Without one, a code in :data:`FATAL_CLOSE_CODES` (e.g. ``shutting_down``) also closes."""
        if self.done:
            return
        error = _built(
            Error, code=code, message=message, request_id=request_id, field=field, retry_after_s=retry_after_s
        )
        refused: _ServerRequest | None = None
        if request_id is not None:
            live = self._requests.pop(request_id, None)
            ended = live is not None or request_id in self._reportable
            self._reportable.pop(request_id, None)
            if ended:
                _remember(self._failed, request_id)
            if live is not None and code in _REFUSALS:
                refused = live  # busy: the engine's queue was full
        self._queue(error)
        if request_id is None and code in FATAL_CLOSE_CODES:
            self.close = Close(FATAL_CLOSE_CODES[code], code.replace("_", " "))
        elif refused is not None and self.close is None:
            self._charge(retry_after_s, refused.arrived, charged=refused.early)

    def _charge(self, retry_after_s: float | None, arrived: float, *, charged: bool) -> None:
        """Account for a refused generate that arrived at ``arrived``: remember the advised retry time;
        if ``charged``, spend a refusal token, closing the connection when there is none."""
        if retry_after_s is not None:
            self._retry_at = max(self._retry_at, arrived + retry_after_s)
        if charged:
            self.refusals += 1
            if self._refusal_bucket.take(arrived) > 0.0:
                self.close = Close(CLOSE_POLICY_VIOLATION, "too many refused requests", abort=True)

    def _live(self, request_id: str) -> _ServerRequest | None:
        """The in-flight request, or None when the connection is done (sends race the close)."""
        if self.done:
            return None
        request = self._requests.get(request_id)
        if request is None:
            raise _usage(f"request {request_id!r} is not in flight on this connection", request_id)
        return request

    def _planned(self, request: _ServerRequest, request_id: str, what: str, decode_on: str) -> Plan:
        if request.plan is None:
            raise _usage(f"{what}: send the plan of {request_id!r} first", request_id)
        if request.plan.plan.decode_on != decode_on:
            raise _usage(f"{what}: the plan of {request_id!r} decodes on the {request.plan.plan.decode_on}", request_id)
        return request.plan

    def _check_outgoing(self, message: _Message, request_id: str) -> None:
        try:
            check_limits(message, self.limits)  # type: ignore[arg-type]
        except ProtocolError as exc:
            raise _usage(f"{message.TYPE}: {exc}", request_id) from None

    def _deliver(self, request_id: str, announcement: _Message, payload: bytes) -> None:
        if len(payload) > self.limits.max_payload_bytes:
            raise _usage(
                f"payload: {len(payload)} bytes, over max_payload_bytes={self.limits.max_payload_bytes}", request_id
            )
        self._queue(announcement)
        self._push(payload)  # immediately after its announcement: that adjacency is the pairing
        del self._requests[request_id]
        _remember(self._reportable, request_id)

    def _end_cancelled(self, request_id: str) -> None:
        self.send_error(request_id, "cancelled", "cancelled at the client's request")


# --------------------------------------------------------------------------- client


@dataclass
class _ClientRequest:
    generate: Generate
    plan: Plan | None = None


@dataclass(frozen=True)
class _Expected:
    """An announced binary frame: deliver it for ``announcement`` (or discard it if ``discard``)."""

    announcement: HandoffAnnouncement | ResultAnnouncement
    since: float
    discard: bool = False


class ClientConnection(_Connection):
    """The device's side of one websocket connection.

    The :class:`Hello` is queued at construction: send :meth:`data_to_send` first. After
    the :class:`Welcome` (event), :meth:`send_generate` checks a request against the
    server's limits before queueing it (raising :class:`ProtocolError` with the code the
    server would answer), so a bad prompt never leaves the device. Events: ``Welcome``,
    ``Plan``, ``Progress``, :class:`HandoffReceived` (decoded with ``handoff_limits`` and
    this bundle's family, checked against the plan), :class:`ResultReceived`, ``Error``
    and :class:`FrameRejected`. After a handoff or result, :meth:`send_report` once.

    ``limits`` are this side's own receive limits (frame sizes, violations) and apply
    until the welcome; then the server's limits apply to requests.
    """

    def __init__(
        self,
        *,
        family_id: str,
        client_name: str = "rise-device",
        token: str | None = None,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        device_class: str | None = None,
        device_step_s: float | None = None,
        device_load: float | None = None,
        limits: ProtocolLimits = ProtocolLimits(),
        handoff_limits: HandoffLimits = HandoffLimits(),
    ) -> None:
        super().__init__(limits)
        hello = _built(
            Hello,
            versions=tuple(versions),
            family_id=family_id,
            client=client_name,
            token=token,
            device_class=device_class,
            device_step_s=device_step_s,
            device_load=device_load,
        )
        assert isinstance(hello, Hello)
        self.hello = hello
        self.family_id = family_id
        self.handoff_limits = handoff_limits
        self.state: Literal["hello", "open"] = "hello"
        self.welcome: Welcome | None = None
        self._requests: dict[str, _ClientRequest] = {}  # sent, not yet delivered or failed
        self._delivered: OrderedDict[str, None] = OrderedDict()  # handoff/result received, not reported
        self._reported: OrderedDict[str, None] = OrderedDict()
        self._expected: _Expected | None = None
        self._limits_in = limits  # what received frames are checked against (see _on_welcome)
        self._next_id = 0
        self._queue(hello)

    # ----------------------------------------------------------------- state

    @property
    def server_limits(self) -> ProtocolLimits | None:
        return None if self.welcome is None else self.welcome.limits

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Requests sent and not yet delivered or ended (what the server's in-flight limit counts)."""
        return tuple(self._requests)

    @property
    def delivered(self) -> tuple[str, ...]:
        """Requests whose handoff/result arrived and whose report is not sent yet."""
        return tuple(self._delivered)

    def new_request_id(self) -> str:
        """A request id not used on this connection (``r1``, ``r2``, ...)."""
        while True:
            self._next_id += 1
            rid = f"r{self._next_id}"
            if not self._known(rid):
                return rid

    def connection_closed(self) -> tuple[str, ...]:
        """The adapter saw the socket close: returns the ids of requests that will never finish."""
        self._closed = True
        ids = tuple(self._requests)
        self._requests.clear()
        self._expected = None
        return ids

    # ----------------------------------------------------------------- sending

    def send_generate(self, request: Generate) -> None:
        """Queue ``request`` after checking it against the server's limits and this connection's state."""
        if self.done or self.welcome is None:
            raise _usage("send_generate: the connection is not open (wait for the welcome)")
        if not isinstance(request, Generate):
            raise _usage(f"send_generate: expected a Generate, got {type(request).__name__}")
        rid = request.request_id
        limits = self.welcome.limits
        if self._known(rid):
            raise ProtocolError(
                f"request_id: {rid!r} is already used", code="invalid_request", field="request_id", request_id=rid
            )
        if len(self._requests) >= limits.max_in_flight:
            raise ProtocolError(
                f"request_id: the server allows {limits.max_in_flight} requests in flight",
                code="too_many_in_flight",
                request_id=rid,
            )
        try:
            check_limits(request, limits)
        except ProtocolError as exc:
            exc.request_id = rid
            raise
        # An edge of the first release rejects fields it does not know: previews are not asked of it.
        request = for_peer(request, self.welcome.version)
        newer = newer_fields(request, self.welcome.version)
        if newer:
            raise ProtocolError(
                f"{newer[0]}: the edge speaks protocol version {self.welcome.version}, which has no adaptive or "
                "speculative relay", code="invalid_request", field=newer[0], request_id=rid,
            )
        frame = encode(request)
        size = len(frame.encode("utf-8"))
        if size > limits.max_message_bytes:
            raise ProtocolError(
                f"frame: {size} bytes, over the server's {limits.max_message_bytes}", code="too_large", request_id=rid
            )
        self._requests[rid] = _ClientRequest(request)
        self._push(frame)

    def send_cancel(self, request_id: str) -> None:
        """Ask the server to stop ``request_id``; ignored if it already ended (a race)."""
        if not self.done and request_id in self._requests:
            self._queue(Cancel(request_id=request_id))

    def send_report(self, report: Report) -> None:
        """Queue the device's measurements for a delivered request (once per request)."""
        if self.done:
            return
        if not isinstance(report, Report) or report.request_id not in self._delivered:
            what = report.request_id if isinstance(report, Report) else type(report).__name__
            raise _usage(f"send_report: {what!r} is not a delivered request awaiting its report")
        del self._delivered[report.request_id]
        _remember(self._reported, report.request_id)
        self._queue(report)

    def send_rating(self, request_id: str, rating: int) -> None:
        """Queue the user's -1/0/+1 for a delivered request (before or after its report)."""
        if self.done:
            return
        if request_id not in self._delivered and request_id not in self._reported:
            raise _usage(f"send_rating: {request_id!r} is not a delivered request")
        self._queue(_built(Rating, request_id=request_id, rating=rating))

    def send_error(self, request_id: str | None, code: str, message: str) -> None:
        """Tell the server a delivered request failed on the device (e.g. ``internal``: ORT failed);
        it then expects no report. For a request still in flight, use :meth:`send_cancel`."""
        if self.done:
            return
        if request_id is not None and request_id in self._requests:
            raise _usage(f"send_error: {request_id!r} is in flight; cancel it instead", request_id)
        error = _built(Error, code=code, message=message, request_id=request_id)
        if request_id is not None:
            self._delivered.pop(request_id, None)
        self._queue(error)

    # ----------------------------------------------------------------- receiving

    def receive_text(self, frame: str, now: float) -> list[ClientEvent]:
        """Handle one text frame received at monotonic time ``now``; return the events."""
        if self.done:
            return []
        events: list[ClientEvent] = []
        expected, self._expected = self._expected, None
        if expected is not None and not expected.discard:
            # The binary frame must follow its announcement at once: the pairing is lost.
            rid = expected.announcement.request_id
            exc = ProtocolError(f"frame: expected the binary frame announced for {rid!r}, got text", request_id=rid)
            events += self._fail(exc)
        try:
            message = decode_text(frame, self._limits_in)
        except ProtocolError as exc:
            # A garbled frame is a violation, but it does not end a request: its id may be garbled too.
            exc.request_id = None
            if self.state == "hello":
                return events + self._reject(exc, close=Close(CLOSE_PROTOCOL_ERROR, "bad welcome"))
            return events + self._reject(exc)
        if self.state == "hello":
            return events + self._on_welcome(message)
        if isinstance(message, Error):
            if message.request_id is not None:
                self._requests.pop(message.request_id, None)
                self._delivered.pop(message.request_id, None)
            return events + [message]
        if isinstance(message, Plan):
            return events + self._on_plan(message)
        if isinstance(message, Progress):
            return events + self._on_progress(message)
        if isinstance(message, (HandoffAnnouncement, ResultAnnouncement)):
            return events + self._on_announcement(message, now)
        what = "a second welcome" if isinstance(message, Welcome) else f"{message.TYPE!r}, which only a client sends"
        return events + self._reject(ProtocolError(f"type: unexpected {what}", field="type"))

    def receive_bytes(self, data: bytes, now: float) -> list[ClientEvent]:
        """Handle one binary frame: the payload announced by the frame just before it."""
        if self.done:
            return []
        expected, self._expected = self._expected, None
        if expected is None:
            exc = ProtocolError("frame: unexpected binary frame (no handoff or result announced)", field="frame")
            if self.state == "hello":
                return list(self._reject(exc, close=Close(CLOSE_PROTOCOL_ERROR, "expected welcome")))
            return list(self._reject(exc))
        if expected.discard:
            return []
        announcement = expected.announcement
        rid = announcement.request_id
        data = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else b""
        if len(data) != announcement.nbytes:
            exc = ProtocolError(
                f"frame: expected {announcement.nbytes} bytes as announced, got {len(data)}",
                code="bad_handoff",
                field="nbytes",
                request_id=rid,
            )
            return self._fail(exc)
        transfer_s = max(0.0, now - expected.since)
        plan = self._requests[rid].plan
        assert plan is not None
        if isinstance(announcement, ResultAnnouncement):
            if not data.startswith(PNG_SIGNATURE):
                exc = ProtocolError("result: not a PNG (bad signature)", code="bad_handoff", request_id=rid)
                return self._fail(exc)
            self._delivered_ok(rid)
            return [ResultReceived(announcement, data, transfer_s)]
        try:
            handoff = decode_handoff(data, limits=self.handoff_limits, expected_family=self.family_id)
        except HandoffError as exc:
            return self._fail(protocol_error_from_handoff(exc, rid))
        conflict = handoff_conflict(handoff, plan)
        if conflict is not None:
            return self._fail(ProtocolError(f"handoff: {conflict}", code="bad_handoff", request_id=rid))
        self._delivered_ok(rid)
        return [HandoffReceived(announcement, handoff, data, transfer_s)]

    def _on_welcome(self, message: _Message) -> list[ClientEvent]:
        if isinstance(message, Error):
            return [message]  # the server refused the hello and closes
        if not isinstance(message, Welcome):
            exc = ProtocolError(f"type: expected 'welcome' first, got {message.TYPE!r}", field="type")
            return list(self._reject(exc, close=Close(CLOSE_PROTOCOL_ERROR, "expected welcome")))
        if message.version not in self.hello.versions:
            exc = ProtocolError(
                f"version: expected one of {list(self.hello.versions)}, got {message.version}",
                code="unsupported_version",
                field="version",
            )
            return list(self._reject(exc, close=Close(CLOSE_PROTOCOL_ERROR, "unsupported version")))
        if message.family_id != self.family_id:
            exc = ProtocolError(
                f"family_id: expected {self.family_id!r}, got {message.family_id!r}",
                code="wrong_family",
                field="family_id",
            )
            return list(self._reject(exc, close=Close(CLOSE_POLICY_VIOLATION, "wrong family")))
        self.welcome, self.state = message, "open"
        # From now on the server's request limits apply, with this side's own frame-size limits.
        own = self.limits
        self._limits_in = ProtocolLimits(
            **{
                **message.limits.to_dict(),
                "max_message_bytes": own.max_message_bytes,
                "max_payload_bytes": own.max_payload_bytes,
                "max_violations": own.max_violations,
            }
        )
        return [message]

    def _on_plan(self, plan: Plan) -> list[ClientEvent]:
        request = self._requests.get(plan.request_id)
        if request is None or request.plan is not None:
            what = "a second plan" if request is not None else "a plan for an unknown request"
            return list(self._reject(ProtocolError(f"request_id: {what} {plan.request_id!r}", field="request_id")))
        if plan.family_id is not None and plan.family_id != self.family_id:
            exc = ProtocolError(f"family_id: a plan for family {plan.family_id!r}, not this bundle's "
                                f"{self.family_id!r}", code="wrong_family", field="family_id")
            return list(self._reject(exc, close=Close(CLOSE_POLICY_VIOLATION, "wrong family")))
        request.plan = plan
        return [plan]

    def _on_progress(self, progress: Progress) -> list[ClientEvent]:
        request = self._requests.get(progress.request_id)
        if request is None or request.plan is None:
            exc = ProtocolError(
                f"request_id: progress for {progress.request_id!r}, which has no plan", field="request_id"
            )
            return list(self._reject(exc))
        return [progress]

    def _on_announcement(self, announcement: HandoffAnnouncement | ResultAnnouncement, now: float) -> list[ClientEvent]:
        rid = announcement.request_id
        request = self._requests.get(rid)
        want = "device" if isinstance(announcement, HandoffAnnouncement) else "edge"
        if request is None or request.plan is None or request.plan.plan.decode_on != want:
            # Still consume the binary frame that follows, so later frames pair correctly.
            self._expected = _Expected(announcement, now, discard=True)
            why = "an unknown request" if request is None else "a request whose plan does not call for it"
            exc = ProtocolError(f"{announcement.TYPE}: for {why} ({rid!r})", field="request_id")
            if request is not None:
                exc.request_id = rid
                return self._fail(exc)
            return list(self._reject(exc))
        self._expected = _Expected(announcement, now)
        return []

    def _fail(self, exc: ProtocolError) -> list[ClientEvent]:
        """Reject a server frame that sinks one delivered request: the error (with its id) ends it on both sides."""
        if exc.request_id is not None:
            self._requests.pop(exc.request_id, None)
        return list(self._reject(exc))

    def _delivered_ok(self, rid: str) -> None:
        del self._requests[rid]
        _remember(self._delivered, rid)

    def _known(self, rid: str) -> bool:
        return rid in self._requests or rid in self._delivered or rid in self._reported
