"""What every numpy sampler offers, and the state a handoff carries to continue one.

The edge runs a diffusers scheduler for the first ``k`` steps; the device continues with
the numpy port of the same scheduler. :class:`SamplerState` is everything the port needs
to continue exactly where diffusers stopped (step index plus multistep history); the
edge fills it from the diffusers scheduler (``edge_server.scheduler_bridge``) and the
handoff codec carries it as safetensors tensors plus JSON scalars.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class SamplerState:
    """Sampler state at a step boundary.

    ``step_index`` is the index (into ``timesteps``) of the next step to run, i.e. the
    number of steps already taken. ``tensors`` holds float32 arrays (multistep history,
    e.g. ``model_outputs.0``); ``scalars`` holds ints/floats (e.g. ``lower_order_nums``).
    Names are per sampler and documented in its module.
    """

    step_index: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, int | float] = field(default_factory=dict)


class Sampler(Protocol):
    """The diffusers scheduler interface, in numpy (float32 in, float32 out)."""

    name: str
    timesteps: np.ndarray  # length N after set_timesteps(N); int64, or float32 where diffusers' are fractional (Euler)
    init_noise_sigma: float
    last_x0: np.ndarray | None  # the clean latent the last step predicted (None before one): the live preview's

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray: ...

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray: ...

    def state(self) -> SamplerState: ...

    def load_state(self, state: SamplerState) -> None: ...
