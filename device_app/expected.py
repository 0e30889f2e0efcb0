"""What this device asked the edge for, and the checks of what comes back against it.

The device chose its edge, but it does not trust the edge's bytes: a plan, a handoff and an
edge-decoded PNG are each checked against the request, the plan and the bundle *before* any
ONNX Runtime or Pillow work, so an edge cannot make a phone run 500 steps on a batch of eight
latents or inflate a 400 KB PNG into a 12000 x 12000 image. The bounds are this device's own
(:class:`DeviceLimits`), never the ones the edge's welcome claims. Every failure is one
:class:`~device_app.errors.EdgeMismatch` line:

* :func:`check_plan`: the plan honours the request (``plan_conflict``; a size the request left
  open must be the bundle's default) and fits the device (``plan_refused``: steps, image size);
* :func:`check_handoff`: the latent is (1, the bundle's channels, the plan's size / the VAE
  factor), the text embeddings the bundle's shape, N and k the plan's (``payload_mismatch``);
* :func:`png_size` / :func:`decode_png`: the PNG's IHDR, read from the bytes before any decoding,
  declares the plan's size (``payload_mismatch``); only then does Pillow decode it.

No torch here: this is the device.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from device_app.errors import PAYLOAD_MISMATCH, PLAN_CONFLICT, PLAN_REFUSED, EdgeMismatch
from device_app.results import ImageArray
from device_app.runtime import DeviceBundle
from shared.errors import ConfigError
from shared.handoff import Handoff
from shared.protocol import PNG_SIGNATURE, Generate, Plan, plan_conflict
from shared.relay_plan import MAX_STEPS
from shared.validation import check_int

__all__ = ["DeviceLimits", "check_handoff", "check_plan", "check_png", "decode_png", "default_size", "png_size"]

_IHDR = struct.Struct(">I4sIIBBBBBI")  # length, type, width, height, depth, colour, compression, filter, interlace, CRC
_PNG_MAX_SIDE = 2**31 - 1  # the PNG spec's bound on a declared width or height


@dataclass(frozen=True)
class DeviceLimits:
    """What this device runs or decodes, whatever the edge's welcome allows (bounds inclusive).

    ``max_steps`` bounds a plan's total steps N (the edge's own default limit);
    ``max_image_pixels`` an image's height x width, asked for or received (2048 x 2048 by
    default; SDXL's own size is 1024 x 1024). Pillow's decompression-bomb guard is lowered to it.
    """

    max_steps: int = 100
    max_image_pixels: int = 2048 * 2048

    def __post_init__(self) -> None:
        check_int("max_steps", self.max_steps, lo=1, hi=MAX_STEPS, error=ConfigError)
        check_int("max_image_pixels", self.max_image_pixels, lo=64, hi=2**31, error=ConfigError)


def default_size(bundle: DeviceBundle) -> tuple[int, int]:
    """The (height, width) an edge uses for a request that leaves the size open: the family's default."""
    side = bundle.manifest.sample_size * bundle.manifest.vae_scale_factor
    return side, side


def check_plan(bundle: DeviceBundle, request: Generate, plan: Plan, limits: DeviceLimits) -> None:
    """Raise :class:`EdgeMismatch` unless ``plan`` honours ``request`` and fits this device and ``bundle``."""
    rid = request.request_id
    conflict = plan_conflict(request, plan)
    if conflict is None and request.height is None and (plan.height, plan.width) != default_size(bundle):
        height, width = default_size(bundle)
        conflict = (f"height: expected the bundle's default {height}x{width} (the request left the size open), "
                    f"got {plan.height}x{plan.width}")
    if conflict is not None:  # the edge ignored what this request fixed: its image would be wrong
        raise EdgeMismatch(PLAN_CONFLICT, f"request {rid}: the server's {conflict}", request_id=rid)
    steps = plan.plan.num_inference_steps
    if steps > limits.max_steps:
        raise EdgeMismatch(
            PLAN_REFUSED, f"request {rid}: the server's plan has {steps} steps, over this device's limit of "
            f"{limits.max_steps}", request_id=rid,
        )
    factor = bundle.manifest.vae_scale_factor
    if plan.height % factor or plan.width % factor:
        raise EdgeMismatch(
            PLAN_REFUSED, f"request {rid}: the server's plan size {plan.height}x{plan.width} is not a multiple of "
            f"the bundle's VAE factor {factor}", request_id=rid,
        )
    if plan.height * plan.width > limits.max_image_pixels:
        raise EdgeMismatch(
            PLAN_REFUSED, f"request {rid}: the server's plan size {plan.height}x{plan.width} is over this device's "
            f"limit of {limits.max_image_pixels} pixels", request_id=rid,
        )


def check_handoff(bundle: DeviceBundle, handoff: Handoff, plan: Plan) -> None:
    """Raise :class:`EdgeMismatch` unless ``handoff`` is the one ``plan`` announced, for this bundle.

    The latent must be (1, latent channels, height / factor, width / factor) of the plan's size,
    the text embeddings (1, L, D) of the bundle's unconditional embedding, N the plan's and k the
    plan's (for an adaptive plan, any step of its window; the decoder already bounded every shape
    and tied the other tensors to the latent's batch).
    """
    rid = plan.request_id
    manifest = bundle.manifest
    factor = manifest.vae_scale_factor
    want = (1, manifest.latent_channels, plan.height // factor, plan.width // factor)
    got = tuple(handoff.latents.shape)
    if got != want:
        raise EdgeMismatch(
            PAYLOAD_MISMATCH, f"request {rid}: the server's handoff latent has shape {got}, expected {want} "
            f"(batch 1, the bundle's {manifest.latent_channels} channels, the plan's {plan.height}x{plan.width} "
            "image)", request_id=rid,
        )
    want_cond = (1, *bundle.uncond.shape[1:])
    got_cond = tuple(handoff.cond_embeddings.shape)
    if got_cond != want_cond:
        raise EdgeMismatch(
            PAYLOAD_MISMATCH, f"request {rid}: the server's handoff text embeddings have shape {got_cond}, "
            f"expected {want_cond} (the bundle's)", request_id=rid,
        )
    steps = plan.plan.num_inference_steps
    if handoff.num_inference_steps != steps:
        raise EdgeMismatch(
            PAYLOAD_MISMATCH, f"request {rid}: the server's handoff has num_inference_steps "
            f"{handoff.num_inference_steps}, the plan {steps}", request_id=rid,
        )
    if not plan.plan.accepts_split(handoff.split):  # an adaptive plan: anywhere in its window
        want_k = (str(plan.plan.split) if not plan.plan.adaptive
                  else f"a step in [{plan.plan.first_split}, {plan.plan.split}]")
        raise EdgeMismatch(
            PAYLOAD_MISMATCH, f"request {rid}: the server's handoff has split {handoff.split}, the plan {want_k}",
            request_id=rid,
        )


def png_size(png: bytes, request_id: str | None = None) -> tuple[int, int]:
    """The (width, height) a PNG declares in its IHDR chunk, read from the bytes (nothing decoded).

    :class:`EdgeMismatch` (``payload_mismatch``) if the bytes do not start with the signature and
    a well-formed IHDR (length 13, CRC right, sides in [1, 2**31 - 1]).
    """
    where = "" if request_id is None else f"request {request_id}: "
    header = png[len(PNG_SIGNATURE):len(PNG_SIGNATURE) + _IHDR.size]
    if not png.startswith(PNG_SIGNATURE) or len(header) < _IHDR.size:
        raise EdgeMismatch(PAYLOAD_MISMATCH, f"{where}the server's PNG has no IHDR header", request_id=request_id)
    length, kind, width, height, *_, crc = _IHDR.unpack(header)
    if length != 13 or kind != b"IHDR" or zlib.crc32(header[4:-4]) != crc:
        raise EdgeMismatch(PAYLOAD_MISMATCH, f"{where}the server's PNG has a malformed IHDR header",
                           request_id=request_id)
    if not (1 <= width <= _PNG_MAX_SIDE and 1 <= height <= _PNG_MAX_SIDE):
        raise EdgeMismatch(PAYLOAD_MISMATCH, f"{where}the server's PNG declares {width}x{height} pixels",
                           request_id=request_id)
    return width, height


def _check_png_size(width: int, height: int, plan: Plan, limits: DeviceLimits) -> None:
    rid = plan.request_id
    if (height, width) != (plan.height, plan.width):
        raise EdgeMismatch(
            PAYLOAD_MISMATCH, f"request {rid}: the server's PNG is {width}x{height} (width x height), the plan "
            f"{plan.width}x{plan.height}", request_id=rid,
        )
    if width * height > limits.max_image_pixels:
        raise EdgeMismatch(
            PAYLOAD_MISMATCH, f"request {rid}: the server's PNG has {width * height} pixels, over this device's "
            f"limit of {limits.max_image_pixels}", request_id=rid,
        )


def check_png(png: bytes, plan: Plan, limits: DeviceLimits) -> None:
    """Raise :class:`EdgeMismatch` unless the PNG's header declares the plan's size (within ``limits``)."""
    width, height = png_size(png, plan.request_id)
    _check_png_size(width, height, plan, limits)


def decode_png(png: bytes, plan: Plan, limits: DeviceLimits) -> ImageArray:
    """An edge-decoded PNG as uint8 (H, W, 3), after :func:`check_png`; nothing larger is ever decoded.

    Blocking (Pillow decodes here). Pillow's own decompression-bomb guard is lowered to
    ``limits.max_image_pixels`` (process-wide, only ever lowered) as a second line.
    """
    from PIL import Image  # the device extra ships pillow; only edge-decoded results need it

    check_png(png, plan, limits)
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > limits.max_image_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # warns above this, refuses above twice this
    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as img:  # lazy: reads the header, decodes nothing
            _check_png_size(*img.size, plan, limits)  # what Pillow will decode, not just what was parsed above
            image = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise EdgeMismatch(PAYLOAD_MISMATCH, f"request {plan.request_id}: the server's PNG: {exc}",
                           request_id=plan.request_id) from None
    if image.shape != (plan.height, plan.width, 3):  # the decoder's answer, checked like the header
        raise EdgeMismatch(
            PAYLOAD_MISMATCH, f"request {plan.request_id}: the server's PNG decoded to shape {image.shape}, "
            f"expected {(plan.height, plan.width, 3)}", request_id=plan.request_id,
        )
    return image
