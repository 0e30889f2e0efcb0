"""shared.manifest: schema round trip, schema errors, integrity checks (on a synthetic bundle)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import BundleError, IntegrityError
from shared.manifest import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_NAME,
    BundleManifest,
    GraphEntry,
    Personalization,
    TensorSpec,
    TokenizerInfo,
    ValidationCheck,
    file_entry,
    load_manifest,
    resolve_bundle_path,
    sha256_file,
    verify_bundle_files,
)

REPO = Path(__file__).resolve().parents[2]


def _graph(name: str) -> GraphEntry:
    return GraphEntry(
        path=f"{name}/model.onnx",
        inputs=[TensorSpec("sample", "float32", ["batch_size", 4, "height", "width"])],
        outputs=[TensorSpec("out_sample", "float32", ["batch_size", 4, "height", "width"])],
        dtype="fp32", quantization=None, quantized_op_types=[], opset=18, rtol=1e-4,
        checks=[ValidationCheck(shapes={"sample": [1, 4, 8, 8]}, max_abs_error=1e-6, output_scale=1.0, tolerance=1e-4)],
        max_abs_error=1e-6,
    )


def make_bundle(root: Path) -> BundleManifest:
    """A bundle of placeholder files with a correct manifest."""
    files = {
        "unet/model.onnx": b"unet", "vae_decoder/model.onnx": b"vae", "text_encoder/model.onnx": b"te",
        "tokenizer/tokenizer.json": b"{}", "uncond_embedding.safetensors": b"uncond",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = BundleManifest(
        format=BUNDLE_FORMAT, format_version=BUNDLE_FORMAT_VERSION, family_id="tiny-0123", family_name="tiny",
        small_model="unet_small", dtype="fp32", quantization=None, latent_channels=4, vae_scale_factor=2,
        vae_scaling_factor=0.18215, vae_shift_factor=0.0, sample_size=16, cross_attention_dim=32,
        text_max_length=32, scheduler_config={"_class_name": "DDIMScheduler", "num_train_timesteps": 1000},
        tokenizer=TokenizerInfo("tokenizer", "tokenizer/tokenizer.json", ["tokenizer/tokenizer.json"], 1, 0, 2),
        uncond_embedding="uncond_embedding.safetensors", uncond_shape=[1, 32, 32],
        graphs={name: _graph(name) for name in ("unet", "vae_decoder", "text_encoder")},
        files={rel: file_entry(root / rel) for rel in files},
        versions={"rise": "0.1.0"}, opset=18, created_at="2026-01-01T00:00:00+00:00", source="pytorch",
    )
    (root / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def test_round_trip(tmp_path: Path) -> None:
    manifest = make_bundle(tmp_path)
    again = BundleManifest.from_json(manifest.to_json())
    assert again == manifest
    assert load_manifest(tmp_path) == manifest
    assert isinstance(again.graphs["unet"].checks[0], ValidationCheck)
    verify_bundle_files(tmp_path, again)


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.pop("family_id"), "family_id"),
        (lambda d: d.update(latent_channels="4"), "latent_channels"),
        (lambda d: d.update(latent_channels=True), "latent_channels"),
        (lambda d: d["graphs"]["unet"].pop("path"), "graphs.unet.path"),
        (lambda d: d["graphs"]["vae_decoder"].update(max_abs_error="small"), "graphs.vae_decoder.max_abs_error"),
        (lambda d: d["graphs"]["unet"]["inputs"][0].update(shape=[1.5]), "graphs.unet.inputs[0].shape[0]"),
        (lambda d: d["files"]["unet/model.onnx"].pop("sha256"), "files.unet/model.onnx.sha256"),
        (lambda d: d.update(scheduler_config=[]), "scheduler_config"),
        (lambda d: d["graphs"].pop("text_encoder"), "text_encoder"),
        (lambda d: d.update(dtype="fp64"), "dtype"),
        (lambda d: d.update(format="zip"), "format"),
        (lambda d: d["files"].pop("tokenizer/tokenizer.json"), "tokenizer.tokenizer_json"),
        (lambda d: d["files"].pop("uncond_embedding.safetensors"), "uncond_embedding"),
        (lambda d: d.update(uncond_shape=[1, 77, 768]), "uncond_shape"),
        (lambda d: d.update(vae_shift_factor=None), "vae_shift_factor"),
    ],
)
def test_schema_errors_name_the_key(tmp_path: Path, mutate, key: str) -> None:
    data = json.loads(make_bundle(tmp_path).to_json())
    mutate(data)
    with pytest.raises(BundleError, match=key.replace("[", r"\[").replace("]", r"\]")):
        BundleManifest.from_dict(data)


def test_newer_format_and_bad_json(tmp_path: Path) -> None:
    data = json.loads(make_bundle(tmp_path).to_json())
    data["format_version"] = BUNDLE_FORMAT_VERSION + 1
    with pytest.raises(BundleError, match="newer"):
        BundleManifest.from_dict(data)
    with pytest.raises(BundleError, match="not valid JSON"):
        BundleManifest.from_json("{not json")
    with pytest.raises(BundleError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match="cannot read"):
        load_manifest(tmp_path)


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    data = json.loads(make_bundle(tmp_path).to_json())
    data["added_in_a_later_minor_version"] = {"x": 1}
    assert BundleManifest.from_dict(data).family_id == "tiny-0123"


def test_integrity_errors_name_the_file(tmp_path: Path) -> None:
    manifest = make_bundle(tmp_path)
    target = tmp_path / "vae_decoder" / "model.onnx"
    target.write_bytes(b"vaX")  # same size, one byte changed
    with pytest.raises(IntegrityError, match="vae_decoder/model.onnx.*sha256"):
        verify_bundle_files(tmp_path, manifest)
    target.write_bytes(b"vae!")
    with pytest.raises(IntegrityError, match="vae_decoder/model.onnx has 4 bytes"):
        verify_bundle_files(tmp_path, manifest)
    target.unlink()
    with pytest.raises(IntegrityError, match="vae_decoder/model.onnx is missing"):
        verify_bundle_files(tmp_path, manifest)


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "a/../../b", "a\\b"])
def test_paths_escaping_the_bundle_are_refused(tmp_path: Path, bad: str) -> None:
    data = json.loads(make_bundle(tmp_path).to_json())
    data["files"][bad] = {"sha256": "0" * 64, "size": 1}
    with pytest.raises(BundleError, match="escapes"):
        BundleManifest.from_dict(data)


def test_symlink_escaping_the_bundle_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = make_bundle(bundle)
    (tmp_path / "secret").write_bytes(b"unet")
    (bundle / "unet" / "model.onnx").unlink()
    os.symlink(tmp_path / "secret", bundle / "unet" / "model.onnx")
    with pytest.raises(BundleError, match="escapes"):
        verify_bundle_files(bundle, manifest)
    with pytest.raises(BundleError, match="escapes"):
        resolve_bundle_path(bundle, "unet/model.onnx")


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_manifest_module_imports_no_torch() -> None:
    code = "import sys, shared.manifest; sys.exit(any(m in sys.modules for m in ('torch', 'onnx', 'numpy')))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_not_an_object() -> None:
    with pytest.raises(BundleError, match="the manifest must be a JSON object"):
        BundleManifest.from_json("[1, 2]")


# ----------------------------------------------------------------------------- personalized bundles

_SHA_A, _SHA_B, _SHA_C = "a" * 64, "b" * 64, "c" * 64


def _lora_personalization() -> Personalization:
    return Personalization(kind="lora", label="my style", base_small_model="unet_small", base_small_sha256=_SHA_A,
                           adapter_file="my_style.safetensors", adapter_sha256=_SHA_B, adapter_scale=0.8,
                           adapter_format="diffusers")


@pytest.mark.parametrize(
    "personalization",
    [None, _lora_personalization(),
     Personalization(kind="fine_tune", label="tuned", base_small_model="unet_small", base_small_sha256=_SHA_A)],
)
def test_round_trip_with_and_without_personalization(tmp_path: Path, personalization: Personalization | None) -> None:
    manifest = dataclasses.replace(make_bundle(tmp_path), small_model_sha256=_SHA_C, personalization=personalization)
    again = BundleManifest.from_json(manifest.to_json())
    assert again == manifest and again.small_model_sha256 == _SHA_C
    assert isinstance(again.personalization, type(personalization))
    if personalization is not None:
        assert json.loads(manifest.to_json())["personalization"]["label"] == personalization.label
        assert personalization.describe().startswith("LoRA 'my style' (my_style.safetensors, diffusers format, "
                                                     "scale 0.8) fused into" if personalization.kind == "lora"
                                                     else "fine-tune 'tuned' of unet_small")


def test_a_manifest_without_the_new_keys_still_loads(tmp_path: Path) -> None:
    data = json.loads(make_bundle(tmp_path).to_json())
    del data["small_model_sha256"], data["personalization"]
    old = BundleManifest.from_dict(data)
    assert old.small_model_sha256 is None and old.personalization is None


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"small_model_sha256": "A" * 64}, "small_model_sha256"),
        ({"small_model_sha256": None}, "needs manifest key 'small_model_sha256'"),
        ({"personalization": {"kind": "merge"}}, "personalization.kind"),
        ({"personalization": {"label": ""}}, "personalization.label"),
        ({"personalization": {"label": "x" * 65}}, "personalization.label"),
        ({"personalization": {"label": "a\nb"}}, "personalization.label"),
        ({"personalization": {"base_small_sha256": "1234"}}, "personalization.base_small_sha256"),
        ({"personalization": {"adapter_sha256": None}}, "personalization.adapter_sha256"),
        ({"personalization": {"adapter_scale": math.inf}}, "personalization.adapter_scale"),
        ({"personalization": {"adapter_scale": -1.0}}, "personalization.adapter_scale"),
        ({"personalization": {"adapter_scale": "1"}}, "personalization.adapter_scale"),
        ({"personalization": {"adapter_file": "../x.safetensors"}}, "personalization.adapter_file"),
        ({"personalization": {"adapter_format": "Kohya SS"}}, "personalization.adapter_format"),
        ({"personalization": {"kind": "fine_tune"}}, "must be null for a fine_tune"),
    ],
)
def test_personalization_errors_name_the_key(tmp_path: Path, change: dict, key: str) -> None:
    manifest = dataclasses.replace(make_bundle(tmp_path), small_model_sha256=_SHA_C,
                                   personalization=_lora_personalization())
    data = json.loads(manifest.to_json())
    for name, value in change.items():
        if isinstance(value, dict):
            data[name].update(value)
        else:
            data[name] = value
    with pytest.raises(BundleError, match=re.escape(key)):
        BundleManifest.from_dict(data)
