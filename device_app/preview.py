"""The device's live previews: its own steps drawn as they go, with the edge's kind of projection.

See :mod:`shared.preview`: the device draws the sampler's predicted clean latent after each
due step with the projection the edge fitted for the family, which ``rise-export`` writes into
the bundle's manifest (``preview_projection``). A bundle written before that has none: the
device then fits one from its own ONNX VAE decoder on random latents (once per bundle, on the
first preview) — rougher colours (see :mod:`edge_server.preview`), but a preview. PNG with Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from device_app.runtime import DeviceBundle
from shared.preview import LatentProjection, LazyProjection, fit_latents, fit_projection, preview_due

#: (stage "edge" | "device", step, PNG bytes of the preview): what a UI gets for each preview.
PreviewCallback = Callable[[str, int, bytes], None]


def encode_preview_png(rgb: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_preview_png(png: bytes) -> NDArray[np.uint8]:
    """A preview PNG (from the edge or the device) as (h, w, 3) uint8."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class DevicePreviewer:
    """Previews of one bundle's latents; the projection is fitted on first use (thread-safe)."""

    def __init__(self, bundle: DeviceBundle) -> None:
        self.bundle = bundle
        self._projection = LazyProjection(self._fit)

    @property
    def projection(self) -> LatentProjection:
        return self._projection.get()

    def _fit(self) -> LatentProjection:
        manifest = self.bundle.manifest
        if manifest.preview_projection is not None:
            return LatentProjection.from_dict(manifest.preview_projection, manifest.latent_channels)
        latents = fit_latents(manifest.latent_channels)
        return fit_projection(latents, self.bundle.decode(latents), manifest.vae_scale_factor)

    def png(self, x0: NDArray[np.floating]) -> bytes:
        return encode_preview_png(self.projection.render(x0))

    def step_hook(self, every: int | None, on_preview: PreviewCallback) -> Callable[[int, int, np.ndarray], None]:
        """An ``on_x0(step, total, x0)`` for :func:`device_app.finish.finish_latents`: a preview on due steps."""

        def on_x0(step: int, total: int, x0: np.ndarray) -> None:
            if preview_due(step, total, every):
                on_preview("device", step, self.png(x0))

        return on_x0
