"""The numpy guidance-scale embedding is diffusers' ``get_guidance_scale_embedding``.

Diffusers' CPU ``torch.exp`` (MKL) is one ulp off for ~1% of float32 inputs, and the port's is
correctly rounded; the sines then take arguments up to ``1000 * w``, where one ulp of a frequency
is up to ~1e-3. So the port is compared to 1e-6 with diffusers' own function run on a correctly
rounded exp (measured: 6e-8, sin/cos round-off), and to diffusers as it stands with a bound of two
float32 ulps of the argument: its frequency's ulp, and the rounding of the float32 product (measured:
up to 9e-4 at guidance scale 13, dims 256 and 512; 1.04 ulps at one entry on an AVX-512 machine,
whose MKL exp is off by one ulp at other inputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline

from shared.errors import ConfigError
from shared.guidance import guidance_scale_embedding, lcm_guidance_embedding

DIMS = (256, 255, 512, 320, 4, 5)
SCALES = (1.0, 1.5, 2.0, 4.5, 7.5, 8.0, 13.0, 0.0)


def diffusers_embedding(w: torch.Tensor, dim: int) -> np.ndarray:
    out: torch.Tensor = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None,  # it does not use self
        w,
        embedding_dim=dim,
    )
    return out.numpy()


@contextmanager
def correctly_rounded_torch_exp() -> Iterator[None]:
    original = torch.exp

    def exp(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.exp(x.numpy().astype(np.float64)).astype(x.numpy().dtype))

    torch.exp = exp  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.exp = original


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("guidance_scale", SCALES)
def test_matches_diffusers(dim: int, guidance_scale: float) -> None:
    w = torch.tensor(guidance_scale - 1).repeat(3)  # as LatentConsistencyModelPipeline builds it
    ours = lcm_guidance_embedding(guidance_scale, dim, batch=3)
    assert ours.dtype == np.float32 and ours.shape == (3, dim)
    np.testing.assert_array_equal(ours, guidance_scale_embedding(guidance_scale - 1, dim, batch=3))
    with correctly_rounded_torch_exp():
        exact = diffusers_embedding(w, dim)
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-6)
    # Against diffusers as is: each entry within two float32 ulps of its argument (one of the frequency's exp, one of
    # rounding the float32 product w * 1000 * frequency), plus sin/cos round-off.
    reference = diffusers_embedding(w, dim)
    half = dim // 2
    frequencies = np.exp(np.arange(half) * -np.log(10000.0) / (half - 1))
    argument = np.abs(1000.0 * (guidance_scale - 1)) * np.concatenate([frequencies, frequencies, [0.0] * (dim % 2)])
    bound = argument * 2.0**-22 + 1e-6
    error = np.abs(ours.astype(np.float64) - reference)
    assert np.all(error <= bound)
    # Where torch's frequency is the correctly rounded one, diffusers as is matches to 1e-6.
    e = torch.log(torch.tensor(10000.0)) / (half - 1)
    torch_frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -e).numpy()
    same = torch_frequencies == np.exp((np.arange(half, dtype=np.float32) * -e.numpy()).astype(np.float64)).astype(
        np.float32)
    columns = np.concatenate([same, same, np.ones(dim % 2, dtype=bool)])
    assert np.all(error[:, columns] <= 1e-6)
    if dim % 2:
        assert np.all(ours[:, -1] == 0)


def test_per_row_values_and_broadcasting() -> None:
    w = np.array([0.5, 3.0, 6.5], dtype=np.float32)
    rows = guidance_scale_embedding(w, 256, batch=3)
    with correctly_rounded_torch_exp():
        exact = diffusers_embedding(torch.from_numpy(w), 256)
    np.testing.assert_allclose(rows, exact, rtol=0, atol=1e-6)
    for i, value in enumerate(w):
        np.testing.assert_array_equal(rows[i], guidance_scale_embedding(float(value), 256)[0])
    one = guidance_scale_embedding(np.array([2.0]), 64, batch=4)
    assert one.shape == (4, 64) and np.all(one == one[0])
    assert guidance_scale_embedding(np.float64(2.0), 64).shape == (1, 64)
    # guidance_scale 1 (w = 0): sin 0 and cos 1.
    zero = lcm_guidance_embedding(1.0, 8)
    np.testing.assert_array_equal(zero, [[0, 0, 0, 0, 1, 1, 1, 1]])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"w": 1.0, "embedding_dim": 3}, "embedding_dim"),
        ({"w": 1.0, "embedding_dim": 256.0}, "embedding_dim"),
        ({"w": 1.0, "embedding_dim": 256, "batch": 0}, "batch"),
        ({"w": float("nan"), "embedding_dim": 256}, "finite"),
        ({"w": np.ones(3), "embedding_dim": 256, "batch": 2}, "3 values for batch=2"),
        ({"w": np.ones((2, 2)), "embedding_dim": 256}, "1-D"),
        ({"w": "7.5", "embedding_dim": 256}, "number"),
        ({"w": True, "embedding_dim": 256}, "number"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        guidance_scale_embedding(**kwargs)  # type: ignore[arg-type]


def test_lcm_guidance_embedding_subtracts_one() -> None:
    np.testing.assert_array_equal(lcm_guidance_embedding(8.0, 256, 2), guidance_scale_embedding(7.0, 256, 2))
    with pytest.raises(ConfigError, match="guidance_scale"):
        lcm_guidance_embedding(float("inf"), 256)
