"""Helpers more than one test module needs: the socket-free pump, the torch blocker, a synthetic profile.

Fixtures (the tiny family and its bundles) are in ``tests/conftest.py``; this module holds plain
functions and constants, imported explicitly.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from shared.bandit import ArmQuality, Profile, Timing
from shared.protocol import ClientConnection, ServerConnection

REPO = Path(__file__).resolve().parents[1]

#: What the device does not have: importing any of these fails in a process started with the prelude.
DEVICE_FORBIDDEN = ("torch", "diffusers", "transformers", "optimum")

#: Python source that makes importing torch (and the rest of :data:`DEVICE_FORBIDDEN`) fail, as on a
#: device. Put it first in a ``python -c`` script: it must run before anything imports them.
NO_TORCH_PRELUDE = f"""\
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {set(DEVICE_FORBIDDEN)!r}:
            raise ImportError(f"{{name}} is not installed on the device")
        return None

sys.meta_path.insert(0, NoTorch())
"""


def run_without_torch(script: str, *args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (repo as cwd) where torch and friends cannot be imported."""
    return subprocess.run([sys.executable, "-c", NO_TORCH_PRELUDE + script, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def pump(src: ServerConnection | ClientConnection, dst: ServerConnection | ClientConnection,
         now: float = 0.0) -> list[Any]:
    """Deliver every frame ``src`` queued to ``dst``, in order; return ``dst``'s events."""
    events: list[Any] = []
    for frame in src.data_to_send():
        events += dst.receive_text(frame, now) if isinstance(frame, str) else dst.receive_bytes(frame, now)
    return events


def synthetic_profile(steps=(10, 20, 30), fractions=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), levels=range(1, 10), *,
                      small_slope: float = 0.06, step_penalty: float = 0.25, edge_step_s: float = 0.05,
                      device_step_s: float = 0.25) -> Profile:
    """A SYNTHETIC profile with the shape the paper reports, for tests and for trying the simulator.

    Quality (made up): the large model degrades slowly with the number of items, the small
    one fast (``small_slope`` per item); a relay that gives the edge the fraction f = k/N of the steps gets
    ``small + (large - small) * (1 - (1 - f)^2.5)`` (the early steps matter most); fewer
    steps cost quality (``step_penalty``). Times: an SD-sized family on an edge GPU and a phone.
    """
    levels = tuple(levels)
    arms = []
    for n in steps:
        step_factor = 1.0 - step_penalty * math.exp(-(n - 4) / 6.0)
        for f in fractions:
            k = round(f * n)
            quality = []
            for level in levels:
                large = 0.97 - 0.025 * (level - 1)
                small = max(0.95 - small_slope * (level - 1), 0.0)
                frac = k / n
                quality.append(round(step_factor * (small + (large - small) * (1 - (1 - frac) ** 2.5)), 4))
            arms.append(ArmQuality(n, k, tuple(quality)))
    timing = Timing(edge_step_s=edge_step_s, device_step_s=device_step_s, edge_decode_s=0.04, device_decode_s=0.3,
                    handoff_bytes=300_000, image_bytes=350_000, text_encode_s=0.01)
    return Profile(levels=levels, arms=tuple(arms), timing=timing, family="synthetic", synthetic=True,
                   sources=("tests/helpers.py:synthetic_profile",))
