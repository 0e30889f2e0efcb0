"""Replicas holding different families, without Ray: the routing rule (a loaded replica wins unless it is busier
by more than the family's measured cold start), the cold-start estimate, the front's per-family engines over one
deployment, and one replica driven directly on two real tiny families."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from edge_server.cluster import (
    DEFAULT_COLD_START_S,
    ClusterConfig,
    EdgeReplica,
    FamilyLoad,
    LoadBoard,
    RayEngine,
    ReplicaEvent,
    WireRequest,
    routing_cost,
)
from edge_server.cold_start import DEFAULT_LOAD_BYTES_PER_S
from edge_server.config import FamilySpec
from edge_server.engine import EdgeOutcome, EdgeRequest, EngineClosed, EngineStats
from edge_server.family import describe_family, load_family
from edge_server.relay import EdgeRelay
from shared.bandit.latency import edge_drain_s
from shared.handoff import decode_handoff
from shared.relay_plan import RelayPlan
from tests.edge_server.test_cluster import FakeHandle, close_quietly

IDLE = EngineStats(0, 0, 0, 0, 0, (), (), ())
A_STEPS = {1: 0.1, 2: 0.15}  # measured seconds per UNet call of family A, by requests in it
MB = 1_000_000


def load(loaded: bool, running: tuple[int, ...] = (), queued: tuple[int, ...] = (), *,
         step_times: dict[int, float] | None = None, load_s: tuple[float, ...] = (),
         weight_bytes: int = 100 * MB) -> FamilyLoad:
    stats = EngineStats(len(queued), len(running), 0, 0, 0, (), running, queued)
    return FamilyLoad(loaded, stats, dict(step_times or {}), load_s, weight_bytes)


def heard(board: LoadBoard, replica: str, families: dict[str, FamilyLoad]) -> None:
    board.heard(ReplicaEvent("status", replica, 1000 + ord(replica[0]), IDLE, {}, families=families))


def two_replicas(a_running: tuple[int, ...] = (2,), a_queued: tuple[int, ...] = ()) -> LoadBoard:
    """Replica a holds A (its load measured at 2 s), replica b holds B (1 s): A is cold on b, B on a."""
    board = LoadBoard(max_batch=2)
    heard(board, "a", {"A": load(True, a_running, a_queued, step_times=A_STEPS, load_s=(2.0,)),
                       "B": load(False, weight_bytes=50 * MB)})
    heard(board, "b", {"A": load(False), "B": load(True, load_s=(1.0,), weight_bytes=50 * MB)})
    return board


def test_a_request_goes_to_the_replica_with_its_family_loaded_unless_that_one_is_busier_than_a_cold_start():
    board = two_replicas(a_running=(2,))
    table = board.step_table("A")
    assert table[1:] == pytest.approx([0.1, 0.15])
    assert board.cold_start_s("A") == (pytest.approx(2.0), "measured")
    # a: A loaded, one request with 2 steps left; b: idle but cold for A (its cost includes A's 2 s load)
    assert board.finish_s("a", 4, family="A") == pytest.approx(routing_cost(table, [2], [], 4))
    assert board.finish_s("b", 4, family="A") == pytest.approx(routing_cost(table, [], [], 4) + 2.0)
    assert board.soonest(4, family="A") == "a"
    assert board.soonest(4, family="B") == "b"  # and B's request goes to B's replica

    busier = two_replicas(a_running=(10, 10))  # busier than b, by less than a cold start: a still wins
    assert busier.finish_s("a", 4, family="A") - routing_cost(table, [], [], 4) < 2.0
    assert busier.soonest(4, family="A") == "a"

    swamped = two_replicas(a_running=(10, 10), a_queued=(10,) * 6)  # busier by more than a cold start: b wins
    assert swamped.finish_s("a", 4, family="A") - routing_cost(table, [], [], 4) > 2.0
    assert swamped.soonest(4, family="A") == "b"
    assert swamped.soonest(4, family="B") == "b"  # B's requests are not pushed away by A's queue on a


def test_requests_routed_but_not_accepted_count_for_their_family_only():
    board = two_replicas(a_running=())
    before_a, before_b = board.finish_s("a", 4, family="A"), board.finish_s("b", 4, family="B")
    for i in range(8):
        board.routed(f"k{i}", "a", 10, "A")  # routed to a, not acknowledged yet
    assert board.load("a", family="A")[1] == [10] * 8 and board.load("a", family="B") == ([], [])
    assert board.finish_s("a", 4, family="A") > before_a + 2.0
    assert board.soonest(4, family="A") == "b"  # the cold replica now finishes A's request sooner
    assert board.finish_s("b", 4, family="B") == pytest.approx(before_b)


def test_the_other_familys_work_on_a_replica_counts_against_it():
    board = LoadBoard(max_batch=2)
    # both replicas hold A loaded; c also has B's requests queued (its engine shares c's slice)
    heard(board, "c", {"A": load(True, step_times=A_STEPS, load_s=(2.0,)),
                       "B": load(True, (3,), (3, 3), step_times={1: 0.2}, load_s=(1.0,))})
    heard(board, "d", {"A": load(True, step_times=A_STEPS, load_s=(2.0,)), "B": load(False)})
    b_table = board.step_table("B")
    assert board.finish_s("c", 4, family="A") == pytest.approx(
        board.finish_s("d", 4, family="A") + edge_drain_s(b_table, [3], [3, 3]))
    assert edge_drain_s(b_table, [3], [3, 3]) == pytest.approx(3 * b_table[2] + 3 * b_table[1])
    assert board.soonest(4, family="A") == "d"


def test_another_familys_engine_running_more_requests_than_one_unet_call_holds_is_priced_not_a_crash():
    # an engine admits rows, not requests: a guided family's engine runs twice the requests of one call
    board = LoadBoard(max_batch=2)
    heard(board, "c", {"A": load(True, step_times=A_STEPS, load_s=(2.0,)),
                       "B": load(True, (3, 3, 3, 3), (2,), step_times={1: 0.2, 2: 0.3}, load_s=(1.0,))})
    heard(board, "d", {"A": load(True, step_times=A_STEPS, load_s=(2.0,)), "B": load(False)})
    b_table = board.step_table("B")
    # each of B's 3 steps takes two full calls; then its queued request runs its 2 alone
    assert edge_drain_s(b_table, [3, 3, 3, 3], [2]) == pytest.approx(3 * 2 * b_table[2] + 2 * b_table[1])
    assert board.finish_s("c", 4, family="A") == pytest.approx(
        board.finish_s("d", 4, family="A") + edge_drain_s(b_table, [3, 3, 3, 3], [2]))
    assert board.soonest(4, family="A") == "d"


def test_the_cold_start_is_measured_then_estimated_from_a_measured_rate_then_a_stated_default():
    board = LoadBoard(max_batch=2)
    assert board.cold_start_s("A") == (DEFAULT_COLD_START_S, "default")  # nothing reported at all
    heard(board, "a", {"A": load(False, weight_bytes=100 * MB), "B": load(False, weight_bytes=50 * MB)})
    assert board.cold_start_s("A") == (pytest.approx(100 * MB / DEFAULT_LOAD_BYTES_PER_S), "default")
    heard(board, "b", {"A": load(False), "B": load(True, load_s=(0.5, 1.5), weight_bytes=50 * MB)})
    # no load of A measured yet: its bytes at the rate B's two loads took (100 MB in 2 s)
    assert board.cold_start_s("A") == (pytest.approx(100 * MB / (100 * MB / 2.0)), "estimated")
    heard(board, "a", {"A": load(True, load_s=(3.0,)), "B": load(False, weight_bytes=50 * MB)})
    assert board.cold_start_s("A") == (pytest.approx(3.0), "measured")
    board.died("a")  # its measurement outlives it
    assert board.cold_start_s("A") == (pytest.approx(3.0), "measured")


def test_a_replica_not_heard_from_pays_the_cold_start_unless_its_routing_stats_say_it_holds_the_family():
    board = two_replicas(a_running=())
    cold = board.cold_start_s("A")[0]
    assert board.finish_s("z", 4, family="A") == pytest.approx(board.finish_s("b", 4, family="A"))
    stats = {"families": {"A": load(True, load_s=(2.0,)).summary()}, "running_steps": [], "queued_steps": []}
    assert board.finish_s("z", 4, stats, family="A") == pytest.approx(board.finish_s("b", 4, family="A") - cold)


# ---------------------------------------------------------------------- the front over a scripted deployment

FAMILIES = {fid: {"family_id": fid, "name": fid.lower(), "default_size": size, "folder": f"/{fid}",
                  "default_sampler": "ddim", "sampler_error": None} for fid, size in (("A", 32), ("B", 64))}
PLAN = RelayPlan(6, 3, "ddim", 5.0)


def test_the_front_has_one_engine_per_family_and_requests_carry_their_family():
    seen: list[str | None] = []

    async def script(wire: WireRequest, attempt: int) -> AsyncIterator[ReplicaEvent]:
        seen.append(wire.family)
        replica = "a" if wire.family == "A" else "b"
        yield ReplicaEvent("accepted", replica, 7, IDLE, {})
        yield ReplicaEvent("outcome", replica, 7, IDLE, {},
                           outcome=EdgeOutcome("handoff", 0.0, 0.1, handoff=(wire.family or "").encode(), edge_steps=3))

    info = {**FAMILIES["A"], "families": FAMILIES}
    engine = RayEngine(FakeHandle(script), info, ClusterConfig(replicas=2), max_queue=8, board=LoadBoard(max_batch=4))
    try:
        a, b = engine.family_engine("A"), engine.family_engine("B")
        assert (a.family_id, a.default_size, b.family_id, b.default_size) == ("A", 32, "B", 64)
        assert b.submit(EdgeRequest("1:x", "x", "p", PLAN, 1)).result(10).handoff == b"B"
        assert a.submit(EdgeRequest("1:y", "y", "p", PLAN, 1)).result(10).handoff == b"A"
        assert engine.submit(EdgeRequest("1:z", "z", "p", PLAN, 1)).result(10).handoff == b"A"  # the first family
        assert seen == ["B", "A", "A"]
        assert [(s.key, s.family, s.replica) for s in engine.served] == [
            ("1:x", "B", "b"), ("1:y", "A", "a"), ("1:z", "A", "a")]
        with pytest.raises(Exception, match="not served by this cluster"):
            engine.family_engine("C")
        a.close(drain=True, timeout=5)  # one family closed: the other still serves
        with pytest.raises(EngineClosed):
            a.submit(EdgeRequest("1:w", "w", "p", PLAN, 1))
        assert b.submit(EdgeRequest("1:v", "v", "p", PLAN, 1)).result(10).handoff == b"B"
        assert not engine._closed
    finally:
        close_quietly(engine)


def test_the_fronts_planner_sees_the_cold_start_of_a_family_no_replica_holds():
    async def script(wire: WireRequest, attempt: int) -> AsyncIterator[ReplicaEvent]:
        yield ReplicaEvent("accepted", "a", 7, IDLE, {})

    board = LoadBoard(max_batch=2)
    heard(board, "a", {"A": load(True, load_s=(2.0,)), "B": load(False, weight_bytes=50 * MB)})
    info = {**FAMILIES["A"], "families": FAMILIES}
    engine = RayEngine(FakeHandle(script), info, ClusterConfig(replicas=1), max_queue=8, board=board)
    try:
        assert engine.stats("A").cold_start_s == 0.0  # loaded where its requests go
        # B is loaded nowhere: its requests wait for a load, priced at the rate A's load ran (100 MB in 2 s)
        assert engine.stats("B").cold_start_s == pytest.approx(board.cold_start_s("B")[0]) == pytest.approx(1.0)
        assert engine.family_engine("B").stats().cold_start_s == pytest.approx(1.0)
    finally:
        close_quietly(engine)


def test_the_cluster_metrics_say_which_families_each_replica_loaded_and_the_cold_start():
    from prometheus_client import CollectorRegistry, generate_latest

    from edge_server.cluster import ClusterMetrics

    engine = RayEngine(FakeHandle(lambda wire, attempt: None),
                       {**FAMILIES["A"], "families": FAMILIES}, ClusterConfig(replicas=2), max_queue=8,
                       board=two_replicas())
    try:
        registry = CollectorRegistry()
        ClusterMetrics(engine).register(registry)
        text = generate_latest(registry).decode()
        assert 'rise_edge_replica_family_loaded{family="A",replica="a"} 1.0' in text
        assert 'rise_edge_replica_family_loaded{family="A",replica="b"} 0.0' in text
        assert 'rise_edge_replica_family_loads_total{family="B",replica="b"} 1.0' in text
        assert 'rise_edge_cluster_cold_start_seconds{family="A",source="measured"} 2.0' in text
    finally:
        close_quietly(engine)


# ---------------------------------------------------------------------- one replica on two real families


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lab.hub_families import build_sd15_bk_sdm_tiny

    return build_sd15_bk_sdm_tiny(tmp_path_factory.mktemp("sd15") / "sd15-tiny").folder


async def _events(replica: EdgeReplica, wire: WireRequest) -> list[ReplicaEvent]:
    return [event async for event in replica.run(wire)]


def test_a_replica_loads_its_home_family_at_start_and_another_on_its_first_request(tiny_family_dir, tiny_family,
                                                                                     sd15_dir):
    specs = [FamilySpec("tiny", str(tiny_family_dir)), FamilySpec("sd15", str(sd15_dir))]
    tiny_id, sd15_id = tiny_family.family_id, describe_family(sd15_dir).family_id
    replica = EdgeReplica(specs, device="cpu", threads=1, max_batch_rows=4, home=1)  # rank 1 of 2: sd15
    try:
        families = replica.describe("ddim")["status"].families
        assert families[sd15_id].loaded and len(families[sd15_id].load_s) == 1
        assert not families[tiny_id].loaded and families[tiny_id].load_s == ()
        assert families[tiny_id].weight_bytes == describe_family(tiny_family_dir).weight_bytes()
        assert set(replica.record_routing_stats()["families"]) == {tiny_id, sd15_id}

        wire = WireRequest("1:t", "t", "a red sneaker", PLAN, 5, None, None, family=tiny_id)
        events = asyncio.run(_events(replica, wire))
        assert [e.kind for e in events][0] == "accepted" and events[-1].kind == "outcome"
        after = events[-1].families
        assert after[tiny_id].loaded and len(after[tiny_id].load_s) == 1 and after[tiny_id].load_s[0] > 0
        assert len(after[sd15_id].load_s) == 1  # nothing reloaded
        assert events[-1].outcome is not None and events[-1].outcome.handoff is not None
        expected = EdgeRelay(tiny_family).start("a red sneaker", PLAN, 5)
        np.testing.assert_allclose(decode_handoff(events[-1].outcome.handoff).latents, expected.latents,
                                   atol=1e-5, rtol=1e-5)

        sd15 = asyncio.run(_events(replica, WireRequest("1:s", "s", "a red sneaker", PLAN, 5, None, None,
                                                        family=sd15_id)))
        expected = EdgeRelay(load_family(sd15_dir)).start("a red sneaker", PLAN, 5)
        assert sd15[-1].outcome is not None and sd15[-1].outcome.handoff is not None
        np.testing.assert_allclose(decode_handoff(sd15[-1].outcome.handoff).latents, expected.latents,
                                   atol=1e-5, rtol=1e-5)

        stranger = asyncio.run(_events(replica, WireRequest("1:u", "u", "p", PLAN, 5, None, None, family="nope")))
        assert [(e.kind, e.error) for e in stranger] == [("error", "invalid")]
        assert "not served" in stranger[0].message
    finally:
        replica.pool.close(drain=False, timeout=10)


def test_the_router_ranks_by_the_requests_family_and_asks_replicas_it_has_not_heard_from_first():
    pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")
    from types import SimpleNamespace

    from edge_server.cluster import register_board, unregister_board
    from edge_server.cluster_router import SoonestFinishRouter

    router = object.__new__(SoonestFinishRouter)  # its logic only: Ray Serve is not running
    router.initialize_state(board="rise-test-families")
    board = two_replicas(a_running=())
    register_board("rise-test-families", board)

    def replica(name: str) -> SimpleNamespace:
        return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), routing_stats={})

    def wire(key: str, family: str) -> SimpleNamespace:
        return SimpleNamespace(args=(WireRequest(key, key, "p", RelayPlan(6, 4, "ddim", 5.0), 1, None, None,
                                                 family=family),))

    def choose(candidates, pending) -> list[str]:
        ranked = asyncio.run(router.choose_replicas(candidates, pending))
        return [group[0].replica_id.unique_id for group in ranked]

    try:
        replicas = [replica("a"), replica("b")]
        assert choose(replicas, wire("1:x", "A")) == ["a", "b"]
        assert choose(replicas, wire("1:y", "B")) == ["b", "a"]
        assert board.load("a", family="A")[1] == [4] and board.load("b", family="B")[1] == [4]  # counted as routed
        for i in range(8):  # A's replica swamped: the next A request pays the cold start on b instead
            board.routed(f"2:{i}", "a", 10, "A")
        assert choose(replicas, wire("1:z", "A")) == ["b", "a"]
        # a call that is not a request (the front's describe): the replica not heard from first
        assert choose([replica("a"), replica("new"), replica("b")], SimpleNamespace(args=("ddim",)))[0] == "new"
    finally:
        unregister_board("rise-test-families")
