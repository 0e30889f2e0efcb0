"""CPU threads for the edge's torch work: what to do when the steps do not get the cores torch uses.

On a busy machine torch's default (one intra-op thread per physical core) can make a UNet step many
times slower than one thread: a parallel region waits for its slowest thread, and a thread whose
core is taken by another process is descheduled. Measured on our 2-core VM (a test-sized UNet,
4 latents of 24x24; the VM is noisy): idle, 2 threads 137-190 ms a step against 1 thread's
207-304 ms, with CPU time = ``wall x threads``; beside one busy loop, 2 threads 404 ms (CPU time 0.70
of ``wall x threads``) against 207 ms; beside another torch job, 4035 ms against 156 ms (26x, 0.50).

:class:`StepEfficiency` measures that share (process CPU time against wall time around the first
UNet calls). Below :data:`MIN_EFFICIENCY` it logs one warning, and when the operator did not set
``--threads`` (``adapt``) it drops torch to one thread, which cannot starve this way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger("rise.edge")

#: Below this share of ``threads`` cores busy during the UNet calls, the steps are starved (healthy
#: parallel steps keep it near 1; the starved 2-thread runs we measured were at 0.25-0.5).
MIN_EFFICIENCY = 0.75
#: UNet calls measured before judging (the first one warms caches and allocators: skipped).
CALLS = 4


class StepEfficiency:
    """Watches the first UNet calls of a CPU edge; warns once if its threads are starved."""

    def __init__(self, threads: int | None = None, *, cpu_clock: Callable[[], float] = time.process_time,
                 wall_clock: Callable[[], float] = time.perf_counter, warn: Callable[[str], None] = log.warning,
                 device: str = "cpu", adapt: bool = False,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.threads = threads if threads is not None else torch.get_num_threads()
        self.adapt, self._set_threads = adapt, set_threads
        self._cpu, self._wall, self._warn = cpu_clock, wall_clock, warn
        self._cpu_s = self._wall_s = 0.0
        self._calls = 0
        self.done = device != "cpu" or self.threads <= 1  # a GPU step or a single thread cannot be starved so
        self.efficiency: float | None = None
        self._started: tuple[float, float] | None = None

    def before(self) -> None:
        if not self.done:
            self._started = (self._cpu(), self._wall())

    def after(self) -> None:
        if self.done or self._started is None:
            return
        cpu0, wall0 = self._started
        self._calls += 1
        if self._calls > 1:  # the first call warms up
            self._cpu_s += self._cpu() - cpu0
            self._wall_s += self._wall() - wall0
        if self._calls <= CALLS:
            return
        self.done = True
        self.efficiency = self._cpu_s / max(self._wall_s * self.threads, 1e-9)
        if self.efficiency >= MIN_EFFICIENCY:
            return
        what = (f"UNet steps kept only {self.efficiency:.0%} of the {self.threads} CPU threads busy over "
                f"{CALLS - 1} calls: the cores are shared with other work, and a step may be many times "
                "slower than with fewer threads")
        if self.adapt:
            self._set_threads(1)  # called on the engine's thread, which runs every torch op of the edge
            self._warn(f"{what}; switched to 1 thread (--threads N sets a count and turns this off)")
        else:
            self._warn(f"{what}; try --threads 1 (or --threads N for N idle cores)")
