"""Two replicas holding different families on a local Ray instance, behind the real daemon as ``rise-edge serve
--engine ray --family tiny=DIR --family sd15=DIR`` builds it (``Daemon._load_families``), with real clients.

One deployment for the module (a replica's start costs ~20 s on two shared cores). The families are the tiny
demo-shaped one and a tiny SD1.5-shaped one (``lab.hub_families``); replica of rank 0 loads the first, rank 1 the
second, and each request must be served by the replica holding its family, with nothing loaded that was not needed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")

from edge_server.cluster import RayEngine, RayFamilyEngine
from edge_server.config import EdgeConfig, FamilySpec
from edge_server.daemon import Daemon, EdgeServer
from edge_server.family import load_family
from edge_server.relay import EdgeRelay
from shared.protocol import HandoffReceived, Plan
from shared.relay_plan import RelayPlan
from tests.edge_server.test_daemon import TOKEN, BareClient

PLANS = [RelayPlan(4, 2, "dpmpp_2m", 5.0), RelayPlan(6, 3, "ddim", 5.0)]
WAIT_S = 240.0  # generous: two shared cores, other test suites running


@dataclass
class Cluster:
    engine: RayEngine
    server: EdgeServer
    port: int
    families: dict[str, object]  # family id -> the family loaded in this process (the single-engine reference)


@pytest.fixture(scope="module")
def cluster(tiny_family_dir, tiny_family, tmp_path_factory) -> Iterator[Cluster]:
    from lab.hub_families import build_sd15_bk_sdm_tiny

    sd15_dir = build_sd15_bk_sdm_tiny(tmp_path_factory.mktemp("sd15") / "sd15-tiny").folder
    specs = [FamilySpec("tiny", str(tiny_family_dir)), FamilySpec("sd15", str(sd15_dir))]
    config = EdgeConfig(port=0, device="cpu", engine="ray", replicas=2, threads=1, max_batch_rows=4, max_queue=16,
                        scheduler="fixed")

    def no_single_family() -> object:
        raise AssertionError("several families: the daemon's single-family loader is unused")

    daemon = Daemon(config, no_single_family, families=specs)  # type: ignore[arg-type]
    server = daemon.load()
    server.token = TOKEN
    engine = server.service.engine
    assert isinstance(engine, RayFamilyEngine)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-daemon", daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
        sd15 = load_family(Path(sd15_dir))
        yield Cluster(engine.cluster_engine, server, port, {tiny_family.family_id: tiny_family,
                                                            sd15.family_id: sd15})
    finally:
        try:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(120)  # closes the engines: Ray goes down
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            daemon.close()


async def _generate(port: int, family_id: str, i: int, plan: RelayPlan):
    client = await BareClient.open(port, family_id)
    try:
        return await client.generate(prompt=f"request {i}", seed=100 + i, pinned=plan)
    finally:
        await client.ws.close()


def _holders(engine: RayEngine) -> dict[str, str]:
    """Family id -> the replica that has it loaded (each replica must hold exactly one)."""
    holders: dict[str, str] = {}
    for replica, view in engine.board.replicas().items():
        loaded = [fid for fid, load in view.families.items() if load.loaded]
        assert len(loaded) == 1, (replica, loaded)
        holders[loaded[0]] = replica
    return holders


def test_each_request_is_served_by_the_replica_holding_its_family_and_nothing_extra_loads(cluster):
    engine = cluster.engine
    ids = list(cluster.families)
    assert list(engine.families) == ids and set(cluster.server.services) == set(ids)
    holders = _holders(engine)
    assert set(holders) == set(ids) and len(set(holders.values())) == 2  # one family each, as ranked

    # Two rounds of one request per family, both families at once: a replica holding the family is idle then, the
    # other is cold for it (and has the other family's request), so where each goes does not depend on timing.
    jobs = [(ids[i % 2], i, PLANS[i // 2]) for i in range(4)]

    async def main():
        out = []
        for r in range(2):
            out += await asyncio.gather(*[_generate(cluster.port, fid, i, plan) for fid, i, plan in jobs[2 * r:2 * r + 2]])
        return out

    results = asyncio.run(main())
    for (fid, i, plan), (event, seen) in zip(jobs, results, strict=True):
        assert isinstance(event, HandoffReceived), event
        assert next(e for e in seen if isinstance(e, Plan)).family_id == fid
        expected = EdgeRelay(cluster.families[fid]).start(f"request {i}", plan, 100 + i)  # the single engine's
        assert event.handoff.family_id == fid
        err = float(np.abs(event.handoff.latents - expected.latents).max())
        assert err <= 1e-4, (fid, i, err)  # the batching tolerance of the one-process engine

    served = [s for s in engine.served]
    assert len(served) == len(jobs)
    pids = {replica: view.pid for replica, view in engine.board.replicas().items()}
    for s in served:
        assert s.replica == holders[s.family], (s, holders)  # the replica holding the family served it
        assert s.pid == pids[s.replica]
    assert _holders(engine) == holders  # and no replica loaded the other family
    for replica, view in engine.board.replicas().items():
        for fid, load in view.families.items():
            assert len(load.load_s) == (1 if holders[fid] == replica else 0), (replica, fid, load.load_s)
    stats = engine.cluster_stats()
    for fid in ids:
        seconds, source = stats.cold_start_s[fid]
        assert source == "measured" and seconds > 0
        print(f"family {fid}: cold start {seconds:.2f} s (measured on replica {holders[fid]})")
    from prometheus_client import generate_latest

    scrape = generate_latest(cluster.server.metrics.registry).decode()
    assert scrape.count("rise_edge_replica_family_loaded{") == 4  # two families on two replicas
    assert 'source="measured"' in scrape
