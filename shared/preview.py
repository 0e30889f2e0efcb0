"""Live previews: the picture forming, drawn from the predicted clean latent at a few bytes a step.

A preview is the sampler's predicted clean latent x0 (every port records it as ``last_x0``;
the edge's jobs as ``DenoiseJob.x0``) pushed through a **linear latent-to-RGB projection**
over each latent pixel's 3 x 3 neighbourhood (a 3 x 3 convolution to RGB plus a bias), then a
per-channel tone curve, so a preview is as large as the latent (64 x 64 for SD1.5, 12 x 12 for
the demo family) and costs ``27 C`` multiply-adds and three table lookups a pixel.

Why linear and not a tiny decoder (TAESD-like): it needs no training run and no weights to
ship (it is fitted by least squares from the family's own VAE decodes in under a second,
:func:`fit_projection`), and it is the same maths on the edge and the device. Why the
neighbourhood and the curve: measured on the demo family (the VAE decodes of x0 along 10-step
trajectories, averaged per latent pixel), the per-pixel projection that diffusion UIs use for
SD1.x reaches 14.5 dB PSNR, the 3 x 3 one 18 dB; random-feature (tanh) or quadratic variants
did not generalise better. A least-squares fit pulls saturated colours towards the mean (the
demo family's red sneaker came out dark red on a grey ground); the tone curve, the mean target
colour for each level of the linear output, restores them (final latent: 22.8 -> 24.0 dB, the
background black again).
What a preview must show — where the items are and roughly their colours — survives it; the
details it blurs are what the remaining steps add.

Pure numpy: both sides import it; PNG encoding is the adapters' (Pillow on either side).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shared.errors import ConfigError

#: The largest preview side in pixels: larger latents are averaged down to it (SDXL's 128 -> 64).
PREVIEW_MAX_SIDE = 64
#: Random latents the projection is fitted on, and their side (in latent pixels).
FIT_COUNT = 4
FIT_SIDE = 8


#: The neighbourhood a preview pixel is drawn from (latent pixels a side, odd).
KERNEL = 3
#: Where the tone curve is given: linear-output levels (RGB in [0, 1], a margin either side).
CURVE_KNOTS = np.linspace(-0.25, 1.25, 31, dtype=np.float32)


@dataclass(frozen=True)
class LatentProjection:
    """RGB in [0, 1] = ``curve`` of (a ``KERNEL`` x ``KERNEL`` convolution of x0 (``weights`` (K, K, C, 3)) + ``bias``).

    ``curve`` (3, len(CURVE_KNOTS)) maps each channel's linear level at the knots to its colour
    (linear in between); ``None``: the identity.
    """

    weights: NDArray[np.float32]
    bias: NDArray[np.float32]
    curve: NDArray[np.float32] | None = None

    def __post_init__(self) -> None:
        w = self.weights
        if w.ndim != 4 or w.shape[:2] != (KERNEL, KERNEL) or w.shape[3] != 3 or self.bias.shape != (3,):
            raise ConfigError(f"a latent projection is ({KERNEL}, {KERNEL}, C, 3) weights and a (3,) bias, got "
                              f"{w.shape} and {self.bias.shape}")
        if self.curve is not None and self.curve.shape != (3, len(CURVE_KNOTS)):
            raise ConfigError(f"a latent projection's curve is (3, {len(CURVE_KNOTS)}), got {self.curve.shape}")
        curve = np.zeros(1) if self.curve is None else self.curve
        if not (np.isfinite(w).all() and np.isfinite(self.bias).all() and np.isfinite(curve).all()):
            raise ConfigError("a latent projection must be finite")

    @property
    def channels(self) -> int:
        return int(self.weights.shape[2])

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready (a bundle manifest carries it): ``weights`` and ``curve`` flattened row-major, ``bias``."""
        data = {"weights": [float(v) for v in self.weights.ravel()], "bias": [float(v) for v in self.bias]}
        if self.curve is not None:
            data["curve"] = [float(v) for v in self.curve.ravel()]
        return data

    @classmethod
    def from_dict(cls, data: object, channels: int) -> LatentProjection:
        """The inverse of :meth:`to_dict` for a ``channels``-channel latent; ConfigError naming what is wrong."""
        if not isinstance(data, dict) or not {"weights", "bias"} <= set(data) <= {"weights", "bias", "curve"}:
            raise ConfigError("preview_projection: expected an object with 'weights', 'bias' (and 'curve')")
        try:
            weights = np.asarray(data["weights"], dtype=np.float32)
            bias = np.asarray(data["bias"], dtype=np.float32)
            curve = None if data.get("curve") is None else np.asarray(data["curve"], dtype=np.float32)
        except (TypeError, ValueError):
            raise ConfigError("preview_projection: weights, bias and curve must be lists of numbers") from None
        if curve is not None:
            if curve.shape != (3 * len(CURVE_KNOTS),):
                raise ConfigError(f"preview_projection: expected {3 * len(CURVE_KNOTS)} curve values, got {curve.size}")
            curve = curve.reshape(3, len(CURVE_KNOTS))
        expected = KERNEL * KERNEL * channels * 3
        if weights.shape != (expected,):
            raise ConfigError(f"preview_projection: expected {expected} weights for {channels} latent channels, "
                              f"got {weights.size}")
        return cls(weights.reshape(KERNEL, KERNEL, channels, 3), bias, curve)

    def render(self, x0: NDArray[np.floating], max_side: int = PREVIEW_MAX_SIDE) -> NDArray[np.uint8]:
        """The preview of one latent (1, C, h, w) or (C, h, w): (h', w', 3) uint8, sides at most ``max_side``."""
        latent = np.asarray(x0, dtype=np.float32)
        if latent.ndim == 4:
            latent = latent[0]
        if latent.ndim != 3 or latent.shape[0] != self.channels:
            raise ConfigError(f"a preview needs a ({self.channels}, h, w) latent, got shape {tuple(np.shape(x0))}")
        latent = np.nan_to_num(latent, nan=0.0, posinf=0.0, neginf=0.0)
        kernel = self.weights.reshape(-1, self.channels, 3)
        rgb = np.einsum("khwc,kcd->hwd", _neighbourhoods(latent), kernel) + self.bias
        if self.curve is not None:
            rgb = np.stack([np.interp(rgb[..., c], CURVE_KNOTS, self.curve[c]) for c in range(3)], axis=-1)
        stride = -(-max(rgb.shape[:2]) // max_side)
        if stride > 1:
            rgb = _average_pool(rgb, stride)
        pixels: NDArray[np.uint8] = (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)
        return pixels


def _neighbourhoods(latent: NDArray[np.float32]) -> NDArray[np.float32]:
    """(K*K, h, w, C): every latent pixel's neighbours, offset by offset (edges repeated)."""
    c, h, w = latent.shape
    r = KERNEL // 2
    padded = np.pad(latent, ((0, 0), (r, r), (r, r)), mode="edge").transpose(1, 2, 0)
    return np.stack([padded[i:i + h, j:j + w] for i in range(KERNEL) for j in range(KERNEL)])


def _average_pool(image: NDArray[np.float32], factor: int) -> NDArray[np.float32]:
    """(H, W, 3) averaged over ``factor`` x ``factor`` blocks (the edges cropped to whole blocks)."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    if h == 0 or w == 0:
        raise ConfigError(f"cannot average a {image.shape[0]}x{image.shape[1]} image by {factor}")
    blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, image.shape[2])
    pooled: NDArray[np.float32] = blocks.mean(axis=(1, 3), dtype=np.float32)
    return pooled


def fit_latents(channels: int, *, count: int = FIT_COUNT, side: int = FIT_SIDE, seed: int = 0) -> NDArray[np.float32]:
    """Standard normal latents (as scaled latents are distributed): a fit's input where no better ones exist."""
    return np.random.default_rng(seed).standard_normal((count, channels, side, side), dtype=np.float32)


def fit_projection(latents: NDArray[np.floating], images: NDArray[np.generic], factor: int) -> LatentProjection:
    """Least squares from latent neighbourhoods to the mean colour of the ``factor`` x ``factor`` patch decoded.

    ``latents`` (B, C, h, w) and their VAE decodes ``images`` (B, h*factor, w*factor, 3), uint8
    or floats in [0, 1].
    """
    z = np.asarray(latents, dtype=np.float32)
    pixels = np.asarray(images, dtype=np.float64)
    if np.asarray(images).dtype == np.uint8:
        pixels = pixels / 255.0
    b, c, h, w = z.shape
    if pixels.shape != (b, h * factor, w * factor, 3):
        raise ConfigError(f"fit_projection: {b} latents of {h}x{w} with factor {factor} decode to "
                          f"({b}, {h * factor}, {w * factor}, 3), got {pixels.shape}")
    targets = pixels.reshape(b, h, factor, w, factor, 3).mean(axis=(2, 4)).reshape(-1, 3)
    rows = [_neighbourhoods(latent).transpose(1, 2, 0, 3).reshape(h * w, -1) for latent in z]
    inputs = np.concatenate([np.concatenate(rows).astype(np.float64), np.ones((b * h * w, 1))], axis=1)
    solution, *_ = np.linalg.lstsq(inputs, targets, rcond=None)
    weights = solution[:-1].reshape(KERNEL, KERNEL, c, 3).astype(np.float32)
    curve = np.stack([_tone_curve(inputs @ solution[:, ch], targets[:, ch]) for ch in range(3)])
    return LatentProjection(weights, solution[-1].astype(np.float32), curve.astype(np.float32))


def _tone_curve(levels: NDArray[np.float64], colours: NDArray[np.float64]) -> NDArray[np.float64]:
    """The mean colour at each knot's level (pixels binned by the nearest knot), made non-decreasing.

    Knots with fewer than :data:`_MIN_PER_KNOT` pixels take the line between their neighbours (the
    identity past the data's ends), so a few stray pixels never bend it; the running maximum keeps a
    brighter level from mapping to a darker colour.
    """
    knots = CURVE_KNOTS.astype(np.float64)
    nearest = np.abs(levels[:, None] - knots[None, :]).argmin(axis=1)
    counts = np.bincount(nearest, minlength=len(knots))
    sums = np.bincount(nearest, weights=colours, minlength=len(knots))
    known = counts >= _MIN_PER_KNOT
    if not known.any():
        return knots
    means = sums[known] / counts[known]
    curve = np.interp(knots, knots[known], means, left=np.nan, right=np.nan)
    low, high = knots[known][0], knots[known][-1]
    curve[knots < low] = means[0] + (knots[knots < low] - low)  # past the data: slope 1 (the identity's)
    curve[knots > high] = means[-1] + (knots[knots > high] - high)
    return np.maximum.accumulate(curve)


_MIN_PER_KNOT = 4


class LazyProjection:
    """A projection made by ``fit`` on first use, once, whichever thread asks first (the others wait)."""

    def __init__(self, fit: Callable[[], LatentProjection]) -> None:
        self._fit = fit
        self._projection: LatentProjection | None = None
        self._lock = threading.Lock()

    def get(self) -> LatentProjection:
        with self._lock:
            if self._projection is None:
                self._projection = self._fit()
            return self._projection


def preview_due(step: int, total: int, every: int | None) -> bool:
    """Whether step ``step`` of ``total`` gets a preview when one is asked for every ``every`` steps.

    The last step of a stage always does (the picture the stage leaves), so a client that asks
    sees at least one preview from each side.
    """
    if every is None or every < 1 or step < 1:
        return False
    return step % every == 0 or step == total
