"""rise-export on the tiny family: bundle contents, validation figures, fp16/int8, --from-onnx."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.onnx_export import ExportOptions, export_bundle
from export.validate import RTOL
from shared.errors import ExportError, IntegrityError
from shared.manifest import MANIFEST_NAME, UNCOND_TENSOR, load_manifest, verify_bundle_files

GRAPHS = ("unet", "vae_decoder", "text_encoder")


def _session(bundle: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle / name / "model.onnx"), providers=["CPUExecutionProvider"])


def _print_checks(label: str, manifest) -> None:
    for name, graph in manifest.graphs.items():
        for check in graph.checks:
            shapes = {k: v for k, v in check.shapes.items() if v}
            print(f"[{label}] {name:12s} {shapes}: max-abs {check.max_abs_error:.3e} <= tol {check.tolerance:.3e}")


def test_fp32_bundle_files_and_manifest(fp32_bundle_dir: Path, tiny_family) -> None:
    manifest = load_manifest(fp32_bundle_dir)
    verify_bundle_files(fp32_bundle_dir, manifest)
    on_disk = {p.relative_to(fp32_bundle_dir).as_posix() for p in fp32_bundle_dir.rglob("*") if p.is_file()}
    assert on_disk == set(manifest.files) | {MANIFEST_NAME}
    for name in GRAPHS:
        assert f"{name}/model.onnx" in manifest.files
    assert not (fp32_bundle_dir / "vae_encoder").exists()
    assert manifest.family_id == tiny_family.family_id
    assert manifest.small_model == "unet_small"
    assert (manifest.dtype, manifest.quantization, manifest.source) == ("fp32", None, "pytorch")
    assert manifest.latent_channels == 4 and manifest.vae_scale_factor == 2 and manifest.sample_size == 16
    assert manifest.vae_scaling_factor == pytest.approx(tiny_family.vae_scaling_factor)
    assert manifest.vae_shift_factor == 0.0
    assert manifest.cross_attention_dim == 32 and manifest.text_max_length == 32
    assert manifest.scheduler_config["_class_name"] == "DDIMScheduler"
    assert manifest.scheduler_config["beta_schedule"] == tiny_family.scheduler_config["beta_schedule"]
    assert manifest.opset >= 14
    assert {"torch", "diffusers", "optimum-onnx", "onnx", "onnxruntime"} <= set(manifest.versions)
    assert [i.name for i in manifest.graphs["unet"].inputs] == ["sample", "timestep", "encoder_hidden_states"]
    for graph in manifest.graphs.values():
        assert all(spec.dtype == "float32" for spec in graph.inputs + graph.outputs if spec.name != "input_ids")


def test_fp32_graphs_validated_at_two_shapes(fp32_bundle_dir: Path) -> None:
    manifest = load_manifest(fp32_bundle_dir)
    _print_checks("fp32", manifest)
    for name, graph in manifest.graphs.items():
        assert len(graph.checks) == 2
        first, second = (c.shapes for c in graph.checks)
        assert first != second, name  # two different shapes, not one shape twice
        assert graph.rtol == RTOL["fp32"]
        for check in graph.checks:
            assert check.max_abs_error <= check.tolerance


def test_tokenizer_json_and_uncond_embedding(fp32_bundle_dir: Path, tiny_family) -> None:
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    manifest = load_manifest(fp32_bundle_dir)
    tokenizer = Tokenizer.from_file(str(fp32_bundle_dir / manifest.tokenizer.tokenizer_json))
    reference = tiny_family.pipeline.tokenizer
    for prompt in ("", "a red fox in the snow"):
        expected = reference(prompt, padding="max_length", max_length=manifest.text_max_length, truncation=True)
        assert tokenizer.encode(prompt).ids == expected.input_ids
    assert "tokenizer/vocab.json" in manifest.tokenizer.files  # the original files came along
    uncond = load_file(str(fp32_bundle_dir / manifest.uncond_embedding))[UNCOND_TENSOR]
    assert uncond.dtype == np.float32 and list(uncond.shape) == manifest.uncond_shape == [1, 32, 32]
    ids = np.asarray([tokenizer.encode("").ids], dtype=np.int64)
    hidden = _session(fp32_bundle_dir, "text_encoder").run(["last_hidden_state"], {"input_ids": ids})[0]
    np.testing.assert_allclose(hidden, uncond, atol=1e-4)


def test_tampered_byte_raises_integrity_error(fp32_bundle_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(fp32_bundle_dir, bundle)
    manifest = load_manifest(bundle)
    target = bundle / "unet" / "model.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="unet/model.onnx"):
        verify_bundle_files(bundle, manifest)


def _feeds(seed: int = 1) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "unet": {
            "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
            "timestep": np.array(500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 32, 32), dtype=np.float32),
        },
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 16, 16), dtype=np.float32) / 0.18215},
    }


def _psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of images in [-1, 1] (the decoder's range), clipped as a viewer would."""
    a, b = np.clip(image, -1, 1), np.clip(reference, -1, 1)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_low_precision_bundles_load_and_run(kind: str, request, fp32_bundle_dir: Path) -> None:
    result = request.getfixturevalue(f"{kind}_bundle")
    bundle, manifest = result.bundle_dir, result.manifest
    verify_bundle_files(bundle, load_manifest(bundle))
    _print_checks(kind, manifest)
    if kind == "fp16":
        assert manifest.dtype == "fp16" and all(g.dtype == "fp16" for g in manifest.graphs.values())
    else:
        assert manifest.quantization == "int8"
        notes = [g.note for g in manifest.graphs.values()]
        assert all(g.quantization == "int8" for g in manifest.graphs.values()), notes
        assert "MatMulInteger" in manifest.graphs["unet"].quantized_op_types
    assert result.timings["total"] > 0
    for name, feeds in _feeds().items():
        (reference,) = _session(fp32_bundle_dir, name).run(None, feeds)
        (got,) = _session(bundle, name).run(None, feeds)
        assert got.dtype == np.float32 and got.shape == reference.shape
        error = float(np.max(np.abs(got - reference)))
        scale = max(1.0, float(np.max(np.abs(reference))))
        extra = f", decoded-image PSNR {_psnr(got, reference):.1f} dB" if name == "vae_decoder" else ""
        print(f"[{kind} vs fp32] {name}: max-abs {error:.3e} (output scale {scale:.2f}){extra}")
        assert error <= RTOL[kind] * scale


def test_from_onnx_accepts_an_optimum_folder(optimum_small_dir: Path, tiny_family, tiny_family_dir: Path,
                                             tmp_path: Path, capsys) -> None:
    from export.cli import main

    out = tmp_path / "from-onnx"
    assert main(["--family", str(tiny_family_dir), "--from-onnx", str(optimum_small_dir), "--out", str(out)]) == 0
    assert "max-abs err" in capsys.readouterr().out  # the summary table
    manifest = load_manifest(out)
    verify_bundle_files(out, manifest)
    assert manifest.source == "onnx"
    _print_checks("from-onnx", manifest)
    assert all(c.max_abs_error <= c.tolerance for g in manifest.graphs.values() for c in g.checks)


def test_from_onnx_with_the_wrong_unet_fails_validation(optimum_small_dir: Path, tiny_family, tiny_family_dir: Path,
                                                        tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    # The same I/O as the small UNet but a different network: an export of some other model.
    wrong = tmp_path / "wrong"
    shutil.copytree(optimum_small_dir, wrong)
    model = onnx.load(str(wrong / "unet" / "model.onnx"))
    out_name = model.graph.output[0].name
    (producer,) = [n for n in model.graph.node if out_name in n.output]
    producer.output[list(producer.output).index(out_name)] = "pre_out"
    model.graph.node.append(helper.make_node("Neg", ["pre_out"], [out_name]))
    onnx.save(model, str(wrong / "unet" / "model.onnx"))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"graph unet \(fp32\) disagrees with PyTorch at sample=\(1, 4, 16, 16\)"):
        export_bundle(ExportOptions(family=tiny_family_dir, out=out, from_onnx=wrong), family=tiny_family)
    assert not out.exists()  # nothing published
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # staging removed


def test_force_replaces_a_previous_bundle(tiny_family, tiny_family_dir: Path, optimum_small_dir: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("{}")
    (out / "stale.bin").write_bytes(b"old")
    export_bundle(ExportOptions(family=tiny_family_dir, out=out, from_onnx=optimum_small_dir, force=True),
                  family=tiny_family)
    assert not (out / "stale.bin").exists()
    verify_bundle_files(out, load_manifest(out))


def test_int8_falls_back_when_a_kernel_is_missing(fp32_bundle_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import onnx

    from export import quantize

    src = fp32_bundle_dir / "vae_decoder" / "model.onnx"
    real_session_error = quantize.session_error

    def no_conv_integer(path: Path) -> str | None:  # as on a runtime without ConvInteger
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        if "ConvInteger" in ops:
            return "Could not find an implementation for ConvInteger(10)"
        return real_session_error(path)

    monkeypatch.setattr(quantize, "session_error", no_conv_integer)
    result = quantize.quantize_int8(src, tmp_path / "a" / "model.onnx")
    assert result.quantized and "MatMulInteger" in result.op_types and "ConvInteger" not in result.op_types
    assert "ConvInteger" in result.note

    monkeypatch.setattr(quantize, "session_error", lambda path: "no integer kernels at all")
    result = quantize.quantize_int8(src, tmp_path / "b" / "model.onnx")
    assert not result.quantized and result.note.startswith("kept fp32")
    assert (tmp_path / "b" / "model.onnx").read_bytes() == src.read_bytes()
