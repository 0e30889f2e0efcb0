"""The guidance-scale embedding an LCM-distilled denoiser takes as ``timestep_cond``, in numpy.

Guidance-distilled UNets (LCM, ``time_cond_proj_dim`` set) are not run twice with
classifier-free guidance: the guidance scale is an input, embedded as diffusers'
``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` does (the VDM sinusoidal
embedding of ``1000 * w``). Diffusers' pipelines pass ``w = guidance_scale - 1``, and so must
callers of :func:`guidance_scale_embedding`; :func:`lcm_guidance_embedding` does the ``- 1``,
so the edge and the device build the embedding with one function and agree bit for bit.

Computed in float32 in diffusers' order (``w`` is cast to float32 first, as the pipeline's
``torch.tensor(guidance_scale - 1)`` is), with correctly rounded ``log``/``exp``/``sin``/``cos``.
torch's CPU ``exp`` (MKL) is one ulp off for about 1% of float32 inputs, e.g. frequency 4 of
``embedding_dim`` 256; since the sines take arguments up to ``1000 * w``, one ulp of a frequency
moves such an entry by up to ``1000 * |w| * 1.2e-7`` (5e-4 at guidance scale 7.5) from
diffusers' value. Entries whose frequency agrees match diffusers to float32 round-off. No torch
here: the device has none.

Refused with ``ConfigError``: ``embedding_dim`` < 4 (diffusers divides by ``embedding_dim // 2 - 1``
and returns NaN at 2 and 3), a ``batch`` < 1, a non-finite ``w`` or a ``w`` of another length
than 1 or ``batch``.
"""

from __future__ import annotations

import math

import numpy as np

from shared.errors import ConfigError
from shared.validation import is_integral, is_real

__all__ = ["guidance_scale_embedding", "lcm_guidance_embedding"]


def guidance_scale_embedding(w: np.ndarray | float, embedding_dim: int, batch: int = 1) -> np.ndarray:
    """Diffusers' ``get_guidance_scale_embedding(w, embedding_dim)``: float32 (batch, embedding_dim).

    ``w`` is ``guidance_scale - 1`` (as diffusers' pipelines pass it): a number, or a 1-D array
    of length 1 (repeated ``batch`` times) or ``batch`` (one value per row). Rows are
    ``[sin(1000 w f_0), .., sin(1000 w f_{h-1}), cos(1000 w f_0), .., cos(1000 w f_{h-1})]`` with
    ``h = embedding_dim // 2`` and ``f_i = exp(-i log(10000) / (h - 1))``, plus one zero column
    when ``embedding_dim`` is odd.
    """
    if not is_integral(embedding_dim) or int(embedding_dim) < 4:
        raise ConfigError(f"guidance embedding: embedding_dim={embedding_dim!r} must be an integer >= 4")
    if not is_integral(batch) or int(batch) < 1:
        raise ConfigError(f"guidance embedding: batch={batch!r} must be an integer >= 1")
    dim, rows = int(embedding_dim), int(batch)
    if isinstance(w, np.ndarray):
        if w.ndim > 1 or not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
            raise ConfigError(f"guidance embedding: w must be a number or a 1-D real array, got {w.dtype} {w.shape}")
        values = w.reshape(-1).astype(np.float32)
    elif is_real(w):
        values = np.array([w], dtype=np.float32)
    else:
        raise ConfigError(f"guidance embedding: w must be a number or a 1-D real array, got {type(w).__name__}")
    if values.shape[0] not in (1, rows):
        raise ConfigError(f"guidance embedding: w has {values.shape[0]} values for batch={rows}; give 1 or {rows}")
    if not np.all(np.isfinite(values)):
        raise ConfigError(f"guidance embedding: w={values.tolist()!r} must be finite")
    scaled = np.broadcast_to(values, (rows,)) * np.float32(1000.0)

    half = dim // 2
    # torch: log(tensor(10000.)) / (half - 1), then exp(arange(half) * -that), all float32.
    step = np.float32(np.float32(math.log(10000.0)) / np.float32(half - 1))
    exponents = np.arange(half, dtype=np.float32) * -step
    frequencies = np.exp(exponents.astype(np.float64)).astype(np.float32)  # correctly rounded float32 exp
    arguments = (scaled[:, None] * frequencies[None, :]).astype(np.float64)
    out = np.zeros((rows, dim), dtype=np.float32)
    out[:, :half] = np.sin(arguments).astype(np.float32)
    out[:, half : 2 * half] = np.cos(arguments).astype(np.float32)
    return out


def lcm_guidance_embedding(guidance_scale: float, embedding_dim: int, batch: int = 1) -> np.ndarray:
    """The ``timestep_cond`` of an LCM-distilled UNet for ``guidance_scale``: float32 (batch, embedding_dim).

    ``guidance_scale_embedding(guidance_scale - 1, ...)``, the ``w`` diffusers' LCM pipeline passes.
    """
    if not is_real(guidance_scale) or not math.isfinite(guidance_scale):
        raise ConfigError(f"guidance embedding: guidance_scale={guidance_scale!r} must be a finite number")
    return guidance_scale_embedding(float(guidance_scale) - 1.0, embedding_dim, batch)
