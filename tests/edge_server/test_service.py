"""The request service without sockets: a fake engine completes futures on demand (no sleeps, no timing),
and one test runs the real BatchingEngine on the tiny family."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import pytest

from edge_server.config import SCHEDULER_CHOICES, EdgeConfig
from edge_server.engine import (
    EdgeOutcome,
    EdgeRequest,
    Engine,
    EngineBusy,
    EngineClosed,
    EngineStats,
    RequestCancelled,
)
from edge_server.family import Family
from edge_server.metrics import EdgeMetrics
from edge_server.service import RequestService, make_engine
from shared.errors import ConfigError
from shared.handoff import decode_handoff
from shared.planning import FixedPlanner, PlanContext
from shared.protocol import Generate, Report
from shared.relay_plan import RelayPlan


class FakeEngine:
    """An Engine whose futures complete only when the test says so."""

    family_id = "fake-family"
    default_size = 64

    def __init__(self, max_queue: int = 4) -> None:
        self.max_queue = max_queue
        self.pending: dict[str, tuple[EdgeRequest, Future[EdgeOutcome]]] = {}
        self.cancelled: list[str] = []
        self.completed = 0
        self.closed: tuple[bool, float] | None = None

    def submit(self, request: EdgeRequest) -> Future[EdgeOutcome]:
        if self.closed is not None:
            raise EngineClosed("closed")
        if len(self.pending) >= self.max_queue:
            raise EngineBusy(f"edge queue is full ({len(self.pending)} requests)", 1.5)
        future: Future[EdgeOutcome] = Future()
        self.pending[request.key] = (request, future)
        return future

    def cancel(self, key: str) -> None:
        self.cancelled.append(key)
        entry = self.pending.pop(key, None)
        if entry is not None:
            entry[1].set_exception(RequestCancelled(f"request {key} was cancelled"))

    def complete(self, key: str) -> EdgeRequest:
        request, future = self.pending.pop(key)
        if request.on_progress is not None:
            request.on_progress(request.plan.split, request.plan.split)
        self.completed += 1
        future.set_result(EdgeOutcome("handoff", 0.01, 0.02, handoff=b"fake handoff"))
        return request

    def fail(self, key: str, exc: BaseException) -> None:
        self.pending.pop(key)[1].set_exception(exc)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.pending), 0, self.completed, self.completed, self.completed)

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        self.closed = (drain, timeout)


class RecordingPlanner:
    """The fixed policy, recording what it was asked and told."""

    name = "recording"

    def __init__(self) -> None:
        self.inner = FixedPlanner(6, 0.5, "ddim", 5.0)
        self.contexts: list[PlanContext] = []
        self.feedback_calls: list[tuple[RelayPlan, Generate, Report]] = []
        self.saved = 0

    def choose(self, request: Generate, context: PlanContext) -> tuple[RelayPlan, str]:
        self.contexts.append(context)
        return self.inner.choose(request, context)

    def feedback(self, plan: RelayPlan, request: Generate, report: Report) -> None:
        self.feedback_calls.append((plan, request, report))

    def save(self) -> None:
        self.saved += 1


Made = tuple[RequestService, FakeEngine, RecordingPlanner]


def make_service(engine: FakeEngine | None = None, **config: Any) -> Made:
    fake = FakeEngine() if engine is None else engine
    planner = RecordingPlanner()
    return RequestService(fake, EdgeConfig(**config), planner=planner, metrics=EdgeMetrics()), fake, planner


def sample(service: RequestService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def report(rid: str, rating: int | None = None) -> Report:
    return Report(request_id=rid, device_compute_s=0.05, transfer_s=0.001, total_latency_s=0.4, rating=rating)


def test_fake_engine_implements_the_protocol() -> None:
    engine: Engine = FakeEngine()  # the static check; at run time, the calls below
    assert engine.stats().queued == 0 and engine.family_id == "fake-family"


def test_plan_is_the_planners_choice_over_engine_load_with_defaults_applied() -> None:
    service, engine, planner = make_service()
    other = service.open_session()
    service.submit(service.plan(other, Generate(request_id="o1", prompt="busy elsewhere")))
    session = service.open_session()

    ticket = service.plan(session, Generate(request_id="r1", prompt="a red sneaker", device_load=0.3, rtt_s=0.02),
                          device_step_s=0.04)
    assert ticket.plan == RelayPlan(6, 3, "ddim", 5.0) and ticket.why.startswith("fixed policy")
    assert ticket.scheduler == "recording"
    assert (ticket.height, ticket.width) == (64, 64)  # the engine's default size
    assert isinstance(ticket.seed, int) and 0 <= ticket.seed < 2**63
    assert ticket.key == session.key("r1") != other.key("r1")
    context = planner.contexts[-1]
    assert (context.queue_depth, context.device_load, context.rtt_s, context.device_step_s) == (1, 0.3, 0.02, 0.04)
    assert set(session.in_flight) == {"r1"}

    pinned = RelayPlan(4, 4, "euler", 3.0, decode_on="edge")
    explicit = service.plan(session, Generate(request_id="r2", prompt="p", seed=7, height=32, width=48, pinned=pinned))
    assert (explicit.plan, explicit.why, explicit.seed, explicit.height, explicit.width) == (
        pinned, "pinned by the client", 7, 32, 48)
    service.submit(explicit)
    request, _ = engine.pending[explicit.key]
    assert (request.request_id, request.prompt, request.plan, request.seed, request.height, request.width) == (
        "r2", "p", pinned, 7, 32, 48)


def test_delivered_request_is_counted_and_awaits_its_report() -> None:
    service, engine, _ = make_service()
    session = service.open_session()
    ticket = service.plan(session, Generate(request_id="r1", prompt="p"))
    progress: list[tuple[int, int]] = []
    future = service.submit(ticket, lambda step, total: progress.append((step, total)))
    assert not future.done()
    engine.complete(ticket.key)
    outcome = future.result(timeout=0)
    service.delivered(session, ticket, outcome)
    assert progress == [(3, 3)] and outcome.handoff == b"fake handoff"
    assert session.in_flight == {} and list(session.awaiting_report) == ["r1"]
    labels = {"steps": "6", "split": "3", "sampler": "ddim", "decode_on": "device"}
    assert sample(service, "rise_edge_requests_total", **labels) == 1.0
    assert sample(service, "rise_edge_stage_seconds_count", stage="edge") == 1.0
    assert sample(service, "rise_edge_stage_seconds_count", stage="edge_total") == 1.0


def test_busy_engine_yields_busy_with_retry_after() -> None:
    service, _, _ = make_service(FakeEngine(max_queue=1))
    session = service.open_session()
    service.submit(service.plan(session, Generate(request_id="r1", prompt="p")))
    ticket = service.plan(session, Generate(request_id="r2", prompt="p"))
    with pytest.raises(EngineBusy) as info:
        service.submit(ticket)
    failure = service.failed(session, "r2", info.value)
    assert failure.code == "busy" and failure.retry_after_s == 1.5 and "full" in failure.message
    assert "r2" not in session.in_flight
    assert sample(service, "rise_edge_errors_total", code="busy") == 1.0


def test_cancel_frees_the_slot() -> None:
    service, engine, _ = make_service(FakeEngine(max_queue=1))
    session = service.open_session()
    first = service.plan(session, Generate(request_id="r1", prompt="p"))
    future = service.submit(first)
    service.cancel(session, "r1")
    with pytest.raises(RequestCancelled) as info:
        future.result(timeout=0)
    assert service.failed(session, "r1", info.value).code == "cancelled"
    second = service.plan(session, Generate(request_id="r2", prompt="p"))
    service.submit(second)  # room again
    assert list(engine.pending) == [second.key]


def test_errors_map_to_protocol_codes_and_timeouts_cancel() -> None:
    service, engine, _ = make_service(request_timeout_s=12)
    session = service.open_session()
    assert service.failed(session, "a", ConfigError("height must be a multiple of 8")).code == "invalid_request"
    assert service.failed(session, "b", EngineClosed("the edge shut down")).code == "shutting_down"
    internal = service.failed(session, "c", ValueError("a bug"))
    assert internal.code == "internal" and "a bug" not in internal.message
    timeout = service.failed(session, "d", TimeoutError())
    assert timeout.code == "internal" and "12 s" in timeout.message
    assert engine.cancelled == [session.key("d")]
    assert service.refusal() is None
    service.draining = True
    refusal = service.refusal()
    assert refusal is not None and refusal.code == "shutting_down"
    assert sample(service, "rise_edge_errors_total", code="shutting_down") == 2.0


def test_report_reaches_the_planners_feedback_once() -> None:
    service, engine, planner = make_service()
    session = service.open_session()
    request = Generate(request_id="r1", prompt="p")
    ticket = service.plan(session, request)
    future = service.submit(ticket)
    engine.complete(ticket.key)
    service.delivered(session, ticket, future.result(timeout=0))

    first = report("r1", rating=1)
    assert service.report(session, first) is True
    assert planner.feedback_calls == [(ticket.plan, request, first)]
    assert service.report(session, report("r1")) is False  # a replayed report is counted, not learned from
    assert service.report(service.open_session(), report("r1")) is False  # nor another connection's
    service.rating(-1)
    assert len(planner.feedback_calls) == 1
    assert sample(service, "rise_edge_reports_total") == 3.0
    assert sample(service, "rise_edge_ratings_total", rating="1") == 1.0
    assert sample(service, "rise_edge_ratings_total", rating="-1") == 1.0


def test_closing_a_session_cancels_its_requests_and_close_closes_the_engine() -> None:
    service, engine, planner = make_service()
    session = service.open_session()
    ticket = service.plan(session, Generate(request_id="r1", prompt="p"))
    future = service.submit(ticket)
    assert sample(service, "rise_edge_connections") == 1.0
    service.close_session(session, ["r1", "r0"])
    assert sorted(engine.cancelled) == [session.key("r0"), session.key("r1")]
    assert isinstance(future.exception(timeout=0), RequestCancelled)
    assert sample(service, "rise_edge_connections") == 0.0
    service.close(drain=False, timeout=3.0)
    service.save()
    assert engine.closed == (False, 3.0) and service.draining and planner.saved == 1


def test_real_engine_on_the_tiny_family(tiny_family: Family) -> None:
    metrics = EdgeMetrics()
    config = EdgeConfig(max_queue=1)
    engine = make_engine(tiny_family, config, metrics=metrics)
    planner = RecordingPlanner()
    service = RequestService(engine, config, planner=planner, metrics=metrics)
    session = service.open_session()
    try:
        plan = RelayPlan(4, 2, "ddim", 5.0)
        ticket = service.plan(session, Generate(request_id="r1", prompt="a red bag", seed=3, pinned=plan))
        assert ticket.height == ticket.width == tiny_family.default_latent_size * tiny_family.vae_scale_factor
        outcome = service.submit(ticket).result(timeout=120)
        service.delivered(session, ticket, outcome)
        assert outcome.handoff is not None
        handoff = decode_handoff(outcome.handoff)
        assert (handoff.request_id, handoff.seed, handoff.split) == ("r1", 3, 2)
        snapshot = service.stats()
        assert (snapshot.queued, snapshot.active, snapshot.completed, snapshot.unet_calls) == (0, 0, 1, 2)
        assert snapshot.batch_sizes == (1, 1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            snapshot.completed = 5  # type: ignore[misc]

        # A long request holds the only slot: the next one is busy, until the long one is cancelled.
        long = service.plan(session, Generate(request_id="r2", prompt="p", pinned=RelayPlan(200, 200, "ddim", 5.0)))
        long_future = service.submit(long)
        blocked = service.plan(session, Generate(request_id="r3", prompt="p", pinned=plan))
        # the planner saw the long request's edge steps, waiting or running (the scheduler projects them)
        seen = planner.contexts[-1]
        assert seen.edge_queued is not None and seen.edge_running is not None
        assert (seen.edge_queued, seen.edge_running) == ((200,), ()) or (
            seen.edge_queued == () and len(seen.edge_running) == 1 and 0 < seen.edge_running[0] <= 200)
        with pytest.raises(EngineBusy) as info:
            service.submit(blocked)
        busy = service.failed(session, "r3", info.value)
        assert busy.code == "busy" and busy.retry_after_s is not None and busy.retry_after_s > 0
        service.cancel(session, "r2")
        with pytest.raises(RequestCancelled):
            long_future.result(timeout=60)
        again = service.plan(session, Generate(request_id="r4", prompt="p", pinned=plan))
        service.submit(again).result(timeout=120)

        assert service.stats().completed == 2 and service.stats().unet_calls > 2
        assert (snapshot.completed, snapshot.unet_calls, snapshot.batch_sizes) == (1, 2, (1, 1))  # unchanged
        assert service.report(session, report("r1")) and planner.feedback_calls[0][0] == plan
        assert metrics.registry.get_sample_value("rise_edge_batch_requests_count") == service.stats().unet_calls
    finally:
        service.close(drain=False, timeout=10.0)


def test_retry_after_follows_the_steps_the_batch_has_left(tiny_family: Family) -> None:
    """A full queue tells the client when a slot should free: after the running requests' remaining
    steps, so a long request in the batch gives a long retry-after (it was 0.1 s before, whatever
    ran). The running request is paused inside its first progress callback, so nothing moves."""
    import threading

    from edge_server.engine import BatchingEngine

    def retry_with(steps: int) -> tuple[float, float]:
        engine = BatchingEngine(tiny_family, max_batch_rows=2, max_queue=1)
        pause, paused = threading.Event(), threading.Event()

        def hold(step: int, total: int) -> None:
            paused.set()
            pause.wait(timeout=120)

        try:
            running = engine.submit(EdgeRequest("a", "a", "p", RelayPlan(steps, steps, "ddim", 5.0), 1,
                                                on_progress=hold))
            assert paused.wait(timeout=120)
            with pytest.raises(EngineBusy) as info:
                engine.submit(EdgeRequest("b", "b", "p", RelayPlan(4, 4, "ddim", 5.0), 2))
            return info.value.retry_after_s, engine._call_s_ewma  # frozen while the batch is paused
        finally:
            pause.set()
            running.result(timeout=120)
            engine.close(drain=False, timeout=30)

    for steps in (200, 4):
        retry, call_s = retry_with(steps)
        # steps - 1 left (one ran), one UNet call each (2 rows: the batch holds one guided request)
        assert retry == pytest.approx(max(0.1, (steps - 1) * call_s), abs=0.006)


# --------------------------------------------------------------------------- the request log line


def _request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    """The request lines logged, each parsed back into its key=value fields (edge_server.logs' format)."""
    import shlex

    from edge_server.logs import REQUEST_FIELDS, REQUEST_LOGGER

    lines = []
    for record in caplog.records:
        if record.name == REQUEST_LOGGER:
            word, *pairs = shlex.split(record.getMessage())
            assert word == "request"
            fields = dict(pair.split("=", 1) for pair in pairs)
            assert tuple(fields) == REQUEST_FIELDS  # every key, always, in the documented order
            lines.append(fields)
    return lines


def test_a_served_request_is_one_line_with_its_plan_times_and_the_devices_report(caplog) -> None:
    caplog.set_level("INFO", logger="rise.edge.requests")
    service, engine, _ = make_service()
    session = service.open_session("10.0.0.7")
    ticket = service.plan(session, Generate(request_id="r1", prompt="p"))
    future = service.submit(ticket)
    engine.complete(ticket.key)
    service.delivered(session, ticket, future.result(timeout=0))
    assert _request_lines(caplog) == []  # the device's times are still to come
    service.report(session, Report(request_id="r1", device_compute_s=0.25, transfer_s=0.125, total_latency_s=0.5))
    service.report(session, report("r1"))  # a replayed report is no second line
    [line] = _request_lines(caplog)
    assert line == {"id": "r1", "conn": str(session.id), "peer": "10.0.0.7", "outcome": "ok", "code": "-",
                    "steps": "6", "split": "3", "sampler": "ddim", "decode": "device", "scheduler": "recording",
                    "why": ticket.why, "queue_s": "0.010", "edge_s": "0.020", "device_s": "0.250",
                    "transfer_s": "0.125", "total_s": "0.500"}


def test_failed_cancelled_and_unreported_requests_get_their_one_line(caplog) -> None:
    caplog.set_level("INFO", logger="rise.edge.requests")
    service, engine, _ = make_service(FakeEngine(max_queue=2))
    session = service.open_session("127.0.0.1")
    busy = [service.plan(session, Generate(request_id=rid, prompt="p")) for rid in ("a", "b", "c")]
    service.submit(busy[0])
    service.submit(busy[1])
    with pytest.raises(EngineBusy) as info:
        service.submit(busy[2])
    service.failed(session, "c", info.value)
    future = engine.pending[busy[1].key][1]
    engine.complete(busy[1].key)
    service.delivered(session, busy[1], future.result(timeout=0))
    service.failed(session, "x", ConfigError("steps: expected an integer in [1, 100], got 0"))  # refused at planning
    service.close_session(session)  # "a" still in flight, "b" delivered without a report
    service.draining = True
    service.refusal(service.open_session("127.0.0.2"), "late")
    lines = {line["id"]: line for line in _request_lines(caplog)}
    assert set(lines) == {"a", "b", "c", "x", "late"}  # one line each
    assert (lines["c"]["outcome"], lines["c"]["code"], lines["c"]["steps"], lines["c"]["edge_s"]) == (
        "error", "busy", "6", "-")
    assert (lines["x"]["outcome"], lines["x"]["code"], lines["x"]["steps"]) == ("error", "invalid_request", "-")
    assert (lines["a"]["outcome"], lines["a"]["code"]) == ("error", "cancelled")
    assert (lines["b"]["outcome"], lines["b"]["code"], lines["b"]["edge_s"], lines["b"]["device_s"]) == (
        "unreported", "-", "0.020", "-")
    assert (lines["late"]["outcome"], lines["late"]["code"], lines["late"]["peer"]) == (
        "error", "shutting_down", "127.0.0.2")


def test_a_pinned_plan_is_reported_as_pinned_not_as_the_policys_choice() -> None:
    service, _, _ = make_service()
    session = service.open_session()
    chosen = service.plan(session, Generate(request_id="r1", prompt="p"))
    pinned = service.plan(session, Generate(request_id="r2", prompt="p", pinned=RelayPlan(4, 2, "ddim", 5.0)))
    assert chosen.scheduler == "recording"
    assert (pinned.scheduler, pinned.why) == ("pinned", "pinned by the client")


def test_an_unknown_scheduler_lists_the_choices_and_does_not_ask_for_a_profile() -> None:
    from edge_server.service import make_planner

    with pytest.raises(ConfigError) as info:
        make_planner(EdgeConfig(scheduler="foo"))
    message = str(info.value)
    assert "needs --profile" not in message and "'foo'" in message
    assert f"one of {', '.join(SCHEDULER_CHOICES)} or an arm such as N20k10" in message
    with pytest.raises(ConfigError, match="--scheduler linucb needs --profile"):  # a known name still needs one
        make_planner(EdgeConfig(scheduler="linucb"))


@pytest.mark.parametrize("name", [*(n for n in SCHEDULER_CHOICES if n not in ("auto", "fixed")), "N20k8"])
def test_every_scheduler_named_in_help_is_one_the_planner_builds(name: str, tmp_path) -> None:
    from edge_server.service import make_planner
    from shared.bandit.profile import save_profile
    from tests.helpers import synthetic_profile

    profile = tmp_path / "profile.json"
    save_profile(profile, synthetic_profile())
    planner = make_planner(EdgeConfig(scheduler=name, profile=str(profile)))
    assert planner.name  # built, not refused


def test_the_speculative_ratio_reaches_the_planner_from_the_flag(tmp_path) -> None:
    from edge_server.config import config_from_args
    from edge_server.daemon import build_parser
    from edge_server.service import make_planner
    from shared.bandit.planner import BanditPlanner
    from shared.bandit.profile import save_profile
    from tests.helpers import synthetic_profile

    profile = tmp_path / "profile.json"
    save_profile(profile, synthetic_profile())
    args = ["serve", "--family", "f", "--profile", str(profile), "--scheduler", "linucb"]
    config = config_from_args(build_parser().parse_args([*args, "--speculative-ratio", "0.25"]))
    planner, default = make_planner(config), make_planner(config_from_args(build_parser().parse_args(args)))
    assert isinstance(planner, BanditPlanner) and isinstance(default, BanditPlanner)
    assert planner.speculative_ratio == 0.25 and default.speculative_ratio is None
    with pytest.raises(ConfigError, match="--speculative-ratio"):
        config_from_args(build_parser().parse_args([*args, "--speculative-ratio", "0"]))


# --------------------------------------------------------------------------- how the family reads the prompt


def _demo_reader(text: str, seed: int):
    from shared.demo_grammar.understanding import GRAMMAR_NAME, read_prompt_as

    return read_prompt_as(GRAMMAR_NAME, text, seed)


def test_a_prompt_read_in_part_is_drawn_as_read_and_the_plan_says_how() -> None:
    engine = FakeEngine()
    service = RequestService(engine, EdgeConfig(), planner=RecordingPlanner(), metrics=EdgeMetrics(),
                             read_prompt=_demo_reader)
    session = service.open_session()
    ticket = service.plan(session, Generate(request_id="r1", prompt="a green bag", seed=3))
    expected = _demo_reader("a green bag", 3)
    assert expected is not None and expected.prompt != "a green bag"
    assert (ticket.prompt, ticket.notice) == (expected.prompt, expected.message)
    assert ticket.notice  # it says how it was read (the family's words)
    service.submit(ticket)
    assert engine.pending[ticket.key][0].prompt == expected.prompt  # the family is given what it can draw
    exact = service.plan(session, Generate(request_id="r2", prompt="a red bag in the top left", seed=3))
    assert (exact.prompt, exact.notice) == (None, None)  # read as typed: nothing to say
    service.submit(exact)
    assert engine.pending[exact.key][0].prompt == "a red bag in the top left"


def test_a_prompt_the_family_understands_nothing_of_is_refused_not_drawn_blank(caplog) -> None:
    from edge_server.service import RequestFailed

    caplog.set_level("INFO", logger="rise.edge.requests")
    engine = FakeEngine()
    service = RequestService(engine, EdgeConfig(), planner=RecordingPlanner(), metrics=EdgeMetrics(),
                             read_prompt=_demo_reader)
    session = service.open_session()
    with pytest.raises(RequestFailed) as info:
        service.plan(session, Generate(request_id="r1", prompt="a cat on a sofa", seed=1))
    failure = service.failed(session, "r1", info.value)
    reading = _demo_reader("a cat on a sofa", 1)
    assert reading is not None and reading.scene is None and reading.message
    assert (failure.code, failure.message) == ("invalid_request", reading.message)  # the family's own explanation
    assert '"cat"' in failure.message  # it names what it did not understand
    assert engine.pending == {}  # nothing reached the engine
    assert [line["code"] for line in _request_lines(caplog)] == ["invalid_request"]
