"""What loading a family costs: the one estimate of a cold start, pure (no torch, no I/O).

The edge's family pool (:mod:`edge_server.family_pool`) tells its planner how long a request for a
family that is not loaded will wait for the load, and the cluster's router (:mod:`edge_server.cluster`)
adds the same cost to a replica that does not hold the family; both ask :func:`estimate_load_s`.
Loading is mostly reading weights and building modules, so the seconds scale with the family's weight
bytes: a family's own measured loads are the best guess, then the bytes per second every load so far
ran at (one disk, one kind of model), then a stated default.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: Bytes per second a family's weights load at before any load was measured: a stated default, between what
#: bench/cold_start.py measured on two shared CPU cores with the files in the page cache (the demo family 190-290
#: MB/s, a tiny SD1.5-shaped one 32-46 MB/s: building many small modules costs more than reading their bytes, so
#: one family's rate prices another's only roughly; a family's own loads replace it after its first).
DEFAULT_LOAD_BYTES_PER_S = 100e6


def estimate_load_s(weight_bytes: int, own_loads_s: Sequence[float],
                    measured: Iterable[tuple[int, float]]) -> tuple[float, str]:
    """(seconds, how they were had) a load of a family of ``weight_bytes`` takes.

    The mean of its own measured loads (``own_loads_s``: "measured"); else its weight bytes over the
    bytes per second of every load measured so far (``measured``: (weight bytes, seconds) per load, of
    any family; "estimated"); else over :data:`DEFAULT_LOAD_BYTES_PER_S` ("default")."""
    if own_loads_s:
        return sum(own_loads_s) / len(own_loads_s), "measured"
    loaded_bytes = seconds = 0.0
    for nbytes, load_s in measured:
        loaded_bytes += max(nbytes, 0)
        seconds += max(load_s, 0.0)
    if seconds > 0 and loaded_bytes > 0:
        return weight_bytes / (loaded_bytes / seconds), "estimated"
    return weight_bytes / DEFAULT_LOAD_BYTES_PER_S, "default"
