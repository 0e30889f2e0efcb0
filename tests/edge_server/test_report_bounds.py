"""A report cannot steer the scheduler (issue 20): what it claims is bounded by what the edge saw,
one connection teaches a bounded number of reports, ratings count once, and the poisoning attack of
the security review (pin every arm, report a day's latency for all but one) leaves the plans alone.

Without sockets: the service with a fake engine (tests/edge_server/test_service.py) and an injected
clock, so no test waits on time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_server import service as service_module
from edge_server.config import EdgeConfig
from edge_server.metrics import EdgeMetrics
from edge_server.service import LEARN_BURST, LEARN_PER_S, PINNED_LEARN_COST, RequestService
from shared.bandit import load_profile
from shared.bandit import planner as planner_module
from shared.bandit.planner import BanditPlanner
from shared.protocol import Generate, Rating, Report
from shared.relay_plan import RelayPlan
from tests.edge_server.test_service import FakeEngine, RecordingPlanner, sample

DEMO_PROFILE = Path(__file__).resolve().parents[2] / "models" / "demo" / "family" / "profile.json"


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def served(planner: Any = None, **config: Any) -> tuple[RequestService, FakeEngine, Any, Clock]:
    clock = Clock()
    engine = FakeEngine(max_queue=64)
    planner = planner or RecordingPlanner()
    return RequestService(engine, EdgeConfig(**config), planner=planner, metrics=EdgeMetrics(), clock=clock), \
        engine, planner, clock


def deliver(service: RequestService, engine: FakeEngine, session: Any, rid: str, clock: Clock, *,
            edge_s: float = 1.0, pinned: RelayPlan | None = None, preference: float = 0.5) -> None:
    ticket = service.plan(session, Generate(request_id=rid, prompt="a red sneaker", pinned=pinned,
                                            preference=preference))
    future = service.submit(ticket)
    clock.t += edge_s
    engine.complete(ticket.key)
    service.delivered(session, ticket, future.result(timeout=0))


def claim(rid: str, total: float, **kw: Any) -> Report:
    return Report(request_id=rid, device_compute_s=0.05, transfer_s=0.01, total_latency_s=total, **kw)


def test_a_report_claims_no_more_than_the_edge_saw_and_no_less():
    service, engine, planner, clock = served()
    session = service.open_session()
    deliver(service, engine, session, "r1", clock, edge_s=1.0)
    clock.t += 2.0  # the report comes 3 s after planning began
    assert service.report(session, claim("r1", 86400.0, rtt_s=0.05))
    learned = planner.feedback_calls[-1][2].total_latency_s
    assert learned == pytest.approx(3.0 + service_module.REPORT_SLACK_S + 2 * 0.05)
    deliver(service, engine, session, "r2", clock, edge_s=1.0)
    assert service.report(session, claim("r2", 0.001))  # faster than the edge's own second: impossible
    assert planner.feedback_calls[-1][2].total_latency_s == pytest.approx(1.0)
    deliver(service, engine, session, "r3", clock, edge_s=0.5)
    clock.t += 1.0
    assert service.report(session, claim("r3", 1.2))  # honest: learned as it is
    assert planner.feedback_calls[-1][2].total_latency_s == 1.2
    assert sample(service, "rise_edge_errors_total", code="report_clipped") == 2.0


def test_one_connection_teaches_a_bounded_number_of_reports():
    service, engine, planner, clock = served()
    session, other = service.open_session(), service.open_session()
    learned = 0
    for i in range(int(LEARN_BURST) + 10):
        deliver(service, engine, session, f"r{i}", clock, edge_s=0.0)
        learned += service.report(session, claim(f"r{i}", 0.5))
    assert learned == int(LEARN_BURST)
    assert sample(service, "rise_edge_errors_total", code="report_not_learned") == 10.0
    deliver(service, engine, other, "o1", clock, edge_s=0.0)
    assert service.report(other, claim("o1", 0.5))  # another connection has its own budget
    clock.t += 10.0 / LEARN_PER_S  # ten reports' worth of time
    results = []
    for i in range(12):
        deliver(service, engine, session, f"s{i}", clock, edge_s=0.0)
        results.append(service.report(session, claim(f"s{i}", 0.5)))
    assert sum(results) == 10
    # a pinned plan (the client chose the arm) costs more of the budget
    fresh = service.open_session()
    pinned = RelayPlan(6, 3, "ddim", 5.0)
    got = []
    for i in range(int(LEARN_BURST)):
        deliver(service, engine, fresh, f"p{i}", clock, edge_s=0.0, pinned=pinned)
        got.append(service.report(fresh, claim(f"p{i}", 0.5)))
    assert sum(got) == int(LEARN_BURST // PINNED_LEARN_COST)
    assert len(planner.feedback_calls) == learned + 1 + 10 + sum(got)


def test_repeated_ratings_count_once_per_request():
    service, engine, _, clock = served()
    session = service.open_session()
    deliver(service, engine, session, "r1", clock)
    service.report(session, claim("r1", 1.5, rating=1))
    for _ in range(5):
        service.rating(Rating(request_id="r1", rating=1), session)
    service.rating(Rating(request_id="r2", rating=-1), session)
    assert sample(service, "rise_edge_ratings_total", rating="1") == 1.0
    assert sample(service, "rise_edge_ratings_total", rating="-1") == 1.0


def demo_planner() -> BanditPlanner:
    return BanditPlanner.from_profile(load_profile(DEMO_PROFILE), "linucb")


def plans_for(service: RequestService, session: Any) -> list[RelayPlan]:
    out = []
    for i, w in enumerate((0.0, 0.25, 0.5, 0.75, 1.0)):
        ticket = service.plan(session, Generate(request_id=f"probe{i}-{id(session)}", prompt="a red sneaker",
                                                preference=w))
        out.append(ticket.plan)
        session.in_flight.pop(ticket.request_id)  # a probe: never submitted
    return out


def attacker_arm(planner: BanditPlanner) -> RelayPlan:
    return max(planner.arms, key=lambda a: (a.split, a.decode_on == "edge"))  # the edge's most expensive


def poison(service: RequestService, engine: FakeEngine, clock: Clock, planner: BanditPlanner) -> None:
    """The review's attack: pin each arm, report the protocol's maximum latency for all but the most
    expensive edge-only arm, a fraction of a second after each delivery."""
    keep = attacker_arm(planner)
    session = service.open_session()
    for i, arm in enumerate(planner.arms):
        deliver(service, engine, session, f"x{i}", clock, edge_s=0.2, pinned=arm)
        clock.t += 0.1
        service.report(session, claim(f"x{i}", 0.3 if arm == keep else 86400.0))


def predicted_latency(planner: BanditPlanner) -> list[float]:
    from shared.planning import PlanContext

    _, ctx = planner.context(0.5, 0.5, PlanContext(0, 0), level=3, price=False)
    return [float(x) for x in planner.policy.predict(ctx)[2]]  # type: ignore[attr-defined]


def test_the_poisoning_attack_does_not_take_the_scheduler_over(monkeypatch):
    defended, engine, planner, clock = served(demo_planner())
    keep = attacker_arm(planner)
    before = plans_for(defended, defended.open_session())
    poison(defended, engine, clock, planner)
    after = plans_for(defended, defended.open_session())
    # the attacker's arm gains nothing, and no arm is written off (the demo's arms take ~0.1-1 s)
    assert after.count(keep) <= before.count(keep)
    assert max(predicted_latency(planner)) < 10.0

    # the same attack on an edge without the bounds (what the review did): it takes the scheduler over
    monkeypatch.setattr(service_module, "REPORT_SLACK_S", 1e9)
    monkeypatch.setattr(service_module, "PINNED_LEARN_COST", 0.0)
    monkeypatch.setattr(planner_module, "MAX_LEARNED_LATENCY_S", 1e9)
    open_edge, engine, planner, clock = served(demo_planner())
    assert plans_for(open_edge, open_edge.open_session()) == before
    poison(open_edge, engine, clock, planner)
    assert plans_for(open_edge, open_edge.open_session()).count(keep) > before.count(keep)
    assert max(predicted_latency(planner)) > 1000.0
