"""The device's bundle library: a folder of bundles listed for a picker, broken ones skipped with a reason.

The library holds the session's tiny fp32 bundle (``base``), two personalized bundles of the same
family made from it (a fused LoRA and a fine-tune with other UNet weights, see
``tests/device_app/personal_bundles.py``) and folders that are not usable bundles.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_app.bundle_library import BundleLibrary, kind_text, quick_check_bundle, scan_library
from device_app.cli import main as device_main
from device_app.runtime import DeviceBundle
from shared.errors import BundleError, IntegrityError
from shared.manifest import load_manifest
from tests.device_app.personal_bundles import copy_bundle, personalize, tamper_unet, write_manifest


@pytest.fixture(scope="module")
def library_dir(fp32_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("library")
    write_manifest(root / "base", copy_bundle(fp32_bundle_dir, root / "base"))
    personalize(fp32_bundle_dir, root / "red-lora", label="Red bags", kind="lora", scale=0.8)
    personalize(fp32_bundle_dir, root / "night-ft", label="Night shots", kind="fine_tune", unet_seed=1)
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{")  # not JSON
    half = root / "half"
    copy_bundle(fp32_bundle_dir, half)
    write_manifest(half, json.loads((fp32_bundle_dir / "manifest.json").read_text()))
    (half / "unet" / "model.onnx").unlink()  # a listed file is missing
    (root / "photos").mkdir()  # not a bundle at all
    bad_kind = copy_bundle(fp32_bundle_dir, root / "dreambooth")
    bad_kind["personalization"] = {"kind": "dreambooth", "label": "X", "base_small_model": "unet_small",
                                   "base_small_sha256": "0" * 64}
    bad_kind["small_model_sha256"] = "0" * 64
    write_manifest(root / "dreambooth", bad_kind)
    (root / "notes.txt").write_text("a plain file: passed over")
    (root / ".cache").mkdir()  # hidden: passed over
    return root


@pytest.fixture(scope="module")
def library(library_dir: Path) -> BundleLibrary:
    return scan_library(library_dir)


def test_the_library_lists_base_and_personalized_bundles(library, library_dir, fp32_bundle_dir):
    family = load_manifest(fp32_bundle_dir)
    assert [b.name for b in library] == ["base", "night-ft", "red-lora"]  # sorted by folder name
    base, night, red = library.bundles
    assert [b.label for b in library] == [f"{family.family_name} · {family.small_model}", "Night shots", "Red bags"]
    assert [b.kind for b in library] == ["base", "fine_tune", "lora"]
    assert [b.kind_text for b in library] == ["base", "fine-tune", "LoRA x0.8"]
    assert (red.adapter_scale, night.adapter_scale, base.adapter_scale) == (0.8, None, None)
    # One family: the personalized ones keep the family's id (the edge serves them all).
    assert {b.family_id for b in library} == {family.family_id} and {b.family_name for b in library} == {"tiny-sd"}
    assert {b.precision for b in library} == {"fp32"}
    listed = (fp32_bundle_dir / "manifest.json").stat().st_size + sum(e.size for e in family.files.values())
    assert abs(base.size_bytes - listed) < 200  # the copy's manifest is re-serialized: a few bytes apart
    assert red.details == f"tiny-sd ({family.family_id}) · LoRA x0.8 · fp32 · {red.size_bytes / 1e6:.1f} MB"
    assert red.line() == f"red-lora: Red bags — {red.details}"
    assert red.folder == library_dir / "red-lora" and red.personalization is not None


def test_broken_folders_are_reported_one_line_each_not_fatal(library):
    reasons = {s.name: s.reason for s in library.skipped}
    assert sorted(reasons) == ["broken", "dreambooth", "half", "photos"]  # not notes.txt, not .cache
    assert "not valid JSON" in reasons["broken"]
    assert "file unet/model.onnx is missing" in reasons["half"]
    assert reasons["photos"] == "no manifest.json (not a bundle folder)"
    assert "personalization.kind" in reasons["dreambooth"]
    assert all("\n" not in r for r in reasons.values())
    assert library.lines()[-4:] == [f"{name}: skipped: {reasons[name]}" for name in sorted(reasons)]


def test_listing_hashes_nothing_the_chosen_bundle_is_verified_in_full(fp32_bundle_dir, tmp_path, monkeypatch):
    tamper_unet(fp32_bundle_dir, tmp_path / "tampered", label="Tampered")
    import shared.manifest

    def no_hashing(*_args: object, **_kwargs: object) -> str:
        raise AssertionError("the listing hashed a file")

    monkeypatch.setattr(shared.manifest, "sha256_file", no_hashing)
    library = scan_library(tmp_path)
    assert [b.label for b in library] == ["Tampered"]  # right sizes: listed without hashing
    monkeypatch.undo()
    with pytest.raises(IntegrityError, match="unet/model.onnx does not match its sha256"):
        DeviceBundle(library.find("Tampered").folder)


def test_pick_by_folder_name_or_label(library, library_dir, fp32_bundle_dir, tmp_path):
    assert library.find("night-ft").label == "Night shots"
    assert library.find("Red bags").name == "red-lora"
    assert library.find("  red BAGS ").name == "red-lora"  # a typed label: case and outer spaces do not matter
    with pytest.raises(BundleError, match="'broken' in .* is not usable: manifest is not valid JSON"):
        library.find("broken")
    with pytest.raises(BundleError, match=r"no bundle named or labelled 'Blue' .*there are: base, night-ft, red-lora"):
        library.find("Blue")
    assert library.holding(library_dir / "red-lora").name == "red-lora"
    assert library.holding(fp32_bundle_dir) is None and library.holding("") is None
    personalize(fp32_bundle_dir, tmp_path / "a", label="Mine", scale=0.5)
    personalize(fp32_bundle_dir, tmp_path / "b", label="Mine", scale=1.0)
    twins = scan_library(tmp_path)
    with pytest.raises(BundleError, match=r"2 bundles .* are labelled 'Mine' \(a, b\): pick one by its folder name"):
        twins.find("Mine")
    assert twins.find("b").adapter_scale == 1.0


def test_a_folder_that_is_not_there_is_one_error(tmp_path):
    with pytest.raises(BundleError, match="bundle library .*missing is not a folder"):
        scan_library(tmp_path / "missing")
    assert len(scan_library(tmp_path)) == 0


def test_quick_check_and_kind_words(fp32_bundle_dir, tmp_path):
    assert quick_check_bundle(fp32_bundle_dir).family_name == "tiny-sd"
    manifest = copy_bundle(fp32_bundle_dir, tmp_path / "short")
    manifest["files"]["unet/model.onnx"]["size"] += 1
    write_manifest(tmp_path / "short", manifest)
    with pytest.raises(BundleError, match="file unet/model.onnx has .* bytes, the manifest says"):
        quick_check_bundle(tmp_path / "short")
    assert (kind_text("lora", 0.75), kind_text("lora"), kind_text("fine_tune"), kind_text("base")) == (
        "LoRA x0.75", "LoRA", "fine-tune", "base")


def test_rise_device_bundles_lists_one_line_per_bundle(library, library_dir, capsys, tmp_path):
    assert device_main(["bundles", str(library_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == library.lines()
    assert out[2].startswith("red-lora: Red bags — tiny-sd (") and "LoRA x0.8" in out[2]
    assert out[-1].startswith("photos: skipped: no manifest.json")
    assert device_main(["bundles", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"rise-device: error: bundle library {tmp_path / 'nowhere'} is not a folder"]
    assert device_main(["bundles", str(tmp_path)]) == 0
    assert "no usable bundle" in capsys.readouterr().err
