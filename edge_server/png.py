"""PNG encoding of edge-decoded images: the API layer's job, never the engine's."""

from __future__ import annotations

import io

import numpy as np
from numpy.typing import NDArray
from PIL import Image


def encode_png(image: NDArray[np.uint8]) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless, as the device's own decode would show it)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_png: expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
