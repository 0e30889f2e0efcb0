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

Failures. A replica that dies is restarted by Ray Serve. A request whose steps had not started there is
submitted again (up to ``max_attempts``), so it lands on a live replica; one that had started fails with
:class:`~edge_server.engine.EngineBusy`, which the service sends as the protocol's retryable ``busy``.
Nothing is left hanging: every stream ends in an outcome or an error. The scheduler's state stays in the
front (one per cluster), persisted by the service as with one engine.

Operations. :func:`cluster_parts` is what ``rise-edge serve --engine ray`` starts (engine, planner, and the
:class:`ClusterMetrics` on the daemon's registry: replicas, restarts, resubmissions, each replica's queue,
running requests, UNet calls and rows).

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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from shared.bandit.latency import DEFAULT_BATCH_BETA, batch_step_times, edge_schedule
from shared.errors import ConfigError, RiseError
from shared.relay_plan import RelayPlan

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from prometheus_client import CollectorRegistry

    from edge_server.config import EdgeConfig
    from edge_server.engine import EdgeOutcome, EdgeRequest, EngineStats

log = logging.getLogger("rise.cluster")

#: What ``--engine ray`` says, in one line, when the ``cluster`` extra is not installed.
RAY_MISSING = "--engine ray needs Ray Serve, which is not installed here: pip install '.[cluster]'"
ROUTERS = ("soonest", "pow2")  # ours (edge_server.cluster_router), or Ray Serve's power of two choices
ROUTER_PATH = "edge_server.cluster_router.SoonestFinishRouter"
DEPLOYMENT = "EdgeReplica"
SHUTDOWN_S = 20.0  # the most RayEngine.close waits for the deployment's deletion and Ray's shutdown


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


EventKind = Literal["accepted", "progress", "outcome", "error"]
ErrorKind = Literal["busy", "closed", "cancelled", "invalid", "internal"]


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
    """One replica: a :class:`~edge_server.engine.BatchingEngine` on its slice, streaming events to the front.

    A plain class: :meth:`RayEngine.start` wraps it with ``serve.deployment``; tests may drive it directly.
    """

    def __init__(self, family_dir: str, small: str | None = None, variant: str | None = None, *,
                 device: str = "cpu", dtype: str = "auto", max_batch_rows: int = 16, max_queue: int = 64,
                 batching: bool = True, threads: int | None = None) -> None:
        import torch

        from edge_server.engine import BatchingEngine
        from edge_server.family import load_family
        from edge_server.placement import resolve_placement

        if threads is not None:
            torch.set_num_threads(threads)

        def load() -> Any:  # on the engine's thread (one OpenMP pool: see BatchingEngine)
            if threads is not None:
                torch.set_num_threads(threads)
            return load_family(family_dir, small, variant=variant, placement=resolve_placement(device, dtype))

        self.timer = StepTimer()
        self.engine = BatchingEngine(load, max_batch_rows=max_batch_rows, max_queue=max_queue, batching=batching,
                                     on_batch=self.timer)
        self.pid = os.getpid()
        self.replica = _replica_id()

    def describe(self, sampler: str | None = None) -> dict[str, Any]:
        """What the front needs before it serves: the family, its default size and sampler, a sampler check."""
        family = self.engine.family
        problem = None
        if sampler is not None:
            try:
                family.check_sampler(sampler)
            except RiseError as exc:
                problem = str(exc)
        return {"family_id": family.family_id, "default_size": self.engine.default_size,
                "folder": str(family.folder), "default_sampler": family.default_sampler, "sampler_error": problem,
                "replica": self.replica, "pid": self.pid}

    def _event(self, kind: EventKind, **fields: Any) -> ReplicaEvent:
        return ReplicaEvent(kind, self.replica, self.pid, self.engine.stats(), self.timer.snapshot(), **fields)

    async def run(self, wire: WireRequest) -> AsyncIterator[ReplicaEvent]:
        """Serve one request: ``accepted``, ``progress`` (the latest only, when several are waiting), then
        ``outcome`` or ``error``. Cancelling the stream cancels the request in the engine."""
        from edge_server.engine import EdgeRequest

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
            future = self.engine.submit(request)
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
            self.engine.cancel(wire.key)
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
        return load_summary(self.engine.stats(), self.timer.snapshot())

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def process_id(self) -> int:
        return self.pid

    def __del__(self) -> None:  # Ray Serve tears the replica down: fail what it holds, promptly
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(drain=False, timeout=5.0)


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


class LoadBoard:
    """The front's view of every replica's load, shared by the router, the planner's ``stats`` and the metrics.

    Updated from the replicas' events (each carries its load) and by the router for requests routed but not yet
    accepted. Thread-safe: the router runs on Ray Serve's loop, the engine's driver on its own, the planner on
    the daemon's.
    """

    def __init__(self, max_batch: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.max_batch = max(1, max_batch)  # requests per UNet call (rows / 2 for guided requests)
        self._clock = clock
        self._lock = threading.Lock()
        self._views: dict[str, ReplicaView] = {}
        self._routed: dict[str, tuple[str, int]] = {}  # key -> (replica, edge steps): routed, not accepted yet
        self._live: set[str] | None = None  # the router's replica set (None: not told)
        self.restarts = 0  # replicas seen dying
        self.resubmits = 0  # requests submitted again after their replica died before they started

    # updates

    def heard(self, event: ReplicaEvent, key: str | None = None) -> None:
        with self._lock:
            self._views[event.replica] = ReplicaView(event.stats, event.pid, event.step_times, self._clock())
            if key is not None and event.kind != "progress":
                self._routed.pop(key, None)

    def routed(self, key: str, replica: str, steps: int) -> None:
        with self._lock:
            self._routed[key] = (replica, steps)

    def forget(self, key: str) -> None:
        with self._lock:
            self._routed.pop(key, None)

    def died(self, replica: str) -> bool:
        """The front saw ``replica`` fail; True the first time (one restart counted per replica)."""
        with self._lock:
            first = self._views.pop(replica, None) is not None
            for key in [k for k, (r, _) in self._routed.items() if r == replica]:
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

    def replica_count(self) -> int:
        with self._lock:
            return len(self._live) if self._live is not None else len(self._views)

    def load(self, replica: str, fallback: dict[str, Any] | None = None) -> tuple[list[int], list[int]]:
        """(running steps, queued steps with the routed-not-accepted ones behind) of ``replica``: what it last
        said, else its routing stats (``fallback``), else idle."""
        with self._lock:
            view = self._views.get(replica)
            routed = [steps for r, steps in self._routed.values() if r == replica]
        if view is not None:
            running, queued = list(view.stats.running_steps or ()), list(view.stats.queued_steps or ())
        elif fallback:
            running, queued = list(fallback.get("running_steps", ())), list(fallback.get("queued_steps", ()))
        else:
            running, queued = [], []
        return running, queued + routed

    def finish_s(self, replica: str, steps: int, fallback: dict[str, Any] | None = None) -> float:
        """When a request of ``steps`` edge steps routed now would finish on ``replica``, with what it costs the
        requests it joins (:func:`routing_cost`; seconds from now over :meth:`step_table`)."""
        running, queued = self.load(replica, fallback)
        return routing_cost(self.step_table(), running, queued, steps)

    def step_table(self) -> list[float]:
        """Seconds per batched step by requests, pooled over every replica's measurements (one table for all:
        replicas of one deployment run alike, and one that has not measured yet must not look slower or faster
        than the others); unmeasured, in single-request steps."""
        with self._lock:
            pooled: dict[int, list[float]] = {}
            for view in self._views.values():
                for b, t in view.step_times.items():
                    pooled.setdefault(int(b), []).append(float(t))
        measured = {b: sum(ts) / len(ts) for b, ts in pooled.items()}
        return batch_step_times(1.0, fill_small_batches(measured), self.max_batch, DEFAULT_BATCH_BETA)

    def soonest(self, steps: int, candidates: list[str] | None = None) -> str | None:
        names = candidates if candidates is not None else list(self.replicas())
        if not names:
            return None
        return min(names, key=lambda r: (self.finish_s(r, steps), r))


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


@dataclass
class _Flight:
    request: EdgeRequest
    future: Future[EdgeOutcome]
    task: asyncio.Task[None] | None = None
    cancelled: BaseException | None = None
    replica: str | None = None


class RayEngine:
    """An :class:`~edge_server.engine.Engine` whose requests run on the replicas of a Ray Serve deployment.

    Build it with :meth:`start` (deploys the replicas on a local Ray instance or joins a cluster); tests may hand
    it a ``DeploymentHandle`` of their own. ``max_queue`` bounds what this front holds in flight (across all
    replicas) before ``busy``.
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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rise-ray-front", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ start-up

    @classmethod
    def start(cls, family_dir: str, config: EdgeConfig, cluster: ClusterConfig, *, small: str | None = None,
              timeout_s: float = 600.0) -> RayEngine:
        """Deploy ``cluster.replicas`` replicas of the family and return the front's engine.

        Starts a local Ray instance (``cluster.ray_address`` None) or joins one; raises
        :class:`ClusterUnavailable` (one line) when Ray Serve is missing or the cluster cannot be reached.
        """
        require_ray()
        import ray
        from ray import serve

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
        board = LoadBoard(max(1, config.max_batch_rows // 2))
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
                "target_ongoing_requests": max(1, config.max_batch_rows // 2)}
        else:
            options["num_replicas"] = cluster.replicas
        if cluster.router == "soonest":
            options["request_router_config"] = {
                "request_router_class": ROUTER_PATH, "request_router_kwargs": {"board": cluster.app_name},
                "request_routing_stats_period_s": 1.0, "request_routing_stats_timeout_s": 5.0}
        deployment = serve.deployment(**options)(EdgeReplica)
        # a replica sees only the accelerator Ray gave it (CUDA_VISIBLE_DEVICES): "cuda:N" is its "cuda" there
        device = "cuda" if cluster.num_gpus > 0 and config.device.startswith("cuda") else config.device
        app = deployment.bind(str(family_dir), small, config.variant, device=device, dtype=config.dtype,
                              max_batch_rows=config.max_batch_rows, max_queue=config.max_queue,
                              batching=config.batching, threads=cluster.torch_threads)
        try:
            serve.start(proxy_location="Disabled")  # no HTTP ingress: the daemon is the devices' one address
            handle = serve.run(app, name=cluster.app_name, route_prefix=None)
            info = handle.describe.remote(config.sampler).result(timeout_s=timeout_s)
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
        log.info("cluster: %d replica(s) of %s on Ray (%s), router %s", cluster.replicas, info["family_id"],
                 cluster.ray_address or "local", cluster.router)
        default_steps = max(1, round(config.steps * config.split_fraction))
        most = cluster.max_replicas or cluster.replicas
        return cls(handle, info, cluster, max_queue=config.max_queue * most, board=board,
                   owns_ray=owns, default_steps=default_steps)

    # ------------------------------------------------------------------ the Engine interface

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

    def submit(self, request: EdgeRequest) -> Future[EdgeOutcome]:
        from edge_server.engine import EngineBusy, EngineClosed

        with self._lock:
            if self._closing:
                raise EngineClosed("the edge is shutting down")
            if len(self._flights) >= self.max_queue:
                raise EngineBusy(f"edge cluster queue is full ({len(self._flights)} requests)", 1.0)
            if request.key in self._flights:
                raise RiseError(f"request {request.request_id} is already in flight")
            flight = _Flight(request, Future())
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

    def stats(self) -> EngineStats:
        """The load of the replica the router will pick for a typical request, counters summed over the cluster.

        ``queued`` / ``queued_steps`` also hold the requests this front submitted that no replica acknowledged yet.
        """
        from edge_server.engine import EngineStats

        views = self.board.replicas()
        with self._lock:
            pending = [f.request.plan.split for f in self._flights.values() if f.replica is None]
        best = self.board.soonest(self._default_steps)
        if best is None:
            return EngineStats(len(pending), 0, 0, 0, 0, (), (), tuple(pending))
        mine = with_pending(views[best].stats, pending)
        return replace(mine, unet_calls=sum(v.stats.unet_calls for v in views.values()),
                       rows_total=sum(v.stats.rows_total for v in views.values()),
                       completed=sum(v.stats.completed for v in views.values()))

    def cluster_stats(self) -> ClusterStats:
        views = self.board.replicas()
        with self._lock:
            pending = sum(1 for f in self._flights.values() if f.replica is None)
            in_flight = len(self._flights)
        return ClusterStats({r: v.stats for r, v in views.items()}, self.board.replica_count(), pending,
                            in_flight, self.board.restarts, self.board.resubmits)

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking work; let what is in flight finish (drain) or fail it; tear the deployment down."""
        from edge_server.engine import EngineClosed

        with self._lock:
            if self._closed:
                return
            self._closing = True
            flights = list(self._flights.values())
        if drain:
            deadline = time.monotonic() + timeout
            for flight in flights:
                try:
                    flight.future.exception(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # a timeout: failed below
                    break
        for flight in flights:
            if not flight.future.done():
                flight.cancelled = EngineClosed("the edge shut down before this request finished")
                self._loop.call_soon_threadsafe(self._cancel_task, flight)
        for flight in flights:
            try:
                flight.future.exception(timeout=10.0)
            except Exception:
                if not flight.future.done():
                    flight.future.set_exception(EngineClosed("the edge shut down before this request finished"))
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
                           preview_every=r.preview_every if r.on_preview is not None else None)
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


def cluster_planner(engine: RayEngine, config: EdgeConfig) -> Any:
    """The front's planner (one per cluster): the config's, over the family's shipped profile if it has one."""
    from pathlib import Path

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
        return [replicas, restarts, resubmits, pending, queue, active, rows, calls]


def with_pending(stats: EngineStats, steps: list[int]) -> EngineStats:
    """``stats`` with ``steps`` queued behind what it holds."""
    return replace(stats, queued=stats.queued + len(steps), queued_steps=(*(stats.queued_steps or ()), *steps))
