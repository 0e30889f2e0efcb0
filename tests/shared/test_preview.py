"""The live preview's projection: fitted from a VAE's decodes, rendered small, due on the right steps."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import ConfigError
from shared.preview import KERNEL, PREVIEW_MAX_SIDE, LatentProjection, fit_latents, fit_projection, preview_due


def _decoder(weights: np.ndarray, bias: np.ndarray, factor: int):
    """A 'VAE' whose every latent pixel decodes to a flat patch of its linear colour (plus zero-mean texture)."""

    def decode(latents: np.ndarray) -> np.ndarray:
        colour = np.einsum("bchw,cd->bhwd", latents, weights) + bias
        patches = np.repeat(np.repeat(colour, factor, axis=1), factor, axis=2)
        texture = np.tile(np.array([[0.05, -0.05], [-0.05, 0.05]]), (factor // 2, factor // 2))
        patches += np.tile(texture, (colour.shape[1], colour.shape[2]))[None, :, :, None]
        return np.clip(patches, 0, 1)

    return decode


def test_the_fit_recovers_a_linear_decoder_and_renders_its_colours():
    rng = np.random.default_rng(1)
    weights = rng.normal(0, 0.05, (4, 3)).astype(np.float32)
    bias = np.array([0.5, 0.4, 0.6], np.float32)
    decode = _decoder(weights, bias, factor=8)
    latents = fit_latents(4)
    projection = fit_projection(latents, decode(latents), 8)
    centre = np.zeros((KERNEL, KERNEL, 4, 3), np.float32)
    centre[KERNEL // 2, KERNEL // 2] = weights  # each patch is its own pixel's colour: the neighbours weigh 0
    np.testing.assert_allclose(projection.weights, centre, atol=1e-4)
    np.testing.assert_allclose(projection.bias, bias, atol=1e-4)
    back = LatentProjection.from_dict(projection.to_dict(), 4)  # as a bundle manifest carries it
    np.testing.assert_array_equal(back.weights, projection.weights)
    np.testing.assert_array_equal(back.bias, projection.bias)
    x0 = rng.standard_normal((1, 4, 6, 5)).astype(np.float32)
    preview = projection.render(x0)
    assert preview.shape == (6, 5, 3) and preview.dtype == np.uint8
    expected = np.clip(np.einsum("chw,cd->hwd", x0[0], weights) + bias, 0, 1) * 255
    assert np.abs(preview.astype(float) - expected).max() <= 4.0  # the tone curve: the identity, to its knots


def test_the_tone_curve_restores_what_a_saturating_decoder_does_to_colours():
    rng = np.random.default_rng(2)
    weights = rng.normal(0, 0.2, (4, 3)).astype(np.float32)

    def decode(latents: np.ndarray) -> np.ndarray:  # strong colours clip: no linear map reproduces it
        colour = np.clip(1.8 * np.tanh(np.einsum("bchw,cd->bhwd", latents, weights)) + 0.5, 0, 1)
        return np.repeat(np.repeat(colour, 8, axis=1), 8, axis=2)

    latents = fit_latents(4, count=8)
    projection = fit_projection(latents, decode(latents), 8)
    linear = LatentProjection(projection.weights, projection.bias)  # the same fit without its curve
    x0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    truth = decode(x0)[:, ::8, ::8] * 255
    errors = [np.mean([np.abs(p.render(x).astype(float) - t).mean() for x, t in zip(x0, truth, strict=True)])
              for p in (projection, linear)]
    assert errors[0] < 0.8 * errors[1], errors


def test_large_latents_are_averaged_down_and_bad_values_never_break_a_preview():
    weights = np.zeros((KERNEL, KERNEL, 4, 3), np.float32)
    weights[1, 1] = np.eye(4, 3)
    projection = LatentProjection(weights, np.zeros(3, np.float32))
    big = np.full((1, 4, 128, 96), 0.5, np.float32)
    small = projection.render(big)
    assert max(small.shape[:2]) <= PREVIEW_MAX_SIDE and small.shape == (64, 48, 3)
    assert (small[..., 0] == 128).all()
    wild = np.full((4, 3, 3), np.nan, np.float32)
    wild[0, 0, 0] = np.inf
    assert projection.render(wild).dtype == np.uint8  # NaN/inf from a diverging run: black/white, no crash


def test_shapes_that_do_not_fit_are_refused_in_one_line():
    projection = LatentProjection(np.zeros((KERNEL, KERNEL, 4, 3), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match=r"needs a \(4, h, w\) latent"):
        projection.render(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="decode to"):
        fit_projection(np.zeros((2, 4, 8, 8)), np.zeros((2, 32, 32, 3), np.uint8), 8)
    with pytest.raises(ConfigError, match="finite"):
        LatentProjection(np.full((KERNEL, KERNEL, 4, 3), np.nan, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match="108 weights for 4 latent channels"):
        LatentProjection.from_dict({"weights": [0.0] * 12, "bias": [0.0] * 3}, 4)
    with pytest.raises(ConfigError, match="'weights', 'bias'"):
        LatentProjection.from_dict({"weights": []}, 4)


@pytest.mark.parametrize(
    ("every", "due"),
    [(None, []), (1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (3, [3, 5]), (10, [5])],
)
def test_previews_are_due_every_few_steps_and_at_the_last(every, due):
    assert [s for s in range(0, 6) if preview_due(s, 5, every)] == due
