"""Helpers more than one test module needs: the socket-free pump, the torch blocker, a synthetic profile.

Fixtures (the tiny family and its bundles) are in ``tests/conftest.py``; this module holds plain
functions and constants, imported explicitly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

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
