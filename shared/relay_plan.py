"""A relay configuration: how one request is split between the edge and the device.

One plan is one arm of the scheduler's bandit: total steps ``N``, split ``k`` (the edge's
large model runs steps ``[0, k)``, the device's small model ``[k, N)``; ``k = 0`` is
device-only, ``k = N`` edge-only), the sampler, the guidance scale and where the VAE
decode runs. Pure data with up-front validation, shared by both sides.

Two relay modes go beyond a fixed split:

- **Adaptive handoff** (``handoff_tau``): the edge hands off as soon as the relative change of
  its predicted clean latent (x0) between two steps falls below ``handoff_tau``, but not before
  ``min_split`` steps and not after ``split`` (then ``split`` is the most the edge runs). The
  handoff says where it happened; the device continues from there.
- **Speculative relay** (``speculative``): the device starts its own device-only run at once
  and keeps the edge request open; when the edge's handoff arrives it switches to it if that
  still pays (:func:`shared.planning.speculative_switch`), else finishes alone and cancels
  the edge request.
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
    handoff_tau: float | None = None  # adaptive handoff: hand off once the x0 change is below this
    min_split: int | None = None  # adaptive handoff: the fewest edge steps (default 1)
    speculative: bool = False  # the device starts device-only at once and switches if the handoff pays

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
        tau = self.handoff_tau
        if tau is not None and (not is_number(tau) or not 0.0 < tau <= 1.0):
            raise ConfigError(f"handoff_tau must be a number in (0, 1], got {tau!r}")
        if self.min_split is not None:
            if tau is None:
                raise ConfigError("min_split needs handoff_tau (it bounds an adaptive handoff)")
            if not is_int(self.min_split) or not 1 <= self.min_split <= k:
                raise ConfigError(f"min_split must be an integer in [1, split={k}], got {self.min_split!r}")
        if tau is not None and not 1 <= k < n:
            raise ConfigError(f"an adaptive handoff needs 1 <= split < steps, got split={k} of {n}")
        if self.speculative is not True and self.speculative is not False:
            raise ConfigError(f"speculative must be true or false, got {self.speculative!r}")
        if self.speculative and (k == 0 or self.decode_on != "device"):
            raise ConfigError("a speculative relay needs edge steps (split >= 1) and the decode on the device")

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs only for guidance > 1, as in diffusers' pipelines."""
        return self.guidance_scale > 1.0

    @property
    def adaptive(self) -> bool:
        """The edge picks the handoff step itself, in ``[first_split, split]``."""
        return self.handoff_tau is not None

    @property
    def first_split(self) -> int:
        """The earliest step the handoff may happen at (``split`` for a fixed split)."""
        if self.handoff_tau is None:
            return self.split
        return 1 if self.min_split is None else self.min_split

    def accepts_split(self, step: int) -> bool:
        """Whether a handoff at ``step`` is the one this plan asked for."""
        return self.first_split <= step <= self.split

    @property
    def edge_steps(self) -> int:
        """The most steps the edge runs (an adaptive handoff may stop earlier)."""
        return self.split

    @property
    def device_steps(self) -> int:
        return self.num_inference_steps - self.split
