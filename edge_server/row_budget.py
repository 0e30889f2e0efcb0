"""How many UNet rows one batched call may take: the operator's ceiling and, on a GPU, what fits its memory.

``--max-batch-rows`` (``max_batch_rows`` in edge.toml) is ``auto`` by default: 16 rows on a CPU,
where more rows per call stop paying; on a GPU as many as fit in the memory left free once the
family is loaded, at most 64. A number is a ceiling: on a GPU it is still trimmed (with a
warning) to what fits, since a batch that does not fit fails every request in it.

What fits is measured, not guessed: :func:`measure_row_memory` runs the family's large UNet on
one request and on four at its default size and reads the allocator's peaks (the difference is
what a row costs; what is left, a call's fixed part), plus the peak of one VAE decode (an
edge-decoded request's, taken one at a time). Rows of another latent size are priced by their
latent area, which is how a UNet's activations grow with PyTorch's memory-efficient attention.

A batch that still runs out of memory (another process took some, a size far from the probe's)
is not lost: :class:`RowBudget` shrinks to half its rows at that size, the engine retries the
same requests in smaller calls (no request has changed: the step runs only once the UNet call
returns), and only a request that alone does not fit fails, with a message that says so.
The pricing is ours: no library sizes diffusion batches from memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.errors import RiseError

#: ``auto`` on a CPU: the fixed default before ``auto`` (8 guided requests, the most bench/bench_edge_batch.py times).
AUTO_CPU_ROWS = 16
#: ``auto``'s ceiling on a GPU; the memory left after loading may trim it.
AUTO_GPU_ROWS = 64
#: The share of the free memory batches may use: the rest absorbs fragmentation and other small buffers.
MEMORY_FRACTION = 0.9
GIB = 2**30
MIB = 2**20


class NoRoomOnDevice(RiseError):
    """The family's UNet cannot take even one request's rows in the memory this device has left."""


def ceiling_rows(configured: int | None, device_type: str) -> int:
    """The most rows a call may take before memory is asked: the configured number, else ``auto``'s."""
    if configured is not None:
        return configured
    return AUTO_GPU_ROWS if device_type == "cuda" else AUTO_CPU_ROWS


def planned_rows(configured: int | None) -> int:
    """The rows a scheduler plans with before the engine has measured its device (``auto``: the CPU's)."""
    return configured if configured is not None else AUTO_CPU_ROWS


@dataclass(frozen=True)
class RowMemory:
    """What :func:`measure_row_memory` found, in bytes: a UNet row at the probe's latent area (h x w latent
    pixels), a call's fixed part, the largest one-off beside the batches (a VAE decode), and the memory free
    (to this process's allocator) once the family and the probe's buffers were released."""

    per_row: int
    fixed: int
    reserve: int
    free: int
    area: int

    def rows_that_fit(self, area: int | None = None) -> int:
        """Rows of ``area`` (default: the probe's) that fit the usable share of the free memory."""
        usable = self.free * MEMORY_FRACTION - self.reserve - self.fixed
        per_row = self.per_row * (area or self.area) / self.area
        return max(0, math.floor(usable / max(per_row, 1.0)))

    def describe(self) -> str:
        return (f"{self.free / GIB:.1f} GiB free, {self.per_row / MIB:.0f} MiB per UNet row, "
                f"{(self.fixed + self.reserve) / MIB:.0f} MiB kept for a call's fixed part and a VAE decode")


class RowBudget:
    """The engine's limit on rows per UNet call, by latent area (thread-confined: the engine's worker).

    ``memory`` None (a CPU, or memory not measured): the ceiling alone, whatever the size.
    Otherwise rows of area ``a`` are limited to what fits (:meth:`RowMemory.rows_that_fit`),
    and each out-of-memory error lowers the limit for that area and larger ones.
    """

    def __init__(self, ceiling: int, memory: RowMemory | None = None) -> None:
        if ceiling < 1:
            raise ValueError("a row budget's ceiling must be >= 1")
        self.ceiling = ceiling
        self.memory = memory
        self._row_area_cap: float | None = None  # rows x area known not to fit (lowered by each OOM)

    def rows_for(self, area: int) -> int:
        """The most rows a call on latents of ``area`` (h x w) may take; at least 1."""
        rows = self.ceiling
        if self.memory is not None:
            rows = min(rows, self.memory.rows_that_fit(area))
        if self._row_area_cap is not None:
            rows = min(rows, math.floor(self._row_area_cap / area))
        return max(1, rows)

    def after_out_of_memory(self, area: int, rows: int, fewest: int) -> int | None:
        """A call of ``rows`` rows of ``area`` ran out of memory: the new limit there (half), or None when the
        call was already the fewest rows a call can take (``fewest``: one request's) and cannot be split."""
        if rows <= fewest:
            return None
        self._row_area_cap = max(fewest, rows // 2) * area
        return self.rows_for(area)


class MemoryStats(Protocol):
    """The parts of ``torch.cuda`` the probe reads (a fake in the CPU tests)."""

    def synchronize(self, device: Any = None) -> None: ...
    def empty_cache(self) -> None: ...
    def reset_peak_memory_stats(self, device: Any = None) -> None: ...
    def memory_allocated(self, device: Any = None) -> int: ...
    def max_memory_allocated(self, device: Any = None) -> int: ...
    def mem_get_info(self, device: Any = None) -> tuple[int, int]: ...


def measure_row_memory(device: Any, forward: Callable[[int], int], decode: Callable[[], object] | None,
                       area: int, stats: MemoryStats) -> RowMemory:
    """Peaks of ``forward(n)`` (n requests in one UNet call; returns the rows it ran) at 1 and 4 requests, and
    of ``decode()``, on ``device``; the free memory after. One request's call that does not fit raises
    NoRoomOnDevice; four that do not fit are priced from one request alone (its peak counted as all rows)."""

    def peak(run: Callable[[], Any]) -> tuple[int, Any]:
        stats.synchronize(device)
        stats.reset_peak_memory_stats(device)
        base = stats.memory_allocated(device)
        result = run()
        stats.synchronize(device)
        return max(0, stats.max_memory_allocated(device) - base), result

    one, rows_one = _or_no_room(lambda: peak(lambda: forward(1)), stats)
    try:
        four, rows_four = peak(lambda: forward(4))
    except Exception as exc:  # torch.OutOfMemoryError: a small device; one request's figure, all rows
        if not is_out_of_memory(exc):
            raise
        stats.empty_cache()
        per_row, fixed = one / max(rows_one, 1), 0.0
    else:
        per_row = max((four - one) / max(rows_four - rows_one, 1), 1.0)
        fixed = max(one - per_row * rows_one, 0.0)
    reserve = 0
    if decode is not None:
        reserve, _ = _or_no_room(lambda: peak(decode), stats)
    stats.empty_cache()
    free, _total = stats.mem_get_info(device)
    return RowMemory(per_row=round(per_row), fixed=round(fixed), reserve=int(reserve), free=int(free), area=area)


def _or_no_room(run: Callable[[], tuple[int, Any]], stats: MemoryStats) -> tuple[int, Any]:
    try:
        return run()
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        stats.empty_cache()
        raise NoRoomOnDevice(f"one request does not fit this device's free memory: {str(exc).splitlines()[0]}") \
            from exc


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or cuBLAS failing to allocate its workspace (a plain RuntimeError)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "CUBLAS_STATUS_ALLOC_FAILED" in str(exc)
