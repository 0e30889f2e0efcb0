"""Several families on one edge: loading on first use, eviction under a memory budget, and the daemon serving
devices of two families at once (the demo-shaped tiny family and a tiny SD1.5-shaped one)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from edge_server.cold_start import DEFAULT_LOAD_BYTES_PER_S
from edge_server.config import EdgeConfig, FamilySpec
from edge_server.engine import EdgeOutcome, EdgeRequest, EngineStats, RequestCancelled
from edge_server.family import describe_family, load_family, loaded_bytes
from edge_server.family_pool import FamilyPool, FamilyUnavailable
from edge_server.metrics import EdgeMetrics
from edge_server.relay import EdgeRelay
from edge_server.service import make_engine
from shared.errors import ConfigError
from shared.handoff import decode_handoff
from shared.protocol import PROTOCOL_VERSIONS, Error
from shared.relay_plan import RelayPlan
from tests.edge_server.test_daemon import TOKEN, BareClient

PLAN = RelayPlan(4, 2, "dpmpp_2m", 5.0)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lab.hub_families import build_sd15_bk_sdm_tiny

    return build_sd15_bk_sdm_tiny(tmp_path_factory.mktemp("sd15") / "sd15-tiny").folder


@pytest.fixture(scope="module")
def specs(tiny_family_dir: Path, sd15_dir: Path) -> list[FamilySpec]:
    return [FamilySpec("tiny", str(tiny_family_dir)), FamilySpec("sd15", str(sd15_dir))]


class FakeEngine:
    """An engine whose requests finish when the test says (``finish``)."""

    def __init__(self, family_id: str) -> None:
        self.family_id = family_id
        self.default_size = 64
        self.futures: dict[str, Future[EdgeOutcome]] = {}
        self.cancelled: list[str] = []
        self.closed = False
        self.arrived = threading.Condition()

    def submit(self, request: EdgeRequest) -> Future[EdgeOutcome]:
        future: Future[EdgeOutcome] = Future()
        with self.arrived:
            self.futures[request.key] = future
            self.arrived.notify_all()
        return future

    def finish(self, key: str) -> None:
        """Finish request ``key`` once it has arrived (a request that waited for the load arrives from the load's
        callback, which may run just after the load's future resolved)."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: key in self.futures, timeout=10), f"{key} never reached the engine"
            future = self.futures.pop(key)
        future.set_result(EdgeOutcome("handoff", 0.0, 0.0, handoff=b"x"))

    def cancel(self, key: str) -> None:
        self.cancelled.append(key)

    def stats(self) -> EngineStats:
        return EngineStats(0, len(self.futures), 0, 0, 0)

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        self.closed = True


class FakeFactory:
    """Builds FakeEngines; a load waits for ``release`` when ``gate`` is set, so a test sees requests wait."""

    def __init__(self, gate: bool = False) -> None:
        self.built: list[FakeEngine] = []
        self.release = threading.Event()
        if not gate:
            self.release.set()
        self.fail: str | None = None

    def __call__(self, spec: FamilySpec, info) -> FakeEngine:
        self.release.wait(30)
        if self.fail == spec.name:
            raise ConfigError(f"cannot load family {spec.name}: broken weights")
        engine = FakeEngine(info.family_id)
        self.built.append(engine)
        return engine


def _request(key: str) -> EdgeRequest:
    return EdgeRequest(key, key, "a red sneaker", PLAN, seed=1)


def _ids(pool: FamilyPool) -> tuple[str, str]:
    tiny, sd15 = pool.family_ids
    return tiny, sd15


def test_family_info_is_read_without_loading_and_matches_the_loaded_family(tiny_family_dir, tiny_family):
    info = describe_family(tiny_family_dir)
    assert info.family_id == tiny_family.family_id
    assert info.default_size == tiny_family.default_latent_size * tiny_family.vae_scale_factor
    assert info.default_sampler == tiny_family.default_sampler
    # the estimate from the safetensors headers is the loaded parameters' bytes (buffers aside)
    assert abs(info.weight_bytes() - loaded_bytes(tiny_family)) <= 0.01 * loaded_bytes(tiny_family)


def test_a_family_loads_on_first_use_and_requests_wait_for_it(specs):
    factory = FakeFactory(gate=True)
    pool = FamilyPool(specs, factory)
    tiny, sd15 = _ids(pool)
    engine = pool.engine(sd15)
    assert not pool.is_loaded(sd15) and engine.default_size == describe_family(specs[1].folder).default_size
    first, second = engine.submit(_request("1:a")), engine.submit(_request("1:b"))
    assert engine.stats().queued == 2 and not first.done()  # waiting in line for the load
    engine.cancel("1:b")
    with pytest.raises(RequestCancelled):
        second.result(timeout=5)
    assert pool.acquire(sd15)[1] is not None  # still loading: the factory waits for the release
    factory.release.set()
    fake = pool.wait_loaded(sd15, timeout=10)
    assert pool.is_loaded(sd15) and not pool.is_loaded(tiny)
    fake.finish("1:a")
    assert "1:b" not in fake.futures  # the cancelled one never reached the engine
    assert first.result(timeout=5).kind == "handoff"
    assert pool.counters(sd15)[0] == 1
    pool.close()
    assert fake.closed


def test_the_pool_says_how_long_a_request_waits_for_its_familys_load(specs):
    now = [100.0]
    factory = FakeFactory(gate=True)
    pool = FamilyPool(specs, factory, clock=lambda: now[0])
    tiny, sd15 = _ids(pool)
    sd15_bytes, tiny_bytes = (pool.info(f).weight_bytes(pool.placement) for f in (sd15, tiny))
    whole = sd15_bytes / DEFAULT_LOAD_BYTES_PER_S  # nothing loaded yet: its bytes at the stated default rate
    engine = pool.engine(sd15)
    assert pool.cold_start_s(sd15) == pytest.approx(whole) and engine.stats().cold_start_s == pytest.approx(whole)
    waiting = engine.submit(_request("1:a"))  # the load starts at 100 s and waits for the release
    now[0] += whole / 4
    assert engine.stats().cold_start_s == pytest.approx(whole * 3 / 4)  # what is left of it
    now[0] += whole
    assert pool.cold_start_s(sd15) == 0.0  # overdue: nothing left to promise
    factory.release.set()
    pool.wait_loaded(sd15, timeout=10).finish("1:a")
    assert waiting.result(timeout=5).kind == "handoff"
    assert pool.cold_start_s(sd15) == 0.0 and engine.stats().cold_start_s == 0.0
    # the other family is priced at the rate this load ran at (one disk, one kind of model)
    (load_s,) = pool.counters(sd15)[2]
    assert pool.cold_start_s(tiny) == pytest.approx(tiny_bytes * load_s / sd15_bytes)
    pool.close()


def test_a_failed_load_fails_the_waiting_requests_with_its_reason_and_can_be_retried(specs):
    factory = FakeFactory()
    factory.fail = "tiny"
    pool = FamilyPool(specs, factory)
    tiny, _ = _ids(pool)
    future = pool.engine(tiny).submit(_request("1:a"))
    with pytest.raises(ConfigError, match="broken weights"):
        future.result(timeout=10)
    factory.fail = None
    again = pool.engine(tiny).submit(_request("1:b"))  # the next request loads it again
    _wait_loaded(pool, tiny)
    factory.built[-1].finish("1:b")
    assert again.result(timeout=5).kind == "handoff"


def _wait_loaded(pool: FamilyPool, family_id: str) -> None:
    pool.wait_loaded(family_id, timeout=10)


def test_the_least_recently_used_idle_family_is_evicted_and_a_busy_one_never(specs):
    infos = [describe_family(s.folder) for s in specs]
    budget = max(i.weight_bytes() for i in infos) + min(i.weight_bytes() for i in infos) // 2  # one at a time
    factory = FakeFactory()
    metrics = EdgeMetrics()
    pool = FamilyPool(specs, factory, memory_budget_bytes=budget, on_event=metrics.observe_family)
    tiny, sd15 = _ids(pool)
    busy = pool.engine(tiny).submit(_request("1:a"))
    _wait_loaded(pool, tiny)
    with pytest.raises(FamilyUnavailable, match="held by families in use") as refused:
        pool.engine(sd15).submit(_request("2:a"))  # tiny is busy: not evicted, sd15 refused with a retry time
    assert refused.value.retry_after_s is not None and pool.is_loaded(tiny)
    tiny_engine = factory.built[-1]
    tiny_engine.finish("1:a")
    assert busy.result(timeout=5).kind == "handoff"
    later = pool.engine(sd15).submit(_request("2:b"))  # tiny is idle now: evicted for sd15
    _wait_loaded(pool, sd15)
    assert tiny_engine.closed and not pool.is_loaded(tiny) and pool.loaded_ids() == [sd15]
    factory.built[-1].finish("2:b")
    assert later.result(timeout=5).kind == "handoff"
    back = pool.engine(tiny).submit(_request("1:b"))  # reloaded on demand, evicting sd15
    _wait_loaded(pool, tiny)
    factory.built[-1].finish("1:b")
    assert back.result(timeout=5).kind == "handoff"
    assert pool.counters(tiny)[:2] == (2, 1) and pool.counters(sd15)[:2] == (1, 1)
    assert pool.loaded_bytes() <= budget
    sample = metrics.registry.get_sample_value
    assert sample("rise_edge_family_loads_total", {"family": "tiny"}) == 2
    assert sample("rise_edge_family_evictions_total", {"family": "sd15"}) == 1
    assert sample("rise_edge_families_loaded", {"family": "tiny"}) == 1
    assert sample("rise_edge_families_loaded", {"family": "sd15"}) == 0
    assert sample("rise_edge_family_load_seconds_count") == 3


def test_bad_pools_are_refused_up_front(specs, tiny_family_dir):
    need = describe_family(tiny_family_dir).weight_bytes()
    with pytest.raises(ConfigError, match="more than the whole memory budget"):
        FamilyPool(specs, FakeFactory(), memory_budget_bytes=need // 2)
    with pytest.raises(ConfigError, match="same family"):
        FamilyPool([specs[0], FamilySpec("again", specs[0].folder)], FakeFactory())
    with pytest.raises(ConfigError, match="given twice"):
        EdgeConfig().family_specs([f"a={specs[0].folder}", f"a={specs[1].folder}"])
    with pytest.raises(ConfigError, match="family name"):
        EdgeConfig().family_specs([f"bad name={specs[0].folder}"])
    with pytest.raises(ConfigError, match="--small names one family"):
        EdgeConfig().family_specs([specs[0].folder, specs[1].folder], small="unet_small")


def test_config_file_families_tables(tmp_path, specs):
    config_file = tmp_path / "edge.toml"
    config_file.write_text(f'load_families = "first_use"\nmemory_budget_mb = 120.5\n'
                           f'[families.tiny]\nfolder = "{specs[0].folder}"\n'
                           f'[families.sd15]\nfolder = "{specs[1].folder}"\nsmall = "unet_small"\n')
    config = EdgeConfig.from_toml(config_file)
    assert (config.load_families, config.memory_budget_mb) == ("first_use", 120.5)
    assert [(s.name, s.small) for s in config.family_specs()] == [("tiny", None), ("sd15", "unet_small")]
    assert [s.name for s in config.family_specs([f"only={specs[0].folder}"])] == ["only"]  # flags win
    config_file.write_text('[families.x]\nsmall = "unet_small"\n')
    with pytest.raises(ConfigError, match="needs folder"):
        EdgeConfig.from_toml(config_file)


def _real_pool(specs, budget: int | None = None) -> FamilyPool:
    config = EdgeConfig(port=0, threads=1)

    def factory(spec: FamilySpec, _info):
        return make_engine(lambda: load_family(spec.folder, spec.small), config)

    return FamilyPool(specs, factory, memory_budget_bytes=budget)


def test_eviction_frees_the_family_and_reloading_gives_the_same_handoff(specs):
    infos = [describe_family(s.folder) for s in specs]
    pool = _real_pool(specs, budget=max(i.weight_bytes() for i in infos) + 1024)
    tiny, sd15 = _ids(pool)
    try:
        first = pool.engine(tiny).submit(_request("1:a")).result(timeout=120)
        family_ref = weakref.ref(pool.wait_loaded(tiny, timeout=60).family)  # type: ignore[attr-defined]
        pool.engine(sd15).submit(_request("2:a")).result(timeout=120)  # evicts tiny
        gc.collect()
        assert family_ref() is None, "the evicted family's modules are still referenced"
        again = pool.engine(tiny).submit(_request("1:b")).result(timeout=120)
        pool.wait_loaded(tiny, timeout=60)  # the request may finish before the pool has counted the load
        # same seed, same family: the same latent after the reload, to the bit
        np.testing.assert_array_equal(decode_handoff(again.handoff).latents, decode_handoff(first.handoff).latents)
        loads, evictions, load_s = pool.counters(tiny)
        assert (loads, evictions) == (2, 1) and all(s > 0 for s in load_s)
    finally:
        pool.close(drain=False, timeout=10)


DEMO_FAMILY = Path(__file__).resolve().parents[2] / "models" / "demo" / "family"


@pytest.fixture(scope="module")
def demo_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import main

    out = tmp_path_factory.mktemp("demo-bundle") / "bundle"
    assert main(["--family", str(DEMO_FAMILY), "--out", str(out), "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def sd15_bundle_dir(sd15_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import main

    out = tmp_path_factory.mktemp("sd15-bundle") / "bundle"
    assert main(["--family", str(sd15_dir), "--out", str(out)]) == 0
    return out


async def _serve_two_families(specs, bundles):
    from device_app.client import EdgeClient
    from device_app.runtime import DeviceBundle
    from edge_server.daemon import EdgeServer

    pool = _real_pool(specs)
    server = EdgeServer.with_family_pool(pool, EdgeConfig(port=0, scheduler="fixed"))
    server.token = TOKEN
    pool.load_at_start()
    port = await server.start()
    try:
        async def device(bundle_dir: Path, seed: int):
            bundle = DeviceBundle(bundle_dir, threads=1)
            async with EdgeClient.connect(f"ws://127.0.0.1:{port}", bundle, token=TOKEN) as client:
                return await client.generate("a red sneaker", seed=seed, pinned=PLAN, timeout=240)

        results = await asyncio.gather(*(device(b, 3 + i) for i, b in enumerate(bundles)))
        stranger = await BareClient.open(port, "other-0123456789ab")
        refused = await stranger.next_event()
        await stranger.ws.close()
        return results, refused
    finally:
        await server.stop()


def test_one_edge_serves_devices_of_two_families_at_once(sd15_dir, demo_bundle_dir, sd15_bundle_dir):
    """The demo family and a tiny SD1.5-shaped one on one edge; a device of each, at once, with its own bundle."""
    from device_app.finish import finish_latents
    from device_app.runtime import DeviceBundle

    specs = [FamilySpec("demo", str(DEMO_FAMILY)), FamilySpec("sd15", str(sd15_dir))]
    bundles = [demo_bundle_dir, sd15_bundle_dir]
    results, refused = asyncio.run(_serve_two_families(specs, bundles))
    families = [load_family(spec.folder) for spec in specs]
    for i, (family, bundle_dir, result) in enumerate(zip(families, bundles, results, strict=True)):
        assert result.plan.family_id == family.family_id  # the plan says which family served it
        reading = family.read_prompt("a red sneaker", 3 + i)  # the demo family draws what its grammar reads
        handoff = EdgeRelay(family).start(reading.prompt if reading else "a red sneaker", PLAN, 3 + i)
        expected = finish_latents(DeviceBundle(bundle_dir, threads=1), handoff)
        err = float(np.abs(result.latents - expected).max())
        assert err <= 1e-4, (family.name, err)  # the relay engine's tolerance: batching changes only round-off
        assert result.image.std() > 0
    assert isinstance(refused, Error) and refused.code == "wrong_family"
    assert all(f.family_id in refused.message for f in families)


def test_each_family_has_its_own_scheduler_profile_and_state(tmp_path, sd15_dir):
    from edge_server.service import family_planner
    from shared.bandit.profile import save_profile
    from tests.helpers import synthetic_profile

    demo = DEMO_FAMILY  # ships profile.json
    profile = tmp_path / "sd15-profile.json"
    save_profile(profile, synthetic_profile(steps=(5, 10), fractions=(0.0, 0.4, 1.0)))
    config = EdgeConfig(bandit_state=str(tmp_path / "state.json"))
    specs = [FamilySpec("demo", str(demo)), FamilySpec("sd15", str(sd15_dir), profile=str(profile))]
    planners = [family_planner(config, describe_family(s.folder), s, several=True) for s in specs]
    assert [p.name for p in planners] == ["linucb", "linucb"]
    arms = [{(a.num_inference_steps, a.split) for a in p.arms} for p in planners]  # type: ignore[attr-defined]
    assert arms[0] != arms[1] and {n for n, _ in arms[1]} == {5, 10}  # each reads its own profile
    for planner in planners:
        planner.save()
    assert sorted(f.name for f in tmp_path.glob("state.*.json")) == ["state.demo.json", "state.sd15.json"]
    alone = family_planner(config, describe_family(demo), specs[0], several=False)
    assert alone.state_path is not None and Path(alone.state_path).name == "state.json"  # type: ignore[attr-defined]


async def _first_use_requests(bundle_dir: Path) -> tuple[list, list[float]]:
    from device_app.client import EdgeClient
    from device_app.runtime import DeviceBundle
    from edge_server.daemon import EdgeServer

    pool = _real_pool([FamilySpec("demo", str(DEMO_FAMILY))])  # not loaded at start: on first use
    server = EdgeServer.with_family_pool(pool, EdgeConfig(port=0, scheduler="fixed"))
    server.token = TOKEN
    port = await server.start()
    loading: list[float] = []
    try:
        bundle = DeviceBundle(bundle_dir, threads=1)
        async with EdgeClient.connect(f"ws://127.0.0.1:{port}", bundle, token=TOKEN) as client:
            results = [await client.generate("a red sneaker", seed=seed, pinned=PLAN, timeout=240,
                                             on_loading=loading.append) for seed in (1, 2)]
        return results, loading
    finally:
        await server.stop()


def test_the_first_request_of_a_family_not_loaded_is_told_the_load_it_waits_for(demo_bundle_dir):
    (first, second), loading = asyncio.run(_first_use_requests(demo_bundle_dir))
    assert first.plan.loading_s is not None and first.plan.loading_s > 0  # the default rate's estimate
    assert loading == [first.plan.loading_s]  # the device was told, once
    assert second.plan.loading_s is None  # loaded by then: nothing to wait for
    assert first.image.std() > 0 and second.image.std() > 0


async def _requests_by_protocol_version() -> list[tuple[BareClient, object]]:
    from edge_server.daemon import EdgeServer

    pool = _real_pool([FamilySpec("demo", str(DEMO_FAMILY))])  # not loaded: the plan would say loading_s
    # The bandit scheduler, as deployed, with a speculative relay wanted for every plan that can be one.
    server = EdgeServer.with_family_pool(pool, EdgeConfig(port=0, speculative_ratio=1e-9))
    server.token = TOKEN
    port = await server.start()
    try:
        family_id = describe_family(DEMO_FAMILY).family_id
        served = []
        for versions in ((1,), PROTOCOL_VERSIONS):  # a device of the first release, then one of this
            client = await BareClient.open(port, family_id, versions=versions)
            event, _ = await client.generate(prompt="a green bag", seed=3, preference=0.5)  # read in part: a notice
            await client.ws.close()
            served.append((client, event))
        return served
    finally:
        await server.stop()


def test_a_first_release_device_is_served_in_the_words_it_knows():
    """A device of protocol version 1 checks every frame's keys: a plan with a notice, the family and the
    load it waits for would fail there. It gets the first release's plan frame and its picture."""
    import json

    from shared.protocol import HandoffReceived, ResultReceived

    plans = []
    for client, event in asyncio.run(_requests_by_protocol_version()):
        assert isinstance(event, (HandoffReceived, ResultReceived)), event
        [plan] = [json.loads(f) for f in client.frames if isinstance(f, str) and json.loads(f)["type"] == "plan"]
        plans.append(plan)
    first, now = plans
    assert set(first) == {"type", "request_id", "plan", "seed", "height", "width", "scheduler", "why"}
    assert set(first["plan"]) == {"num_inference_steps", "split", "sampler", "guidance_scale", "decode_on"}
    assert now["notice"] and now["family_id"] and now["plan"].get("speculative")  # what the first one was spared
