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
import io
import json
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
from PIL.PngImagePlugin import PngInfo

from device_app.app.backends import (
    BundleHolder,
    Job,
    LinkStatus,
    NetworkBackend,
    OfflineBackend,
    Outcome,
    link_for_error,
)
from device_app.app.controller import MAX_SEED, NO_SERVER, UNREACHABLE, Controller, is_unreachable, parse_seed
from device_app.app.gallery import GalleryError, ImageInfo
from device_app.app.offline import device_only_handoff, generate_offline, offline_plan
from device_app.app.settings import Settings, SettingsStore
from device_app.app.words import loading_text
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


def outcome(rid: str = "r1", *, offline: bool = False, plan: RelayPlan = RelayPlan(4, 2, "dpmpp_2m", 5.0),
            scheduler: str | None = None, notice: str | None = None) -> Outcome:
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    chosen = scheduler or ("offline" if offline else "fixed")
    return Outcome(rid, image, plan, 7, chosen, "why", None if offline else 0.2, 0.1, 0.4, offline,
                   width=8, height=8, family="tiny", family_id="tiny-abc123", notice=notice)


class FakeBackend:
    """Records jobs, ratings, connects and cancels; the test plays the backend's reports by hand."""

    def __init__(self, state: str = "connected") -> None:
        self.jobs: list[tuple[Job, Any]] = []
        self.ratings: list[tuple[str, int]] = []
        self.cancelled: list[int] = []
        self.connects: list[tuple[str, str, Callable[[LinkStatus], None]]] = []
        self.state = state
        self.closed = False

    def submit(self, job: Job, sink: Any) -> None:
        self.jobs.append((job, sink))

    def cancel(self, job_id: int) -> None:
        self.cancelled.append(job_id)

    def connect(self, url: str, token: str, done: Callable[[LinkStatus], None]) -> None:
        self.connects.append((url, token, done))

    def rate(self, request_id: str, rating: int, done: Callable[[BaseException | None], None]) -> None:
        self.ratings.append((request_id, rating))
        done(None)

    def link(self) -> LinkStatus:
        return LinkStatus(self.state, "ws://x", 0.004, 1e8)

    def close(self) -> None:
        self.closed = True


def fake_controller(tmp_path: Path, bundle: Path | None = None, **settings: Any
                    ) -> tuple[Controller, FakeBackend, FakeBackend]:
    """A controller on fake backends; ``bundle`` (default: a minimal valid bundle folder) in its settings."""
    store = SettingsStore(tmp_path / "settings.json")
    if bundle is None:
        bundle = tmp_path / "bundle"
        if not bundle.exists():
            minimal_bundle(bundle)
    store.save(Settings(**{"server_url": "ws://edge:8765", "bundle": str(bundle), **settings}))
    network, offline = FakeBackend(), FakeBackend("offline")
    controller = Controller(store, network, offline, save_dir=tmp_path / "saved", gallery_dir=tmp_path / "gallery")
    return controller, network, offline


def minimal_bundle(folder: Path, *, family_id: str | None = None, grammar: str | None = None) -> Path:
    """A bundle folder that passes the app's quick check: the session's tiny bundle (files hard-linked, or copied),
    its manifest re-written with ``family_id`` / ``prompt_grammar`` when given."""
    import shutil

    shutil.copytree(_REAL_BUNDLE[0], folder, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("manifest.json"))
    manifest = json.loads((_REAL_BUNDLE[0] / "manifest.json").read_text())
    if family_id is not None:
        manifest["family_id"] = family_id
    if grammar is not None:
        manifest["prompt_grammar"] = grammar
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _link_or_copy(source: str, target: str) -> None:
    import os
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


_REAL_BUNDLE: list[Path] = []


@pytest.fixture(autouse=True)
def real_bundle(request: pytest.FixtureRequest) -> None:
    """Fake-backend tests need a bundle folder that passes the quick check: the session's tiny fp32 bundle."""
    if not _REAL_BUNDLE:
        _REAL_BUNDLE.append(request.getfixturevalue("fp32_bundle_dir"))


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


def test_generate_shows_edge_then_device_progress_and_the_result_in_plain_words(tmp_path):
    controller, network, _ = fake_controller(tmp_path, preference=0.3)
    seen: list[str] = []
    controller.subscribe(lambda c: seen.append(c.status))
    assert controller.generate("  a red bag ", seed="42")
    job, sink = network.jobs[0]
    assert (job.prompt, job.preference, job.server_url, job.seed) == ("a red bag", 0.3, "ws://edge:8765", 42)
    assert controller.busy and not controller.generate("another")  # one at a time
    sink.plan(RelayPlan(4, 2, "dpmpp_2m", 5.0), "balanced")
    assert controller.progress == (0, 4) and controller.progress_text == "server 0/2 · this device 0/2"
    sink.progress("edge", 1, 2)
    sink.progress("edge", 2, 2)
    sink.progress("device", 3, 4)  # device steps count from K + 1
    assert controller.progress == (3, 4) and controller.progress_text == "server 2/2 · this device 1/2"
    sink.done(outcome("r1", scheduler="linucb"))
    assert not controller.busy and controller.progress == (4, 4)
    assert controller.status.startswith("Done in 0.40 s")
    # The main line speaks plainly; the technical line is behind Details.
    assert controller.result_text == ("2 steps on the server, 2 on this device — chosen for quality 0.3\n"
                                      "Made in 0.40 s (server 0.20 s, this device 0.10 s)")
    assert "N=" not in controller.result_text and "load" not in controller.result_text
    assert controller.details_text.startswith("N=4 K=2 (edge 2 · device 2 steps) · dpmpp_2m · guidance 5 · seed 7")
    assert "scheduler linucb: why" in controller.details_text
    assert [h.prompt for h in controller.history] == ["a red bag"] and controller.current is controller.history[0]
    assert any("Server: step 1 of 2" in s for s in seen)


def test_while_the_server_loads_its_model_the_status_says_so_and_how_long(tmp_path):
    controller, network, _ = fake_controller(tmp_path)
    assert controller.generate("a red bag")
    _, sink = network.jobs[0]
    sink.plan(RelayPlan(4, 2, "dpmpp_2m", 5.0), "balanced")
    sink.loading(7.6)
    assert controller.status == "The server is loading its model first (about 8 s)"
    sink.progress("edge", 1, 2)  # loaded: the steps say the rest
    assert controller.status == "Server: step 1 of 2"
    assert loading_text(0.2) == "The server is loading its model first (about 1 s)"
    assert loading_text(150.0) == "The server is loading its model first (about 2 min)"


@pytest.mark.parametrize("scheduler, plan, line", [
    ("pinned", RelayPlan(20, 10, "ddim", 7.5), "10 steps on the server, 10 on this device — as you fixed it"),
    ("fixed", RelayPlan(4, 2, "ddim", 7.5), "2 steps on the server, 2 on this device — the server's fixed split"),
    ("linucb", RelayPlan(8, 8, "ddim", 7.5), "all 8 steps on the server — chosen for quality 0.6"),
    ("linucb", RelayPlan(1, 0, "ddim", 7.5), "all 1 step on this device — chosen for quality 0.6"),
])
def test_who_chose_the_plan_in_words(tmp_path, scheduler, plan, line):
    controller, network, _ = fake_controller(tmp_path, preference=0.6)
    controller.generate("a red bag")
    network.jobs[0][1].done(outcome(plan=plan, scheduler=scheduler))
    assert controller.result_text.splitlines()[0] == line
    assert "chosen by" not in controller.result_text


def test_seed_field(tmp_path):
    assert parse_seed("random") is None and parse_seed("  ") is None and parse_seed(None) is None
    assert parse_seed(" 123 ") == 123 and parse_seed(0) == 0
    for bad in ("abc", "-1", "1.5", str(MAX_SEED + 1)):
        with pytest.raises(ValueError, match="seed"):
            parse_seed(bad)
    controller, network, _ = fake_controller(tmp_path)
    assert not controller.generate("a red bag", seed="twelve")
    assert network.jobs == [] and "whole number or 'random'" in controller.status
    assert controller.generate("a red bag", seed="random")
    drawn = network.jobs[0][0].seed  # drawn here, so the prompt note and the picture use the same seed
    assert drawn is not None and 0 <= drawn <= MAX_SEED


def test_cancel_tells_the_backend_and_drops_late_reports(tmp_path):
    controller, network, _ = fake_controller(tmp_path)
    assert not controller.cancel()  # nothing to cancel
    controller.generate("a red bag")
    job, sink = network.jobs[0]
    sink.plan(RelayPlan(4, 2, "dpmpp_2m", 5.0), "balanced")
    assert controller.cancel()
    assert network.cancelled == [job.job_id]
    assert not controller.busy and controller.status == "Cancelled" and controller.progress == (0, 0)
    sink.progress("edge", 1, 2)
    sink.done(outcome("late"))  # the backend's report after the cancel: dropped
    assert controller.history == [] and controller.current is None and controller.status == "Cancelled"
    assert controller.generate("a blue bag")  # free for the next one


def test_cancel_offline_job_goes_to_the_offline_backend(tmp_path):
    controller, network, offline = fake_controller(tmp_path, server_url="")
    controller.generate("a red bag")
    controller.cancel()
    assert offline.cancelled == [offline.jobs[0][0].job_id] and network.cancelled == []


def test_gallery_survives_a_restart_with_its_parameters(tmp_path):
    controller, network, _ = fake_controller(tmp_path, preference=0.6)
    controller.generate("a red bag", seed=7)
    network.jobs[0][1].done(outcome("r1", scheduler="linucb"))
    controller.rate(1)
    controller.generate("a blue bag", seed=8)
    network.jobs[1][1].done(outcome("r2", plan=RelayPlan(6, 3, "euler", 4.0)))
    image = controller.current.image
    files = sorted((tmp_path / "gallery").glob("*.png"))
    assert len(files) == 2
    # The PNG carries A1111's "parameters" and our JSON, readable by any PNG reader.
    text = Image.open(controller.current.entry.path).text
    assert text["parameters"].splitlines()[0] == "a blue bag"
    assert "Steps: 6, Sampler: euler, CFG scale: 4, Seed: 7, Size: 8x8, Model: tiny" in text["parameters"]
    assert json.loads(text["rise"])["split"] == 3

    again, _, _ = fake_controller(tmp_path)  # a new app on the same folders
    assert [h.prompt for h in again.history] == ["a blue bag", "a red bag"]
    newest, oldest = again.history
    assert (newest.info.steps, newest.info.split, newest.info.sampler, newest.info.guidance) == (6, 3, "euler", 4.0)
    assert (newest.info.family, newest.info.total_s, newest.info.edge_s) == ("tiny", 0.4, 0.2)
    assert oldest.rating == 1 and oldest.info.preference == 0.6  # the rating was kept in the file
    np.testing.assert_array_equal(newest.image, image)
    again.open_item(oldest)  # re-open into the result view
    assert again.current is oldest and again.result_text.startswith("2 steps on the server, 2 on this device")
    copy = again.save(oldest)  # a copy, parameters included, in the save folder
    assert copy is not None and copy.parent == tmp_path / "saved" and "rise" in Image.open(copy).text
    assert again.delete(oldest)
    assert [h.prompt for h in again.history] == ["a blue bag"] and again.current is None
    assert len(list((tmp_path / "gallery").glob("*.png"))) == 1
    third, _, _ = fake_controller(tmp_path)
    assert [h.prompt for h in third.history] == ["a blue bag"]


def test_gallery_skips_files_it_cannot_read(tmp_path):
    (tmp_path / "gallery").mkdir()
    (tmp_path / "gallery" / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (4, 4)).save(tmp_path / "gallery" / "foreign.png")  # no parameters of ours
    bad = PngInfo()
    bad.add_itxt("rise", json.dumps({"prompt": "x", "seed": "seven"}))
    Image.new("RGB", (4, 4)).save(tmp_path / "gallery" / "bad.png", pnginfo=bad)
    controller, _, _ = fake_controller(tmp_path)
    assert controller.history == []
    with pytest.raises(GalleryError, match="missing 'steps'|'seed'"):
        ImageInfo.from_json(json.dumps({"prompt": "x", "seed": "seven"}))


def test_gallery_folder_is_configurable(tmp_path):
    controller, network, _ = fake_controller(tmp_path)
    other = tmp_path / "elsewhere"
    assert controller.update_settings(gallery_dir=str(other))
    controller.generate("a red bag")
    network.jobs[0][1].done(outcome())
    assert len(list(other.glob("*.png"))) == 1 and not (tmp_path / "gallery").exists()


def test_rate_save_and_preference(tmp_path):
    controller, network, _ = fake_controller(tmp_path)
    assert not controller.generate("   ") and controller.status == "Type a prompt first"
    controller.generate("a red bag")
    network.jobs[0][1].done(outcome("r9"))
    assert controller.rate(1)
    assert network.ratings == [("r9", 1)] and controller.current.rating == 1
    assert controller.status == "Rating sent to the server"
    path = controller.save()
    assert path is not None and path.parent == tmp_path / "saved" and path.name.endswith("-a-red-bag.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), controller.current.image)
    assert controller.set_preference(0.9)
    assert SettingsStore(tmp_path / "settings.json").load().preference == 0.9  # persisted
    assert not controller.update_settings(server_url="http://nope")
    assert "Settings not saved" in controller.status and controller.settings.server_url == "ws://edge:8765"


def test_a_bad_bundle_is_refused_in_settings_and_said_at_start(tmp_path):
    controller, _, _ = fake_controller(tmp_path, bundle=tmp_path / "no-such-bundle")
    controller.start()
    assert controller.bundle_problem is not None and "does not exist" in controller.bundle_problem
    assert "choose one in Settings" in controller.status and not controller.can_generate
    assert not controller.generate("a red bag")
    good = minimal_bundle(tmp_path / "good")
    broken = minimal_bundle(tmp_path / "broken")
    (broken / "manifest.json").write_text("{")
    assert not controller.update_settings(bundle=str(broken))
    assert "Settings not saved" in controller.status and "not valid JSON" in controller.status
    assert controller.settings.bundle == str(tmp_path / "no-such-bundle")  # the old one kept
    assert controller.update_settings(bundle=str(good))
    assert controller.bundle_problem is None and controller.can_generate


def test_connection_indicator_states(tmp_path):
    controller, network, _ = fake_controller(tmp_path)
    assert controller.link_text == "not connected"
    controller.start()  # connects at once, in the background: no "not connected" while the edge is fine
    assert controller.link_text == "connecting…" and len(network.connects) == 1
    url, token, done = network.connects[0]
    done(LinkStatus("connected", url, 0.004))
    assert controller.link_text == "connected"
    done(LinkStatus("unauthorized", url, detail="bad token"))
    assert controller.link_text == "unauthorized" and "access token" in controller.status
    done(LinkStatus("offline", url, detail="refused"))
    assert controller.link_text == "offline"
    device_only, network2, _ = fake_controller(tmp_path / "b", server_url="")
    device_only.start()
    assert device_only.link_text == "device only" and network2.connects == []
    assert link_for_error(EdgeConnectionError("unauthorized", "bad token")).state == "unauthorized"
    assert link_for_error(EdgeConnectionError("connect_failed", "refused")).state == "offline"
    assert link_for_error(EdgeConnectionError("wrong_family", "other family")).state == "refused"


def test_an_offline_edge_is_tried_again_while_idle(tmp_path):
    now = [1000.0]
    store = SettingsStore(tmp_path / "settings.json")
    store.save(Settings(server_url="ws://edge:8765", bundle=str(minimal_bundle(tmp_path / "bundle"))))
    network = FakeBackend("disconnected")
    controller = Controller(store, network, FakeBackend(), gallery_dir=tmp_path / "g", clock=lambda: now[0])
    controller.start()
    network.connects[0][2](LinkStatus("offline", "ws://edge:8765", detail="refused"))
    network.state = "offline"
    controller.refresh_indicators()
    assert controller.link_text == "offline" and len(network.connects) == 1  # not at once
    now[0] += Controller.RECONNECT_S
    controller.refresh_indicators()
    assert len(network.connects) == 2 and controller.link_text == "connecting…"
    network.connects[1][2](LinkStatus("connected", "ws://edge:8765", 0.003))
    network.state = "connected"
    controller.refresh_indicators()
    assert controller.link_text == "connected"


def test_demo_grammar_help_and_notes(tmp_path):
    from shared.demo_grammar.understanding import example_prompts, read_prompt, vocabulary_line

    bundle = minimal_bundle(tmp_path / "demo-bundle", grammar="demo")
    controller, network, offline = fake_controller(tmp_path, bundle=bundle)
    assert controller.prompt_hint == f"Describe an image, e.g. {example_prompts(1, seed=0)[0]}"
    assert controller.prompt_line == vocabulary_line()  # what it can draw, until one types
    note = controller.read_prompt("a green bag", seed="5")  # as the user types
    assert note is not None and note == read_prompt("a green bag", 5).message and "green bag" in note
    assert controller.prompt_line == note
    assert controller.read_prompt(read_prompt("a green bag", 5).prompt, seed="5") is None  # exactly as typed
    assert controller.prompt_line == vocabulary_line()
    # Nothing the family can draw: no request, no blank picture, the note says why.
    assert not controller.generate("a cat on a sofa") and network.jobs == []
    assert controller.prompt_line == read_prompt("a cat on a sofa", 0).message and "cat" in controller.prompt_line
    assert "Nothing to draw" in controller.status
    assert controller.generate("a green bag", seed=5)
    assert controller.prompt_line == read_prompt("a green bag", 5).message
    # A read of the same text after Generate (typing debounced): the generation's note, for its seed, stays.
    assert controller.read_prompt("a green bag", seed="random") == read_prompt("a green bag", 5).message
    # The edge's reading replaces the local one when it comes with the plan.
    network.jobs[0][1].done(outcome(notice="Placed the green bag in the top left."))
    assert controller.prompt_line == "Placed the green bag in the top left."
    assert controller.current.info.notice == "Placed the green bag in the top left."
    # The family is given the prompt as it was read (edge and device alike): the picture is what the note says.
    assert network.jobs[0][0].given == read_prompt("a green bag", 5).prompt != "a green bag"
    controller.update_settings(server_url="")
    controller.generate("a green bag", seed=5)
    job = offline.jobs[0][0]
    assert job.prompt == "a green bag" and job.given == read_prompt("a green bag", 5).prompt
    assert controller.current.prompt == "a green bag"  # the gallery keeps what the user typed


def test_other_families_get_a_general_hint(tmp_path):
    controller, _, _ = fake_controller(tmp_path)
    assert controller.prompt_hint == "Describe an image, e.g. a lighthouse on a cliff at sunset"
    assert controller.read_prompt("a cat on a sofa") is None and controller.prompt_line == ""


def test_live_preview_shows_while_busy(tmp_path):
    controller, network, _ = fake_controller(tmp_path)
    pixels = np.random.default_rng(1).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    assert not controller.show_preview(buffer.getvalue())  # nothing in progress
    controller.generate("a red bag")
    assert not controller.show_preview(b"not a png") and controller.preview is None
    assert controller.show_preview(buffer.getvalue())
    np.testing.assert_array_equal(controller.preview, pixels)
    network.jobs[0][1].done(outcome())
    assert controller.preview is None  # the result replaces it


def test_unreachable_edge_falls_back_to_the_device(tmp_path):
    controller, network, offline = fake_controller(tmp_path)
    controller.generate("a red bag")
    network.jobs[0][1].failed(EdgeConnectionError("connect_failed", "cannot connect"))
    assert controller.status == UNREACHABLE and controller.offline and controller.busy
    assert controller.link_text == "offline"
    job, sink = offline.jobs[0]
    assert job.prompt == "a red bag"
    sink.plan(RelayPlan(4, 0, "dpmpp_2m", 7.5), "offline")
    sink.progress("device", 2, 4)
    assert controller.progress == (2, 4) and controller.progress_text == "this device 2/4"
    sink.done(outcome("offline-1", offline=True, plan=RelayPlan(4, 0, "dpmpp_2m", 7.5)))
    assert controller.result_text.startswith("all 4 steps on this device — the server is unreachable")
    assert "server unreachable" in controller.status
    assert controller.rate(-1) and network.ratings == []  # nobody to tell


def test_other_edge_errors_are_shown_not_hidden_by_the_fallback(tmp_path):
    controller, network, offline = fake_controller(tmp_path)
    controller.generate("a red bag")
    network.jobs[0][1].failed(EdgeConnectionError("unauthorized", "bad token"))
    assert not controller.busy and offline.jobs == []
    assert controller.status == "Failed: unauthorized: bad token" and controller.link_text == "unauthorized"
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
                      schedule=pump, save_dir=tmp_path / "saved", gallery_dir=tmp_path / "gallery", bundles=holder)


@contextlib.contextmanager
def fake_edge(family: Any, **knobs: Any) -> Iterator[Any]:
    """The protocol-level ``FakeEdge`` (it records ratings, reports and cancels) on its own loop in a thread."""
    from tests.device_app.fake_edge import FakeEdge

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    edge = FakeEdge(family, token=TOKEN, **knobs)
    asyncio.run_coroutine_threadsafe(edge.__aenter__(), loop).result(WAIT_S)
    try:
        yield edge
    finally:
        asyncio.run_coroutine_threadsafe(edge.__aexit__(None, None, None), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)


def test_real_backends_against_a_local_edge_then_offline(tiny_family, fp32_bundle_dir, tmp_path):
    pump = Pump()
    stages: list[str] = []
    with running_edge(tiny_family, tmp_path) as (url, token_file):
        controller = real_controller(tmp_path, fp32_bundle_dir, pump, server_url=url, token=TOKEN, preference=0.7)
        controller.subscribe(lambda c: stages.append(c.progress_text))
        try:
            controller.start()  # connects at start: "connecting…", then "connected", before any Generate
            assert controller.link_text == "connecting…"
            pump.until(lambda: controller.link.state != "connecting")
            assert controller.link_text == "connected", controller.link
            thread = threading.current_thread()
            assert controller.generate("a red bag")
            pump.until(lambda: not controller.busy)
            assert threading.current_thread() is thread  # every change ran here, not in a worker
            assert controller.error is None, controller.status
            item = controller.current
            assert not item.info.offline and (item.info.steps, item.info.split, item.info.sampler) == (4, 2, "dpmpp_2m")
            assert item.info.family_id == controller.manifest.family_id and item.entry is not None
            assert item.image.dtype == np.uint8 and item.image.std() > 1
            assert "server 1/2 · this device 0/2" in stages and "server 2/2 · this device 1/2" in stages
            assert controller.result_text.startswith("2 steps on the server, 2 on this device — the server's fixed")
            controller.refresh_indicators()
            assert controller.link.state == "connected" and controller.link_text == "connected"
            controller.rate(1)
            pump.until(lambda: controller.status.startswith("Rating"))
            assert controller.status == "Rating sent to the server"
            # A second request reuses the connection.
            controller.generate("a blue sneaker")
            pump.until(lambda: not controller.busy)
            assert len(controller.history) == 2 and not controller.current.info.offline
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
        assert controller.current.info.offline and controller.current.info.split == 0
        assert controller.current.info.steps == 3  # preference 0.7 of 2..4 steps
        assert controller.result_text.startswith("all 3 steps on this device — the server is unreachable")
        assert len(controller.history) == 3
    finally:
        controller.close()


def test_cancel_reaches_the_edge(tiny_family, fp32_bundle_dir, tmp_path):
    """The edge plans, then stalls: Cancel frees the app at once and the edge gets ``cancel`` for that request."""
    with fake_edge(tiny_family, stall=True) as edge:
        edge.cancels = cancels = NotifyingList()
        pump = Pump()
        controller = real_controller(tmp_path, fp32_bundle_dir, pump, server_url=edge.url, token=TOKEN)
        try:
            controller.generate("a red bag")
            pump.until(lambda: controller.plan is not None)  # the edge has the request
            rid = next(iter(edge.served))
            assert controller.cancel() and not controller.busy and controller.status == "Cancelled"
            assert cancels.added.wait(WAIT_S), "the edge was never told"
            assert [c.request_id for c in edge.cancels] == [rid]
            assert controller.history == []
        finally:
            controller.close()


def test_wrong_token_shows_unauthorized_at_start(tiny_family, fp32_bundle_dir, tmp_path):
    with fake_edge(tiny_family) as edge:
        pump = Pump()
        controller = real_controller(tmp_path, fp32_bundle_dir, pump, server_url=edge.url, token="wrong-token")
        try:
            controller.start()
            pump.until(lambda: controller.link.state != "connecting")
            assert controller.link_text == "unauthorized" and "access token" in controller.status
        finally:
            controller.close()


def test_rating_reaches_the_edge(tiny_family, fp32_bundle_dir, tmp_path):
    """The daemon only counts reports; the protocol-level FakeEdge records the Rating message itself."""
    with fake_edge(tiny_family) as edge:
        edge.ratings = ratings = NotifyingList()
        pump = Pump()
        controller = real_controller(tmp_path, fp32_bundle_dir, pump, server_url=edge.url, token=TOKEN)
        try:
            controller.generate("a red bag")
            pump.until(lambda: not controller.busy)
            rid = controller.current.info.request_id
            controller.rate(-1)
            pump.until(lambda: controller.status.startswith("Rating"))
            assert ratings.added.wait(WAIT_S), "the edge never got the rating"
            assert [(r.request_id, r.rating) for r in edge.ratings] == [(rid, -1)]
            assert [r.request_id for r in edge.reports] == [rid]  # the report came first
        finally:
            controller.close()


def test_an_adaptive_handoff_counts_the_device_steps_from_where_it_happened(tmp_path):
    controller, network, _offline = fake_controller(tmp_path)
    controller.generate("a red bag")
    _job, sink = network.jobs[0]
    sink.plan(RelayPlan(20, 12, "dpmpp_2m", 7.5, handoff_tau=0.05, min_split=2), "linucb: N20k2-12t0.05")
    sink.progress("edge", 8, 8)  # the edge settled after 8 of at most 12 steps
    sink.progress("device", 9, 20)
    assert controller.progress_text == "server 8/8 · this device 1/12"
    sink.progress("device", 20, 20)
    assert controller.progress_text == "server 8/8 · this device 12/12"
