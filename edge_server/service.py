"""The request service: everything between the wire protocol and the engine, without sockets.

Given a :class:`~shared.protocol.Generate` and the connection it came on (a :class:`Session`),
the service plans it (a :class:`~shared.planning.Planner` over the engine's live load), fills in
the defaults (seed, image size), submits it to the :class:`~edge_server.engine.Engine`, and keeps
the per-request bookkeeping: what is in flight, which delivered plans await the device's report,
the planner's feedback when that report arrives, ratings, the Prometheus metrics and one log line per
request once its record is complete (``rise.edge.requests``, format in :mod:`edge_server.logs`). The asyncio
daemon (``edge_server.daemon``) only moves frames: websocket <-> protocol events <-> these calls.
Every call here is synchronous and runs on the caller's thread (the daemon's event loop), so
tests drive it with a fake engine and no sockets, sleeps or event loop.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from edge_server.config import FAMILY_PROFILE as FAMILY_PROFILE  # re-exported: where it was defined before
from edge_server.config import EdgeConfig, check_scheduler, profile_missing
from edge_server.engine import (
    BatchingEngine,
    EdgeOutcome,
    EdgeRequest,
    Engine,
    EngineBusy,
    EngineClosed,
    EngineStats,
    PreviewCallback,
    ProgressCallback,
    RequestCancelled,
)
from edge_server.family import Family, FamilyInfo
from edge_server.family_pool import FamilySpec, FamilyUnavailable
from edge_server.logs import REQUEST_LOGGER, request_line
from edge_server.metrics import EdgeMetrics
from edge_server.row_budget import planned_rows
from shared.demo_grammar.understanding import PromptReading, read_prompt_as
from shared.errors import RiseError
from shared.planning import FixedPlanner, PlanContext, Planner
from shared.protocol import MAX_SECONDS, Generate, ProtocolLimits, Rating, Report
from shared.relay_plan import RelayPlan

log = logging.getLogger("rise.edge")
request_log = logging.getLogger(REQUEST_LOGGER)

#: The ``scheduler`` a plan frame names when the client pinned the configuration (no policy chose it).
PINNED = "pinned"
#: How a family reads a prompt for a seed (``Family.read_prompt``); None: free text, encoded as typed.
PromptReader = Callable[[str, int], PromptReading | None]
MAX_NOTICE_CHARS = 512  # what a plan frame's notice may carry ...
MAX_ERROR_CHARS = 1024  # ... and an error frame's message

#: Delivered requests remembered per connection for their report; devices that never report are forgotten.
MAX_AWAITING_REPORT = 256
#: What a report may claim is bounded by what the edge saw itself (see :meth:`RequestService.report`):
#: a total latency between the edge's own time for the request and the time from planning to the
#: report's arrival, plus this slack and two round trips (the request's way in, the report's way back).
REPORT_SLACK_S = 1.0
MAX_SLACK_RTT_S = 2.0
#: Each connection may teach the scheduler this many reports in a burst, refilled at LEARN_PER_S;
#: a report of a pinned plan (the client chose the arm) costs PINNED_LEARN_COST of them.
LEARN_BURST = 20.0
LEARN_PER_S = 0.5
PINNED_LEARN_COST = 4.0
MAX_RATED = 1024  # request ids per connection whose rating was counted (repeats count once)


def _loading_s(cold_start_s: float) -> float | None:
    """The plan frame's ``loading_s``: the family's load still ahead, to a tenth of a second (None: loaded)."""
    seconds = round(min(max(cold_start_s, 0.0), MAX_SECONDS), 1)  # the most a plan frame's loading_s says
    return seconds if seconds > 0 else None


def make_planner(config: EdgeConfig, *, default_sampler: str = "dpmpp_2m",
                 family_profile: str | Path | None = None) -> Planner:
    """The scheduler the config names: the fixed policy, or a bandit/baseline over a measured profile.

    ``default_sampler`` stands in for a config that names none (the family's own, once it is loaded).
    ``family_profile`` is the profile the loaded family ships, used when the config names none;
    ``auto`` (the default) is LinUCB when there is a profile, else the fixed policy.
    """
    sampler = config.sampler or default_sampler
    profile = config.profile or (str(family_profile) if family_profile is not None else None)
    scheduler = check_scheduler("--scheduler", config.scheduler)  # a name in --help's list, before "needs"
    if scheduler == "auto":
        scheduler = "linucb" if profile is not None else "fixed"
    if scheduler == "fixed":
        return FixedPlanner(config.steps, config.split_fraction, sampler, config.guidance)
    if profile is None:
        raise profile_missing(config.scheduler)
    from shared.bandit.planner import BanditPlanner
    from shared.bandit.profile import load_profile

    return BanditPlanner.from_profile(
        load_profile(profile), scheduler, config.bandit_state,
        sampler=sampler, guidance_scale=config.guidance,
        edge_capacity=max(1, planned_rows(config.max_batch_rows) // 2), alpha=config.alpha,
        speculative_ratio=config.speculative_ratio,
    )


def family_planner(config: EdgeConfig, info: FamilyInfo, spec: FamilySpec, *, several: bool) -> Planner:
    """One family's scheduler on an edge that may serve several: its own profile and its own learned state.

    The profile is the spec's, else ``--profile`` when the edge serves this family alone, else the one its folder
    ships. With ``several`` families, ``--bandit-state S.json`` persists each family's state to ``S.<name>.json``.
    """
    shipped = Path(info.folder) / FAMILY_PROFILE
    profile = spec.profile or (None if several else config.profile)
    state = config.bandit_state
    if several and state is not None:
        path = Path(state)
        state = str(path.with_name(f"{path.stem}.{spec.name}{path.suffix or '.json'}"))
    family_config = dataclasses.replace(config, profile=profile, bandit_state=state)
    if config.sampler is not None and config.sampler not in info.samplers:
        raise RiseError(f"--sampler {config.sampler}: family {spec.name} ({info.pipeline_class}) runs "
                        f"{', '.join(info.samplers)}")
    return make_planner(family_config, default_sampler=info.default_sampler,
                        family_profile=shipped if shipped.is_file() else None)


def family_planners(config: EdgeConfig, described: dict[str, tuple[FamilySpec, FamilyInfo]]) -> dict[str, Planner]:
    """Each family's scheduler (:func:`family_planner`) by family id, each named in the log."""
    planners: dict[str, Planner] = {}
    for fid, (spec, info) in described.items():
        planners[fid] = family_planner(config, info, spec, several=len(described) > 1)
        log.info("scheduler for family %s: %s", spec.name, planners[fid].name)
    return planners


def family_prompt_reader(info: FamilyInfo) -> PromptReader | None:
    """How the family reads a prompt (its grammar's reader), without holding the family: it may be evicted."""
    grammar = info.prompt_grammar
    if grammar is None:
        return None
    max_words = info.text_max_length - 2

    def read(text: str, seed: int) -> PromptReading | None:
        return read_prompt_as(grammar, text, seed, max_words=max_words)

    return read


def make_engine(family: Family | Callable[[], Family], config: EdgeConfig, *,
                metrics: EdgeMetrics | None = None) -> BatchingEngine:
    """The default engine for a config, reporting its batches and rows per call to ``metrics``. ``family`` may be
    a loader: the engine's own thread then loads it."""
    return BatchingEngine(family, max_batch_rows=config.max_batch_rows, max_queue=config.max_queue,
                          batching=config.batching, adapt_threads=config.threads is None,
                          on_batch=None if metrics is None else metrics.observe_batch,
                          on_row_limit=None if metrics is None else metrics.observe_row_limit)


class RequestFailed(RiseError):
    """A request ends with a protocol ``error``: ``code`` (``busy``, ``cancelled``...) and the message."""

    def __init__(self, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Ticket:
    """A planned request: what the ``plan`` frame announces and the engine is asked to run."""

    key: str  # the engine's key: unique across connections
    request: Generate
    plan: RelayPlan
    why: str
    scheduler: str
    seed: int
    height: int
    width: int
    started: float  # perf_counter when planning began (the edge_total stage)
    prompt: str | None = None  # what the family is given, when its reading differs from what was typed
    notice: str | None = None  # one line for the user on how the prompt was read (the plan frame's notice)
    loading_s: float | None = None  # the family's load the request waits for first (the plan frame's; None: loaded)

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class Delivered:
    """A request whose outcome went out: when (perf_counter) and the engine's times, until its report."""

    ticket: Ticket
    at: float
    queue_s: float
    edge_s: float
    edge_steps: int | None = None  # where the handoff happened (an adaptive plan's may be before its split)


@dataclass
class Session:
    """One connection's bookkeeping: its requests in flight and the delivered ones awaiting a report."""

    id: int
    peer: str | None = None  # the peer's address, for the log
    in_flight: dict[str, Ticket] = field(default_factory=dict)  # planned, not yet ended
    awaiting_report: OrderedDict[str, Delivered] = field(default_factory=OrderedDict)  # oldest first
    learn_tokens: float = LEARN_BURST  # what this connection may still teach the scheduler (token bucket)
    learn_refilled: float | None = None  # when the bucket was last refilled (None: never used)
    rated: OrderedDict[str, None] = field(default_factory=OrderedDict)  # requests whose rating was counted

    def key(self, request_id: str) -> str:
        return f"{self.id}:{request_id}"


class RequestService:
    """Plans, submits and accounts for requests on one :class:`~edge_server.engine.Engine`.

    The service owns the engine it is given (``close`` closes it) and the planner (``save``
    persists it). ``draining`` refuses new requests with ``shutting_down``.
    """

    def __init__(self, engine: Engine, config: EdgeConfig, *, planner: Planner | None = None,
                 metrics: EdgeMetrics | None = None, clock: Callable[[], float] = time.perf_counter,
                 read_prompt: PromptReader | None = None) -> None:
        self.engine = engine
        self._read_prompt = read_prompt  # the family's reader (the demo family's grammar); None: free text
        self._clock = clock  # perf_counter-like: the report bounds and learning budgets use it
        self.config = config
        self.metrics = metrics or EdgeMetrics()
        self.planner: Planner = planner or make_planner(config)
        self.limits = ProtocolLimits.from_dict({"allowed_sizes": (), **config.limits})
        self.draining = False
        self._sessions = 0
        # Read at scrape time: set only after a UNet call, they would go stale once the edge is idle.
        self.metrics.queue_depth.set_function(lambda: self.engine.stats().queued)
        self.metrics.active.set_function(lambda: self.engine.stats().active)

    @property
    def family_id(self) -> str:
        return self.engine.family_id

    @property
    def default_size(self) -> int:
        return self.engine.default_size

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ------------------------------------------------------------------ connections

    def open_session(self, peer: str | None = None) -> Session:
        """A new connection (``peer``: its address, named in the request lines)."""
        self._sessions += 1
        self.metrics.connections.inc()
        return Session(self._sessions, peer)

    def close_session(self, session: Session, request_ids: Iterable[str] = ()) -> None:
        """The connection is gone: drop its requests in the engine (``request_ids``: those the protocol had).

        Its requests still in flight end as ``cancelled``, its delivered ones as ``unreported`` (logged)."""
        for request_id in {*session.in_flight, *request_ids}:
            self.engine.cancel(session.key(request_id))
        for ticket in session.in_flight.values():
            self._log(session, ticket.request_id, ticket, code="cancelled")
        for delivered in session.awaiting_report.values():
            self._log_delivered(session, delivered, None)
        session.in_flight.clear()
        session.awaiting_report.clear()
        self.metrics.connections.dec()

    # ------------------------------------------------------------------ one request

    def refusal(self, session: Session | None = None, request_id: str | None = None) -> RequestFailed | None:
        """The error a new request gets right away (the edge is draining), counted (and logged when the
        session and request are given); ``None`` = accept it."""
        if not self.draining:
            return None
        self.metrics.errors.labels("shutting_down").inc()
        if session is not None and request_id is not None:
            self._log(session, request_id, None, code="shutting_down")
        return RequestFailed("shutting_down", "the edge server is shutting down")

    def plan(self, session: Session, request: Generate, *, device_step_s: float | None = None,
             relay_modes: bool = True) -> Ticket:
        """Choose the configuration over the engine's current load and fill in seed and size.

        ``device_step_s`` is the device's small-model step time from its hello; ``relay_modes`` False
        for a device whose protocol version has no adaptive or speculative relay. A request the
        planner cannot serve as asked raises (see :meth:`failed` for the error it becomes), and so
        does a prompt the family understands nothing of (``invalid_request``, saying what it can draw:
        never a silent blank picture). What it understood in part is drawn, the ticket's ``notice``
        saying how it was read.
        """
        started = self._clock()
        seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
        reading = self._read_prompt(request.prompt, seed) if self._read_prompt is not None else None
        if reading is not None and reading.scene is None:
            why_not = reading.message or "the prompt names nothing this family draws"
            raise RequestFailed("invalid_request", why_not[:MAX_ERROR_CHARS])
        notice = reading.message if reading is not None else None
        if notice is not None and len(notice) > MAX_NOTICE_CHARS:
            notice = notice[: MAX_NOTICE_CHARS - 3] + "..."
        stats = self.engine.stats()
        context = PlanContext(stats.queued, stats.active, request.device_load, request.rtt_s, request.bandwidth_bps,
                              device_step_s, stats.running_steps, stats.queued_steps, stats.cold_start_s,
                              relay_modes)
        plan, why = self.planner.choose(request, context)
        ticket = Ticket(
            key=session.key(request.request_id), request=request, plan=plan, why=why,
            scheduler=PINNED if request.pinned is not None else self.planner.name, seed=seed,
            height=request.height or self.default_size, width=request.width or self.default_size, started=started,
            prompt=reading.prompt if reading is not None and reading.prompt != request.prompt else None,
            notice=notice, loading_s=_loading_s(stats.cold_start_s),
        )
        session.in_flight[request.request_id] = ticket
        return ticket

    def submit(self, ticket: Ticket, on_progress: ProgressCallback | None = None,
               on_preview: PreviewCallback | None = None) -> Future[EdgeOutcome]:
        """Hand the planned request to the engine. Raises EngineBusy / EngineClosed (see :meth:`failed`).

        ``on_progress(step, split)`` is called on the engine's thread; ``on_preview(step, split, rgb)``
        instead of it on the steps the request asked a live preview for (``Generate.preview_every``).
        """
        prompt = ticket.prompt if ticket.prompt is not None else ticket.request.prompt
        every = ticket.request.preview_every
        return self.engine.submit(EdgeRequest(ticket.key, ticket.request_id, prompt, ticket.plan,
                                              ticket.seed, ticket.height, ticket.width, on_progress,
                                              preview_every=every, on_preview=on_preview if every else None))

    def delivered(self, session: Session, ticket: Ticket, outcome: EdgeOutcome) -> None:
        """The outcome went out: the request now awaits its report; its stages go to the metrics."""
        session.in_flight.pop(ticket.request_id, None)
        session.awaiting_report[ticket.request_id] = Delivered(ticket, self._clock(), outcome.queue_s,
                                                               outcome.edge_compute_s, outcome.edge_steps)
        while len(session.awaiting_report) > MAX_AWAITING_REPORT:
            self._log_delivered(session, session.awaiting_report.popitem(last=False)[1], None)
        plan = ticket.plan
        self.metrics.requests.labels(plan.num_inference_steps, plan.split, plan.sampler, plan.decode_on).inc()
        self.metrics.stage_seconds.labels("queue").observe(outcome.queue_s)
        self.metrics.stage_seconds.labels("edge").observe(outcome.edge_compute_s)
        self.metrics.stage_seconds.labels("edge_total").observe(time.perf_counter() - ticket.started)

    def failed(self, session: Session, request_id: str, exc: BaseException) -> RequestFailed:
        """The request ended with ``exc``: the protocol error to send (counted). A timeout also cancels it."""
        ticket = session.in_flight.pop(request_id, None)
        failure = self._as_failure(session, request_id, exc)
        self.metrics.errors.labels(failure.code).inc()
        self._log(session, request_id, ticket, code=failure.code)
        return failure

    def _as_failure(self, session: Session, request_id: str, exc: BaseException) -> RequestFailed:
        if isinstance(exc, RequestFailed):
            return exc
        if isinstance(exc, EngineBusy):
            return RequestFailed("busy", str(exc), retry_after_s=exc.retry_after_s)
        if isinstance(exc, FamilyUnavailable):  # the memory budget is held by busy families, or its load failed
            if exc.retry_after_s is not None:
                return RequestFailed("busy", str(exc), retry_after_s=exc.retry_after_s)
            return RequestFailed("internal", str(exc))
        if isinstance(exc, EngineClosed):
            return RequestFailed("shutting_down", str(exc))
        if isinstance(exc, RequestCancelled):
            return RequestFailed("cancelled", str(exc))
        if isinstance(exc, TimeoutError):
            self.engine.cancel(session.key(request_id))
            return RequestFailed("internal", f"the edge did not finish within {self.config.request_timeout_s:.0f} s")
        if isinstance(exc, RiseError):  # a request the edge cannot serve as asked (size, steps, config)
            return RequestFailed("invalid_request", str(exc))
        log.error("request %s failed", request_id, exc_info=exc)
        return RequestFailed("internal", "internal error on the edge (logged)")

    def cancel(self, session: Session, request_id: str) -> None:
        """Drop a request in the engine (the client asked, or its task was cancelled); its future fails."""
        self.engine.cancel(session.key(request_id))

    # ------------------------------------------------------------------ what the device tells us

    def report(self, session: Session, report: Report) -> bool:
        """Count a device's report; if its request awaits one, the planner learns from it. True if it did.

        A report cannot steer the scheduler (SECURITY.md): its ``total_latency_s`` is clipped to what
        the edge observed, at least the edge's own time for the request (planning to the outcome
        going out) and at most planning to this report's arrival plus ``REPORT_SLACK_S`` and two
        round trips; each connection teaches at most ``LEARN_BURST`` reports at once, refilled at
        ``LEARN_PER_S`` (a pinned plan's report costs ``PINNED_LEARN_COST``); beyond, reports are
        counted and not learned from. A rating counts once per request.
        """
        self.metrics.reports.inc()
        self._count_rating(session, report.request_id, report.rating)
        for stage, value in (("device", report.device_compute_s), ("transfer", report.transfer_s),
                             ("total", report.total_latency_s)):
            self.metrics.stage_seconds.labels(stage).observe(value)
        entry = session.awaiting_report.pop(report.request_id, None)
        if entry is None:
            return False
        self._log_delivered(session, entry, report)
        ticket, delivered_at = entry.ticket, entry.at
        now = self._clock()
        rtt = min(max(report.rtt_s or 0.0, 0.0), MAX_SLACK_RTT_S)
        lowest, highest = delivered_at - ticket.started, now - ticket.started + REPORT_SLACK_S + 2 * rtt
        bounded = min(max(report.total_latency_s, lowest), highest)
        if bounded != report.total_latency_s:
            self.metrics.errors.labels("report_clipped").inc()
            log.info("report %s claimed %.3f s; the edge saw %.3f to %.3f s: learned as %.3f s", report.request_id,
                     report.total_latency_s, lowest, highest, bounded)
            report = dataclasses.replace(report, total_latency_s=bounded)
        cost = PINNED_LEARN_COST if ticket.request.pinned is not None else 1.0
        if not self._spend_learning(session, cost, now):
            self.metrics.errors.labels("report_not_learned").inc()
            return False
        self.planner.feedback(ticket.plan, ticket.request, report)
        return True

    def rating(self, rating: int | Rating, session: Session | None = None) -> None:
        """A rating after the report: counted once per request (with its session), not learned from: the
        scheduler's update for that request already happened with the report (ratings inside a report
        do feed it)."""
        if isinstance(rating, Rating):
            if session is not None:
                self._count_rating(session, rating.request_id, rating.rating)
                return
            rating = rating.rating
        self.metrics.ratings.labels(str(rating)).inc()

    def _count_rating(self, session: Session, request_id: str, rating: int | None) -> None:
        if rating is None or request_id in session.rated:
            return
        session.rated[request_id] = None
        while len(session.rated) > MAX_RATED:
            session.rated.popitem(last=False)
        self.metrics.ratings.labels(str(rating)).inc()

    def _spend_learning(self, session: Session, cost: float, now: float) -> bool:
        if session.learn_refilled is not None:
            session.learn_tokens = min(LEARN_BURST, session.learn_tokens + (now - session.learn_refilled) * LEARN_PER_S)
        session.learn_refilled = now
        if session.learn_tokens < cost:
            return False
        session.learn_tokens -= cost
        return True

    # ------------------------------------------------------------------ the request log

    def _log_delivered(self, session: Session, delivered: Delivered, report: Report | None) -> None:
        self._log(session, delivered.ticket.request_id, delivered.ticket, queue_s=delivered.queue_s,
                  edge_s=delivered.edge_s, report=report, edge_steps=delivered.edge_steps)

    def _log(self, session: Session, request_id: str, ticket: Ticket | None, *, code: str | None = None,
             queue_s: float | None = None, edge_s: float | None = None, report: Report | None = None,
             edge_steps: int | None = None) -> None:
        """The request's one line (edge_server.logs): written once its record is complete.

        ``split`` is where the handoff happened when the engine said (an adaptive plan's), else the plan's.
        """
        if not request_log.isEnabledFor(logging.INFO):
            return
        plan = ticket.plan if ticket is not None else None
        outcome = "error" if code is not None else "ok" if report is not None else "unreported"
        request_log.info("%s", request_line(
            id=request_id, conn=session.id, peer=session.peer, outcome=outcome, code=code,
            steps=plan.num_inference_steps if plan else None,
            split=edge_steps if edge_steps is not None else plan.split if plan else None,
            sampler=plan.sampler if plan else None, decode=plan.decode_on if plan else None,
            scheduler=ticket.scheduler if ticket else None, why=ticket.why if ticket else None,
            queue_s=queue_s, edge_s=edge_s, device_s=report.device_compute_s if report else None,
            transfer_s=report.transfer_s if report else None, total_s=report.total_latency_s if report else None))

    def rejected(self, code: str) -> None:
        """The protocol refused a frame and queued an error with ``code``: count it."""
        self.metrics.errors.labels(code).inc()

    # ------------------------------------------------------------------ lifecycle

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests and close the engine (finishing or failing what it holds)."""
        self.draining = True
        self.engine.close(drain=drain, timeout=timeout)

    def save(self) -> None:
        """Persist the planner's learned state (atomic; a no-op for the fixed policy)."""
        self.planner.save()
