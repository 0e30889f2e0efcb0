"""Several model families on one edge: loaded at start or on first use, evicted under a memory budget.

An operator with SD1.5 and SDXL users runs one ``rise-edge serve`` with both (``--family sd15=DIR
--family sdxl=DIR``, or ``[families.NAME]`` tables in edge.toml). Each family keeps its own engine
(one batching worker: requests of different families never share a UNet call), its own scheduler
(profile and learned state) and its own prompt reader; a device's ``hello`` names the family of its
bundle and its connection is served by that family (``edge_server.daemon``).

:class:`FamilyPool` holds what is loaded. What a family is (its id, sampler, grammar, default size,
and the bytes its weights take) is read from its folder without loading it
(:func:`edge_server.family.describe_family`), so the edge answers a hello for a family it has not
loaded yet and knows what loading it will cost. A load runs on a thread of its own (the event loop
never waits for weights); requests that arrive meanwhile wait in line for it. Before a load, the least
recently used *idle* families (nothing queued or running) are evicted until the new one fits
``memory_budget_bytes``; when the families in the way are all busy, the request is answered
``busy`` with a retry time instead of overrunning the budget. A family bigger than the whole budget
is refused at start, in one line.

:class:`PooledEngine` is one family's :class:`~edge_server.engine.Engine` on top of the pool: the
request service holds it as it would a plain engine, and eviction and reloading stay out of its sight.
Ray Serve's multiplexing (``serve.multiplexed``) does the same across replicas for model ids loaded
per request; it is not used here because a family is loaded on the engine's own worker thread (one
OpenMP pool, see ``BatchingEngine``) and evicted only when idle, which its LRU cache does not know.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

from edge_server.cold_start import estimate_load_s
from edge_server.config import FamilySpec as FamilySpec  # re-exported: the pool's unit
from edge_server.engine import (
    EdgeOutcome,
    EdgeRequest,
    Engine,
    EngineBusy,
    EngineClosed,
    EngineStats,
    RequestCancelled,
)
from edge_server.family import Family, FamilyInfo, describe_family, loaded_bytes
from edge_server.placement import CPU_FP32, Placement
from shared.errors import ConfigError, RiseError

log = logging.getLogger("rise.families")

#: Seconds a request refused for memory is told to wait: about one request's edge time.
BUDGET_RETRY_S = 5.0


class FamilyUnavailable(RiseError):
    """A family cannot be served now: its load failed, or the memory budget is held by families in use."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


EngineFactory = Callable[[FamilySpec, FamilyInfo], Engine]  # builds a loaded engine (blocks for the load)
PoolEvent = Callable[[str, str, float], None]  # (family name, "load" | "evict", seconds): metrics; keep it quick


@dataclass
class _Slot:
    spec: FamilySpec
    info: FamilyInfo
    engine: Engine | None = None
    loading: Future[Engine] | None = None
    loading_since: float = 0.0  # the pool's clock when the load started
    nbytes: int = 0  # measured once loaded; the estimate while loading
    last_used: float = 0.0
    settling: bool = False  # loaded, its waiting requests not yet handed to it: not to be evicted
    loads: int = 0
    evictions: int = 0
    load_s: list[float] = field(default_factory=list)  # every load's seconds (the cold-start cost)


class FamilyPool:
    """The families an edge serves and which of them are loaded (see the module docstring).

    ``factory`` builds a family's engine, loaded (it blocks for the load; the pool calls it on a
    thread of its own). ``memory_budget_bytes`` None: no budget, nothing is evicted.
    """

    def __init__(self, specs: Iterable[FamilySpec], factory: EngineFactory, *,
                 memory_budget_bytes: int | None = None, placement: Placement = CPU_FP32,
                 clock: Callable[[], float] = time.monotonic, on_event: PoolEvent | None = None) -> None:
        self._factory = factory
        self._clock = clock
        self._on_event = on_event
        self.placement = placement
        self.memory_budget_bytes = memory_budget_bytes
        self._lock = threading.Lock()
        self._published = threading.Condition(self._lock)  # notified when a load ends (loaded, failed or closed)
        self._slots: dict[str, _Slot] = {}
        names: set[str] = set()
        for spec in specs:
            if spec.name in names:
                raise ConfigError(f"family name {spec.name!r} is given twice")
            names.add(spec.name)
            info = describe_family(spec.folder, spec.small, variant=spec.variant)
            if info.family_id in self._slots:
                other = self._slots[info.family_id].spec.name
                raise ConfigError(f"families {other!r} and {spec.name!r} are the same family ({info.family_id}): "
                                  "serve it once")
            need = info.weight_bytes(placement)
            if memory_budget_bytes is not None and need > memory_budget_bytes:
                raise ConfigError(f"family {spec.name!r} needs {_mb(need)} for its weights in {placement.dtype_name}, "
                                  f"more than the whole memory budget ({_mb(memory_budget_bytes)})")
            self._slots[info.family_id] = _Slot(spec, info, nbytes=need)
        if not self._slots:
            raise ConfigError("no family to serve: give --family DIR (or [families.NAME] in the config)")
        self._closed = False

    # ------------------------------------------------------------------ what is served

    @property
    def family_ids(self) -> list[str]:
        """Every family served, in the order given (the first is the default)."""
        return list(self._slots)

    def info(self, family_id: str) -> FamilyInfo:
        return self._slots[family_id].info

    def spec(self, family_id: str) -> FamilySpec:
        return self._slots[family_id].spec

    def is_loaded(self, family_id: str) -> bool:
        with self._lock:
            return self._slots[family_id].engine is not None

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return [fid for fid, slot in self._slots.items() if slot.engine is not None]

    def loaded_bytes(self) -> int:
        """The bytes of the families loaded or loading (measured, or estimated while loading)."""
        with self._lock:
            return self._held_bytes()

    def counters(self, family_id: str) -> tuple[int, int, tuple[float, ...]]:
        """(loads, evictions, each load's seconds) of a family."""
        with self._lock:
            slot = self._slots[family_id]
            return slot.loads, slot.evictions, tuple(slot.load_s)

    def cold_start_s(self, family_id: str) -> float:
        """Seconds a request for the family submitted now waits for its load: 0 when loaded; what is left of the
        load when it is loading; else a whole load (:func:`~edge_server.cold_start.estimate_load_s`: the mean of
        its own loads, else its weight bytes at the rate of every load here so far, else at the default rate)."""
        with self._lock:
            slot = self._slots[family_id]
            if slot.engine is not None:
                return 0.0
            measured = [(s.nbytes, seconds) for s in self._slots.values() for seconds in s.load_s]
            estimate, _ = estimate_load_s(slot.nbytes, slot.load_s, measured)
            if slot.loading is not None:
                return max(estimate - (self._clock() - slot.loading_since), 0.0)
            return estimate

    def engine(self, family_id: str) -> PooledEngine:
        """The family's engine for its request service (loaded when first used)."""
        if family_id not in self._slots:
            raise ConfigError(f"family {family_id!r} is not served here (serving {', '.join(self._slots)})")
        return PooledEngine(self, family_id)

    # ------------------------------------------------------------------ loading and eviction

    def load_at_start(self) -> None:
        """Load the families, in order, as many as fit the budget without evicting one; block until loaded.

        Raises the first load's error (a family that does not load is refused at start, in one line)."""
        for fid, slot in self._slots.items():
            with self._lock:
                fits = self.memory_budget_bytes is None or self._held_bytes() + slot.nbytes <= self.memory_budget_bytes
                future = self._start_load(fid) if fits else None
            if future is None:
                log.info("family %s waits for its first request (the memory budget %s is full)", slot.spec.name,
                         _mb(self.memory_budget_bytes or 0))
                continue
            self.wait_loaded(fid)

    def wait_loaded(self, family_id: str, timeout: float | None = None) -> Engine:
        """The family's engine once it is loaded, starting its load if need be (blocks); the load's error if it
        fails, EngineClosed if the pool closes first, TimeoutError after ``timeout`` seconds."""
        engine, loading = self.acquire(family_id)
        if engine is not None:
            return engine
        assert loading is not None
        loading.result(timeout)  # the load's own error raises here (published before it resolves)
        slot = self._slots[family_id]
        with self._published:
            if not self._published.wait_for(lambda: slot.engine is not None or self._closed, timeout):
                raise TimeoutError(f"family {slot.spec.name} did not finish loading within {timeout} s")
            if slot.engine is None:
                raise EngineClosed("the edge is shutting down")
            return slot.engine

    def acquire(self, family_id: str) -> tuple[Engine | None, Future[Engine] | None]:
        """The family's engine if loaded (marked used), else the future of its load (started if need be).

        Raises :class:`FamilyUnavailable` when the budget is held by busy families. Call under no lock."""
        with self._lock:
            if self._closed:
                raise EngineClosed("the edge is shutting down")
            slot = self._slots[family_id]
            slot.last_used = self._clock()
            if slot.engine is not None:
                return slot.engine, None
            if slot.loading is not None:
                return None, slot.loading
            return None, self._start_load(family_id)

    def _held_bytes(self) -> int:
        return sum(s.nbytes for s in self._slots.values() if s.engine is not None or s.loading is not None)

    def _start_load(self, family_id: str) -> Future[Engine]:
        """Make room (under the lock), then load on a thread of its own; the future resolves to the engine."""
        slot = self._slots[family_id]
        evicted = self._make_room(slot)
        future: Future[Engine] = Future()
        slot.loading, slot.loading_since = future, self._clock()
        thread = threading.Thread(target=self._load, args=(slot, future, evicted), daemon=True,
                                  name=f"rise-load-{slot.spec.name}")
        thread.start()
        return future

    def _make_room(self, slot: _Slot) -> list[tuple[_Slot, Engine]]:
        """Detach the least recently used idle families until ``slot`` fits; their engines are closed by the
        loading thread. FamilyUnavailable if the busy ones leave no room."""
        budget = self.memory_budget_bytes
        if budget is None:
            return []
        evicted: list[tuple[_Slot, Engine]] = []
        candidates = sorted((s for s in self._slots.values() if s.engine is not None and s is not slot),
                            key=lambda s: s.last_used)
        for other in candidates:
            if self._held_bytes() + slot.nbytes <= budget:
                break
            assert other.engine is not None
            stats = other.engine.stats()
            if stats.queued or stats.active or other.settling:
                continue
            evicted.append((other, other.engine))
            other.engine = None
            other.evictions += 1
            other.nbytes = other.info.weight_bytes(self.placement)
        if self._held_bytes() + slot.nbytes > budget:
            for other, engine in evicted:  # nothing is evicted for a load that cannot happen anyway
                other.engine, other.evictions = engine, other.evictions - 1
            busy = [s.spec.name for s in self._slots.values() if s.engine is not None or s.loading is not None]
            raise FamilyUnavailable(
                f"family {slot.spec.name} needs {_mb(slot.nbytes)}; the edge's memory budget ({_mb(budget)}) is "
                f"held by families in use ({', '.join(busy)}): retry shortly", retry_after_s=BUDGET_RETRY_S)
        return evicted

    def _evict(self, evicted: list[tuple[_Slot, Engine]], for_name: str) -> None:
        """Close the detached engines; once this returns nothing references their families."""
        while evicted:
            other, engine = evicted.pop()
            engine.close(drain=True, timeout=30.0)
            del engine
            log.info("evicted family %s (idle; %s freed for %s)", other.spec.name, _mb(other.nbytes), for_name)
            if self._on_event is not None:
                self._on_event(other.spec.name, "evict", 0.0)

    def _load(self, slot: _Slot, future: Future[Engine], evicted: list[tuple[_Slot, Engine]]) -> None:
        if evicted:
            self._evict(evicted, slot.spec.name)
            _release_memory(self.placement)
        started = time.perf_counter()
        try:
            engine = self._factory(slot.spec, slot.info)
        except BaseException as exc:  # every load error ends the waiting requests, never hangs them
            with self._lock:
                slot.loading = None
                self._published.notify_all()
            message = " ".join(str(exc).split())
            log.error("family %s failed to load: %s", slot.spec.name, message)
            future.set_exception(exc if isinstance(exc, RiseError)
                                 else FamilyUnavailable(f"family {slot.spec.name} failed to load: {message}"))
            return
        seconds = time.perf_counter() - started
        family = getattr(engine, "family", None)
        nbytes = loaded_bytes(family) if isinstance(family, Family) else slot.nbytes
        with self._lock:
            slot.loading = None
            closing = self._closed
            if not closing:  # loaded and counted before anyone sees it loaded
                slot.engine, slot.nbytes, slot.settling = engine, nbytes, True
                slot.loads += 1
                slot.load_s.append(seconds)
                if self._on_event is not None:
                    self._on_event(slot.spec.name, "load", seconds)
            self._published.notify_all()
        if closing:  # the edge stopped meanwhile: the waiting requests fail as shutting down
            engine.close(drain=False, timeout=10.0)
            future.set_exception(EngineClosed("the edge is shutting down"))
            return
        log.info("loaded family %s (%s) in %.1f s (%s)", slot.spec.name, slot.info.family_id, seconds, _mb(nbytes))
        # The requests that waited for the load reach the engine (the future's callbacks) while the slot is settling,
        # so no eviction can take the engine between its load and its first requests.
        future.set_result(engine)
        with self._lock:
            slot.settling = False

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Close every loaded engine (a load still running closes its engine when it ends)."""
        with self._lock:
            self._closed = True
            self._published.notify_all()
            engines = [s.engine for s in self._slots.values() if s.engine is not None]
            for s in self._slots.values():
                s.engine = None
        for engine in engines:
            engine.close(drain=drain, timeout=timeout)


def _release_memory(placement: Placement) -> None:
    """Give an evicted family's memory back (its modules are unreferenced once its engine is closed)."""
    gc.collect()
    if placement.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes < 1e9 else f"{nbytes / 1e9:.2f} GB"


@dataclass
class _Waiting:
    request: EdgeRequest
    future: Future[EdgeOutcome]


class PooledEngine:
    """One family's :class:`~edge_server.engine.Engine` on a :class:`FamilyPool`: submits to the family's engine,
    loading it first if it is not loaded (the requests meanwhile wait in line, cancellable)."""

    def __init__(self, pool: FamilyPool, family_id: str) -> None:
        self.pool = pool
        self._family_id = family_id
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}  # key -> request waiting for the load

    @property
    def family_id(self) -> str:
        return self._family_id

    @property
    def default_size(self) -> int:
        return self.pool.info(self._family_id).default_size

    def submit(self, request: EdgeRequest) -> Future[EdgeOutcome]:
        engine, loading = self.pool.acquire(self._family_id)
        if engine is not None:
            return engine.submit(request)
        assert loading is not None
        waiting = _Waiting(request, Future())
        with self._lock:
            if len(self._waiting) >= 256:
                raise EngineBusy(f"family {self.pool.spec(self._family_id).name} is loading with "
                                 f"{len(self._waiting)} requests waiting", BUDGET_RETRY_S)
            self._waiting[request.key] = waiting
        loading.add_done_callback(lambda done: self._loaded(waiting, done))
        return waiting.future

    def _loaded(self, waiting: _Waiting, done: Future[Engine]) -> None:
        with self._lock:
            if self._waiting.pop(waiting.request.key, None) is None:
                return  # cancelled meanwhile: its future has failed already
        error = done.exception()
        if error is not None:
            waiting.future.set_exception(error)
            return
        try:
            inner = done.result().submit(waiting.request)
        except BaseException as exc:  # busy or closed: the request's own error
            waiting.future.set_exception(exc)
            return
        inner.add_done_callback(lambda result: _copy_outcome(result, waiting.future))

    def cancel(self, key: str) -> None:
        with self._lock:
            waiting = self._waiting.pop(key, None)
        if waiting is not None:
            waiting.future.set_exception(RequestCancelled(f"request {key.split(':', 1)[-1]} was cancelled"))
            return
        engine = self._loaded_engine()
        if engine is not None:
            engine.cancel(key)

    def stats(self) -> EngineStats:
        engine = self._loaded_engine()
        with self._lock:
            waiting = len(self._waiting)
            waiting_steps = tuple(w.request.plan.split for w in self._waiting.values())
        if engine is None:
            return EngineStats(queued=waiting, active=0, unet_calls=0, rows_total=0, completed=0,
                               running_steps=(), queued_steps=waiting_steps,
                               cold_start_s=self.pool.cold_start_s(self._family_id))
        stats = engine.stats()
        if not waiting:
            return stats
        return EngineStats(stats.queued + waiting, stats.active, stats.unet_calls, stats.rows_total, stats.completed,
                           stats.batch_sizes, stats.running_steps,
                           None if stats.queued_steps is None else stats.queued_steps + waiting_steps)

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Close this family's engine if loaded (the pool closes the rest when the edge stops)."""
        with self.pool._lock:
            slot = self.pool._slots[self._family_id]
            engine, slot.engine = slot.engine, None
        if engine is not None:
            engine.close(drain=drain, timeout=timeout)
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for entry in waiting:
            entry.future.set_exception(EngineClosed("the edge shut down before this request finished"))

    @property
    def family(self) -> Family | None:
        """The loaded family (None while it is not loaded)."""
        engine = self._loaded_engine()
        family = getattr(engine, "family", None)
        return family if isinstance(family, Family) else None

    def _loaded_engine(self) -> Engine | None:
        with self.pool._lock:
            return self.pool._slots[self._family_id].engine


def _copy_outcome(source: Future[EdgeOutcome], target: Future[EdgeOutcome]) -> None:
    if target.done():
        return
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())
