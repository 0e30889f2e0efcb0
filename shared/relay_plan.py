"""A relay configuration: how one request is split between the edge and the device.

One plan is one arm of the scheduler's bandit: total steps ``N``, split ``k`` (the edge's
large model runs steps ``[0, k)``, the device's small model ``[k, N)``; ``k = 0`` is
device-only, ``k = N`` edge-only), the sampler, the guidance scale and where the VAE
decode runs. Pure data with up-front validation, shared by both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.errors import ConfigError
from shared.samplers import SAMPLER_NAMES
from shared.validation import is_int, is_number

DecodeSite = Literal["device", "edge"]
MAX_STEPS = 1000


@dataclass(frozen=True)
class RelayPlan:
    num_inference_steps: int
    split: int
    sampler: str = "dpmpp_2m"
    guidance_scale: float = 7.5
    decode_on: DecodeSite = "device"

    def __post_init__(self) -> None:
        n, k = self.num_inference_steps, self.split
        if not is_int(n) or not 1 <= n <= MAX_STEPS:
            raise ConfigError(f"steps must be an integer in [1, {MAX_STEPS}], got {n!r}")
        if not is_int(k) or not 0 <= k <= n:
            raise ConfigError(f"split must be an integer in [0, steps={n}], got {k!r}")
        if self.sampler not in SAMPLER_NAMES:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        g = self.guidance_scale
        if not is_number(g) or not 0.0 <= g <= 50.0:  # NaN fails the comparison
            raise ConfigError(f"guidance must be a number in [0, 50], got {g!r}")
        if self.decode_on not in ("device", "edge"):
            raise ConfigError(f"decode_on must be 'device' or 'edge', got {self.decode_on!r}")

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs only for guidance > 1, as in diffusers' pipelines."""
        return self.guidance_scale > 1.0

    @property
    def edge_steps(self) -> int:
        return self.split

    @property
    def device_steps(self) -> int:
        return self.num_inference_steps - self.split
