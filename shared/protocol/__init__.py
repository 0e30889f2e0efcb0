"""The RISE wire protocol between the edge daemon and the device client, sans I/O.

Pure code in the style of the ``websockets`` library's own core: frames in, typed events
and frames out; no asyncio, no sockets, no clock (the adapter passes ``now``). The asyncio
daemon (``rise-edge serve``) and client (``rise-device generate``) are thin adapters.

* :mod:`shared.protocol.messages`: the messages (frozen dataclasses that validate
  themselves), :class:`ProtocolLimits`, :func:`encode` / :func:`decode_text`, the error codes.
* :mod:`shared.protocol.connection`: :class:`ServerConnection` and
  :class:`ClientConnection`, the per-connection state machines.

Frames
------
Control messages are JSON text frames, one object each, ``{"type": "generate", ...}``;
every field is always written (``null`` when unset). Tensor and image payloads are
binary frames: the handoff is the safetensors document of :mod:`shared.handoff`
(unchanged), an edge-decoded image is PNG bytes.

A conversation (``>`` client to server, ``<`` server to client)::

    > hello     {versions, token, client, family_id, device_class?, device_step_s?, device_load?}
    < welcome   {version, family_id, server, limits}
    > generate  {request_id, prompt, preference, seed?, height?, width?, steps?, pinned?,
                 device_load?, rtt_s?, bandwidth_bps?}
    < plan      {request_id, plan: {num_inference_steps, split, sampler, guidance_scale, decode_on},
                 seed, height, width, scheduler, why}
    < progress  {request_id, stage: "edge", step, total}          (any number)
    < handoff   {request_id, nbytes, edge_compute_s?, queue_s?}   then at once: <binary: safetensors handoff>
      or result {request_id, nbytes, height, width, format: "png", ...}  then at once: <binary: PNG>
                                                                      (decode_on="edge")
      or error  {code, message, request_id, field?, retry_after_s?}    (ends the request)
    > report    {request_id, device_compute_s, transfer_s, total_latency_s, device_load?, rtt_s?,
                 bandwidth_bps?, rating?}
    > rating    {request_id, rating}                              (any time after delivery)
    > cancel    {request_id}                                      (server answers error code "cancelled")
    > error     {code, message, request_id?}                      (the device failed a delivered request)

How a binary frame is tied to its request
-----------------------------------------
By adjacency, checked by content. The server sends a ``handoff`` (or ``result``)
announcement naming the request and the payload's byte count, and the binary frame
*immediately* after it; websocket frames on one connection arrive in order, so the next
frame is the payload. The client then checks that the byte count matches and that the
decoded handoff's own header (``request_id``, steps, split, sampler, guidance, seed)
matches the announced request's plan; the server checks the same before it sends, so a
mixed-up batch cannot deliver one request's latent to another. A text frame between an
announcement and its binary frame, or a binary frame without one, is a violation. The
announcement's arrival time also gives the client the payload's transfer time.

Versions and unknown fields
---------------------------
``hello`` lists the versions the client speaks; the server picks the highest common one
(:data:`PROTOCOL_VERSIONS`) or answers ``unsupported_version`` and closes. ``hello`` and
``error`` keep their format in every version (they are exchanged before, or instead of,
an agreement), and ``hello`` ignores unknown fields so a newer client can add some. Every
other message rejects unknown fields: within a negotiated version every field is known,
so an unknown one is a bug (a misspelt optional field would otherwise be dropped without
a word), and a new field comes with a new version.

Version 2 names the fields that came after the first release (:data:`ADDED_IN_V2`: a plan's
``notice``, ``family_id``, ``loading_s`` and relay modes, a request's ``preview_every``). Both
sides send them only to a peer that negotiated version 2 (:func:`for_peer` leaves them out, and
a relay mode the peer cannot run is refused: :func:`newer_fields`), so a device or edge of the
first release keeps working with this one. Both sides accept them under version 1 as well:
releases before version 2 sent some of them while announcing only version 1.

Errors
------
A bad frame never raises out of ``receive_*``: the connection queues an ``error`` (code
from :data:`ERROR_CODES`, a message naming the field) and returns a
:class:`FrameRejected` event. A bad request fails only itself; a bad hello, a wrong
token, no common version or a wrong family close the connection (:attr:`close` holds
the websocket close code and reason), as do ``max_violations`` rejected frames.
"""

from __future__ import annotations

from shared.protocol.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    FATAL_CLOSE_CODES,
    ClientConnection,
    ClientEvent,
    Close,
    Event,
    FrameRejected,
    HandoffReceived,
    ResultReceived,
    ServerConnection,
    ServerEvent,
    TokenBucket,
)
from shared.protocol.messages import (
    ADDED_IN_V2,
    ERROR_CODES,
    MAX_SECONDS,
    MESSAGE_TYPES,
    PNG_SIGNATURE,
    PROTOCOL_VERSIONS,
    RETRY_CODES,
    Cancel,
    Error,
    ErrorCode,
    Generate,
    HandoffAnnouncement,
    Hello,
    Message,
    Plan,
    Progress,
    ProtocolError,
    ProtocolLimits,
    Rating,
    Report,
    ResultAnnouncement,
    Welcome,
    check_limits,
    decode_text,
    encode,
    for_peer,
    handoff_conflict,
    newer_fields,
    plan_conflict,
    protocol_error_from_handoff,
)

__all__ = [
    "ADDED_IN_V2",
    "CLOSE_GOING_AWAY",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_PROTOCOL_ERROR",
    "ERROR_CODES",
    "FATAL_CLOSE_CODES",
    "MAX_SECONDS",
    "MESSAGE_TYPES",
    "PNG_SIGNATURE",
    "PROTOCOL_VERSIONS",
    "RETRY_CODES",
    "Cancel",
    "ClientConnection",
    "ClientEvent",
    "Close",
    "Error",
    "ErrorCode",
    "Event",
    "FrameRejected",
    "Generate",
    "HandoffAnnouncement",
    "HandoffReceived",
    "Hello",
    "Message",
    "Plan",
    "Progress",
    "ProtocolError",
    "ProtocolLimits",
    "Rating",
    "Report",
    "ResultAnnouncement",
    "ResultReceived",
    "ServerConnection",
    "ServerEvent",
    "TokenBucket",
    "Welcome",
    "check_limits",
    "decode_text",
    "encode",
    "for_peer",
    "handoff_conflict",
    "newer_fields",
    "plan_conflict",
    "protocol_error_from_handoff",
]
