"""rise-export on the hub-shaped families of ``lab/hub_families.py``, and the families it refuses.

Each family (SD1.5 + BK-SDM-tiny, SD1.5 + tiny-sd as an fp16-variant-only pipeline folder,
SD2.1-v + BK-SDM-v2-small, SDXL + SSD-1B, LCM-Dreamshaper) is built and exported once per
session (:func:`exported`, shared with ``test_optimum_pipeline.py``); the tests read its
manifest, graphs and side files. The export wall time and bundle size of each are printed at
the end of the module (``pytest -s``). The refusals (SD3/Flux-style folders, an unknown
scheduler class, a UNet input the device does not feed) must print one line and exit 2
before any graph is exported.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import edge_server.family  # noqa: F401  # imported up front: the refusal timings are not import times
from export.cli import main
from export.onnx_export import MODEL_INDEX_NAME, ExportOptions, ExportResult, export_bundle
from export.tokenizer import write_bundle_tokenizer
from lab.hub_families import (
    BUILDERS,
    HubFamily,
    build_flux_style_folder,
    build_sd3_style_folder,
    build_sd15_bk_sdm_tiny,
    with_scheduler_class,
    with_unet_config,
)
from shared.manifest import (
    GRAPH_NAMES,
    MANIFEST_NAME,
    SDXL_GRAPH,
    UNCOND_POOLED_TENSOR,
    UNCOND_TENSOR,
    load_manifest,
    verify_bundle_files,
)

SD_SAMPLERS = ["ddim", "euler", "dpmpp_2m"]
SD_UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states"]


@dataclass(frozen=True)
class Expected:
    kind: str
    pipeline_class: str
    samplers: list[str]
    guidance: str
    time_cond_proj_dim: int | None
    unet_inputs: list[str]


EXPECTED: dict[str, Expected] = {
    "sd15+bk-sdm-tiny": Expected("sd", "StableDiffusionPipeline", SD_SAMPLERS, "cfg", None, SD_UNET_INPUTS),
    "sd15+tiny-sd": Expected("sd", "StableDiffusionPipeline", SD_SAMPLERS, "cfg", None, SD_UNET_INPUTS),
    "sd21-v+bk-sdm-v2-small": Expected("sd", "StableDiffusionPipeline", SD_SAMPLERS, "cfg", None, SD_UNET_INPUTS),
    "sdxl+ssd-1b": Expected("sdxl", "StableDiffusionXLPipeline", SD_SAMPLERS, "cfg", None,
                            [*SD_UNET_INPUTS, "text_embeds", "time_ids"]),
    "lcm-dreamshaper": Expected("sd", "LatentConsistencyModelPipeline", ["lcm"], "embedding", 256,
                                [*SD_UNET_INPUTS, "timestep_cond"]),
}


@dataclass(frozen=True)
class Exported:
    """One hub family, exported by ``export_bundle`` (which loads the family itself, as rise-export does)."""

    hub: HubFamily
    result: ExportResult
    wall_s: float
    du_kib: int

    @property
    def bundle(self) -> Path:
        return self.result.bundle_dir


_EXPORTED: dict[str, Exported] = {}


def exported(name: str, factory: pytest.TempPathFactory) -> Exported:
    """Family ``name`` built and exported once per session (both test modules use the same bundles)."""
    if name not in _EXPORTED:
        root = factory.mktemp(name.replace("+", "_"))
        hub = BUILDERS[name](root / "family", 0)
        start = time.perf_counter()
        result = export_bundle(ExportOptions(family=hub.folder, out=root / "bundle", small=hub.small))
        wall = time.perf_counter() - start
        du = subprocess.run(["du", "-sk", str(result.bundle_dir)], capture_output=True, text=True, check=True)
        _EXPORTED[name] = Exported(hub, result, wall, int(du.stdout.split()[0]))
    return _EXPORTED[name]


@pytest.fixture(scope="module", params=list(EXPECTED))
def hub_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return exported(request.param, tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    for name, done in _EXPORTED.items():
        size = sum(e.size for e in done.result.manifest.files.values())
        print(f"[hub export] {name}: export {done.wall_s:.1f} s wall, bundle {done.du_kib / 1024:.1f} MiB "
              f"(du -sk {done.du_kib} KiB; listed files {size / 2**20:.2f} MiB)")


def _session(bundle: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle / name / "model.onnx"), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- exported families


def test_manifest_describes_the_family(hub_export: Exported) -> None:
    expected = EXPECTED[hub_export.hub.name]
    manifest = load_manifest(hub_export.bundle)
    verify_bundle_files(hub_export.bundle, manifest)
    assert manifest.family_kind == expected.kind
    assert manifest.pipeline_class == expected.pipeline_class == hub_export.hub.pipeline_class
    assert manifest.samplers == expected.samplers == list(hub_export.hub.samplers)
    assert manifest.guidance == expected.guidance
    assert manifest.time_cond_proj_dim == expected.time_cond_proj_dim
    assert manifest.small_model == (hub_export.hub.small or "unet_small")
    assert manifest.source == "pytorch" and manifest.dtype == "fp32"
    sdxl = expected.kind == "sdxl"
    assert manifest.added_cond_names == (["text_embeds", "time_ids"] if sdxl else [])
    assert (manifest.tokenizer_2 is not None) == sdxl
    assert manifest.uncond_shape == [1, manifest.text_max_length, manifest.cross_attention_dim]
    if sdxl:
        assert manifest.tokenizer_2 is not None and manifest.tokenizer_2.folder == "tokenizer_2"
        assert manifest.tokenizer_2.tokenizer_json in manifest.files
        assert manifest.uncond_pooled_shape == [1, 64]  # hub_families' shrunk OpenCLIP-bigG projection
    else:
        assert manifest.uncond_pooled_shape is None
    if hub_export.hub.name.startswith("sd21-v"):
        assert manifest.scheduler_config["prediction_type"] == "v_prediction"


def test_bundle_files(hub_export: Exported) -> None:
    bundle, manifest = hub_export.bundle, load_manifest(hub_export.bundle)
    graphs = GRAPH_NAMES + ((SDXL_GRAPH,) if manifest.family_kind == "sdxl" else ())
    assert sorted(manifest.graphs) == sorted(graphs)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk == set(manifest.files) | {MANIFEST_NAME}
    for name in graphs:
        assert f"{name}/model.onnx" in manifest.files and f"{name}/config.json" in manifest.files
    assert MODEL_INDEX_NAME in manifest.files  # hashed like every other file
    assert "scheduler/scheduler_config.json" in manifest.files
    assert not (bundle / "vae_encoder").exists()  # optimum's ORT pipelines do without it (test_optimum_pipeline)


def test_model_index_names_the_pipeline_and_its_components(hub_export: Exported) -> None:
    import json

    manifest = load_manifest(hub_export.bundle)
    index = json.loads((hub_export.bundle / MODEL_INDEX_NAME).read_text())
    assert index["_class_name"] == manifest.pipeline_class
    assert "_name_or_path" not in index  # no path of the exporting machine
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert index[part][0] in ("diffusers", "transformers"), part
    assert index["scheduler"][1] == manifest.scheduler_config["_class_name"]
    if manifest.family_kind == "sdxl":
        assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
        assert index["tokenizer_2"][0] == "transformers"
        assert index["force_zeros_for_empty_prompt"] is True
    else:
        assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]


def test_graph_inputs_and_outputs(hub_export: Exported) -> None:
    expected = EXPECTED[hub_export.hub.name]
    manifest = load_manifest(hub_export.bundle)
    assert [i.name for i in manifest.graphs["unet"].inputs] == expected.unet_inputs
    unet_inputs = {i.name: i.shape for i in manifest.graphs["unet"].inputs}
    if expected.kind == "sdxl":
        assert unet_inputs["text_embeds"][1:] == [64] and unet_inputs["time_ids"][1:] == [6]
        outputs_1 = [o.name for o in manifest.graphs["text_encoder"].outputs]
        outputs_2 = [o.name for o in manifest.graphs[SDXL_GRAPH].outputs]
        assert "hidden_states.1" in outputs_1  # the penultimate layer of the 2-layer encoders: what SDXL reads
        assert "hidden_states.1" in outputs_2 and "text_embeds" in outputs_2
    if expected.time_cond_proj_dim is not None:
        assert unet_inputs["timestep_cond"][1:] == [expected.time_cond_proj_dim]
    # The manifest's I/O is the graph's own.
    for name, graph in manifest.graphs.items():
        sess = _session(hub_export.bundle, name)
        assert [a.name for a in sess.get_inputs()] == [i.name for i in graph.inputs]
        assert [a.name for a in sess.get_outputs()] == [o.name for o in graph.outputs]


def test_validation_errors_are_recorded(hub_export: Exported) -> None:
    manifest = load_manifest(hub_export.bundle)
    for name, graph in manifest.graphs.items():
        assert len(graph.checks) == 2, name
        assert graph.max_abs_error == max(c.max_abs_error for c in graph.checks)
        for check in graph.checks:
            assert 0.0 <= check.max_abs_error <= check.tolerance, (name, check)
            print(f"[{hub_export.hub.name}] {name:14s} {check.shapes}: max-abs {check.max_abs_error:.2e}"
                  f" <= {check.tolerance:.2e}")
    unet_checks = manifest.graphs["unet"].checks
    for input_name in EXPECTED[hub_export.hub.name].unet_inputs:
        assert all(input_name in c.shapes for c in unet_checks), input_name  # every input was fed
    if manifest.family_kind == "sdxl":
        assert [c.shapes["time_ids"] for c in unet_checks] == [[1, 6], [2, 6]]


def test_unconditional_embeddings(hub_export: Exported) -> None:
    from safetensors.numpy import load_file

    manifest = load_manifest(hub_export.bundle)
    tensors = load_file(str(hub_export.bundle / manifest.uncond_embedding))
    uncond = tensors[UNCOND_TENSOR]
    assert uncond.dtype == np.float32 and list(uncond.shape) == manifest.uncond_shape
    if manifest.family_kind == "sdxl":  # force_zeros_for_empty_prompt: zeros, as the SDXL pipeline uses
        pooled = tensors[UNCOND_POOLED_TENSOR]
        assert list(pooled.shape) == manifest.uncond_pooled_shape and not pooled.any() and not uncond.any()
    else:  # the empty prompt through the bundle's own text encoder
        assert set(tensors) == {UNCOND_TENSOR}
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(hub_export.bundle / manifest.tokenizer.tokenizer_json))
        ids = np.asarray([tokenizer.encode("").ids], dtype=np.int64)
        (hidden,) = _session(hub_export.bundle, "text_encoder").run(["last_hidden_state"], {"input_ids": ids})
        np.testing.assert_allclose(hidden, uncond, atol=1e-4)


def test_variant_only_small_model_needs_no_flag(tmp_path_factory: pytest.TempPathFactory) -> None:
    done = exported("sd15+tiny-sd", tmp_path_factory)
    small = Path(str(done.hub.small))
    weights = [p.name for p in (small / "unet").iterdir() if p.suffix == ".safetensors"]
    assert weights and all(".fp16." in name for name in weights)  # only the hub's fp16 branch on disk
    assert load_manifest(done.bundle).small_model == str(small)


def test_second_tokenizer_with_another_pad_token(tmp_path: Path) -> None:
    """SDXL's second (OpenCLIP) tokenizer pads with "!" (id 0), not with the end token: the bundle keeps that."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    from lab.tiny_family import _write_byte_level_clip_tokenizer

    _write_byte_level_clip_tokenizer(tmp_path / "src")
    reference = CLIPTokenizer(vocab_file=str(tmp_path / "src" / "vocab.json"),
                              merges_file=str(tmp_path / "src" / "merges.txt"), model_max_length=32, pad_token="!")
    reference.save_pretrained(tmp_path / "src")
    summary = write_bundle_tokenizer(reference, tmp_path / "src", tmp_path / "tokenizer_2")
    assert summary.pad_token_id == reference.convert_tokens_to_ids("!") != summary.eos_token_id
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer_2" / "tokenizer.json"))
    ids = tokenizer.encode("a fox").ids
    assert ids == reference("a fox", padding="max_length", max_length=32).input_ids
    assert ids[-1] == summary.pad_token_id and ids.count(summary.eos_token_id) == 1


def test_variant_flag_reaches_load_family(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    import edge_server.family as family_module
    from shared.errors import FamilyError

    seen: dict[str, Any] = {}

    def fake_load_family(folder: Any, small: Any = None, *, variant: Any = None) -> Any:
        seen.update(folder=folder, small=small, variant=variant)
        raise FamilyError("stop here")

    monkeypatch.setattr(family_module, "load_family", fake_load_family)
    (tmp_path / "fam").mkdir()
    assert main(["--family", str(tmp_path / "fam"), "--variant", "fp16", "--out", str(tmp_path / "b")]) == 2
    assert seen["variant"] == "fp16"
    assert main(["--family", str(tmp_path / "fam"), "--out", str(tmp_path / "b")]) == 2
    assert seen["variant"] is None  # default: load_family detects it
    assert capsys.readouterr().err.count("rise-export: error: stop here") == 2


def test_a_variant_the_folder_lacks_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    family = build_sd15_bk_sdm_tiny(tmp_path / "fam", 0).folder
    line = _refused(capsys, ["--family", str(family), "--variant", "fp16", "--out", str(tmp_path / "b")], tmp_path)
    assert "fp16" in line


# ----------------------------------------------------------------------------- refusals


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], root: Path) -> str:
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("rise-export: error: "), err
    out = Path(argv[argv.index("--out") + 1])
    assert not out.exists()
    assert not [p for p in root.rglob(".*rise-export-*")], "a staging folder was made: the export had started"
    # before the export: no staging folder (above); the time is a figure, not a test (machines differ)
    print(f"[refusal {elapsed * 1000:.0f} ms] {lines[0]}")
    return lines[0]


@pytest.mark.parametrize(("builder", "words"), [
    (build_sd3_style_folder, ("StableDiffusion3Pipeline", "unsupported", "transformer")),
    (build_flux_style_folder, ("FluxPipeline", "unsupported", "transformer")),
])
def test_dit_families_are_refused(builder: Any, words: tuple[str, ...], capsys: pytest.CaptureFixture[str],
                                  tmp_path: Path) -> None:
    folder = builder(tmp_path / "fam")
    line = _refused(capsys, ["--family", str(folder), "--out", str(tmp_path / "b")], tmp_path)
    assert all(w in line for w in words), line


def test_unknown_scheduler_class_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = with_scheduler_class(build_sd15_bk_sdm_tiny(tmp_path / "fam", 0).folder, "FlowMatchEulerDiscreteScheduler")
    line = _refused(capsys, ["--family", str(folder), "--out", str(tmp_path / "b")], tmp_path)
    assert "FlowMatchEulerDiscreteScheduler" in line and "unsupported" in line


@pytest.mark.parametrize(("role", "changes", "words"), [
    ("small", {"class_embed_type": "timestep"}, ("small UNet", "class_embed_type", "unsupported")),
    ("large", {"encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 32}, ("large UNet", "encoder_hid_dim_type")),
])
def test_unet_with_an_input_we_do_not_feed_is_refused(role: str, changes: dict[str, Any], words: tuple[str, ...],
                                                      capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = with_unet_config(build_sd15_bk_sdm_tiny(tmp_path / "fam", 0).folder, role, **changes)
    line = _refused(capsys, ["--family", str(folder), "--out", str(tmp_path / "b")], tmp_path)
    assert all(w in line for w in words), line


def test_from_onnx_without_the_second_text_encoder_is_refused(tmp_path_factory: pytest.TempPathFactory,
                                                              capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    hub = exported("sdxl+ssd-1b", tmp_path_factory).hub
    onnx_dir = tmp_path / "optimum"
    for name in GRAPH_NAMES:  # an SD1.x-style optimum folder: no text_encoder_2/
        (onnx_dir / name).mkdir(parents=True)
        (onnx_dir / name / "model.onnx").write_bytes(b"")
    line = _refused(capsys, ["--family", str(hub.folder), "--from-onnx", str(onnx_dir), "--out",
                             str(tmp_path / "b")], tmp_path)
    assert "text_encoder_2/model.onnx" in line
