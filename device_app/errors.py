"""The device's exceptions: what the edge refused or failed, and what failed on this side.

:class:`EdgeError` carries the server's error ``code`` (or one of the local codes below, for
failures seen only here); :class:`EdgeConnectionError`, :class:`EdgeTimeout` and
:class:`EdgeMismatch` (the edge sent something this device did not ask for) narrow it;
:class:`DeviceRunError` is this device's own half failing (ORT, the sampler, the decode).
All are :class:`shared.errors.RiseError`.
"""

from __future__ import annotations

from shared.errors import RiseError
from shared.protocol import FATAL_CLOSE_CODES, RETRY_CODES, Error

__all__ = [
    "CONNECTION_LOST",
    "CONNECT_FAILED",
    "DEADLINE",
    "DEVICE_FAILED",
    "PAYLOAD_MISMATCH",
    "PLAN_CONFLICT",
    "PLAN_REFUSED",
    "TIMEOUT",
    "DeviceRunError",
    "EdgeConnectionError",
    "EdgeError",
    "EdgeMismatch",
    "EdgeTimeout",
]

# Codes of errors raised on the device without a server Error behind them.
CONNECT_FAILED = "connect_failed"
CONNECTION_LOST = "connection_lost"
TIMEOUT = "timeout"  # the edge went silent for longer than the idle timeout
DEADLINE = "deadline"  # the edge did not deliver within the request's overall deadline (progress or not)
PLAN_CONFLICT = "plan_conflict"  # the plan ignores what the request fixed (pinned plan, steps, seed, size)
PLAN_REFUSED = "plan_refused"  # the plan is over this device's own limits (steps, image size)
PAYLOAD_MISMATCH = "payload_mismatch"  # the handoff or PNG is not what the plan announced (shape, size, steps)
DEVICE_FAILED = "device_failed"


class EdgeError(RiseError):
    """The edge refused or failed a request (or the whole connection).

    ``code`` is the server's error code (:data:`shared.protocol.ERROR_CODES`:
    ``unauthorized``, ``wrong_family``, ``invalid_request``, ``busy``...) or, for failures
    seen only on this side, ``connect_failed`` / ``connection_lost`` / ``timeout`` /
    ``deadline`` / ``plan_conflict`` / ``plan_refused`` / ``payload_mismatch``. ``local`` is
    true when the request never left the device (it failed the server's limits here).
    ``retry_after_s`` is set for ``busy`` and ``rate_limited``.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        retry_after_s: float | None = None,
        field: str | None = None,
        local: bool = False,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.field = field
        self.local = local

    def copy(self, request_id: str | None = None) -> EdgeError:
        """A new exception like this one (to raise in another task), optionally for ``request_id``."""
        return type(self)(
            self.code, self.message, request_id=request_id or self.request_id, retry_after_s=self.retry_after_s,
            field=self.field, local=self.local,
        )

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (the server was busy or rate limiting)."""
        return self.code in RETRY_CODES or self.code == "too_many_in_flight"

    @classmethod
    def from_error(cls, error: Error, what: str = "") -> EdgeError:
        """The exception for a server :class:`Error` message."""
        kind = EdgeConnectionError if error.request_id is None and error.code in FATAL_CLOSE_CODES else EdgeError
        return kind(
            error.code,
            f"{what}{error.message}",
            request_id=error.request_id,
            retry_after_s=error.retry_after_s,
            field=error.field,
        )


class EdgeConnectionError(EdgeError):
    """The connection could not be opened, was refused at the hello, or was lost."""


class EdgeTimeout(EdgeError, TimeoutError):
    """The edge sent nothing for a request (or the hello) within the timeout (code ``timeout``), or did
    not deliver a request within its overall deadline, however many progress frames it sent (``deadline``)."""


class EdgeMismatch(EdgeError):
    """The edge sent something this device did not ask for, caught before any work on it.

    ``plan_conflict``: the plan ignores what the request fixed (or, for a size the request left
    open, is not the bundle's default size); ``plan_refused``: the plan is over this device's own
    limits (:class:`device_app.expected.DeviceLimits`), whatever the edge's welcome allowed;
    ``payload_mismatch``: the handoff's latent or the PNG's declared size is not what the plan
    announced. The request is cancelled (or, once delivered, failed) on the edge.
    """


class DeviceRunError(RiseError):
    """The device half failed (ORT, the sampler or the decode); the edge was told (code ``internal``)."""

    code = DEVICE_FAILED

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
