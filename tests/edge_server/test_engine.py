"""The serving engine without sockets: results, backpressure, cancellation, shutdown, bad requests."""

from __future__ import annotations

import numpy as np
import pytest

from edge_server.engine import BatchingEngine, EdgeRequest, EngineBusy, EngineClosed, RequestCancelled
from edge_server.png import encode_png
from edge_server.relay import EdgeRelay
from shared.errors import ConfigError
from shared.handoff import decode_handoff
from shared.relay_plan import RelayPlan

PLAN = RelayPlan(6, 4, "dpmpp_2m", 5.0)


def request(key: str, seed: int = 0, plan: RelayPlan = PLAN, **kw) -> EdgeRequest:
    return EdgeRequest(key=key, request_id=key, prompt=f"prompt {key}", plan=plan, seed=seed, **kw)


def test_results_match_single_request_path_and_progress_is_reported(tiny_family):
    engine = BatchingEngine(tiny_family, max_batch_rows=8)
    progress: dict[str, list[int]] = {}
    try:
        futures = [engine.submit(request(f"r{i}", i, on_progress=lambda s, t, k=f"r{i}": progress.setdefault(k, []).append(s)))
                   for i in range(3)]
        outcomes = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    for i, outcome in enumerate(outcomes):
        assert outcome.kind == "handoff" and outcome.edge_compute_s > 0 and outcome.queue_s >= 0
        handoff = decode_handoff(outcome.handoff)
        expected = EdgeRelay(tiny_family).start(f"prompt r{i}", PLAN, i)
        assert handoff.request_id == f"r{i}"
        assert np.abs(handoff.latents - expected.latents).max() <= 1e-5 * max(1, np.abs(expected.latents).max())
        assert progress[f"r{i}"] == [1, 2, 3, 4]


def test_edge_decode_returns_an_image_the_api_layer_encodes(tiny_family):
    engine = BatchingEngine(tiny_family)
    try:
        outcome = engine.submit(request("png", plan=RelayPlan(3, 3, "ddim", 5.0, decode_on="edge"))).result(120)
    finally:
        engine.close()
    assert outcome.kind == "image" and outcome.handoff is None
    assert outcome.image is not None and outcome.image.dtype == np.uint8 and outcome.image.shape[2:] == (3,)
    assert encode_png(outcome.image).startswith(b"\x89PNG")


def test_queue_bound_gives_busy_with_retry_after(tiny_family):
    engine = BatchingEngine(tiny_family, max_queue=2)
    try:
        accepted = [engine.submit(request(f"r{i}", plan=RelayPlan(20, 20, "ddim", 5.0))) for i in range(2)]
        with pytest.raises(EngineBusy) as info:
            engine.submit(request("r9"))
        assert info.value.retry_after_s > 0
        for f in accepted:
            f.result(timeout=120)
        engine.submit(request("r10")).result(timeout=120)  # room again once work drains
    finally:
        engine.close()


def test_cancel_and_shutdown_fail_requests_cleanly(tiny_family):
    engine = BatchingEngine(tiny_family, max_batch_rows=2)
    long_plan = RelayPlan(200, 200, "ddim", 5.0)
    running = engine.submit(request("a", plan=long_plan))
    queued = engine.submit(request("b", plan=long_plan))
    engine.cancel("b")
    with pytest.raises(RequestCancelled):
        queued.result(timeout=60)
    engine.close(drain=False)
    with pytest.raises(EngineClosed):
        running.result(timeout=60)
    with pytest.raises(EngineClosed):
        engine.submit(request("c"))


def test_a_bad_request_fails_alone(tiny_family):
    engine = BatchingEngine(tiny_family)
    try:
        bad = engine.submit(request("bad", height=31, width=31))  # not a multiple of the VAE factor
        good = engine.submit(request("good", 1))
        with pytest.raises(ConfigError, match="multiple of 2"):
            bad.result(timeout=60)
        assert good.result(timeout=120).kind == "handoff"
    finally:
        engine.close()


def test_a_loader_runs_on_the_engine_thread_and_its_error_reaches_the_caller(tiny_family):
    import threading

    from shared.errors import RiseError

    loaded_on: list[str] = []

    def load():
        loaded_on.append(threading.current_thread().name)
        return tiny_family

    engine = BatchingEngine(load)
    try:
        assert engine.family is tiny_family and loaded_on == ["rise-engine"]  # loaded before the constructor returned
        handoff = decode_handoff(engine.submit(request("r0")).result(timeout=120).handoff)
        assert handoff.request_id == "r0"
    finally:
        engine.close()

    def broken():
        raise RiseError("family folder /nowhere has no model_index.json")

    with pytest.raises(RiseError, match="no model_index.json"):
        BatchingEngine(broken)
