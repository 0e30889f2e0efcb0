"""Several bundles on one device: the app's bundles folder, the list in Settings, the switch and what it changes.

The library holds the session's tiny fp32 bundle (``base``), a fused LoRA of it (``red-lora``, same
weights, a label), a fine-tune with other UNet weights (``night-ft``), a bundle whose UNet file was
changed after export (``tampered``: right size, wrong sha256), one claiming another family (``other``)
and a folder that is not a bundle (``broken``). The controller runs with fake backends, with the real
ones on the device alone and against a protocol-level edge; the last test picks bundles in a real
window (SDL2 offscreen, a subprocess, as ``test_app_window.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_app.app.backends import BundleHolder, NetworkBackend, OfflineBackend
from device_app.app.controller import Controller
from device_app.app.offline import generate_offline
from device_app.app.settings import Settings, SettingsStore
from device_app.runtime import DeviceBundle
from shared.relay_plan import RelayPlan
from tests.device_app.personal_bundles import copy_bundle, other_family, personalize, tamper_unet, write_manifest
from tests.device_app.test_app_controller import TOKEN, WAIT_S, FakeBackend, Pump, fake_edge
from tests.device_app.test_app_window import assert_fits, drive, window_env  # noqa: F401  (window_env: a fixture)
from tests.helpers import NO_TORCH_PRELUDE

OTHER_FAMILY = "other-family-0123456789ab"


@pytest.fixture(scope="module")
def library_dir(fp32_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    write_manifest(root / "base", copy_bundle(fp32_bundle_dir, root / "base"))
    personalize(fp32_bundle_dir, root / "red-lora", label="Red bags", kind="lora", scale=0.8)
    personalize(fp32_bundle_dir, root / "night-ft", label="Night shots", kind="fine_tune", unet_seed=1)
    tamper_unet(fp32_bundle_dir, root / "tampered", label="Tampered")
    other_family(fp32_bundle_dir, root / "other", OTHER_FAMILY)
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{")
    return root


def offline_image(folder: Path, prompt: str, plan: RelayPlan, seed: int) -> np.ndarray:
    """What the device alone makes with the bundle in ``folder`` (as the app's offline backend does)."""
    return generate_offline(DeviceBundle(folder, threads=1), prompt, plan, seed).image


def store_for(tmp_path: Path, **settings: object) -> SettingsStore:
    store = SettingsStore(tmp_path / "settings.json")
    store.save(Settings(offline_min_steps=2, offline_max_steps=4, **settings))
    return store


# --------------------------------------------------------------------------- controller, fake backends


def test_choosing_a_bundle_switches_persists_and_reconnects(library_dir, tmp_path):
    store = store_for(tmp_path, server_url="ws://edge:8765", bundle=str(library_dir / "base"),
                      bundles_dir=str(library_dir))
    network, offline = FakeBackend(), FakeBackend("offline")
    controller = Controller(store, network, offline, gallery_dir=tmp_path / "gallery")
    assert [b.name for b in controller.library] == ["base", "night-ft", "other", "red-lora", "tampered"]
    assert [s.name for s in controller.library.skipped] == ["broken"]
    assert controller.bundle_entry.name == "base"
    controller.start()
    assert len(network.connects) == 1
    assert controller.choose_bundle("Red bags")  # by label
    assert controller.settings.bundle == str(library_dir / "red-lora") == store.load().bundle  # persisted
    assert controller.bundle_entry.label == "Red bags" and controller.manifest.personalization.adapter_scale == 0.8
    assert controller.status == "Using Red bags (LoRA x0.8, family tiny-sd)"
    assert len(network.connects) == 2 and controller.link_text == "connecting…"  # a new hello for the new bundle
    # A folder that is not a bundle: refused with why, the bundle in use stays.
    assert not controller.choose_bundle("broken")
    assert controller.status.startswith("Bundle not changed: bundle 'broken' in ") and "not valid JSON" in controller.status
    assert controller.settings.bundle == str(library_dir / "red-lora") and len(network.connects) == 2
    assert controller.generate("a red bag")  # busy: no switching under a running image
    assert not controller.choose_bundle("night-ft") and "wait for the image in progress" in controller.status
    assert controller.settings.bundle == str(library_dir / "red-lora")


def test_the_bundles_folder_is_a_setting_listed_again_on_request(library_dir, fp32_bundle_dir, tmp_path):
    store = store_for(tmp_path, bundle=str(fp32_bundle_dir))
    controller = Controller(store, FakeBackend(), FakeBackend(), gallery_dir=tmp_path / "gallery")
    assert controller.library is None and controller.bundle_entry is None
    assert not controller.choose_bundle("night-ft") and "no bundles folder set" in controller.status
    mine = tmp_path / "mine"
    mine.mkdir()
    assert controller.update_settings(bundles_dir=f"  {mine} ")
    assert store.load().bundles_dir == str(mine) and len(controller.library) == 0
    personalize(fp32_bundle_dir, mine / "cats", label="My cat", unet_seed=2)
    assert [b.label for b in controller.refresh_library()] == ["My cat"]  # Settings lists the folder again
    assert controller.choose_bundle("cats") and controller.bundle_entry.kind_text == "LoRA x0.8"
    assert controller.update_settings(bundles_dir=str(tmp_path / "gone"))
    assert controller.library is None and "is not a folder" in controller.library_problem
    assert controller.settings.bundle == str(mine / "cats")  # the bundle in use stays usable


# --------------------------------------------------------------------------- controller, real backends


def real_controller(tmp_path: Path, store: SettingsStore, pump: Pump) -> Controller:
    holder = BundleHolder(store.load().bundle, threads=1)
    return Controller(store, NetworkBackend(holder, open_timeout=WAIT_S, timeout=WAIT_S), OfflineBackend(holder),
                      schedule=pump, gallery_dir=tmp_path / "gallery", bundles=holder)


def generate(controller: Controller, pump: Pump, prompt: str, seed: int) -> np.ndarray:
    assert controller.generate(prompt, seed=seed), controller.status
    pump.until(lambda: not controller.busy)
    assert controller.error is None, controller.status
    return controller.current.image


def test_the_next_generation_uses_the_chosen_bundle_and_a_tampered_one_is_refused(library_dir, tmp_path):
    pump = Pump()
    store = store_for(tmp_path, bundle=str(library_dir / "base"), bundles_dir=str(library_dir), preference=0.5)
    controller = real_controller(tmp_path, store, pump)
    try:
        base = generate(controller, pump, "a red bag", 5)  # on the device alone: no server set
        info = controller.current.info
        plan = RelayPlan(info.steps, 0, info.sampler, info.guidance)
        np.testing.assert_array_equal(base, offline_image(library_dir / "base", "a red bag", plan, 5))
        # The tampered bundle passes the listing (right sizes) but not the full check: refused, base kept.
        assert controller.choose_bundle("Tampered") and controller.choosing == "tampered"
        pump.until(lambda: controller.choosing is None)
        assert controller.status == ("Bundle 'Tampered' not used: bundle file unet/model.onnx does not match its "
                                     "sha256 in the manifest")
        assert controller.settings.bundle == str(library_dir / "base") and controller.can_generate
        assert controller.choose_bundle("Night shots")
        assert controller.settings.bundle == str(library_dir / "base")  # not before its files are verified
        pump.until(lambda: controller.choosing is None)
        assert controller.settings.bundle == str(library_dir / "night-ft"), controller.status
        assert controller.bundles.get().folder == library_dir / "night-ft"  # the verified bundle, kept loaded
        assert controller.current.info.personalization_label == ""  # the base bundle made the first one
        night = generate(controller, pump, "a red bag", 5)
        assert controller.current.info.family_id == controller.manifest.family_id  # the family's id: unchanged
        assert controller.current.info.personalization_label == "Night shots"  # the gallery says which bundle
        assert "· personalized: Night shots" in controller.details_text
        np.testing.assert_array_equal(night, offline_image(library_dir / "night-ft", "a red bag", plan, 5))
        assert np.abs(night.astype(int) - base.astype(int)).mean() > 1  # its own UNet made it
    finally:
        controller.close()


def test_a_bundle_that_fails_to_load_later_is_a_message_not_a_crash(library_dir, fp32_bundle_dir, tmp_path):
    """A bundle typed in Settings is only checked quickly; the sha256 check at its first use says what is wrong."""
    pump = Pump()
    store = store_for(tmp_path, bundle=str(library_dir / "tampered"))
    controller = real_controller(tmp_path, store, pump)
    try:
        assert controller.generate("a red bag", seed=1)
        pump.until(lambda: not controller.busy)
        assert controller.status == ("Failed: bundle file unet/model.onnx does not match its sha256 in the manifest"
                                     " — choose another bundle in Settings")
        assert not controller.can_generate and "sha256" in controller.bundle_problem
        assert controller.update_settings(bundle=str(fp32_bundle_dir)) and controller.can_generate
    finally:
        controller.close()


def test_the_edge_connection_is_reopened_with_the_new_bundles_family(tiny_family, library_dir, tmp_path):
    with fake_edge(tiny_family) as edge:
        pump = Pump()
        store = store_for(tmp_path, server_url=edge.url, token=TOKEN, bundle=str(library_dir / "base"),
                          bundles_dir=str(library_dir))
        controller = real_controller(tmp_path, store, pump)
        try:
            controller.start()
            pump.until(lambda: controller.link.state != "connecting")
            assert controller.link_text == "connected" and edge.connections == 1
            base = generate(controller, pump, "a red bag", 3)
            assert not controller.current.info.offline and controller.current.info.split > 0
            controller.choose_bundle("night-ft")
            pump.until(lambda: controller.choosing is None and controller.link.state == "connected"
                       and edge.connections == 2)
            night = generate(controller, pump, "a red bag", 3)  # the edge's half is the same; the device's is not
            assert not controller.current.info.offline and edge.connections == 2
            first, second = controller.history[1].info, controller.history[0].info
            assert (first.steps, first.split, first.sampler) == (second.steps, second.split, second.sampler)
            assert np.abs(night.astype(int) - base.astype(int)).mean() > 1
            # A bundle of another family: the new hello names it, and this edge refuses it.
            controller.choose_bundle("other")
            pump.until(lambda: controller.choosing is None and controller.link.state not in ("connected", "connecting"))
            assert controller.link.state == "refused" and f"got {OTHER_FAMILY!r}" in controller.link.detail
            assert controller.status == f"The server refused this device: {controller.link.detail}"
        finally:
            controller.close()


# --------------------------------------------------------------------------- the real window


def test_window_lists_the_bundles_and_picking_one_switches_the_next_image(window_env, library_dir, tmp_path):  # noqa: F811
    # --bundle names a bundle of --bundles by its folder name.
    data = drive(window_env, tmp_path, None, "--bundles", str(library_dir), "--bundle", "base", "--server", "",
                 "--pick", "tampered", "--pick", "night-ft", "--prompt", "a red bag", "--seed", "5",
                 "--size", "360x640", "--check-layout")
    listed = data["library"]["listed"]
    rows = {r["name"]: r for r in listed["rows"]}
    assert list(rows) == ["base", "night-ft", "other", "red-lora", "tampered"]
    assert (rows["base"]["label"], rows["night-ft"]["label"], rows["red-lora"]["label"]) == (
        "tiny-sd · unet_small", "Night shots", "Red bags")
    assert " · base · fp32 · " in rows["base"]["details"] and rows["base"]["details"].startswith("tiny-sd (tiny-sd-")
    assert " · fine-tune · " in rows["night-ft"]["details"] and " · LoRA x0.8 · " in rows["red-lora"]["details"]
    assert (rows["base"]["button"], rows["base"]["disabled"]) == ("In use", True)
    assert all((r["button"], r["disabled"]) == ("Use", False) for name, r in rows.items() if name != "base")
    assert listed["library_text"] == f"5 bundles in {library_dir}, 1 skipped"
    assert listed["skipped_text"].startswith("broken: skipped: manifest is not valid JSON")
    assert listed["bundle_text"].startswith("Bundle OK: tiny-sd · unet_small — tiny-sd (")
    assert data["phases"]["start"]["bundle"] == str(library_dir / "base")
    refused = data["library"]["picked tampered"]
    assert refused["status"].startswith("Bundle 'Tampered' not used: bundle file unet/model.onnx does not match")
    assert refused["bundle"] == str(library_dir / "base")
    picked = data["library"]["picked night-ft"]
    assert picked["bundle"] == picked["bundle_input"] == str(library_dir / "night-ft")
    assert picked["status"] == "Using Night shots (fine-tune, family tiny-sd)"
    assert {r["name"]: r["button"] for r in picked["rows"]}["night-ft"] == "In use"
    assert picked["bundle_text"].startswith("Bundle OK: Night shots — tiny-sd (")
    assert "pick 'night-ft': button 'Use', disabled=False" in data["events"]
    assert_fits(data, "start", "bundles", "picked", "finished", "gallery", "settings")
    finished = data["phases"]["finished"]
    assert finished["status"].startswith("Done in") and "on this device" in finished["status"]
    # The image the window made is the fine-tune's, pixel for pixel, not the base bundle's.
    (png,) = (tmp_path / "gallery").glob("*.png")
    image = Image.open(png)
    info = json.loads(image.text["rise"])
    assert info["personalization_label"] == "Night shots" and "RISE personalization: Night shots" in image.text[
        "parameters"]
    made = np.asarray(image.convert("RGB"))
    plan = RelayPlan(info["steps"], 0, info["sampler"], info["guidance"])
    np.testing.assert_array_equal(made, offline_image(library_dir / "night-ft", "a red bag", plan, 5))
    base = offline_image(library_dir / "base", "a red bag", plan, 5)
    assert np.abs(made.astype(int) - base.astype(int)).mean() > 1


def test_app_refuses_a_bundles_folder_or_a_bundle_name_it_cannot_use(window_env, library_dir, tmp_path):  # noqa: F811
    launcher = tmp_path / "app.py"
    launcher.write_text(NO_TORCH_PRELUDE + "import sys\nfrom device_app.app.app import main\nsys.exit(main())\n")
    settings = tmp_path / "settings.json"
    for args, line in (
        (["--bundles", str(tmp_path / "missing")],
         f"rise-device app: error: --bundles {tmp_path / 'missing'}: bundle library {tmp_path / 'missing'} is not a folder"),
        (["--bundles", str(library_dir), "--bundle", "Blue"],
         "rise-device app: error: --bundle Blue is not a usable bundle: no bundle named or labelled 'Blue' in "
         f"{library_dir} (there are: base, night-ft, other, red-lora, tampered)"),
        (["--bundles", str(library_dir), "--bundle", "broken"],
         f"rise-device app: error: --bundle broken is not a usable bundle: bundle 'broken' in {library_dir} is not "
         "usable: manifest is not valid JSON"),
    ):
        proc = subprocess.run([sys.executable, str(launcher), *args, "--settings", str(settings)], env=window_env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr
        assert not settings.exists()  # nothing remembered
