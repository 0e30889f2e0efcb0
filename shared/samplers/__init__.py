"""Numpy ports of diffusers schedulers, for the device half of a relay.

``make_sampler(name, scheduler_config)`` builds one from a family's scheduler config,
the same dict diffusers' ``from_config`` takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.errors import ConfigError, SamplerError
from shared.samplers.base import Sampler, SamplerState
from shared.samplers.ddim import DDIM_DEFAULTS, DDIMSampler
from shared.samplers.dpmpp_2m import DPMPP_2M_DEFAULTS, DPMSolverPP2MSampler
from shared.samplers.euler import EULER_DEFAULTS, EulerSampler
from shared.samplers.lcm import LCM_DEFAULTS, LCMSampler
from shared.samplers.schedule import resolve_config

# The samplers a relay configuration may name (wire names; see edge_server.scheduler_bridge
# for the matching diffusers classes).
SAMPLER_NAMES: tuple[str, ...] = ("ddim", "euler", "dpmpp_2m", "lcm")

_SAMPLER_CLASSES: dict[
    str, type[DDIMSampler] | type[EulerSampler] | type[DPMSolverPP2MSampler] | type[LCMSampler]
] = {
    "ddim": DDIMSampler,
    "euler": EulerSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
    "lcm": LCMSampler,
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": DDIM_DEFAULTS,
    "euler": EULER_DEFAULTS,
    "dpmpp_2m": DPMPP_2M_DEFAULTS,
    "lcm": LCM_DEFAULTS,
}


def resolved_config(name: str, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config values the port for ``name`` runs with (its class defaults under the family's config)."""
    if name not in _DEFAULTS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return resolve_config(scheduler_config, _DEFAULTS[name])


def make_sampler(name: str, scheduler_config: Mapping[str, Any]) -> Sampler:
    """The numpy sampler for wire name ``name``, configured like diffusers' ``from_config``.

    Raises ``ConfigError`` for an unknown name or a config value the port does not support.
    """
    cls = _SAMPLER_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return cls(scheduler_config)


__all__ = [
    "SAMPLER_NAMES",
    "DDIMSampler",
    "DPMSolverPP2MSampler",
    "EulerSampler",
    "LCMSampler",
    "Sampler",
    "SamplerError",
    "SamplerState",
    "make_sampler",
    "resolved_config",
]
