"""What the edge writes to its log: one line per request, and the libraries' noise kept out of it.

**The request line.** Logger ``rise.edge.requests`` (:data:`REQUEST_LOGGER`), level INFO, one line per
``generate`` once its record is complete: when the device's report arrives, when the request ends
with an ``error``, or when its connection closes (or forgets it) before a report came. The message
is ``request`` followed by ``key=value`` pairs (logfmt), always these keys in this order
(:data:`REQUEST_FIELDS`); ``-`` marks a value the edge does not have, a value with a space, a quote
or an ``=`` is double-quoted with JSON escapes::

    request id=r1 conn=3 peer=10.0.0.7 outcome=ok code=- steps=20 split=10 sampler=dpmpp_2m decode=device
    scheduler=linucb why="linucb: ..." queue_s=0.004 edge_s=1.210 device_s=0.950 transfer_s=0.020 total_s=2.300

``outcome``: ``ok`` (delivered and reported), ``unreported`` (delivered; no report came) or ``error``
(``code`` says which: ``busy``, ``cancelled``, ``invalid_request``, ``shutting_down``, ``internal``...).
``queue_s`` / ``edge_s`` are the engine's, ``device_s`` / ``transfer_s`` / ``total_s`` the device's report.

**Library noise.** diffusers looks up which distribution provides each optional package when it is
first imported; ``optimum`` and ``optimum-onnx`` both install the ``optimum`` package, so every
torch command printed "Multiple distributions found for package optimum". It is harmless (either
answers the version check) and :func:`silence_library_noise` drops exactly that record at its
logger; ``edge_server/__init__.py`` installs it before any of our modules imports diffusers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

REQUEST_LOGGER = "rise.edge.requests"
#: The keys of a request line, in order.
REQUEST_FIELDS = ("id", "conn", "peer", "outcome", "code", "steps", "split", "sampler", "decode", "scheduler",
                  "why", "queue_s", "edge_s", "device_s", "transfer_s", "total_s")
MISSING = "-"

#: The logger diffusers reports its package lookup on, and the start of the record dropped there.
_DIFFUSERS_IMPORT_LOGGER = "diffusers.utils.import_utils"
_DUPLICATE_OPTIMUM = "Multiple distributions found for package optimum."


def logfmt(fields: Mapping[str, object]) -> str:
    """``key=value`` pairs in the mapping's order: None as ``-``, floats to the millisecond, text quoted if needed."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def _value(value: object) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if not text or any(c.isspace() or c in '"=\\' for c in text) or not text.isprintable():
        return json.dumps(text, ensure_ascii=True)
    return text


def request_line(**fields: object) -> str:
    """The message of a request line: every key of :data:`REQUEST_FIELDS` in order (missing ones ``-``)."""
    unknown = set(fields) - set(REQUEST_FIELDS)
    if unknown:
        raise ValueError(f"request_line: unknown fields {sorted(unknown)}")
    return "request " + logfmt({key: fields.get(key) for key in REQUEST_FIELDS})


class _DropDuplicateOptimum(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DUPLICATE_OPTIMUM)


_FILTER = _DropDuplicateOptimum()


def silence_library_noise() -> None:
    """Drop diffusers' "Multiple distributions found for package optimum" record (idempotent; needs no import
    of diffusers, so it can run before diffusers does). Every other record of that logger still goes out."""
    logger = logging.getLogger(_DIFFUSERS_IMPORT_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
