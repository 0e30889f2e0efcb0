"""The device app's logic without a window: settings, offline generation, the controller.

The controller runs with fake backends (what it does with each report) and with the real
backends against a real edge daemon on 127.0.0.1 (``EdgeServer`` on its own event loop in
a thread, as ``lab.loopback`` runs it). Backend reports reach the controller
through ``Pump``: a queue drained by the test thread, as Kivy's Clock drains them on the UI
thread in the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from device_app.app.backends import BundleHolder, Job, LinkStatus, NetworkBackend, OfflineBackend, Outcome
from device_app.app.controller import NO_SERVER, OFFLINE_NOTE, UNREACHABLE, Controller, is_unreachable
from device_app.app.offline import device_only_handoff, generate_offline, offline_plan
from device_app.app.settings import Settings, SettingsStore
from device_app.errors import EdgeConnectionError, EdgeError
from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from shared.errors import ConfigError
from shared.relay_plan import RelayPlan

TOKEN = "app-test-token"

#: Upper bound on waiting for something that must happen (a reply, a connection, a report): far above the real
#: time even on a loaded machine, so only a test whose event never comes reaches it. No test waits on a clock.
WAIT_S = 120.0


# --------------------------------------------------------------------------- helpers


class Pump:
    """``schedule`` for the controller: callbacks queue up until the test thread runs them."""

    def __init__(self) -> None:
        self.calls: queue.Queue[Callable[[], None]] = queue.Queue()

    def __call__(self, callback: Callable[[], None]) -> None:
        self.calls.put(callback)

    def until(self, condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
        """Run queued callbacks until ``condition()`` holds (checked after each, and at least every 0.2 s)."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for the controller")
            with contextlib.suppress(queue.Empty):
                self.calls.get(timeout=min(left, 0.2))()


class NotifyingList(list[Any]):
    """A list that sets ``added`` on each append: a test waits on it while another thread fills it."""

    def __init__(self) -> None:
        super().__init__()
        self.added = threading.Event()

    def append(self, item: Any) -> None:
        super().append(item)
        self.added.set()


@contextlib.contextmanager
def running_edge(family: Any, tmp_path: Path, *, steps: int = 4) -> Iterator[tuple[str, Path]]:
    """A real ``EdgeServer`` (token auth, fixed plan N=steps, K=steps/2) on 127.0.0.1, in a thread."""
    from edge_server.daemon import EdgeConfig, EdgeServer

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = EdgeServer.with_batching_engine(family, EdgeConfig(
        host="127.0.0.1", port=0, token_file=str(token_file), steps=steps, split_fraction=0.5, guidance=5.0,
        shutdown_grace_s=2.0))
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(WAIT_S)
        yield f"ws://127.0.0.1:{port}", token_file
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)


@pytest.fixture(scope="module")
def bundle(fp32_bundle_dir: Path) -> DeviceBundle:
    return DeviceBundle(fp32_bundle_dir, threads=1)


def outcome(rid: str = "r1", *, offline: bool = False, plan: RelayPlan = RelayPlan(4, 2, "dpmpp_2m", 5.0)) -> Outcome:
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return Outcome(rid, image, plan, 7, "offline" if offline else "fixed", "why", None if offline else 0.2,
                   0.1, 0.4, offline)


class FakeBackend:
    """Records jobs and ratings; the test plays the backend's reports by hand."""

    def __init__(self, state: str = "connected") -> None:
        self.jobs: list[tuple[Job, Any]] = []
        self.ratings: list[tuple[str, int]] = []
        self.state = state
        self.closed = False

    def submit(self, job: Job, sink: Any) -> None:
        self.jobs.append((job, sink))

    def rate(self, request_id: str, rating: int, done: Callable[[BaseException | None], None]) -> None:
        self.ratings.append((request_id, rating))
        done(None)

    def link(self) -> LinkStatus:
        return LinkStatus(self.state, "ws://x", 0.004, 1e8)

    def close(self) -> None:
        self.closed = True


def fake_controller(tmp_path: Path, **settings: Any) -> tuple[Controller, FakeBackend, FakeBackend]:
    store = SettingsStore(tmp_path / "settings.json")
    store.save(Settings(**{"server_url": "ws://edge:8765", **settings}))
    network, offline = FakeBackend(), FakeBackend("offline")
    return Controller(store, network, offline, save_dir=tmp_path / "saved"), network, offline


# --------------------------------------------------------------------------- settings


def test_settings_round_trip_with_a_private_file(tmp_path):
    store = SettingsStore(tmp_path / "app" / "settings.json")
    assert store.load() == Settings()  # no file yet: defaults
    saved = Settings(server_url="wss://edge.example:8765", token="t0ken", preference=0.8, bundle="/b")
    store.save(saved)
    assert store.load() == saved
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600  # it holds the token
    store.path.chmod(0o644)
    store.load()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600  # tightened on load
    assert [p.name for p in store.path.parent.iterdir()] == ["settings.json"]  # no temporary left behind


@pytest.mark.parametrize("changes, field", [
    ({"server_url": "http://edge"}, "server_url"),
    ({"preference": 1.5}, "preference"),
    ({"preference": True}, "preference"),
    ({"token": "two words"}, "token"),
    ({"offline_min_steps": 9, "offline_max_steps": 3}, "offline steps"),
])
def test_settings_refuse_bad_values(changes, field):
    with pytest.raises(ConfigError, match=field):
        Settings().with_changes(**changes)


def test_a_broken_settings_file_is_named(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SettingsStore(path).load()
    path.write_text('{"server_url": "ws://a:1", "colour": "red"}')
    with pytest.raises(ConfigError, match="colour"):
        SettingsStore(path).load()
    controller = Controller(SettingsStore(path), FakeBackend(), FakeBackend())  # the app still starts
    assert controller.settings == Settings() and "Settings not loaded" in controller.status


# --------------------------------------------------------------------------- offline generation


def test_offline_plan_follows_the_preference():
    assert offline_plan(0.0, min_steps=4, max_steps=12).num_inference_steps == 4
    assert offline_plan(1.0, min_steps=4, max_steps=12).num_inference_steps == 12
    assert offline_plan(0.5, min_steps=4, max_steps=12) == RelayPlan(8, 0, "dpmpp_2m", 7.5)
    with pytest.raises(ConfigError):
        offline_plan(2.0)


def test_offline_handoff_matches_the_edges_device_only_start(tiny_family, bundle):
    """The device's k=0 handoff carries what the edge's would: same schedule, state, text embedding."""
    from edge_server.relay import EdgeRelay

    plan = RelayPlan(5, 0, "dpmpp_2m", 5.0)
    mine = device_only_handoff(bundle, "a red bag", plan, seed=3)
    edge = EdgeRelay(tiny_family).start("a red bag", plan, seed=3)
    assert mine.family_id == edge.family_id and mine.split == 0 and mine.sampler_state.step_index == 0
    np.testing.assert_allclose(mine.timesteps, edge.timesteps)
    np.testing.assert_allclose(mine.cond_embeddings, edge.cond_embeddings, atol=1e-4)  # ORT vs torch encoder
    assert mine.latents.shape == edge.latents.shape and abs(float(mine.latents.std()) - 1.0) < 0.2
    # Same noise in, same image out: the device loop continues either handoff alike.
    import dataclasses

    same_noise = dataclasses.replace(mine, latents=edge.latents)
    np.testing.assert_allclose(finish_latents(bundle, same_noise), finish_latents(bundle, edge), atol=1e-4)


def test_offline_generation_is_seeded_and_reports_steps(bundle):
    plan = RelayPlan(3, 0, "euler", 5.0)
    steps: list[tuple[int, int]] = []
    a = generate_offline(bundle, "a blue sneaker", plan, seed=9, on_step=lambda *s: steps.append(s))
    b = generate_offline(bundle, "a blue sneaker", plan, seed=9)
    c = generate_offline(bundle, "a blue sneaker", plan, seed=10)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert a.image.dtype == np.uint8 and a.image.shape[2] == 3
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.latents, c.latents)
    assert a.total_s >= a.device_compute_s > 0


# --------------------------------------------------------------------------- controller, fake backends


def test_generate_shows_edge_then_device_progress_and_the_result(tmp_path):
    controller, network, _ = fake_controller(tmp_path, preference=0.3)
    seen: list[str] = []
    controller.subscribe(lambda c: seen.append(c.status))
    assert controller.generate("  a red bag ")
    job, sink = network.jobs[0]
    assert (job.prompt, job.preference, job.server_url) == ("a red bag", 0.3, "ws://edge:8765")
    assert controller.busy and not controller.generate("another")  # one at a time
    sink.plan(RelayPlan(4, 2, "dpmpp_2m", 5.0), "balanced")
    assert controller.progress == (0, 4) and controller.progress_text == "edge 0/2 · device 0/2"
    sink.progress("edge", 1, 2)
    sink.progress("edge", 2, 2)
    sink.progress("device", 3, 4)  # device steps count from K + 1
    assert controller.progress == (3, 4) and controller.progress_text == "edge 2/2 · device 1/2"
    sink.done(outcome("r1"))
    assert not controller.busy and controller.progress == (4, 4)
    assert controller.status.startswith("Done in 0.40 s")
    assert "N=4 K=2" in controller.result_text and "chosen by fixed" in controller.result_text
    assert "edge 0.20 s · device 0.10 s" in controller.result_text
    assert [h.prompt for h in controller.history] == ["a red bag"] and controller.current is controller.history[0]
    assert any("Edge step 1 of 2" in s for s in seen)


def test_rate_save_and_preference(tmp_path):
    controller, network, _ = fake_controller(tmp_path)
    assert not controller.generate("   ") and controller.status == "Type a prompt first"
    controller.generate("a red bag")
    network.jobs[0][1].done(outcome("r9"))
    assert controller.rate(1)
    assert network.ratings == [("r9", 1)] and controller.current.rating == 1
    assert controller.status == "Rating sent to the edge"
    path = controller.save()
    assert path is not None and path.parent == tmp_path / "saved" and path.name.endswith("-a-red-bag.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), controller.current.image)
    assert controller.set_preference(0.9)
    assert SettingsStore(tmp_path / "settings.json").load().preference == 0.9  # persisted
    assert not controller.update_settings(server_url="http://nope")
    assert "Settings not saved" in controller.status and controller.settings.server_url == "ws://edge:8765"


def test_unreachable_edge_falls_back_to_the_device(tmp_path):
    controller, network, offline = fake_controller(tmp_path)
    controller.generate("a red bag")
    network.jobs[0][1].failed(EdgeConnectionError("connect_failed", "cannot connect"))
    assert controller.status == UNREACHABLE and controller.offline and controller.busy
    assert controller.link_text == "edge: offline (device only)"
    job, sink = offline.jobs[0]
    assert job.prompt == "a red bag"
    sink.plan(RelayPlan(4, 0, "dpmpp_2m", 7.5), "offline")
    sink.progress("device", 2, 4)
    assert controller.progress == (2, 4) and controller.progress_text == "edge — · device 2/4"
    sink.done(outcome("offline-1", offline=True, plan=RelayPlan(4, 0, "dpmpp_2m", 7.5)))
    assert controller.result_text.startswith(OFFLINE_NOTE)
    assert "edge unreachable" in controller.status
    assert controller.rate(-1) and network.ratings == []  # nobody to tell


def test_other_edge_errors_are_shown_not_hidden_by_the_fallback(tmp_path):
    controller, network, offline = fake_controller(tmp_path)
    controller.generate("a red bag")
    network.jobs[0][1].failed(EdgeConnectionError("unauthorized", "bad token"))
    assert not controller.busy and offline.jobs == []
    assert controller.status == "Failed: unauthorized: bad token"
    assert is_unreachable(EdgeConnectionError("connection_lost", "x"))
    assert not is_unreachable(EdgeError("busy", "x"))


def test_no_server_means_device_only(tmp_path):
    controller, network, offline = fake_controller(tmp_path, server_url="")
    controller.generate("a red bag")
    assert network.jobs == [] and len(offline.jobs) == 1 and controller.status == NO_SERVER


# --------------------------------------------------------------------------- controller, real backends


def real_controller(tmp_path: Path, fp32_bundle_dir: Path, pump: Pump, **settings: Any) -> Controller:
    store = SettingsStore(tmp_path / "settings.json")
    store.save(Settings(bundle=str(fp32_bundle_dir), offline_min_steps=2, offline_max_steps=4, **settings))
    holder = BundleHolder(fp32_bundle_dir, threads=1)
    # The app's 5 s open timeout would send a slow (loaded) but reachable edge's job offline: wait as long as it takes.
    return Controller(store, NetworkBackend(holder, open_timeout=WAIT_S, timeout=WAIT_S), OfflineBackend(holder),
                      schedule=pump, save_dir=tmp_path / "saved")


def test_real_backends_against_a_local_edge_then_offline(tiny_family, fp32_bundle_dir, tmp_path):
    pump = Pump()
    stages: list[str] = []
    with running_edge(tiny_family, tmp_path) as (url, token_file):
        controller = real_controller(tmp_path, fp32_bundle_dir, pump, server_url=url, token=TOKEN, preference=0.7)
        controller.subscribe(lambda c: stages.append(c.progress_text))
        try:
            thread = threading.current_thread()
            assert controller.generate("a red bag")
            pump.until(lambda: not controller.busy)
            assert threading.current_thread() is thread  # every change ran here, not in a worker
            assert controller.error is None, controller.status
            item = controller.current
            assert not item.outcome.offline and item.outcome.plan == RelayPlan(4, 2, "dpmpp_2m", 5.0)
            assert item.image.dtype == np.uint8 and item.image.std() > 1
            assert "edge 1/2 · device 0/2" in stages and "edge 2/2 · device 1/2" in stages
            controller.refresh_indicators()
            assert controller.link.state == "connected" and controller.link_text.startswith("edge: connected")
            controller.rate(1)
            pump.until(lambda: controller.status.startswith("Rating"))
            assert controller.status == "Rating sent to the edge"
            # A second request reuses the connection.
            controller.generate("a blue sneaker")
            pump.until(lambda: not controller.busy)
            assert len(controller.history) == 2 and not controller.current.outcome.offline
        except BaseException:
            controller.close()
            raise
    # The edge is gone: the next request says so and is made on the device. Once the app has seen the close: a
    # request sent between the edge's goodbye (shutting_down) and its close would fail with that instead.
    try:
        pump.until(lambda: controller.network.link().state != "connected")
        seen: list[str] = []
        controller.subscribe(lambda c: seen.append(c.status))
        controller.generate("a green hat")
        pump.until(lambda: not controller.busy)
        assert UNREACHABLE in seen
        assert controller.current.outcome.offline and controller.current.outcome.plan.split == 0
        assert controller.current.outcome.plan.num_inference_steps == 3  # preference 0.7 of 2..4 steps
        assert controller.result_text.startswith(OFFLINE_NOTE)
        assert len(controller.history) == 3
    finally:
        controller.close()


def test_rating_reaches_the_edge(tiny_family, fp32_bundle_dir, tmp_path):
    """The daemon only counts reports; the protocol-level FakeEdge records the Rating message itself."""
    from tests.device_app.fake_edge import FakeEdge

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    edge = FakeEdge(tiny_family, token=TOKEN)
    asyncio.run_coroutine_threadsafe(edge.__aenter__(), loop).result(WAIT_S)
    edge.ratings = ratings = NotifyingList()
    pump = Pump()
    controller = real_controller(tmp_path, fp32_bundle_dir, pump, server_url=edge.url, token=TOKEN)
    try:
        controller.generate("a red bag")
        pump.until(lambda: not controller.busy)
        rid = controller.current.outcome.request_id
        controller.rate(-1)
        pump.until(lambda: controller.status.startswith("Rating"))
        assert ratings.added.wait(WAIT_S), "the edge never got the rating"
        assert [(r.request_id, r.rating) for r in edge.ratings] == [(rid, -1)]
        assert [r.request_id for r in edge.reports] == [rid]  # the report came first
    finally:
        controller.close()
        asyncio.run_coroutine_threadsafe(edge.__aexit__(None, None, None), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
