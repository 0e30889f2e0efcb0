"""The edge's serving engine: the :class:`Engine` interface and its one-process implementation.

The request service (``edge_server.service``) is given an :class:`Engine` and talks to it only
through ``submit`` (returning a ``concurrent.futures.Future``), ``cancel``, ``stats`` and
``close``, in the spirit of LitServe and vLLM: another engine (a Ray Serve deployment, a
multi-GPU pool) is a swap, not a rewrite. An engine hands back the encoded handoff or, for
``decode_on="edge"`` plans, the decoded uint8 image; turning that into PNG bytes is the API
layer's job.

:class:`BatchingEngine` is a bounded queue and one worker thread doing step-level batching:
admit queued requests (text encoding + initial noise), pick the oldest jobs that fit one UNet
call (``edge_server.batching.pick_batch``), advance them one step, and hand back every job that
reached its split. ``batching=False`` runs one request at a time, the baseline the benchmark
compares against. How many rows a call may take is the engine's :class:`~edge_server.row_budget.RowBudget`:
``max_batch_rows`` (None: auto) and, on a GPU, what its memory holds; a call that runs out of memory
is retried in smaller ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from edge_server.batching import DenoiseJob, pick_batch, take_step, unet_noise
from edge_server.family import Conditioning, Family, encode_prompts
from edge_server.preview import PreviewRenderer
from edge_server.relay import decode_latents, prepare
from edge_server.row_budget import (
    MemoryStats,
    NoRoomOnDevice,
    RowBudget,
    ceiling_rows,
    is_out_of_memory,
    measure_row_memory,
)
from edge_server.threads import StepEfficiency
from shared.errors import RiseError
from shared.handoff import encode_handoff
from shared.preview import preview_due
from shared.relay_plan import RelayPlan

log = logging.getLogger("rise.engine")

# (steps done, split); called on the engine's thread. An adaptive plan's split is its most edge steps
# until x0 settles: the call after the settling step reports (s, s).
ProgressCallback = Callable[[int, int], None]
BatchCallback = Callable[[int, int], None]  # (requests, rows) per UNet call; called on the engine's thread
# (family id, rows a call may take at the family's default size, after an out-of-memory error?): once the budget is
# set at start, and after each out-of-memory error; on the engine's thread
RowLimitCallback = Callable[[str, int, bool], None]
# (steps done, split, preview RGB (h, w, 3) uint8) on the steps a preview is due, in place of the progress
# callback for that step (one message to the client); on the engine's thread
PreviewCallback = Callable[[int, int, NDArray[np.uint8]], None]


class EngineBusy(RiseError):
    """The queue is full: retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClosed(RiseError):
    """The engine is shutting down and takes no new work (or dropped this request)."""


class RequestCancelled(RiseError):
    """The request was cancelled (its client left or asked to stop)."""


@dataclass
class EdgeRequest:
    key: str  # unique in the engine (the service prefixes the client's id with its connection)
    request_id: str  # the client's id, carried in the handoff
    prompt: str
    plan: RelayPlan
    seed: int
    height: int | None = None
    width: int | None = None
    on_progress: ProgressCallback | None = None
    preview_every: int | None = None  # a live preview every that many steps (and the last); None: none
    on_preview: PreviewCallback | None = None


@dataclass(frozen=True)
class EdgeOutcome:
    """What the engine hands back for one request: the handoff, or the image it decoded itself."""

    kind: Literal["handoff", "image"]
    queue_s: float  # submit -> admitted
    edge_compute_s: float  # admitted -> outcome ready (shared with co-batched requests)
    handoff: bytes | None = None  # kind "handoff": the encoded handoff (shared.handoff, safetensors)
    image: NDArray[np.uint8] | None = None  # kind "image" (decode_on="edge"): (H, W, 3) uint8
    # the large-model steps the edge ran: the plan's split, or where an adaptive plan handed off
    # (the handoff's split says the same); None where an engine does not say
    edge_steps: int | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's counters, taken under its lock: later work never changes it."""

    queued: int
    active: int
    unet_calls: int
    rows_total: int
    completed: int
    batch_sizes: tuple[int, ...] = ()  # requests per UNet call, the most recent last (bounded)
    # the scheduler projects the edge's schedule from these (None: the engine does not say)
    running_steps: tuple[int, ...] | None = None  # edge steps each request in the batch has left
    queued_steps: tuple[int, ...] | None = None  # edge steps of each queued request, oldest first
    cold_start_s: float = 0.0  # seconds before a request submitted now can start: its family's load (0: loaded)


class Engine(Protocol):
    """What the request service needs from an engine; ``BatchingEngine`` is the one-process one.

    ``submit`` raises :class:`EngineBusy` (with a retry-after) when full and :class:`EngineClosed`
    once closing; its future fails with :class:`RequestCancelled` after ``cancel``, with
    :class:`EngineClosed` if the engine shuts down first, or with the request's own error
    (a :class:`~shared.errors.RiseError` for a request the edge cannot serve as asked).
    """

    @property
    def family_id(self) -> str:
        """The family the engine serves (the protocol's hello checks it)."""
        ...

    @property
    def default_size(self) -> int:
        """Image side in pixels when a request names none (the UNet's sample size)."""
        ...

    def submit(self, request: EdgeRequest) -> Future[EdgeOutcome]: ...

    def cancel(self, key: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None: ...


@dataclass
class _Entry:
    request: EdgeRequest
    future: Future[EdgeOutcome]
    submitted: float
    job: DenoiseJob | None = None
    admitted: float = 0.0


class BatchingEngine:
    """Large-model steps for many requests, batched per step, on one worker thread (an :class:`Engine`).

    ``family`` may be a loader (``lambda: load_family(folder)``): the worker thread then loads it
    before it serves, and the constructor waits for that (re-raising the loader's error), so every
    torch op of the edge runs on that one thread. That matters on CPU: OpenMP keeps a thread pool
    per calling thread, and with a second pool (the main thread's, from loading the weights)
    libgomp counts more threads than cores and stops spinning between parallel regions, which
    doubled the demo family's UNet step at 2 threads on a 2-core machine (29 -> 60 ms per step).

    ``max_batch_rows`` None is ``auto`` (:mod:`edge_server.row_budget`). On a CUDA device the worker
    measures, once the family is loaded, what a UNet row costs in memory and trims the budget to
    what fits; ``memory_stats`` stands in for ``torch.cuda``'s counters (tests measure a fake device).
    The constructor raises NoRoomOnDevice when not even one request fits.
    """

    def __init__(self, family: Family | Callable[[], Family], *, max_batch_rows: int | None = 16,
                 max_queue: int = 64, batching: bool = True, on_batch: BatchCallback | None = None,
                 adapt_threads: bool = False, memory_stats: MemoryStats | None = None,
                 on_row_limit: RowLimitCallback | None = None) -> None:
        if (max_batch_rows is not None and max_batch_rows < 1) or max_queue < 1:
            raise ValueError("max_batch_rows and max_queue must be >= 1")
        self.row_budget = RowBudget(max_batch_rows or 1)  # the worker sets the family's, before anything is served
        self._default_area = 1  # the family's default latent pixels (h x w), set with the budget
        self.max_queue = max_queue
        self.batching = batching
        self._on_batch = on_batch  # (requests, rows) per UNet call, for metrics
        self._on_row_limit = on_row_limit
        self._renderer: PreviewRenderer | None = None  # the live previews' (the worker's), made when first asked
        self._adapt_threads = adapt_threads
        self._lock = threading.Condition()
        self._queued: deque[_Entry] = deque()
        self._active: list[_Entry] = []
        self._cancelled: dict[str, RiseError] = {}  # key -> the error its future fails with
        self._closing = False
        self._unet_calls = self._rows_total = self._completed = 0  # guarded by _lock, copied by stats()
        self._batch_sizes: deque[int] = deque(maxlen=256)
        self._edge_s_ewma = 0.5  # seconds per request, for retry-after estimates
        self._call_s_ewma = 0.05  # seconds per UNet call, for retry-after estimates
        ready: Future[Family] = Future()

        def run() -> None:
            try:  # load here, on the thread that will run the model; the memory probe runs here too
                loaded = family if isinstance(family, Family) else family()
                self.row_budget = self._row_budget(loaded, max_batch_rows, memory_stats)
                self._default_area = loaded.default_latent_size ** 2
            except BaseException as exc:
                ready.set_exception(exc)
                return
            if on_row_limit is not None:
                on_row_limit(loaded.family_id, self.max_batch_rows, False)
            ready.set_result(loaded)
            self._run(loaded)

        self._thread = threading.Thread(target=run, name="rise-engine", daemon=True)
        self._thread.start()
        self.family: Family = ready.result()  # the loader's error, if any, raises here

    # ------------------------------------------------------------------ interface

    @property
    def max_batch_rows(self) -> int:
        """The rows a UNet call may take at the family's default size (the budget's: lowered after a call that ran
        out of memory)."""
        return self.row_budget.rows_for(self._default_area)

    @property
    def family_id(self) -> str:
        return self.family.family_id

    @property
    def default_size(self) -> int:
        return self.family.default_latent_size * self.family.vae_scale_factor

    def submit(self, request: EdgeRequest) -> Future[EdgeOutcome]:
        """Queue a request; its future resolves to an EdgeOutcome. Raises EngineBusy when full."""
        with self._lock:
            if self._closing:
                raise EngineClosed("the edge is shutting down")
            waiting = len(self._queued) + len(self._active)
            if waiting >= self.max_queue:
                raise EngineBusy(f"edge queue is full ({waiting} requests)", round(self._retry_after_s(waiting), 2))
            entry = _Entry(request, Future[EdgeOutcome](), time.perf_counter())
            self._queued.append(entry)
            self._lock.notify()
            return entry.future

    def cancel(self, key: str) -> None:
        """Drop a request wherever it is; its future fails with RequestCancelled."""
        with self._lock:
            self._cancelled[key] = RequestCancelled(f"request {key.split(':', 1)[-1]} was cancelled")
            self._lock.notify()

    def stats(self) -> EngineStats:
        """A snapshot (copied under the lock), safe to keep and read from any thread.

        An adaptive request counts the most steps it may still run (it may hand off earlier)."""
        with self._lock:
            running = tuple(max(e.job.stop_at - e.job.next_step, 0) if e.job is not None else e.request.plan.split
                            for e in self._active)
            return EngineStats(len(self._queued), len(self._active), self._unet_calls, self._rows_total,
                               self._completed, tuple(self._batch_sizes), running,
                               tuple(e.request.plan.split for e in self._queued))

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking work; finish what is queued and running (drain) or fail it; join the worker."""
        with self._lock:
            self._closing = True
            if not drain:
                for entry in [*self._queued, *self._active]:
                    self._cancelled[entry.request.key] = EngineClosed("the edge shut down before this request finished")
            self._lock.notify()
        self._thread.join(timeout)
        with self._lock:  # whatever is left after the timeout is failed, never left hanging
            for entry in [*self._queued, *self._active]:
                if not entry.future.done():
                    entry.future.set_exception(EngineClosed("the edge shut down before this request finished"))
            self._queued.clear()
            self._active.clear()

    # ------------------------------------------------------------------ worker

    def _run(self, family: Family) -> None:
        self.family = family  # the constructor set it too (from the same future); this is the worker's copy
        torch.set_grad_enabled(False)
        # Warns once if the CPU threads are starved; drops to one thread where the operator set none.
        self._efficiency = StepEfficiency(device=family.placement.device.type, adapt=self._adapt_threads)
        while True:
            with self._lock:
                self._drop_cancelled()
                while not self._queued and not self._active and not self._closing:
                    self._lock.wait()
                    self._drop_cancelled()
                if self._closing and not self._queued and not self._active:
                    return
                capacity = self.max_batch_rows if self.batching else 1
                to_admit: list[_Entry] = []
                while self._queued and len(self._active) + len(to_admit) < capacity:
                    to_admit.append(self._queued.popleft())
                self._active.extend(to_admit)
            self._admit(to_admit)
            self._advance()

    def _row_budget(self, family: Family, configured: int | None, stats: MemoryStats | None) -> RowBudget:
        """The budget for ``family`` on its device: on CUDA (or with ``stats``), trimmed to the measured memory."""
        device = family.placement.device
        ceiling = ceiling_rows(configured, device.type)
        if device.type != "cuda" and stats is None:
            return RowBudget(ceiling)
        torch.set_grad_enabled(False)
        size = family.default_latent_size
        job = prepare(family, "", RelayPlan(2, 1, family.default_sampler), 0)  # a guided request, default size

        def forward(requests: int) -> int:
            unet_noise(family.large_unet, [job] * requests)
            return job.unet_rows * requests

        try:
            memory = measure_row_memory(device, forward, lambda: decode_latents(family, job.latents), size * size,
                                        stats if stats is not None else torch.cuda)
        except NoRoomOnDevice as exc:
            raise NoRoomOnDevice(f"family {family.name} ({family.folder}) on {device}: {exc}") from exc
        budget = RowBudget(ceiling, memory)
        rows = budget.rows_for(size * size)
        where = f"{device}'s memory ({memory.describe()})"
        if configured is not None and rows < configured:
            log.warning("--max-batch-rows %d does not fit %s: at most %d rows per UNet call at %dx%d latents",
                        configured, where, rows, size, size)
        else:
            log.info("%d rows per UNet call at %dx%d latents (%s, %s)", rows, size, size,
                     "auto" if configured is None else f"--max-batch-rows {configured}", where)
        if rows < job.unet_rows:
            log.warning("%s holds less than one request's UNet rows: requests run one at a time, and one that "
                        "does not fit fails", where)
        return budget

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        for pool in (self._queued, self._active):
            for entry in [e for e in pool if e.request.key in self._cancelled]:
                pool.remove(entry)
                if not entry.future.done():
                    entry.future.set_exception(self._cancelled[entry.request.key])
        self._cancelled.clear()

    def _admit(self, entries: list[_Entry]) -> None:
        """Prepare the admitted requests: their prompts encoded in one text-encoder call, then each job.

        If the batched encode fails, every request is prepared on its own, so a bad one fails alone.
        """
        if not entries:
            return
        now = time.perf_counter()
        for entry in entries:
            entry.admitted = now
        conditionings: list[Conditioning | None] = [None] * len(entries)
        if len(entries) > 1:
            try:
                encoded = encode_prompts(self.family, [entry.request.prompt for entry in entries])
                conditionings = [encoded.row(i) for i in range(len(entries))]
            except Exception:  # e.g. one prompt the tokenizer rejects: each request alone below
                log.warning("batched text encoding failed; encoding the %d prompts one by one", len(entries))
        for entry, conditioning in zip(entries, conditionings, strict=True):
            r = entry.request
            try:
                entry.job = prepare(self.family, r.prompt, r.plan, r.seed, height=r.height, width=r.width,
                                    request_id=r.request_id, conditioning=conditioning)
            except Exception as exc:  # a bad request must fail alone, never the worker
                self._fail(entry, exc)

    def _advance(self) -> None:
        with self._lock:
            ready = [e for e in self._active if e.job is not None]
        jobs = [e.job for e in ready if e.job is not None]
        oldest = next((job for job in jobs if not job.done), None)
        limit = self.row_budget.rows_for(_area(oldest)) if oldest is not None else 1
        batch = pick_batch(jobs, limit if self.batching else 1)
        if batch:
            try:
                self._efficiency.before()
                call_started = time.perf_counter()
                try:
                    noise = unet_noise(self.family.large_unet, batch)
                except Exception as exc:
                    if is_out_of_memory(exc) and self._smaller_calls(batch, exc):
                        return  # no job has changed: the same requests go again, in smaller calls
                    raise
                take_step(batch, noise)
                call_s = time.perf_counter() - call_started
                self._efficiency.after()
            except Exception as exc:
                log.exception("UNet step failed")
                for entry in ready:
                    if entry.job in batch:
                        self._fail(entry, exc)
                return
            rows = sum(job.unet_rows for job in batch)
            with self._lock:
                self._unet_calls += 1
                self._rows_total += rows
                self._call_s_ewma = 0.8 * self._call_s_ewma + 0.2 * call_s
                self._batch_sizes.append(len(batch))
            if self._on_batch is not None:
                self._on_batch(len(batch), rows)
            for entry in ready:
                if entry.job in batch:
                    self._report_step(entry)
        for entry in ready:
            if entry.job is not None and entry.job.done and not entry.future.done():
                self._finish(entry)

    def _smaller_calls(self, batch: list[DenoiseJob], exc: BaseException) -> bool:
        """A UNet call ran out of memory: True once the budget is lowered for that size (the caller retries),
        else (one request alone) raise NoRoomOnDevice, which fails that request."""
        if self.family.placement.device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed call left cached goes back before the retry
        rows, area = sum(job.unet_rows for job in batch), _area(batch[0])
        h, w = batch[0].latents.shape[-2:]
        limit = self.row_budget.after_out_of_memory(area, rows, fewest=max(job.unet_rows for job in batch))
        if self._on_row_limit is not None:
            self._on_row_limit(self.family.family_id, self.max_batch_rows, True)
        if limit is None:
            raise NoRoomOnDevice(f"this request's UNet step ({rows} rows of {h}x{w} latents) does not fit "
                                 f"{self.family.placement.device}'s free memory: a smaller size would") from exc
        log.warning("a UNet call of %d rows of %dx%d latents ran out of memory on %s; calls of that size now take "
                    "at most %d rows (--max-batch-rows sets the ceiling)", rows, h, w,
                    self.family.placement.device, limit)
        return True

    def _report_step(self, entry: _Entry) -> None:
        """A step done: its live preview where one is due (x0 through the family's projection), else its progress.

        Rendering is a few multiply-adds a latent pixel, on this thread (the projection is fitted on the
        first preview); the PNG is the API layer's. A preview that fails is logged and the step reported
        as plain progress: a preview never fails its request.
        """
        r, job = entry.request, entry.job
        assert job is not None
        step, total = job.next_step, job.stop_at
        if r.on_preview is not None and job.x0 is not None and preview_due(step, total, r.preview_every):
            try:
                if self._renderer is None:
                    self._renderer = PreviewRenderer(self.family)
                rgb = self._renderer.render(job.x0)
            except Exception:
                log.exception("preview of request %s failed; it goes on without", r.request_id)
            else:
                r.on_preview(step, total, rgb)
                return
        if r.on_progress is not None:
            r.on_progress(step, total)

    def _retry_after_s(self, waiting: int) -> float:
        """When a queue slot should free (under the lock): the requests running finish in order of their
        remaining steps, each step a round of UNet calls over the running rows; the ``need``-th to
        finish frees the slot this request needs. Long requests in the batch make it long."""
        need = waiting - self.max_queue + 1
        remaining = sorted(max(e.job.stop_at - e.job.next_step, 1) if e.job is not None
                           else max(e.request.plan.split, 1) for e in self._active)
        rows = sum(e.job.unet_rows if e.job is not None else 2 for e in self._active)
        calls_per_round = max(1, -(-rows // self.max_batch_rows)) if self.batching else max(1, len(self._active))
        if not remaining:  # nothing running yet (all queued): one request's edge time per batch of them
            per_round = max(1, self.max_batch_rows // 2) if self.batching else 1
            return max(0.1, self._edge_s_ewma * need / per_round)
        steps = remaining[min(need, len(remaining)) - 1]
        if need > len(remaining):  # more than one batch must go: the later ones take a request's time each
            steps += (need - len(remaining)) * max(remaining)
        return max(0.1, steps * calls_per_round * self._call_s_ewma)

    def _finish(self, entry: _Entry) -> None:
        r, job = entry.request, entry.job
        assert job is not None
        handoff: bytes | None = None
        image: NDArray[np.uint8] | None = None
        try:
            if r.plan.decode_on == "edge":
                image = decode_latents(self.family, job.latents)[0]
            else:
                handoff = encode_handoff(job.to_handoff(self.family.family_id, r.plan, r.seed))
        except Exception as exc:
            self._fail(entry, exc)
            return
        edge_s = time.perf_counter() - entry.admitted
        with self._lock:
            self._active.remove(entry)
            self._completed += 1
            self._edge_s_ewma = 0.8 * self._edge_s_ewma + 0.2 * edge_s
        queue_s = entry.admitted - entry.submitted
        entry.future.set_result(EdgeOutcome("image" if image is not None else "handoff", queue_s, edge_s,
                                            handoff=handoff, image=image, edge_steps=job.next_step))

    def _fail(self, entry: _Entry, exc: BaseException) -> None:
        with self._lock:
            if entry in self._active:
                self._active.remove(entry)
        if not entry.future.done():
            entry.future.set_exception(exc)


def _area(job: DenoiseJob) -> int:
    """A job's latent pixels (h x w): what a UNet row's memory grows with."""
    h, w = job.latents.shape[-2:]
    return int(h) * int(w)
