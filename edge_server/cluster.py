"""Past one edge: the batching engine as a Ray Serve deployment of replicas, and the :class:`RayEngine` front.

``rise-edge serve --engine ray`` keeps the daemon (websocket protocol, planner, metrics) in one process, the
*front*, and swaps its engine for a :class:`RayEngine`: each request goes through a Ray Serve
``DeploymentHandle`` to one :class:`EdgeReplica` (a :class:`~edge_server.engine.BatchingEngine` on one
accelerator, ``num_gpus=1``, or one CPU slice, ``num_cpus`` with as many torch threads), which streams
back what it does: ``accepted`` (with its load), ``progress`` per step, then the outcome or an error.

Routing. Ray Serve's default router picks the shorter queue of two random replicas. The front's
router (:class:`edge_server.cluster_router.SoonestFinishRouter`, the default here) sends each request to
the replica that will finish it soonest: it projects every replica's step-level batching
(:func:`shared.bandit.latency.edge_schedule`, the planner's own projection) from the queue and the steps
left that the replicas report on every event (:class:`LoadBoard`), plus the requests routed to it that it
has not acknowledged yet, and adds what joining costs the requests already in that batch
(:func:`routing_cost`). ``stats()`` hands the planner the load of the replica that rule picks for a typical
request, so the split the planner picks reflects where the request will run.

Families. A deployment may serve several families (``rise-edge serve --engine ray --family a=DIR --family
b=DIR``): every replica gets all their specs and holds them in a :class:`~edge_server.family_pool.FamilyPool`
under its own ``memory_budget_mb`` (a budget per replica, evicting its least recently used idle family). At start
the replica of rank ``i`` (Ray Serve's replica rank, 0 without one) loads
family ``i mod F`` of the F families, in the order given, and the others on demand (``load_families`` does not
apply: one family each at start, so R >= F replicas start with every family loaded somewhere). Each replica
reports per family whether it is loaded, its queue, its step times and every load's measured seconds
(:class:`FamilyLoad`, on every event and in ``record_routing_stats``). A request carries its family
(``WireRequest.family``); the router ranks replicas by that family's projected finish, plus the work of the
replica's other families (they share its slice: counted as if it ran first), plus the **cold start** where
the family is not loaded (:meth:`LoadBoard.cold_start_s`: the mean of its measured loads; before one is
measured, its ``weight_bytes()`` over the bytes per second of the loads measured so far, else over
:data:`~edge_server.cold_start.DEFAULT_LOAD_BYTES_PER_S`). So a loaded replica wins unless it is busier by more
than a cold start.
The front has one engine per family over the one deployment (:meth:`RayEngine.family_engine`), each with
its own request service and planner (:func:`cluster_family_parts`, built by ``Daemon._load_families``).

Failures. A replica that dies is restarted by Ray Serve. A request whose steps had not started there is
submitted again (up to ``max_attempts``), so it lands on a live replica; one that had started fails with
:class:`~edge_server.engine.EngineBusy`, which the service sends as the protocol's retryable ``busy``.
Nothing is left hanging: every stream ends in an outcome or an error. The scheduler's state stays in the
front (one per family of the cluster), persisted by the service as with one engine.

Operations. :func:`cluster_parts` is what ``rise-edge serve --engine ray`` starts (engine, planner, and the
:class:`ClusterMetrics` on the daemon's registry: replicas, restarts, resubmissions, each replica's queue,
running requests, UNet calls and rows; with several families, :func:`cluster_family_parts`, and per replica and
family whether it is loaded and its loads, per family the cold start the router adds).

Ray is imported only when a cluster is started: ``import edge_server.cluster`` works without the
``cluster`` extra, and :func:`require_ray` turns its absence into one line naming ``pip install '.[cluster]'``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_server.cold_start import estimate_load_s
from edge_server.row_budget import planned_rows
from shared.bandit.latency import DEFAULT_BATCH_BETA, batch_step_times, edge_drain_s, edge_schedule
from shared.errors import ConfigError, RiseError
from shared.relay_plan import RelayPlan

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from prometheus_client import CollectorRegistry

    from edge_server.config import EdgeConfig, FamilySpec
    from edge_server.engine import EdgeOutcome, EdgeRequest, EngineStats

log = logging.getLogger("rise.cluster")

#: What ``--engine ray`` says, in one line, when the ``cluster`` extra is not installed.
RAY_MISSING = "--engine ray needs Ray Serve, which is not installed here: pip install '.[cluster]'"
ROUTERS = ("soonest", "pow2")  # ours (edge_server.cluster_router), or Ray Serve's power of two choices
ROUTER_PATH = "edge_server.cluster_router.SoonestFinishRouter"
DEPLOYMENT = "EdgeReplica"
SHUTDOWN_S = 20.0  # the most RayEngine.close waits for the deployment's deletion and Ray's shutdown
#: A cold start's seconds when not even the family's weight bytes are known (no replica has reported it yet).
DEFAULT_COLD_START_S = 30.0


class ClusterUnavailable(ConfigError):
    """Ray Serve is not installed, or the cluster could not be started or joined (one line)."""


def require_ray() -> None:
    """Raise :class:`ClusterUnavailable` naming the extra when ``ray[serve]`` cannot be imported."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ClusterUnavailable(RAY_MISSING) from None


@dataclass(frozen=True)
class ClusterConfig:
    """How the replicas are laid out: how many, on what, how they are routed to."""

    replicas: int = 2
    min_replicas: int | None = None  # with max_replicas: Ray Serve autoscales between them (replicas = start)
    max_replicas: int | None = None
    ray_address: str | None = None  # None: a local Ray instance; "auto" or "ray://HEAD:10001": join that cluster
    num_cpus: float = 1.0  # per replica: its CPU slice
    num_gpus: float = 0.0  # per replica: 1 = one replica per accelerator
    threads: int | None = None  # torch threads per replica (None: the slice's CPUs, at least 1)
    router: str = "soonest"  # soonest | pow2
    app_name: str = "rise-edge"
    max_attempts: int = 3  # submissions of a request whose steps had not started when its replica failed
    health_check_period_s: float = 2.0
    local_cpus: int | None = None  # CPUs of the local Ray instance (None: Ray's detection); ignored when joining

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas: expected at least 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("--min-replicas and --max-replicas go together")
        if self.min_replicas is not None and self.max_replicas is not None and not (
                1 <= self.min_replicas <= self.replicas <= self.max_replicas):
            raise ConfigError(f"expected 1 <= min_replicas <= replicas <= max_replicas, got {self.min_replicas}, "
                              f"{self.replicas}, {self.max_replicas}")
        if self.router not in ROUTERS:
            raise ConfigError(f"--router: expected one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            raise ConfigError("a replica needs a CPU slice (num_cpus > 0) or an accelerator (num_gpus > 0)")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts: expected at least 1, got {self.max_attempts}")

    @classmethod
    def from_edge_config(cls, config: EdgeConfig) -> ClusterConfig:
        """The cluster an edge config names: ``replicas`` (with ``min_replicas`` / ``max_replicas``, Ray Serve's
        autoscaling bounds) and ``ray_address`` where the config has them; one replica per accelerator on CUDA,
        else per CPU slice of ``threads`` CPUs (default 1) with as many torch threads."""
        gpus = 1.0 if config.device.startswith("cuda") or (config.device == "auto" and _cuda_here()) else 0.0
        threads = config.threads or 1
        return cls(replicas=int(getattr(config, "replicas", None) or 2),
                   min_replicas=getattr(config, "min_replicas", None),
                   max_replicas=getattr(config, "max_replicas", None),
                   ray_address=getattr(config, "ray_address", None), threads=threads, num_cpus=float(threads),
                   num_gpus=gpus)

    @property
    def torch_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, math.floor(self.num_cpus))


def _cuda_here() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# ---------------------------------------------------------------------- what crosses the wire


@dataclass(frozen=True)
class WireRequest:
    """An :class:`~edge_server.engine.EdgeRequest` without its callback: what the front sends a replica."""

    key: str
    request_id: str
    prompt: str
    plan: RelayPlan
    seed: int
    height: int | None
    width: int | None
    preview_every: int | None = None  # the live preview the request asked for (EdgeRequest.preview_every)
    family: str | None = None  # the family id it is for (None: the replica's first family)


EventKind = Literal["accepted", "progress", "outcome", "error", "status"]  # status: a replica's load, asked for
ErrorKind = Literal["busy", "closed", "cancelled", "invalid", "internal"]


@dataclass(frozen=True)
class FamilyLoad:
    """One family on one replica, as the replica reports it."""

    loaded: bool
    stats: EngineStats  # its engine's (requests waiting for its load counted as queued)
    step_times: dict[int, float] = field(default_factory=dict)  # measured seconds per UNet call, by requests
    load_s: tuple[float, ...] = ()  # every load of it on this replica, measured (the cold-start cost)
    weight_bytes: int = 0  # what its weights take as placed (FamilyInfo.weight_bytes, read without loading)

    def summary(self) -> dict[str, Any]:
        """As plain data (the routing stats Ray Serve collects)."""
        return {"loaded": self.loaded, "running_steps": list(self.stats.running_steps or ()),
                "queued_steps": list(self.stats.queued_steps or ()), "step_times": dict(self.step_times),
                "load_s": list(self.load_s), "weight_bytes": self.weight_bytes}

    @classmethod
    def from_summary(cls, data: dict[str, Any]) -> FamilyLoad:
        from edge_server.engine import EngineStats

        running, queued = tuple(data.get("running_steps", ())), tuple(data.get("queued_steps", ()))
        return cls(bool(data.get("loaded")), EngineStats(len(queued), len(running), 0, 0, 0, (), running, queued),
                   {int(b): float(t) for b, t in dict(data.get("step_times", {})).items()},
                   tuple(float(x) for x in data.get("load_s", ())), int(data.get("weight_bytes", 0)))


@dataclass(frozen=True)
class ReplicaEvent:
    """One item of a replica's stream; every one carries the replica's load (``stats``) as it was then."""

    kind: EventKind
    replica: str  # Ray Serve's replica id (unique_id)
    pid: int
    stats: EngineStats
    step_times: dict[int, float] = field(default_factory=dict)  # measured seconds per UNet call, by requests
    step: int = 0  # progress: steps done ...
    split: int = 0  # ... of this many
    preview: NDArray[np.uint8] | None = None  # progress: the step's live preview, where one was due
    outcome: EdgeOutcome | None = None
    error: ErrorKind | None = None
    message: str = ""
    retry_after_s: float | None = None
    families: dict[str, FamilyLoad] = field(default_factory=dict)  # by family id: each family's load there


def error_kind(exc: BaseException) -> ErrorKind:
    from edge_server.engine import EngineBusy, EngineClosed, RequestCancelled

    if isinstance(exc, EngineBusy):
        return "busy"
    if isinstance(exc, EngineClosed):
        return "closed"
    if isinstance(exc, RequestCancelled):
        return "cancelled"
    if isinstance(exc, RiseError):
        return "invalid"
    return "internal"


def rebuild_error(event: ReplicaEvent) -> BaseException:
    """The exception the front's future fails with for a replica's ``error`` event (the service maps it)."""
    from edge_server.engine import EngineBusy, EngineClosed, RequestCancelled

    if event.error == "busy":
        return EngineBusy(event.message, event.retry_after_s or 1.0)
    if event.error == "closed":
        return EngineClosed(event.message)
    if event.error == "cancelled":
        return RequestCancelled(event.message)
    if event.error == "invalid":
        return RiseError(event.message)
    return RuntimeError(f"edge replica {event.replica}: {event.message}")


# ---------------------------------------------------------------------- the replica


class StepTimer:
    """Seconds per UNet call by requests in it, measured between back-to-back calls (EWMA); thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, gap_s: float = 1.0) -> None:
        self._clock = clock
        self._gap_s = gap_s  # a longer pause between calls is idleness, not a call
        self._last: float | None = None
        self._lock = threading.Lock()
        self.times: dict[int, float] = {}

    def __call__(self, requests: int, rows: int) -> None:
        now = self._clock()
        with self._lock:
            if self._last is not None and 0 < now - self._last < self._gap_s:
                sample = now - self._last
                old = self.times.get(requests)
                self.times[requests] = sample if old is None else 0.8 * old + 0.2 * sample
            self._last = now

    def snapshot(self) -> dict[int, float]:
        with self._lock:
            return dict(self.times)


class EdgeReplica:
    """One replica: the families it serves in a :class:`~edge_server.family_pool.FamilyPool` (each a
    :class:`~edge_server.engine.BatchingEngine` on its slice when loaded), streaming events to the front.

    ``families`` are every family of the deployment; the one of index ``rank mod len(families)`` (Ray Serve's
    replica rank, or ``home``) loads before the replica serves, the others on their first request, under
    ``memory_budget_mb`` (None: no budget). A plain class: :meth:`RayEngine.start` wraps it with
    ``serve.deployment``; tests may drive it directly.
    """

    def __init__(self, families: list[FamilySpec], *, device: str = "cpu", dtype: str = "auto",
                 max_batch_rows: int | None = None, max_queue: int = 64, batching: bool = True,
                 threads: int | None = None, memory_budget_mb: float | None = None, home: int | None = None) -> None:
        import torch

        from edge_server.engine import BatchingEngine, Engine
        from edge_server.family import FamilyInfo, load_family
        from edge_server.family_pool import FamilyPool, PooledEngine
        from edge_server.placement import resolve_placement

        if threads is not None:
            torch.set_num_threads(threads)
        placement = resolve_placement(device, dtype)
        self.timers: dict[str, StepTimer] = {}

        def factory(spec: FamilySpec, info: FamilyInfo) -> Engine:
            timer = self.timers.setdefault(info.family_id, StepTimer())

            def load() -> Any:  # on the engine's thread (one OpenMP pool: see BatchingEngine)
                if threads is not None:
                    torch.set_num_threads(threads)
                return load_family(spec.folder, spec.small, variant=spec.variant, placement=placement, info=info)

            return BatchingEngine(load, max_batch_rows=max_batch_rows, max_queue=max_queue, batching=batching,
                                  on_batch=timer)

        budget = None if memory_budget_mb is None else int(memory_budget_mb * 1e6)
        self.pool = FamilyPool(families, factory, memory_budget_bytes=budget, placement=placement)
        ids = self.pool.family_ids
        self.engines: dict[str, PooledEngine] = {fid: self.pool.engine(fid) for fid in ids}
        self.weight_bytes = {fid: self.pool.info(fid).weight_bytes(placement) for fid in ids}
        self.default_family = ids[0]
        self.home = ids[(_replica_rank() if home is None else home) % len(ids)]
        self.pid = os.getpid()
        self.replica = _replica_id()
        try:
            self.pool.wait_loaded(self.home)  # its load error, if any: the replica does not start (Ray Serve says why)
        except BaseException:
            self.pool.close(drain=False, timeout=10.0)
            raise
        log.info("replica %s (pid %d) serves %s; loaded %s", self.replica, self.pid, ", ".join(ids), self.home)

    @property
    def timer(self) -> StepTimer:
        """The step timer of the first family (the one a request naming no family runs on)."""
        return self.timers.setdefault(self.default_family, StepTimer())

    def describe(self, sampler: str | None = None) -> dict[str, Any]:
        """What the front needs before it serves: each family's id, default size and sampler, a sampler check (of
        the first family, as loaded or as described), and this replica's load (``status``)."""
        families: dict[str, dict[str, Any]] = {}
        for fid in self.pool.family_ids:
            info = self.pool.info(fid)
            problem = None
            if sampler is not None and sampler not in info.samplers:
                problem = (f"--sampler {sampler}: family {self.pool.spec(fid).name} ({info.pipeline_class}) runs "
                           f"{', '.join(info.samplers)}")
            families[fid] = {"family_id": fid, "name": self.pool.spec(fid).name, "default_size": info.default_size,
                             "folder": str(info.folder), "default_sampler": info.default_sampler,
                             "sampler_error": problem}
        first = dict(families[self.default_family])
        loaded = self.engines[self.default_family].family
        if sampler is not None and loaded is not None:  # the loaded family's own check (and its wording)
            try:
                loaded.check_sampler(sampler)
                first["sampler_error"] = None
            except RiseError as exc:
                first["sampler_error"] = str(exc)
        return {**first, "families": families, "replica": self.replica, "pid": self.pid,
                "status": self._event("status")}

    def family_loads(self) -> dict[str, FamilyLoad]:
        """Each family's load here: loaded or not, its queue, its step times, its loads' measured seconds."""
        out: dict[str, FamilyLoad] = {}
        for fid, engine in self.engines.items():
            timer = self.timers.get(fid)
            out[fid] = FamilyLoad(self.pool.is_loaded(fid), engine.stats(), timer.snapshot() if timer else {},
                                  self.pool.counters(fid)[2], self.weight_bytes[fid])
        return out

    def stats(self) -> EngineStats:
        """The replica's load over all its families (counters summed, steps side by side)."""
        return sum_stats([load.stats for load in self.family_loads().values()])

    def _event(self, kind: EventKind, **fields: Any) -> ReplicaEvent:
        families = self.family_loads()
        return ReplicaEvent(kind, self.replica, self.pid, sum_stats([f.stats for f in families.values()]),
                            self.timer.snapshot(), families=families, **fields)

    async def run(self, wire: WireRequest) -> AsyncIterator[ReplicaEvent]:
        """Serve one request: ``accepted``, ``progress`` (the latest only, when several are waiting), then
        ``outcome`` or ``error``. Cancelling the stream cancels the request in the engine. A request for a family
        not loaded here waits for its load (the pool's)."""
        from edge_server.engine import EdgeRequest

        engine = self.engines.get(wire.family or self.default_family)
        if engine is None:
            yield self._event("error", error="invalid", message=f"family {wire.family} is not served by this edge "
                                                                f"(serving {', '.join(self.engines)})")
            return
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        latest: list[tuple[int, int, NDArray[np.uint8] | None]] = []

        def on_step(step: int, split: int, preview: NDArray[np.uint8] | None = None) -> None:  # the engine's thread
            def note() -> None:
                latest.append((step, split, preview))
                wake.set()
            loop.call_soon_threadsafe(note)

        # A preview is best effort here as everywhere: when several steps wait, only the latest goes.
        request = EdgeRequest(wire.key, wire.request_id, wire.prompt, wire.plan, wire.seed, wire.height, wire.width,
                              on_step, preview_every=wire.preview_every,
                              on_preview=on_step if wire.preview_every else None)
        try:
            future = engine.submit(request)
        except Exception as exc:
            yield self._event("error", error=error_kind(exc), message=str(exc),
                              retry_after_s=getattr(exc, "retry_after_s", None))
            return
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(wake.set))
        yield self._event("accepted", split=wire.plan.split)
        try:
            while True:
                await wake.wait()
                wake.clear()
                if latest:
                    step, split, preview = latest[-1]
                    latest.clear()
                    if not future.done():
                        yield self._event("progress", step=step, split=split, preview=preview)
                if future.done():
                    break
        except (asyncio.CancelledError, GeneratorExit):
            engine.cancel(wire.key)
            raise
        failure = future.exception()
        if failure is not None:
            yield self._event("error", error=error_kind(failure), message=str(failure),
                              retry_after_s=getattr(failure, "retry_after_s", None))
            return
        outcome = future.result()
        if latest:  # the last step's progress came with the outcome: it goes first, as on one engine
            step, split, preview = latest[-1]
            yield self._event("progress", step=step, split=split, preview=preview)
        yield self._event("outcome", outcome=outcome)

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve's periodic view of this replica (routers fall back on it for replicas the front has not heard)."""
        families = self.family_loads()
        summary = load_summary(sum_stats([f.stats for f in families.values()]), self.timer.snapshot())
        summary["families"] = {fid: load.summary() for fid, load in families.items()}
        return summary

    def process_id(self) -> int:
        return self.pid

    def __del__(self) -> None:  # Ray Serve tears the replica down: fail what it holds, promptly
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close(drain=False, timeout=5.0)


def sum_stats(parts: list[EngineStats]) -> EngineStats:
    """Several engines' stats as one: counts and counters summed, running and queued steps side by side."""
    from edge_server.engine import EngineStats

    def joined(name: str) -> tuple[int, ...] | None:
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None
        return tuple(x for v in values for x in v)

    return EngineStats(sum(p.queued for p in parts), sum(p.active for p in parts), sum(p.unet_calls for p in parts),
                       sum(p.rows_total for p in parts), sum(p.completed for p in parts),
                       tuple(x for p in parts for x in p.batch_sizes), joined("running_steps"),
                       joined("queued_steps"))


def _replica_rank() -> int:
    """This replica's rank in its deployment (Ray Serve >= 2.50 numbers them 0..N-1); 0 outside one."""
    try:
        from ray import serve

        rank = serve.get_replica_context().rank
    except Exception:  # outside a Serve replica, or a Ray Serve without ranks
        return 0
    value = getattr(rank, "rank", rank)
    return int(value) if isinstance(value, int) else 0


def _replica_id() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a Serve replica (a test driving the class directly)
        return f"local-{os.getpid()}"


def load_summary(stats: EngineStats, step_times: dict[int, float]) -> dict[str, Any]:
    """A replica's load as plain data (Ray Serve's routing stats)."""
    return {"queued_steps": list(stats.queued_steps or ()), "running_steps": list(stats.running_steps or ()),
            "queued": stats.queued, "active": stats.active, "step_times": dict(step_times)}


# ---------------------------------------------------------------------- the front's view of the replicas


def fill_small_batches(measured: dict[int, float]) -> dict[int, float] | None:
    """``measured`` (seconds per call by requests) with the sizes below its smallest filled in along its first
    segment (one size only: proportionally), so that one fewer request in a batch never looks free (a table
    interpolated flat below its first size would make a busy replica look as fast as an idle one)."""
    if not measured:
        return None
    sizes = sorted(measured)
    first = sizes[0]
    if first <= 1:
        return dict(measured)
    t0 = measured[first]
    slope = ((measured[sizes[1]] - t0) / (sizes[1] - first)) if len(sizes) > 1 else t0 / first
    slope = max(slope, 0.1 * t0 / first)  # never flat: a request more always costs something
    filled = dict(measured)
    for b in range(1, first):
        filled[b] = max(t0 - slope * (first - b), 0.1 * t0 * b / first)
    return filled


def routing_cost(step_times: list[float], running: list[int], queued: list[int], steps: int) -> float:
    """Seconds until a request of ``steps`` edge steps routed to this edge now would finish there, plus what it
    costs the requests it joins: one more row in their next ``min(left, steps)`` batched steps each.

    ``step_times[b]`` is one batched step of ``b`` requests; ``running`` the steps left of the requests admitted
    (those beyond one UNet call wait their turn, oldest first), ``queued`` those waiting. Routers rank edges by
    it (the front's router, and ``planner_aware`` in :mod:`lab.cluster_sim`).
    """
    batch = len(step_times) - 1
    run, waiting = list(running[:batch]), list(running[batch:]) + list(queued)
    k = max(steps, 1)  # a k=0 request still waits for its turn to be admitted: rank it as one step
    own = edge_schedule(step_times, run, waiting, k)[k]
    harm = 0.0
    if len(run) < batch and not waiting:  # it joins the batch at once: every step it shares costs the others
        harm = sum(min(r, k) for r in run) * (step_times[len(run) + 1] - step_times[len(run)])
    return own + harm


@dataclass
class ReplicaView:
    """What the front last heard from one replica."""

    stats: EngineStats
    pid: int
    step_times: dict[int, float]
    heard: float  # perf_counter
    families: dict[str, FamilyLoad] = field(default_factory=dict)


class LoadBoard:
    """The front's view of every replica's load, shared by the router, the planner's ``stats`` and the metrics.

    Updated from the replicas' events (each carries its load) and by the router for requests routed but not yet
    accepted. Thread-safe: the router runs on Ray Serve's loop, the engine's driver on its own, the planner on
    the daemon's. Every family load a replica reported is kept (a replica that dies keeps its measurements):
    they price a cold start (:meth:`cold_start_s`).
    """

    def __init__(self, max_batch: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.max_batch = max(1, max_batch)  # requests per UNet call (rows / 2 for guided requests)
        self._clock = clock
        self._lock = threading.Lock()
        self._views: dict[str, ReplicaView] = {}
        # key -> (replica, edge steps, family): routed, not accepted yet
        self._routed: dict[str, tuple[str, int, str | None]] = {}
        self._live: set[str] | None = None  # the router's replica set (None: not told)
        self._loads: dict[tuple[str, str], tuple[float, ...]] = {}  # (replica, family) -> its loads' seconds
        self._weights: dict[str, int] = {}  # family -> its weights' bytes, as a replica reported them
        self.restarts = 0  # replicas seen dying
        self.resubmits = 0  # requests submitted again after their replica died before they started

    # updates

    def heard(self, event: ReplicaEvent, key: str | None = None) -> None:
        with self._lock:
            self._views[event.replica] = ReplicaView(event.stats, event.pid, event.step_times, self._clock(),
                                                     dict(event.families))
            self._note_families(event.replica, event.families)
            if key is not None and event.kind != "progress":
                self._routed.pop(key, None)

    def _note_families(self, replica: str, families: dict[str, FamilyLoad]) -> None:
        for fid, load in families.items():
            if load.load_s:
                self._loads[(replica, fid)] = tuple(load.load_s)
            if load.weight_bytes:
                self._weights[fid] = load.weight_bytes

    def routed(self, key: str, replica: str, steps: int, family: str | None = None) -> None:
        with self._lock:
            self._routed[key] = (replica, steps, family)

    def forget(self, key: str) -> None:
        with self._lock:
            self._routed.pop(key, None)

    def died(self, replica: str) -> bool:
        """The front saw ``replica`` fail; True the first time (one restart counted per replica)."""
        with self._lock:
            first = self._views.pop(replica, None) is not None
            for key in [k for k, (r, _, _) in self._routed.items() if r == replica]:
                del self._routed[key]
            if self._live is not None and replica in self._live:
                self._live.discard(replica)
                first = True
            if first:
                self.restarts += 1
            return first

    def set_live(self, replicas: set[str]) -> None:
        """The router's current replica set: views of replicas no longer in it are dropped."""
        with self._lock:
            if self._live is not None:
                gone = self._live - replicas
                self.restarts += sum(1 for r in gone if r in self._views)
                for r in gone:
                    self._views.pop(r, None)
            self._live = set(replicas)

    # reads

    def replicas(self) -> dict[str, ReplicaView]:
        with self._lock:
            return dict(self._views)

    def has_heard(self, replica: str) -> bool:
        with self._lock:
            return replica in self._views

    def replica_count(self) -> int:
        with self._lock:
            return len(self._live) if self._live is not None else len(self._views)

    def load(self, replica: str, fallback: dict[str, Any] | None = None,
             family: str | None = None) -> tuple[list[int], list[int]]:
        """(running steps, queued steps with the routed-not-accepted ones behind) of ``replica`` (of ``family``'s
        engine there, when given): what it last said, else its routing stats (``fallback``), else idle."""
        with self._lock:
            view = self._views.get(replica)
            routed = [steps for r, steps, f in self._routed.values()
                      if r == replica and (family is None or f == family)]
        if family is not None:
            load = self._family_load(replica, family, fallback)
            if load is None:
                return [], routed
            return list(load.stats.running_steps or ()), list(load.stats.queued_steps or ()) + routed
        if view is not None:
            running, queued = list(view.stats.running_steps or ()), list(view.stats.queued_steps or ())
        elif fallback:
            running, queued = list(fallback.get("running_steps", ())), list(fallback.get("queued_steps", ()))
        else:
            running, queued = [], []
        return running, queued + routed

    def families_of(self, replica: str, fallback: dict[str, Any] | None = None) -> dict[str, FamilyLoad]:
        """The families ``replica`` reported (its last event, else its routing stats); empty if it said none."""
        with self._lock:
            view = self._views.get(replica)
        if view is not None and view.families:
            return dict(view.families)
        if fallback and fallback.get("families"):
            loads = {fid: FamilyLoad.from_summary(data) for fid, data in dict(fallback["families"]).items()}
            with self._lock:
                self._note_families(replica, loads)
            return loads
        return {}

    def _family_load(self, replica: str, family: str, fallback: dict[str, Any] | None) -> FamilyLoad | None:
        return self.families_of(replica, fallback).get(family)

    def finish_s(self, replica: str, steps: int, fallback: dict[str, Any] | None = None,
                 family: str | None = None) -> float:
        """When a request of ``steps`` edge steps routed now would finish on ``replica``, with what it costs the
        requests it joins (:func:`routing_cost`; seconds from now over :meth:`step_table`).

        With ``family`` (on a replica that reports its families): that family's projection there, plus the work
        of its other families (they share the replica's slice: counted as if it ran first), plus
        :meth:`cold_start_s` where the family is not loaded (or the replica is not heard from at all)."""
        families = self.families_of(replica, fallback) if family is not None else {}
        if family is None or (not families and self.has_heard(replica)):  # one-family replicas of old
            running, queued = self.load(replica, fallback)
            return routing_cost(self.step_table(), running, queued, steps)
        running, queued = self.load(replica, fallback, family)
        cost = routing_cost(self.step_table(family), running, queued, steps)
        for other in families:
            if other != family:
                run_o, queued_o = self.load(replica, fallback, other)
                cost += edge_drain_s(self.step_table(other), run_o, queued_o)
        mine = families.get(family)
        if mine is None or not mine.loaded:
            cost += self.cold_start_s(family)[0]
        return cost

    def cold_start_s(self, family: str) -> tuple[float, str]:
        """(seconds, how they were had) a replica takes to load ``family``
        (:func:`~edge_server.cold_start.estimate_load_s`, as the local pool's): the mean of its loads measured on any
        replica ("measured"); else its weight bytes over the bytes per second of every load measured so far
        ("estimated"); else over :data:`~edge_server.cold_start.DEFAULT_LOAD_BYTES_PER_S` ("default");
        :data:`DEFAULT_COLD_START_S` when no replica has reported its weight bytes either."""
        with self._lock:
            mine = [s for (_, f), loads in self._loads.items() if f == family for s in loads]
            nbytes = self._weights.get(family)
            measured = [(self._weights.get(f, 0), s) for (_, f), loads in self._loads.items() for s in loads]
        if not mine and not nbytes:
            return DEFAULT_COLD_START_S, "default"
        return estimate_load_s(nbytes or 0, mine, measured)

    def step_table(self, family: str | None = None) -> list[float]:
        """Seconds per batched step by requests, pooled over every replica's measurements (of ``family``, when
        given: one table per family, for all replicas: replicas of one deployment run alike, and one that has not
        measured yet must not look slower or faster than the others); unmeasured, in single-request steps (1 s
        each: the unit a cold start is added in before a step is measured)."""
        with self._lock:
            pooled: dict[int, list[float]] = {}
            for view in self._views.values():
                if family is None:
                    times = view.step_times
                else:
                    load = view.families.get(family)
                    times = load.step_times if load is not None else {}
                for b, t in times.items():
                    pooled.setdefault(int(b), []).append(float(t))
        measured = {b: sum(ts) / len(ts) for b, ts in pooled.items()}
        return batch_step_times(1.0, fill_small_batches(measured), self.max_batch, DEFAULT_BATCH_BETA)

    def soonest(self, steps: int, candidates: list[str] | None = None, family: str | None = None) -> str | None:
        names = candidates if candidates is not None else list(self.replicas())
        if not names:
            return None
        return min(names, key=lambda r: (self.finish_s(r, steps, family=family), r))


# ---------------------------------------------------------------------- the front's engine


@dataclass(frozen=True)
class ClusterStats:
    """The cluster as the front sees it: each replica's load, and what happened to requests."""

    replicas: dict[str, EngineStats]
    replica_count: int
    pending: int  # submitted by this front, not yet accepted by a replica
    in_flight: int  # submitted by this front, not yet ended
    restarts: int
    resubmits: int
    families: dict[str, dict[str, FamilyLoad]] = field(default_factory=dict)  # replica -> family -> its load there
    cold_start_s: dict[str, tuple[float, str]] = field(default_factory=dict)  # family -> LoadBoard.cold_start_s


@dataclass(frozen=True)
class Served:
    """Which replica served a request (:attr:`RayEngine.served`, the most recent last)."""

    key: str
    family: str | None
    replica: str
    pid: int


@dataclass
class _Flight:
    request: EdgeRequest
    future: Future[EdgeOutcome]
    task: asyncio.Task[None] | None = None
    cancelled: BaseException | None = None
    replica: str | None = None
    family: str | None = None


class _DescribedFamily:
    """What an engine of a deployment says about its family, read from the replicas' ``describe`` (``info``)."""

    info: dict[str, Any]

    @property
    def family_id(self) -> str:
        return str(self.info["family_id"])

    @property
    def default_size(self) -> int:
        return int(self.info["default_size"])

    @property
    def default_sampler(self) -> str:
        return str(self.info["default_sampler"])

    @property
    def folder(self) -> str:
        return str(self.info["folder"])


class RayEngine(_DescribedFamily):
    """An :class:`~edge_server.engine.Engine` whose requests run on the replicas of a Ray Serve deployment.

    Build it with :meth:`start` (deploys the replicas on a local Ray instance or joins a cluster); tests may hand
    it a ``DeploymentHandle`` of their own. ``max_queue`` bounds what this front holds in flight (across all
    replicas) before ``busy``.

    A deployment of several families (``info["families"]``, by family id) is served through one engine per family,
    :meth:`family_engine`; this engine itself serves the first. Requests of every family share the flights, the
    bound and the board.
    """

    def __init__(self, handle: Any, info: dict[str, Any], cluster: ClusterConfig, *, max_queue: int,
                 board: LoadBoard, owns_ray: bool = False, default_steps: int = 10) -> None:
        self._handle = handle
        self.info = info
        self.cluster = cluster
        self.max_queue = max_queue
        self.board = board
        self._owns_ray = owns_ray
        self._default_steps = default_steps  # the split the planner's view ranks replicas for
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._closing = False
        self._closed = False
        #: each family's description by family id (a replica's ``describe``); none from a deployment of old
        self.families: dict[str, dict[str, Any]] = dict(info.get("families") or {})
        self._closed_families: set[str] = set()
        #: the most recent requests served and the replica each ran on (the front's record, for logs and tests)
        self.served: deque[Served] = deque(maxlen=1024)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rise-ray-front", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ start-up

    @classmethod
    def start(cls, family_dir: str | None, config: EdgeConfig, cluster: ClusterConfig, *, small: str | None = None,
              families: list[FamilySpec] | None = None, timeout_s: float = 600.0) -> RayEngine:
        """Deploy ``cluster.replicas`` replicas of the family (or of every family of ``families``, each replica
        loading one at start: see the module's docstring) and return the front's engine.

        Starts a local Ray instance (``cluster.ray_address`` None) or joins one; raises
        :class:`ClusterUnavailable` (one line) when Ray Serve is missing or the cluster cannot be reached.
        """
        require_ray()
        import ray
        from ray import serve

        from edge_server.config import FamilySpec

        if families is None:
            if family_dir is None:
                raise ConfigError("the cluster needs a family folder")
            families = [FamilySpec(Path(family_dir).resolve().name or "family", str(family_dir), small,
                                   config.variant)]
        owns = False
        if not ray.is_initialized():
            try:
                if cluster.ray_address is None:
                    ray.init(num_cpus=cluster.local_cpus, include_dashboard=False, log_to_driver=False,
                             configure_logging=False)
                    owns = True
                else:
                    ray.init(address=cluster.ray_address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ClusterUnavailable(f"cannot start or join the Ray cluster "
                                         f"{cluster.ray_address or '(local)'}: {exc}") from exc
        _check_room(cluster, owns)  # Ray Serve would wait for ever for replicas it cannot place
        board = LoadBoard(max(1, planned_rows(config.max_batch_rows) // 2))
        register_board(cluster.app_name, board)
        actor: dict[str, Any] = {"num_cpus": cluster.num_cpus, "num_gpus": cluster.num_gpus,
                                 "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cluster.torch_threads)}}}
        options: dict[str, Any] = {
            "name": DEPLOYMENT, "ray_actor_options": actor, "max_ongoing_requests": config.max_queue,
            "health_check_period_s": cluster.health_check_period_s,
            "health_check_timeout_s": max(10.0, 5 * cluster.health_check_period_s),
            "graceful_shutdown_timeout_s": 5.0,
            "max_constructor_retry_count": 2 * cluster.replicas,  # a family that cannot load fails once per replica
        }
        if cluster.min_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": cluster.min_replicas, "max_replicas": cluster.max_replicas,
                "initial_replicas": cluster.replicas,
                "target_ongoing_requests": max(1, planned_rows(config.max_batch_rows) // 2)}
        else:
            options["num_replicas"] = cluster.replicas
        if cluster.router == "soonest":
            options["request_router_config"] = {
                "request_router_class": ROUTER_PATH, "request_router_kwargs": {"board": cluster.app_name},
                "request_routing_stats_period_s": 1.0, "request_routing_stats_timeout_s": 5.0}
        deployment = serve.deployment(**options)(EdgeReplica)
        # a replica sees only the accelerator Ray gave it (CUDA_VISIBLE_DEVICES): "cuda:N" is its "cuda" there
        device = "cuda" if cluster.num_gpus > 0 and config.device.startswith("cuda") else config.device
        app = deployment.bind(list(families), device=device, dtype=config.dtype,
                              max_batch_rows=config.max_batch_rows, max_queue=config.max_queue,
                              batching=config.batching, threads=cluster.torch_threads,
                              memory_budget_mb=config.memory_budget_mb)
        try:
            serve.start(proxy_location="Disabled")  # no HTTP ingress: the daemon is the devices' one address
            handle = serve.run(app, name=cluster.app_name, route_prefix=None)
            info = _hear_every_replica(handle, board, config.sampler, cluster.replicas, timeout_s)
        except RuntimeError as exc:  # a replica that cannot start (the family, the device): its error, one line
            why = _deployment_error(cluster.app_name) or str(exc).strip().splitlines()[-1]
            _shutdown(cluster.app_name, owns)
            raise ClusterUnavailable(f"the edge replicas did not start: {why}") from exc
        except BaseException:
            _shutdown(cluster.app_name, owns)
            raise
        if info.get("sampler_error"):
            _shutdown(cluster.app_name, owns)
            raise ConfigError(str(info["sampler_error"]))
        log.info("cluster: %d replica(s) of %s on Ray (%s), router %s", cluster.replicas,
                 ", ".join(info.get("families") or [info["family_id"]]), cluster.ray_address or "local", cluster.router)
        for replica, view in sorted(board.replicas().items()):
            log.info("replica %s (pid %d): loaded %s", replica, view.pid,
                     ", ".join(f for f, load in view.families.items() if load.loaded) or "nothing")
        default_steps = max(1, round(config.steps * config.split_fraction))
        most = cluster.max_replicas or cluster.replicas
        return cls(handle, info, cluster, max_queue=config.max_queue * most, board=board,
                   owns_ray=owns, default_steps=default_steps)

    # ------------------------------------------------------------------ the Engine interface


    def family_engine(self, family_id: str) -> RayFamilyEngine:
        """One family's :class:`~edge_server.engine.Engine` over this deployment (its request service's)."""
        if family_id not in self.families:
            raise ConfigError(f"family {family_id!r} is not served by this cluster "
                              f"(serving {', '.join(self.families) or self.family_id})")
        return RayFamilyEngine(self, family_id)

    def submit(self, request: EdgeRequest, family: str | None = None) -> Future[EdgeOutcome]:
        """Send ``request`` to a replica; ``family`` its family id (None: the first family)."""
        from edge_server.engine import EngineBusy, EngineClosed

        if family is None and self.families:
            family = next(iter(self.families))
        with self._lock:
            if self._closing or family in self._closed_families:
                raise EngineClosed("the edge is shutting down")
            if len(self._flights) >= self.max_queue:
                raise EngineBusy(f"edge cluster queue is full ({len(self._flights)} requests)", 1.0)
            if request.key in self._flights:
                raise RiseError(f"request {request.request_id} is already in flight")
            flight = _Flight(request, Future(), family=family)
            self._flights[request.key] = flight
        asyncio.run_coroutine_threadsafe(self._start(flight), self._loop)
        return flight.future

    def cancel(self, key: str) -> None:
        from edge_server.engine import RequestCancelled

        with self._lock:
            flight = self._flights.get(key)
        if flight is None:
            return
        flight.cancelled = RequestCancelled(f"request {key.split(':', 1)[-1]} was cancelled")
        self._loop.call_soon_threadsafe(self._cancel_task, flight)

    def stats(self, family: str | None = None) -> EngineStats:
        """The load of the replica the router will pick for a typical request, counters summed over the cluster.

        ``queued`` / ``queued_steps`` also hold the requests this front submitted that no replica acknowledged yet.
        With ``family`` (a deployment of several): that family's load on the replica a request of it goes to, its
        counters summed over the replicas, and the cold start it waits for there when that replica does not hold it.
        """
        from edge_server.engine import EngineStats

        views = self.board.replicas()
        with self._lock:
            pending = [f.request.plan.split for f in self._flights.values()
                       if f.replica is None and (family is None or f.family == family)]
        best = self.board.soonest(self._default_steps, family=family)
        if best is None:
            return EngineStats(len(pending), 0, 0, 0, 0, (), (), tuple(pending))

        def of(view: ReplicaView) -> EngineStats:
            if family is None or family not in view.families:
                return view.stats
            return view.families[family].stats

        parts = [of(v) for v in views.values()]
        mine = with_pending(of(views[best]), pending)
        cold_start_s = 0.0
        if family is not None:
            there = views[best].families.get(family)
            if there is not None and not there.loaded:
                cold_start_s = self.board.cold_start_s(family)[0]
        return replace(mine, unet_calls=sum(p.unet_calls for p in parts), rows_total=sum(p.rows_total for p in parts),
                       completed=sum(p.completed for p in parts), cold_start_s=cold_start_s)

    def cluster_stats(self) -> ClusterStats:
        views = self.board.replicas()
        with self._lock:
            pending = sum(1 for f in self._flights.values() if f.replica is None)
            in_flight = len(self._flights)
        return ClusterStats({r: v.stats for r, v in views.items()}, self.board.replica_count(), pending,
                            in_flight, self.board.restarts, self.board.resubmits,
                            {r: dict(v.families) for r, v in views.items() if v.families},
                            {f: self.board.cold_start_s(f) for f in self.families})

    def close_family(self, family: str, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking ``family``'s work and end its flights (drained or failed); the last family closed closes
        the engine (the deployment goes down)."""
        from edge_server.engine import EngineClosed

        with self._lock:
            self._closed_families.add(family)
            last = bool(self.families) and self._closed_families >= set(self.families)
            flights = [f for f in self._flights.values() if f.family == family]
        if last:
            self.close(drain=drain, timeout=timeout)
            return
        self._wind_down(flights, drain, timeout, EngineClosed("the edge shut down before this request finished"))

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking work; let what is in flight finish (drain) or fail it; tear the deployment down."""
        from edge_server.engine import EngineClosed

        with self._lock:
            if self._closed:
                return
            self._closing = True
            flights = list(self._flights.values())
        self._wind_down(flights, drain, timeout, EngineClosed("the edge shut down before this request finished"))
        with self._lock:
            self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        # Bounded: when a signal to the whole process group took Ray's own processes down with the daemon, Ray's
        # shutdown waits a minute for a GCS that is gone; the daemon exits after SHUTDOWN_S whatever Ray does.
        down = threading.Thread(target=_shutdown, args=(self.cluster.app_name, self._owns_ray), daemon=True)
        down.start()
        down.join(SHUTDOWN_S)
        if down.is_alive():
            log.warning("Ray did not shut down within %.0f s (its processes may be gone): leaving it", SHUTDOWN_S)
        unregister_board(self.cluster.app_name)

    def _wind_down(self, flights: list[_Flight], drain: bool, timeout: float, why: BaseException) -> None:
        """Let ``flights`` finish (``drain``, up to ``timeout``), then fail what is left with ``why``."""
        if drain:
            deadline = time.monotonic() + timeout
            for flight in flights:
                try:
                    flight.future.exception(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # a timeout: failed below
                    break
        for flight in flights:
            if not flight.future.done():
                flight.cancelled = why
                self._loop.call_soon_threadsafe(self._cancel_task, flight)
        for flight in flights:
            try:
                flight.future.exception(timeout=10.0)
            except Exception:
                if not flight.future.done():
                    flight.future.set_exception(why)

    # ------------------------------------------------------------------ the driver (on the front's loop)

    def _cancel_task(self, flight: _Flight) -> None:
        if flight.task is not None and not flight.task.done():
            flight.task.cancel()

    async def _start(self, flight: _Flight) -> None:
        flight.task = asyncio.current_task()
        if flight.cancelled is not None:  # cancelled before the driver ran
            self._end(flight, exc=flight.cancelled)
            return
        try:
            await self._drive(flight)
        except asyncio.CancelledError:
            self._end(flight, exc=flight.cancelled or _closed())
        except BaseException as exc:  # never leave a future hanging
            log.exception("cluster driver failed for %s", flight.request.key)
            self._end(flight, exc=exc)

    async def _drive(self, flight: _Flight) -> None:
        from edge_server.engine import EngineBusy

        r = flight.request
        wire = WireRequest(r.key, r.request_id, r.prompt, r.plan, r.seed, r.height, r.width,
                           preview_every=r.preview_every if r.on_preview is not None else None, family=flight.family)
        attempt = 0
        while True:
            attempt += 1
            started = False
            flight.replica = None
            stream = self._handle.options(stream=True).run.remote(wire)
            try:
                async for event in stream:
                    self.board.heard(event, r.key)
                    if event.kind == "accepted":
                        flight.replica = event.replica
                    elif event.kind == "progress":
                        started = True
                        if event.preview is not None and r.on_preview is not None:
                            r.on_preview(event.step, event.split, event.preview)  # it stands for the progress
                        elif r.on_progress is not None:
                            r.on_progress(event.step, event.split)
                    elif event.kind == "outcome":
                        assert event.outcome is not None
                        self.served.append(Served(r.key, flight.family, event.replica, event.pid))
                        self._end(flight, outcome=event.outcome)
                        return
                    elif event.kind == "error":
                        if event.error == "busy" and attempt < self.cluster.max_attempts:
                            break  # that replica is full: another may not be
                        self._end(flight, exc=rebuild_error(event))
                        return
                else:
                    raise RuntimeError("the replica's stream ended without an outcome")
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as exc:  # the replica died or became unreachable
                self.board.forget(r.key)
                if flight.replica is not None:
                    self.board.died(flight.replica)
                if started or attempt >= self.cluster.max_attempts:
                    log.warning("request %s lost its replica after it started (%s): answered busy", r.key, exc)
                    self._end(flight, exc=EngineBusy("the edge replica serving this request stopped; retry", 1.0))
                    return
                log.warning("request %s lost its replica before it started (%s): submitting it again", r.key,
                            type(exc).__name__)
                self.board.resubmits += 1
                await asyncio.sleep(0.1 * attempt)  # a back-off: the router may not know yet that it died
            if flight.cancelled is not None:
                self._end(flight, exc=flight.cancelled)
                return

    def _end(self, flight: _Flight, *, outcome: EdgeOutcome | None = None, exc: BaseException | None = None) -> None:
        with self._lock:
            self._flights.pop(flight.request.key, None)
        self.board.forget(flight.request.key)
        if flight.future.done():
            return
        if exc is not None:
            flight.future.set_exception(exc)
        else:
            flight.future.set_result(outcome)  # type: ignore[arg-type]  # outcome is set when exc is not


class RayFamilyEngine(_DescribedFamily):
    """One family's :class:`~edge_server.engine.Engine` over a :class:`RayEngine` of several: its requests carry
    its family id (the router prefers replicas holding it), its ``stats`` are its own load, and closing it ends its
    flights (the last family's close takes the deployment down)."""

    def __init__(self, engine: RayEngine, family_id: str) -> None:
        self.cluster_engine = engine
        self.info = engine.families[family_id]

    def submit(self, request: EdgeRequest) -> Future[EdgeOutcome]:
        return self.cluster_engine.submit(request, family=self.family_id)

    def cancel(self, key: str) -> None:
        self.cluster_engine.cancel(key)

    def stats(self) -> EngineStats:
        return self.cluster_engine.stats(self.family_id)

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        self.cluster_engine.close_family(self.family_id, drain=drain, timeout=timeout)


def _hear_every_replica(handle: Any, board: LoadBoard, sampler: str | None, replicas: int,
                        timeout_s: float) -> dict[str, Any]:
    """The first replica's ``describe``, after asking until every replica has told the board its load (which
    families it loaded, in what seconds): the first request is routed on what they hold. The front's router sends
    such calls to replicas it has not heard from first; Ray's own picks at random (asked up to 4 per replica)."""
    info: dict[str, Any] = handle.describe.remote(sampler).result(timeout_s=timeout_s)
    board.heard(info["status"])
    for _ in range(4 * replicas):
        if len(board.replicas()) >= replicas:
            break
        board.heard(handle.describe.remote(sampler).result(timeout_s=timeout_s)["status"])
    return info


def cluster_planner(engine: RayEngine, config: EdgeConfig) -> Any:
    """The front's planner (one per cluster): the config's, over the family's shipped profile if it has one."""
    from edge_server.service import FAMILY_PROFILE, make_planner

    shipped = Path(engine.folder) / FAMILY_PROFILE
    return make_planner(config, default_sampler=engine.default_sampler,
                        family_profile=shipped if shipped.is_file() else None)


def cluster_parts(family_dir: str, config: EdgeConfig, *, small: str | None = None,
                  cluster: ClusterConfig | None = None,
                  registry: CollectorRegistry | None = None) -> tuple[RayEngine, Any]:
    """What ``rise-edge serve --engine ray`` serves with: the started :class:`RayEngine` and the front's planner.

    ``cluster`` defaults to :meth:`ClusterConfig.from_edge_config`; ``registry`` (the daemon's metrics) gets the
    cluster's gauges. Raises :class:`ClusterUnavailable` (one line) without the extra, before anything starts.
    """
    require_ray()
    cluster = cluster or ClusterConfig.from_edge_config(config)
    engine = RayEngine.start(family_dir, config, cluster, small=small)
    try:
        planner = cluster_planner(engine, config)
        if registry is not None:
            ClusterMetrics(engine).register(registry)
    except BaseException:
        engine.close(drain=False, timeout=10.0)
        raise
    return engine, planner


def cluster_family_parts(specs: list[FamilySpec], config: EdgeConfig, *, cluster: ClusterConfig | None = None,
                         registry: CollectorRegistry | None = None) -> tuple[RayEngine, dict[str, RayFamilyEngine]]:
    """What ``rise-edge serve --engine ray`` with several families serves with: the started :class:`RayEngine`
    (replicas holding the families, see the module's docstring) and one engine per family by family id, in the
    order of ``specs`` (each for its own request service and planner: ``Daemon._load_families``).

    Raises :class:`ClusterUnavailable` (one line) without the extra, before anything starts."""
    require_ray()
    cluster = cluster or ClusterConfig.from_edge_config(config)
    engine = RayEngine.start(None, config, cluster, families=specs)
    try:
        engines = {fid: engine.family_engine(fid) for fid in engine.families}
        if registry is not None:
            ClusterMetrics(engine).register(registry)
    except BaseException:
        engine.close(drain=False, timeout=10.0)
        raise
    return engine, engines


def _closed() -> BaseException:
    from edge_server.engine import EngineClosed

    return EngineClosed("the edge shut down before this request finished")


def _check_room(cluster: ClusterConfig, owns_ray: bool) -> None:
    """ClusterUnavailable (one line) when the Ray cluster has not the CPUs or GPUs free the replicas ask for."""
    import ray

    free = ray.available_resources()
    first = cluster.min_replicas or cluster.replicas
    for resource, each in (("CPU", cluster.num_cpus), ("GPU", cluster.num_gpus)):
        need, have = first * each, float(free.get(resource, 0.0))
        if each > 0 and need > have + 1e-9:
            if owns_ray:
                ray.shutdown()
            raise ClusterUnavailable(f"{first} replica(s) need {need:g} {resource} but the Ray cluster has {have:g} "
                                     f"free: fewer --replicas, a smaller slice (--threads), or more nodes")


def _deployment_error(app_name: str) -> str | None:
    """The last ``...Error: message`` line Ray Serve recorded for the deployment (a replica's constructor)."""
    try:
        from ray import serve

        status = serve.status().applications[app_name].deployments[DEPLOYMENT]
    except Exception:
        return None
    lines = [line.strip() for line in str(status.message).splitlines()
             if re.match(r"^\s*[\w.]*(Error|Exception)", line)]
    return lines[-1] if lines else None


def _shutdown(app_name: str, owns_ray: bool) -> None:
    """Delete the application; stop Serve and Ray when this process started them."""
    try:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.delete(app_name)
            except Exception as exc:  # already gone, or the cluster is unreachable
                log.info("could not delete the Serve application %s: %s", app_name, exc)
            if owns_ray:
                serve.shutdown()
                ray.shutdown()
    except ImportError:
        pass


# ---------------------------------------------------------------------- boards by application (front process)

_BOARDS: dict[str, LoadBoard] = {}
_BOARDS_LOCK = threading.Lock()


def register_board(app_name: str, board: LoadBoard) -> None:
    with _BOARDS_LOCK:
        _BOARDS[app_name] = board


def unregister_board(app_name: str) -> None:
    with _BOARDS_LOCK:
        _BOARDS.pop(app_name, None)


def board_for(app_name: str) -> LoadBoard | None:
    """The front's board the router of ``app_name`` reads (None: a handle in a process with no front)."""
    with _BOARDS_LOCK:
        return _BOARDS.get(app_name)


# ---------------------------------------------------------------------- metrics


class ClusterMetrics:
    """Prometheus gauges of the cluster and of each replica, read at scrape time from the engine's board.

    ``ClusterMetrics(engine).register(edge_metrics.registry)`` adds them to the daemon's registry.
    """

    def __init__(self, engine: RayEngine) -> None:
        self.engine = engine

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_ClusterCollector(self.engine))


class _ClusterCollector:
    def __init__(self, engine: RayEngine) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only (the replica set changes)

    def collect(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.engine.cluster_stats()
        replicas = GaugeMetricFamily("rise_edge_cluster_replicas", "Edge replicas serving (Ray Serve)")
        replicas.add_metric([], stats.replica_count)
        restarts = CounterMetricFamily("rise_edge_cluster_replica_restarts", "Edge replicas seen dying (Ray Serve "
                                                                             "restarts them)")
        restarts.add_metric([], stats.restarts)
        resubmits = CounterMetricFamily("rise_edge_cluster_resubmits", "Requests submitted again after their "
                                                                       "replica died before they started")
        resubmits.add_metric([], stats.resubmits)
        pending = GaugeMetricFamily("rise_edge_cluster_pending", "Requests not yet accepted by a replica")
        pending.add_metric([], stats.pending)
        queue = GaugeMetricFamily("rise_edge_replica_queue_depth", "Requests queued on a replica", labels=["replica"])
        active = GaugeMetricFamily("rise_edge_replica_active_requests", "Requests in a replica's steps",
                                   labels=["replica"])
        rows = CounterMetricFamily("rise_edge_replica_batch_rows", "UNet batch rows a replica ran", labels=["replica"])
        calls = CounterMetricFamily("rise_edge_replica_unet_calls", "UNet calls a replica ran", labels=["replica"])
        for name, s in sorted(stats.replicas.items()):
            queue.add_metric([name], s.queued)
            active.add_metric([name], s.active)
            rows.add_metric([name], s.rows_total)
            calls.add_metric([name], s.unet_calls)
        loaded = GaugeMetricFamily("rise_edge_replica_family_loaded", "1 where a replica holds the family loaded",
                                   labels=["replica", "family"])
        loads = CounterMetricFamily("rise_edge_replica_family_loads", "Loads of a family on a replica",
                                    labels=["replica", "family"])
        for name, families in sorted(stats.families.items()):
            for fid, load in sorted(families.items()):
                loaded.add_metric([name, fid], 1.0 if load.loaded else 0.0)
                loads.add_metric([name, fid], len(load.load_s))
        cold = GaugeMetricFamily("rise_edge_cluster_cold_start_seconds", "Seconds a replica takes to load the family "
                                 "(measured, else estimated): what the router adds for a replica without it",
                                 labels=["family", "source"])
        for fid, (seconds, source) in sorted(stats.cold_start_s.items()):
            cold.add_metric([fid, source], seconds)
        return [replicas, restarts, resubmits, pending, queue, active, rows, calls, loaded, loads, cold]


def with_pending(stats: EngineStats, steps: list[int]) -> EngineStats:
    """``stats`` with ``steps`` queued behind what it holds."""
    return replace(stats, queued=stats.queued + len(steps), queued_steps=(*(stats.queued_steps or ()), *steps))
