"""The cluster front without Ray: RayEngine over a scripted handle, the load board, the missing extra."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from edge_server.cluster import (
    RAY_MISSING,
    ClusterConfig,
    ClusterUnavailable,
    LoadBoard,
    RayEngine,
    ReplicaEvent,
    StepTimer,
    WireRequest,
)
from edge_server.config import EdgeConfig
from edge_server.engine import EdgeOutcome, EdgeRequest, EngineBusy, EngineClosed, EngineStats, RequestCancelled
from edge_server.service import RequestService, Session
from shared.errors import ConfigError, RiseError
from shared.protocol.messages import RETRY_CODES
from shared.relay_plan import RelayPlan

PLAN = RelayPlan(6, 3, "ddim", 5.0)
IDLE = EngineStats(0, 0, 0, 0, 0, (), (), ())

Script = Callable[[WireRequest, int], AsyncIterator[ReplicaEvent]]


def event(kind, replica="a", stats=IDLE, **fields) -> ReplicaEvent:
    return ReplicaEvent(kind, replica, 1000 + ord(replica[0]), stats, {}, **fields)


def outcome() -> EdgeOutcome:
    return EdgeOutcome("handoff", 0.0, 0.1, handoff=b"payload", edge_steps=3)


class ReplicaDied(Exception):
    """Stands in for Ray's ActorDiedError."""


class FakeStream:
    def __init__(self, agen: AsyncIterator[ReplicaEvent]) -> None:
        self._agen = agen
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> ReplicaEvent:
        return await self._agen.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """``handle.options(stream=True).run.remote(wire)`` running ``script(wire, attempt)``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.attempts: dict[str, int] = {}
        self.streams: list[FakeStream] = []

    def options(self, **_: object) -> FakeHandle:
        return self

    @property
    def run(self) -> FakeHandle:
        return self

    def remote(self, wire: WireRequest) -> FakeStream:
        self.attempts[wire.key] = self.attempts.get(wire.key, 0) + 1
        stream = FakeStream(self.script(wire, self.attempts[wire.key]))
        self.streams.append(stream)
        return stream


def engine_on(script: Script, *, max_queue: int = 8, attempts: int = 3) -> RayEngine:
    info = {"family_id": "fam", "default_size": 32, "folder": "/nowhere", "default_sampler": "ddim"}
    return RayEngine(FakeHandle(script), info, ClusterConfig(replicas=2, max_attempts=attempts), max_queue=max_queue,
                     board=LoadBoard(max_batch=4))


def close_quietly(engine: RayEngine) -> None:
    engine._closed = True  # nothing deployed: only the front's loop to stop
    engine._loop.call_soon_threadsafe(engine._loop.stop)
    engine._thread.join(10)


def request(i: int = 0, on_progress=None) -> EdgeRequest:
    return EdgeRequest(f"1:r{i}", f"r{i}", f"prompt {i}", PLAN, 7, 32, 32, on_progress)


def test_a_request_flows_through_its_replica_with_progress_then_outcome():
    async def script(wire, attempt):
        yield event("accepted")
        for step in (1, 2, 3):
            yield event("progress", step=step, split=3)
        yield event("outcome", outcome=outcome())

    engine = engine_on(script)
    progress: list[tuple[int, int]] = []
    try:
        result = engine.submit(request(0, lambda s, t: progress.append((s, t)))).result(10)
        assert result.handoff == b"payload"
        assert progress == [(1, 3), (2, 3), (3, 3)]
        assert engine.cluster_stats().in_flight == 0
    finally:
        close_quietly(engine)


def test_a_preview_from_the_replica_reaches_the_front_in_place_of_its_progress():
    asked: list[int | None] = []
    rgb = np.full((4, 4, 3), 9, np.uint8)

    async def script(wire, attempt):
        asked.append(wire.preview_every)
        yield event("accepted")
        yield event("progress", step=1, split=2)
        yield event("progress", step=2, split=2, preview=rgb)
        yield event("outcome", outcome=outcome())

    engine = engine_on(script)
    seen: list[tuple[str, int]] = []
    try:
        with_previews = request(0, lambda s, t: seen.append(("progress", s)))
        with_previews.preview_every = 2
        with_previews.on_preview = lambda s, t, image: seen.append(("preview", s)) if image is rgb else None
        engine.submit(with_previews).result(10)
        engine.submit(request(1)).result(10)  # asked for none: the replica is asked for none
    finally:
        close_quietly(engine)
    assert seen == [("progress", 1), ("preview", 2)]
    assert asked == [2, None]


def test_a_replica_dying_before_the_steps_started_means_another_submission():
    async def script(wire, attempt):
        yield event("accepted", replica="a" if attempt == 1 else "b")
        if attempt == 1:
            raise ReplicaDied("replica a died")
        yield event("progress", replica="b", step=3, split=3)
        yield event("outcome", replica="b", outcome=outcome())

    engine = engine_on(script)
    try:
        assert engine.submit(request()).result(10).handoff == b"payload"
        stats = engine.cluster_stats()
        assert (stats.resubmits, stats.restarts) == (1, 1)
    finally:
        close_quietly(engine)


def test_a_replica_dying_mid_steps_is_a_retryable_busy_error_for_the_client():
    async def script(wire, attempt):
        yield event("accepted")
        yield event("progress", step=1, split=3)
        raise ReplicaDied("replica a died")

    engine = engine_on(script)
    try:
        future = engine.submit(request())
        with pytest.raises(EngineBusy) as caught:
            future.result(10)
        assert engine._handle.attempts["1:r0"] == 1  # never run twice: the client decides
        service = RequestService(engine, EdgeConfig(), planner=None)
        failure = service.failed(Session(1), "r0", caught.value)
        assert failure.code in RETRY_CODES and failure.retry_after_s is not None
    finally:
        close_quietly(engine)


def test_a_replica_that_keeps_dying_ends_the_request_after_max_attempts():
    async def script(wire, attempt):
        raise ReplicaDied("no replica lives")
        yield  # an async generator

    engine = engine_on(script, attempts=2)
    try:
        with pytest.raises(EngineBusy):
            engine.submit(request()).result(10)
        assert engine._handle.attempts["1:r0"] == 2
    finally:
        close_quietly(engine)


def test_replica_errors_come_back_as_the_engine_errors_the_service_maps():
    async def script(wire, attempt):
        yield event("error", error="invalid", message="height 33 is not a multiple of 8")

    engine = engine_on(script)
    try:
        with pytest.raises(RiseError, match="multiple of 8"):
            engine.submit(request()).result(10)
    finally:
        close_quietly(engine)


def test_cancel_fails_the_future_and_cancels_the_stream():
    gate = threading.Event()

    async def script(wire, attempt):
        yield event("accepted")
        gate.set()
        await asyncio.Event().wait()  # never finishes on its own
        yield event("outcome", outcome=outcome())

    engine = engine_on(script)
    try:
        future = engine.submit(request())
        assert gate.wait(10)
        engine.cancel("1:r0")
        with pytest.raises(RequestCancelled):
            future.result(10)
        assert engine._handle.streams[0].cancelled
    finally:
        close_quietly(engine)


def test_a_full_front_answers_busy_and_a_closed_one_refuses():
    async def script(wire, attempt):
        yield event("accepted")
        await asyncio.Event().wait()
        yield event("outcome", outcome=outcome())

    engine = engine_on(script, max_queue=2)
    futures = [engine.submit(request(i)) for i in range(2)]
    with pytest.raises(EngineBusy):
        engine.submit(request(2))
    engine._closing = True
    with pytest.raises(EngineClosed):
        engine.submit(request(3))
    engine._closing = False
    # close without draining fails what is in flight instead of leaving it hanging
    engine.cluster = ClusterConfig(replicas=2, app_name="not-deployed")
    engine.close(drain=False, timeout=1.0)
    for future in futures:
        with pytest.raises(EngineClosed):
            future.result(10)


def test_the_planner_sees_the_replica_that_will_finish_soonest():
    busy = EngineStats(3, 4, 10, 20, 1, (4,), (5, 5, 5, 5), (6, 6, 6))
    light = EngineStats(0, 1, 10, 20, 1, (1,), (2,), ())
    engine = engine_on(lambda wire, attempt: None)  # type: ignore[arg-type,return-value]
    try:
        engine.board.heard(event("outcome", replica="a", stats=busy))
        engine.board.heard(event("outcome", replica="b", stats=light))
        stats = engine.stats()
        assert (stats.running_steps, stats.queued_steps, stats.active) == ((2,), (), 1)
        assert stats.completed == 2 and stats.unet_calls == 20  # counters: the cluster's
    finally:
        close_quietly(engine)


def test_the_board_ranks_by_projected_finish_including_routed_requests():
    board = LoadBoard(max_batch=2)
    board.heard(event("accepted", replica="a", stats=EngineStats(0, 1, 0, 0, 0, (), (4,), ())))
    board.heard(event("accepted", replica="b", stats=EngineStats(0, 1, 0, 0, 0, (), (1,), ())))
    assert board.finish_s("b", 3) < board.finish_s("a", 3)
    assert board.soonest(3) == "b"
    for i in range(3):  # routed to b, not yet acknowledged: b fills up in the projection
        board.routed(f"k{i}", "b", 6)
    assert board.soonest(3) == "a"
    board.heard(event("accepted", replica="b", stats=EngineStats(0, 1, 0, 0, 0, (), (1,), ())), "k0")
    board.forget("k1")
    board.forget("k2")
    assert board.soonest(3) == "b"
    # a replica the front never heard from is ranked by the routing stats it reported to Ray Serve
    assert board.finish_s("c", 3, {"running_steps": [9, 9], "queued_steps": [9]}) > board.finish_s("b", 3)


def test_a_replica_seen_dying_counts_one_restart_and_its_view_goes():
    board = LoadBoard(max_batch=2)
    board.set_live({"a", "b"})
    board.heard(event("accepted", replica="a"))
    assert board.died("a") and not board.died("a")
    assert board.restarts == 1 and "a" not in board.replicas()
    board.set_live({"b", "c"})  # Ray Serve started the replacement
    assert board.replica_count() == 2


def test_step_timer_measures_back_to_back_calls_only():
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0], gap_s=1.0)
    for t in (0.0, 0.2, 0.4, 5.0, 5.3):
        now[0] = t
        timer(2, 4)
    assert timer.snapshot()[2] == pytest.approx(0.8 * (0.8 * 0.2 + 0.2 * 0.2) + 0.2 * 0.3)


@pytest.mark.parametrize("kwargs", [{"replicas": 0}, {"min_replicas": 1}, {"router": "fastest"},
                                    {"min_replicas": 3, "max_replicas": 4, "replicas": 2}])
def test_bad_cluster_configs_are_named(kwargs):
    with pytest.raises(ConfigError):
        ClusterConfig(**kwargs)


#: A subprocess prelude: Ray cannot be imported (as on a machine without the cluster extra).
WITHOUT_RAY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
"""


def test_without_the_extra_the_cluster_is_one_line_naming_it():
    script = WITHOUT_RAY + """
from edge_server.cluster import require_ray, ClusterUnavailable
try:
    require_ray()
except ClusterUnavailable as exc:
    print(exc)
    sys.exit(2)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == RAY_MISSING
    assert "pip install '.[cluster]'" in RAY_MISSING and issubclass(ClusterUnavailable, RiseError)


def test_admitted_requests_beyond_one_unet_call_wait_their_turn_in_the_projection():
    board = LoadBoard(max_batch=2)
    board.heard(event("progress", replica="a", stats=EngineStats(0, 4, 0, 0, 0, (), (6, 6, 6, 6), ())))
    board.heard(event("progress", replica="b", stats=EngineStats(0, 2, 0, 0, 0, (), (6, 6), ())))
    assert board.finish_s("a", 3) > board.finish_s("b", 3)


def test_the_cluster_metrics_say_replicas_restarts_and_each_replicas_load():
    from prometheus_client import CollectorRegistry, generate_latest

    from edge_server.cluster import ClusterMetrics

    engine = engine_on(lambda wire, attempt: None)  # type: ignore[arg-type,return-value]
    try:
        engine.board.set_live({"a", "b"})
        engine.board.heard(event("progress", replica="a", stats=EngineStats(2, 1, 7, 28, 3, (1,), (4,), (6, 6))))
        engine.board.heard(event("outcome", replica="b", stats=EngineStats(0, 0, 5, 20, 4, (), (), ())))
        engine.board.died("b")
        registry = CollectorRegistry()
        ClusterMetrics(engine).register(registry)
        text = generate_latest(registry).decode()
        assert "rise_edge_cluster_replicas 1.0" in text  # b is gone until Ray Serve's replacement shows up
        assert "rise_edge_cluster_replica_restarts_total 1.0" in text
        assert 'rise_edge_replica_queue_depth{replica="a"} 2.0' in text
        assert 'rise_edge_replica_batch_rows_total{replica="a"} 28.0' in text
    finally:
        close_quietly(engine)


def test_an_edge_config_names_its_cluster():
    config = EdgeConfig(device="cuda:1", threads=2)
    config.replicas = 3  # type: ignore[attr-defined]  # the daemon's --replicas, where the config has it
    cluster = ClusterConfig.from_edge_config(config)
    assert (cluster.replicas, cluster.num_gpus, cluster.torch_threads) == (3, 1.0, 2)
    assert ClusterConfig.from_edge_config(EdgeConfig(device="cpu")).num_gpus == 0.0


def test_a_replica_that_has_not_measured_its_steps_is_ranked_on_the_same_clock():
    board = LoadBoard(max_batch=4)
    measured = ReplicaEvent("outcome", "a", 1, IDLE, {1: 0.05, 2: 0.09})
    board.heard(measured)
    # b never spoke to this front: ranked from its routing stats, in the seconds a measured (one table for all)
    assert board.finish_s("b", 4, {"running_steps": [], "queued_steps": []}) == pytest.approx(board.finish_s("a", 4))
    board.heard(ReplicaEvent("progress", "a", 1, EngineStats(0, 1, 0, 0, 0, (), (8,), ()), {1: 0.05, 2: 0.09}))
    assert board.soonest(4, ["a", "b"]) == "b"


def test_a_busier_replica_never_looks_as_fast_as_an_idle_one_from_partial_measurements():
    board = LoadBoard(max_batch=8)
    # only batches of 4 and 5 requests were measured so far: the table below them is extrapolated, not flat
    board.heard(ReplicaEvent("progress", "a", 1, EngineStats(0, 3, 0, 0, 0, (), (10, 10, 10), ()), {4: 0.4, 5: 0.5}))
    board.heard(ReplicaEvent("outcome", "b", 2, IDLE, {}))
    table = board.step_table()
    assert table[1] < table[2] < table[3] < table[4]
    assert board.soonest(10) == "b"


def test_rise_edge_serve_engine_ray_without_the_extra_is_one_line_and_exit_2(tmp_path):
    script = WITHOUT_RAY + """
from edge_server.daemon import main
sys.exit(main(sys.argv[1:]))
"""
    done = subprocess.run([sys.executable, "-c", script, "serve", "--family", str(tmp_path), "--engine", "ray",
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"rise-edge: error: {RAY_MISSING}"


def test_the_engine_settings_read_from_edge_toml(tmp_path):
    (tmp_path / "edge.toml").write_text('engine = "ray"\nreplicas = 3\nray_address = "auto"\n')
    config = EdgeConfig.from_toml(tmp_path / "edge.toml")
    assert ClusterConfig.from_edge_config(config).replicas == 3 and config.ray_address == "auto"
    (tmp_path / "bad.toml").write_text('engine = "spark"\n')
    with pytest.raises(ConfigError, match="engine"):
        EdgeConfig.from_toml(tmp_path / "bad.toml")
