"""What the device hands back: a finished handoff, and a finished generation with its timings.

* :class:`Finished`: :func:`device_app.finish.finish_handoff`'s answer (final latent,
  decoded image, the seconds the small model's steps and the VAE decode took);
* :class:`GenerationResult` with its :class:`Timings`: one generation, however it was made:
  relayed through the edge (:meth:`device_app.client.EdgeClient.generate`) or on this device
  alone (:func:`device_app.app.offline.generate_offline`, ``offline=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import numpy.typing as npt

from device_app.speculative import ResultPath
from shared.protocol import Plan, Report

__all__ = ["Finished", "GenerationResult", "Timings"]

LatentArray = npt.NDArray[np.float32]  # (B, C, h, w)
ImageArray = npt.NDArray[np.uint8]  # (H, W, 3)


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value
class Finished:
    """A handoff finished on the device.

    ``latents`` is the final latent (B, C, h, w) float32; ``image`` its VAE decode as uint8
    (H, W, 3) (a handoff carries one request: its first, only, image), ``None`` when the
    decode was not asked for. ``steps_s`` is the small model's remaining steps, ``decode_s``
    the VAE decode (0 without it), in seconds of the clock the caller chose.
    """

    latents: LatentArray = field(repr=False)
    image: ImageArray | None = field(repr=False)
    steps_s: float
    decode_s: float


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in seconds.

    ``queue_s`` / ``edge_compute_s`` are the edge's own figures from the handoff
    announcement (``None`` if it did not say). The rest are measured here:
    ``plan_s`` = generate sent -> plan received; ``edge_wait_s`` = generate sent ->
    payload announced (queue + edge steps + network); ``transfer_s`` = the payload's
    frame (announcement -> binary frame); ``handoff_decode_s`` = parsing and checking
    the payload; ``device_compute_s`` = the small model's ORT steps; ``decode_s`` = the
    VAE decode (or, for an edge-decoded result, the PNG decode); ``device_wait_s`` =
    waiting for this device's compute slot; ``text_encode_s`` = the prompt's text
    encoding on this device (device-only generations; the edge encodes a relayed one);
    ``total_latency_s`` = generate sent -> image ready. The :class:`Report` sent to the
    edge carries ``device_compute_s + decode_s`` as its ``device_compute_s`` (the
    protocol's "ORT steps + decode"). A device-only generation has no edge: its edge and
    transfer figures are 0 (``plan_s`` ``None``). ``speculative_steps`` = the steps this device ran
    of its own device-only run under a speculative plan: all of them when it won (then
    ``device_compute_s`` is that run's), the ones discarded when the handoff won (they ran while
    the edge worked, so they cost the device's energy, not latency; ``device_compute_s`` is then
    the steps finishing the handoff only).
    """

    total_latency_s: float
    plan_s: float | None
    edge_wait_s: float
    transfer_s: float
    handoff_decode_s: float
    device_compute_s: float
    decode_s: float
    device_wait_s: float = 0.0
    queue_s: float | None = None
    edge_compute_s: float | None = None
    text_encode_s: float = 0.0
    speculative_steps: int = 0

    @property
    def handoff_overhead_s(self) -> float:
        """What the handoff costs this side: its transfer plus its decoding (the edge's encode is not visible here)."""
        return self.transfer_s + self.handoff_decode_s

    @property
    def device_s(self) -> float:
        """Everything this device computed: text encoding (device-only), the small model's steps, the decode."""
        return self.text_encode_s + self.device_compute_s + self.decode_s

    def as_dict(self) -> dict[str, float | None]:
        data: dict[str, float | None] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["handoff_overhead_s"] = self.handoff_overhead_s
        return data


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value
class GenerationResult:
    """One finished generation.

    ``image`` is uint8 (H, W, 3). ``latents`` is the final latent (1, C, h, w) float32
    for a device-finished request, ``None`` for an edge-decoded one (then ``png`` holds
    the bytes the edge sent). ``plan`` is the configuration used, with its seed, size and
    who chose it (``scheduler``; ``"offline"`` for a device-only generation).
    ``payload_bytes`` is the size of the binary frame (the safetensors handoff or the
    PNG; 0 offline). ``report`` is what was sent back to the edge (``None`` if the
    connection was gone by then, or there was no edge). ``offline``: made on this device
    alone, the edge never involved. :attr:`path` says which path made the image.
    """

    request_id: str
    image: ImageArray = field(repr=False)
    latents: LatentArray | None = field(repr=False)
    plan: Plan
    timings: Timings
    payload_bytes: int
    png: bytes | None = field(default=None, repr=False)
    report: Report | None = None
    offline: bool = False
    path_taken: ResultPath | None = None  # None: read from the result (see path)

    @property
    def path(self) -> ResultPath:
        """Which path made the image: ``"relay"`` (this device finished the edge's handoff), ``"device"``
        (every step here: offline, or a speculative run that beat the handoff), ``"edge"`` (the edge's PNG).
        A speculative result that says ``"device"`` has no :attr:`report`: the edge was told ``cancelled``."""
        if self.path_taken is not None:
            return self.path_taken
        if self.offline:
            return "device"
        return "edge" if self.png is not None else "relay"

    @property
    def decode_on(self) -> str:
        return self.plan.plan.decode_on

    @property
    def handoff_bytes(self) -> int:
        """The safetensors handoff's size (0 for an edge-decoded result, whose payload is a PNG)."""
        return self.payload_bytes if self.png is None else 0

    @property
    def device_compute_s(self) -> float:
        """The small model's steps on this device (``timings.device_compute_s``)."""
        return self.timings.device_compute_s

    @property
    def total_s(self) -> float:
        """Request started -> image ready (``timings.total_latency_s``)."""
        return self.timings.total_latency_s
