"""Personalized bundles (``rise-export --lora`` / ``--small --base-small``): the user's own small UNet, the family's edge.

LoRAs are made here with peft on tiny families and saved as diffusers' training scripts save them
(``get_peft_model_state_dict`` -> ``convert_state_dict_to_diffusers`` -> ``save_lora_weights``). The
relay with the exported bundle (edge: the family's own large model, unchanged; device: the bundle on
ONNX Runtime finishing the handoff) must equal the family's diffusers pipeline with the same LoRA
loaded and fused into its small UNet by diffusers' *pipeline* API (``load_lora_weights`` ->
``fuse_lora`` -> ``unload_lora_weights``: another route than the exporter's model-level one) at
k = 0, N/2 and N: max-abs on the final latent <= 1e-4, as the relay-exactness tests of
``tests/lab/test_local_relay.py`` and ``tests/device_app/test_hub_bundles.py``. Families: (a) the demo
family's shape, untrained (``lab.demo_family.train.build_untrained_family``), (b) SD1.5 + BK-SDM-tiny
(``lab.hub_families``); marked slow, (c) SDXL + SSD-1B (two text encoders) and (d) LCM-Dreamshaper (the LCM
sampler, a guidance-embedded UNet), and a DoRA on (b). Refusals print one line, exit 2 and leave no ``--out`` (nor a staging folder).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.family import Family, load_family
from edge_server.relay import EdgeRelay
from export.cli import main
from export.lora import weights_sha256
from export.onnx_export import ExportOptions, export_bundle
from lab.hub_families import build_lcm_dreamshaper, build_sd15_bk_sdm_tiny, build_sdxl_ssd_1b, pipeline_latent
from shared.errors import ConfigError, ExportError, FamilyError
from shared.handoff import decode_handoff, encode_handoff
from shared.manifest import load_manifest, sha256_file, verify_bundle_files
from shared.relay_plan import RelayPlan

PROMPT = "a red bag on the left"  # within the tiny tokenizers' 32 characters
STEPS = 4
SEED = 11
GUIDANCE = 5.0
SAMPLER = "dpmpp_2m"
TOLERANCE = 1e-4  # max-abs on the final latent (the relay's bound)
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # what diffusers' LoRA training scripts adapt
ERRORS: dict[str, float] = {}  # what each case measured, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    for case, error in sorted(ERRORS.items()):
        print(f"[lora relay] {case}: max-abs {error:.3e}")


def make_lora(unet: Any, folder: Path, *, seed: int, rank: int = 4, text_encoder: Any = None,
              text_encoder_2: Any = None, dora: bool = False, targets: tuple[str, ...] = ATTENTION,
              layout: str = "diffusers") -> Path:
    """A random LoRA (non-zero lora_B, so it changes outputs) on ``unet``'s ``targets``, saved by diffusers.

    With ``text_encoder``: on its attention projections too (a LoRA that changes the text encoder);
    with ``text_encoder_2``: on SDXL's second text encoder, saved as SDXL's training script saves it;
    ``dora``: a DoRA (peft's ``use_dora``: a magnitude vector per layer beside lora_A and lora_B).
    ``targets``: the UNet modules it adapts (default: the attention projections); ``layout`` "peft" saves peft's keys as they are, without
    diffusers' renaming.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)

    def adapted(module: Any, targets: list[str]) -> dict[str, Any]:
        module = copy.deepcopy(module)  # diffusers' and transformers' models both take peft adapters
        module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets,
                                      use_dora=dora))
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.2)
        state = get_peft_model_state_dict(module)
        return state if layout == "peft" else convert_state_dict_to_diffusers(state)

    unet_layers = adapted(unet, list(targets))
    attention = ["q_proj", "k_proj", "v_proj", "out_proj"]
    text_layers = None if text_encoder is None else adapted(text_encoder, attention)
    if text_encoder_2 is not None:
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=unet_layers,
                                                    text_encoder_lora_layers=text_layers,
                                                    text_encoder_2_lora_layers=adapted(text_encoder_2, attention))
    else:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_layers,
                                                  text_encoder_lora_layers=text_layers)
    return folder / "pytorch_lora_weights.safetensors"


def diffusers_fused_small(family: Family, lora: Path, scale: float) -> Any:
    """The family's small UNet with ``lora`` fused in by diffusers' pipeline API (the reference): a pipeline
    of the family's own class (SD, SDXL with its second text encoder, LCM), over its modules (text encoders copied)."""
    p: Any = family.pipeline
    components = {name: copy.deepcopy(module) if name.startswith("text_encoder") else module
                  for name, module in p.components.items()}
    pipe: Any = type(p)(**{**components, "unet": copy.deepcopy(family.small_unet)})
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe.unet.eval().requires_grad_(False)


@dataclasses.dataclass(frozen=True)
class Personalized:
    family: Family  # as loaded: its small UNet is the family's own
    reference: Family  # the same with diffusers' fused small UNet
    lora: Path
    scale: float
    bundle_dir: Path
    bundle: DeviceBundle
    printed: str  # what rise-export printed (the CLI path), else ""
    sampler: str = SAMPLER  # what the relay runs with (LCM: its own sampler and guidance)
    guidance: float = GUIDANCE


def _personalize(family_dir: Path, root: Path, scale: float, seed: int, *, cli: list[str] | None = None,
                 sampler: str = SAMPLER, guidance: float = GUIDANCE, dora: bool = False) -> Personalized:
    """Make a LoRA on the family's small UNet and export it: through ``rise-export`` with ``cli``, else the API."""
    family = load_family(family_dir)
    lora = make_lora(family.small_unet, root / "lora", seed=seed, dora=dora)
    out, printed = root / "bundle", io.StringIO()
    if cli is None:
        export_bundle(ExportOptions(family=family_dir, out=out, lora=lora, lora_scale=scale), family=family)
    else:
        with contextlib.redirect_stdout(printed):
            code = main(["--family", str(family_dir), "--lora", str(lora), "--lora-scale", str(scale), *cli,
                         "--out", str(out), "--threads", "1"])
        assert code == 0, printed.getvalue()
    reference = dataclasses.replace(family, small_unet=diffusers_fused_small(family, lora, scale))
    return Personalized(family, reference, lora, scale, out, DeviceBundle(out, threads=1), printed.getvalue(),
                        sampler, guidance)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lab.demo_family.train import build_untrained_family

    return build_untrained_family(tmp_path_factory.mktemp("demo") / "family")


@pytest.fixture(scope="module")
def demo(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Personalized:
    """The demo-shaped family's LoRA bundle, exported by the CLI (a label of its own, scale 0.75)."""
    return _personalize(demo_dir, tmp_path_factory.mktemp("demo-lora"), 0.75, 1, cli=["--label", "My style"])


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sd15_bk_sdm_tiny(tmp_path_factory.mktemp("sd15") / "family", 0).folder


@pytest.fixture(scope="module")
def sd15(sd15_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Personalized:
    """SD1.5 + BK-SDM-tiny's LoRA bundle, exported by the API (the label from the file's stem, scale 1)."""
    return _personalize(sd15_dir, tmp_path_factory.mktemp("sd15-lora"), 1.0, 2)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Personalized:
    """SDXL + SSD-1B's LoRA bundle (two text encoders, the addition embeddings), exported by the API."""
    folder = build_sdxl_ssd_1b(tmp_path_factory.mktemp("sdxl") / "family", 0).folder
    return _personalize(folder, tmp_path_factory.mktemp("sdxl-lora"), 1.0, 3)


@pytest.fixture(scope="module")
def lcm(tmp_path_factory: pytest.TempPathFactory) -> Personalized:
    """LCM-Dreamshaper's LoRA bundle (a guidance-embedded UNet, the LCM sampler), exported by the API."""
    folder = build_lcm_dreamshaper(tmp_path_factory.mktemp("lcm") / "family", 0).folder
    return _personalize(folder, tmp_path_factory.mktemp("lcm-lora"), 0.8, 4, sampler="lcm", guidance=1.5)


@pytest.fixture(scope="module")
def sd15_dora(sd15_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Personalized:
    """SD1.5 + BK-SDM-tiny with a DoRA (weight-decomposed LoRA), exported by the API."""
    return _personalize(sd15_dir, tmp_path_factory.mktemp("sd15-dora"), 1.0, 6, dora=True)


REPO = Path(__file__).resolve().parents[2]
COMMITTED_LORA = REPO / "models" / "demo" / "lora" / "red-sneakers" / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Personalized:
    """The trained demo family with the LoRA trained on it here (models/demo/lora/red-sneakers), by the CLI."""
    family_dir = REPO / "models" / "demo" / "family"
    family = load_family(family_dir)
    out, printed = tmp_path_factory.mktemp("committed-lora") / "bundle", io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["--family", str(family_dir), "--lora", str(COMMITTED_LORA), "--out", str(out), "--threads", "1"])
    assert code == 0, printed.getvalue()
    reference = dataclasses.replace(family, small_unet=diffusers_fused_small(family, COMMITTED_LORA, 1.0))
    return Personalized(family, reference, COMMITTED_LORA, 1.0, out, DeviceBundle(out, threads=1), printed.getvalue())


def _device_latent(p: Personalized, split: int) -> np.ndarray:
    """The relay: the family's own edge (its large model) for ``split`` steps, then the bundle on the device."""
    plan = RelayPlan(STEPS, split, p.sampler, p.guidance)
    handoff = EdgeRelay(p.family).start(PROMPT, plan, SEED)
    received = decode_handoff(encode_handoff(handoff), expected_family=p.bundle.family_id)
    return finish_latents(p.bundle, received)


def _max_abs(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ----------------------------------------------------------------------------- the relay with a LoRA bundle


_MORE_FAMILIES = pytest.mark.slow  # reason: builds and exports more families and bundles (~2 min on 2 cores)


@pytest.mark.parametrize("which", ["demo", "sd15", "committed", pytest.param("sdxl", marks=_MORE_FAMILIES),
                                   pytest.param("lcm", marks=_MORE_FAMILIES),
                                   pytest.param("sd15_dora", marks=_MORE_FAMILIES)])
def test_relay_with_lora_bundle_equals_diffusers_with_the_lora_fused(which: str, request: pytest.FixtureRequest):
    p: Personalized = request.getfixturevalue(which)
    for split in (0, STEPS // 2, STEPS):
        ours = _device_latent(p, split)
        reference = pipeline_latent(p.reference, PROMPT, p.sampler, STEPS, split, p.guidance, SEED).numpy()
        ERRORS[f"{which} k={split}/{STEPS}"] = error = _max_abs(ours, reference)
        assert ours.shape == reference.shape and error <= TOLERANCE, f"{which} k={split}: max-abs {error:.3g}"
    # The LoRA changes what the device draws: without it, the family's own small UNet gives another latent.
    plain = pipeline_latent(p.family, PROMPT, p.sampler, STEPS, 0, p.guidance, SEED).numpy()
    assert _max_abs(_device_latent(p, 0), plain) > 100 * TOLERANCE


@pytest.mark.parametrize("which", ["demo", "sd15"])
def test_manifest_records_the_lora_and_keeps_the_family(which: str, request: pytest.FixtureRequest):
    p: Personalized = request.getfixturevalue(which)
    manifest = load_manifest(p.bundle_dir)
    verify_bundle_files(p.bundle_dir, manifest)
    assert manifest.family_id == p.family.family_id  # the edge's handoffs are still accepted
    personal = manifest.personalization
    assert personal is not None and personal.kind == "lora"
    assert personal.label == ("My style" if which == "demo" else "pytorch_lora_weights")  # default: the file's stem
    assert personal.adapter_file == p.lora.name and personal.adapter_sha256 == sha256_file(p.lora)
    assert personal.adapter_scale == p.scale and personal.adapter_format == "diffusers"
    assert personal.base_small_model == "unet_small"
    assert personal.base_small_sha256 == weights_sha256(p.family.small_unet)
    # The exporter's fusing (model-level) gives the very weights diffusers' pipeline API gives.
    assert manifest.small_model_sha256 == weights_sha256(p.reference.small_unet) != personal.base_small_sha256
    assert not any(rel.endswith(p.lora.name) for rel in manifest.files)  # the fused weights are the bundle
    # The caller's family is left as it was.
    assert weights_sha256(load_family(p.family.folder).small_unet) == weights_sha256(p.family.small_unet)


def test_every_bundle_records_its_small_unets_hash(tiny_family, fp32_bundle_dir: Path):
    manifest = load_manifest(fp32_bundle_dir)  # a plain bundle (tests/conftest.py)
    assert manifest.personalization is None
    assert manifest.small_model_sha256 == weights_sha256(tiny_family.small_unet)


def test_cli_summary_says_what_was_personalized(demo: Personalized):
    lines = [line for line in demo.printed.splitlines() if line.startswith("personalized:")]
    assert lines == [f"personalized: LoRA 'My style' (pytorch_lora_weights.safetensors, diffusers format, scale 0.75) "
                     f"fused into unet_small; the family ({demo.family.family_id}) and its edge model unchanged"]


# ----------------------------------------------------------------------------- refusals


def _refused(args: list[str], out: Path, capfd) -> str:
    """Run the CLI; it must exit 2 with one line on stderr (fd 2: loggers' and peft's included) and leave nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    before = sorted(out.parent.iterdir())
    assert main([*args, "--out", str(out), "--threads", "1"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rise-export: error: "), err
    assert not out.exists() and sorted(out.parent.iterdir()) == before  # no --out, no staging folder
    return err[0]


def test_a_lora_for_another_architecture_is_refused(demo_dir: Path, sd15: Personalized, tmp_path: Path, capfd):
    # Made on the SD1.5-shaped family's small UNet: its layer names and widths are not the demo family's.
    line = _refused(["--family", str(demo_dir), "--lora", str(sd15.lora)], tmp_path / "b", capfd)
    assert "does not fit the family's small UNet (unet_small)" in line


def test_a_lora_made_on_the_large_unet_is_refused(demo: Personalized, tmp_path: Path, capfd):
    # Same layer names as the small UNet, other widths: a size mismatch.
    lora = make_lora(demo.family.large_unet, tmp_path / "large", seed=3)
    line = _refused(["--family", str(demo.family.folder), "--lora", str(lora)], tmp_path / "out" / "b", capfd)
    assert "does not fit the family's small UNet" in line and "size mismatch" in line


def test_a_lora_that_changes_the_text_encoder_is_refused(demo: Personalized, tmp_path: Path, capfd):
    lora = make_lora(demo.family.small_unet, tmp_path / "te", seed=4, text_encoder=demo.family.pipeline.text_encoder)
    line = _refused(["--family", str(demo.family.folder), "--lora", str(lora)], tmp_path / "out" / "b", capfd)
    assert "also changes the text encoder" in line and "shared with the edge" in line


@_MORE_FAMILIES
def test_an_sdxl_lora_that_changes_the_second_text_encoder_is_refused(sdxl: Personalized, tmp_path: Path, capfd):
    family = sdxl.family
    lora = make_lora(family.small_unet, tmp_path / "te2", seed=5, text_encoder_2=family.pipeline.text_encoder_2)
    line = _refused(["--family", str(family.folder), "--lora", str(lora)], tmp_path / "out" / "b", capfd)
    assert "also changes the text encoder" in line and "shared with the edge" in line


def test_files_that_are_no_safetensors_lora_are_refused(demo: Personalized, tmp_path: Path, capfd):
    pickle = tmp_path / "lora.bin"
    torch.save({"unet.x.lora.down.weight": torch.zeros(2, 2)}, pickle)
    line = _refused(["--family", str(demo.family.folder), "--lora", str(pickle)], tmp_path / "out" / "a", capfd)
    assert "is not a safetensors file" in line
    from safetensors.torch import save_file

    weights = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in list(demo.family.small_unet.state_dict().items())[:4]}, str(weights))
    line = _refused(["--family", str(demo.family.folder), "--lora", str(weights)], tmp_path / "out" / "b", capfd)
    assert "is not a LoRA" in line
    line = _refused(["--family", str(demo.family.folder), "--lora", str(tmp_path / "none.safetensors")],
                    tmp_path / "out" / "c", capfd)
    assert "does not exist" in line


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf", "4.5"])
def test_a_bad_lora_scale_is_refused(demo: Personalized, tmp_path: Path, capfd, scale: str):
    line = _refused(["--family", str(demo.family.folder), "--lora", str(demo.lora), "--lora-scale", scale],
                    tmp_path / "b", capfd)
    assert "--lora-scale must be" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-scale", "1"], "--lora-scale needs --lora"),
        (["--label", "x"], "--label names a personalized bundle"),
        (["--base-small", "unet_small"], "--base-small needs --small"),
        (["--lora", "L", "--small", "unet_small", "--base-small", "unet_small"], "give one"),
        (["--lora", "L", "--from-onnx", "."], "leave out --from-onnx"),
        (["--lora", "L", "--label", " padded "], "--label"),
    ],
)
def test_flags_that_do_not_go_together(demo: Personalized, tmp_path: Path, capfd, extra: list[str], message: str):
    extra = [str(demo.lora) if a == "L" else a for a in extra]
    line = _refused(["--family", str(demo.family.folder), *extra], tmp_path / "b", capfd)
    assert message in line


def test_lora_api_errors_are_typed(demo: Personalized, tmp_path: Path):
    from export.lora import check_lora_scale, fuse_lora

    with pytest.raises(ConfigError):
        check_lora_scale(math.nan)
    assert check_lora_scale(4) == 4.0
    with pytest.raises(ExportError, match="does not fit"):
        fuse_lora(demo.family, make_lora(demo.family.large_unet, tmp_path / "l", seed=5))


# ----------------------------------------------------------------------------- full fine-tunes


def test_a_fine_tune_is_recorded_and_runs(demo_dir: Path, demo: Personalized, tmp_path: Path):
    tuned = copy.deepcopy(demo.family.small_unet)
    torch.manual_seed(6)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    tuned.save_pretrained(tmp_path / "my-tune", safe_serialization=True)
    family = load_family(demo_dir, str(tmp_path / "my-tune"))
    result = export_bundle(ExportOptions(family=demo_dir, out=tmp_path / "bundle", small=str(tmp_path / "my-tune"),
                                         base_small="unet_small"), family=family)
    manifest = load_manifest(result.bundle_dir)
    personal = manifest.personalization
    assert personal is not None and personal.kind == "fine_tune" and personal.label == "my-tune"
    assert personal.base_small_model == "unet_small"
    assert personal.base_small_sha256 == weights_sha256(demo.family.small_unet)
    assert manifest.small_model_sha256 == weights_sha256(tuned) != personal.base_small_sha256
    assert personal.adapter_file is personal.adapter_sha256 is personal.adapter_scale is personal.adapter_format is None
    assert manifest.family_id == demo.family.family_id
    # The device finishes a device-only handoff with the fine-tune, as the family's pipeline does with it.
    bundle = DeviceBundle(result.bundle_dir, threads=1)
    handoff = EdgeRelay(family).start(PROMPT, RelayPlan(STEPS, 0, SAMPLER, GUIDANCE), SEED)
    ours = finish_latents(bundle, decode_handoff(encode_handoff(handoff), expected_family=bundle.family_id))
    ERRORS["fine-tune k=0"] = error = _max_abs(ours, pipeline_latent(family, PROMPT, SAMPLER, STEPS, 0, GUIDANCE, SEED))
    assert error <= TOLERANCE


def test_a_fine_tune_of_another_architecture_is_refused(demo_dir: Path, demo: Personalized, tmp_path: Path, capfd):
    from diffusers import UNet2DConditionModel

    config = {**demo.family.small_unet.config, "layers_per_block": 2}
    UNet2DConditionModel.from_config(config).save_pretrained(tmp_path / "other", safe_serialization=True)
    line = _refused(["--family", str(demo_dir), "--small", str(tmp_path / "other"), "--base-small", "unet_small"],
                    tmp_path / "out" / "b", capfd)
    assert "does not have the architecture of its base unet_small: layers_per_block is 2 in the fine-tune, 1" in line
    family = load_family(demo_dir, str(tmp_path / "other"))
    from export.lora import check_fine_tune

    with pytest.raises(FamilyError, match="layers_per_block"):
        check_fine_tune(family, "unet_small")
    with pytest.raises(ConfigError, match="both name"):
        check_fine_tune(load_family(demo_dir), "unet_small")


# ----------------------------------------------------------------------------- key layouts and partial fits


def _relaid(lora: Path, folder: Path, layout: str) -> Path:
    """The same LoRA in the peft layout (``lora_A/lora_B``) or kohya's (``lora_unet_*``, ``lora_down/up``, alphas)."""
    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    for key, value in load_file(str(lora)).items():
        module, _, part = key.removeprefix("unet.").partition(".lora.")
        down = part.startswith("down")
        if layout == "peft":
            tensors[f"unet.{module}.{'lora_A' if down else 'lora_B'}.weight"] = value
        else:  # kohya: alpha = rank gives diffusers' scale 1, as the original's
            name = "lora_unet_" + module.replace(".", "_")
            tensors[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = value
            if down:
                tensors[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"{layout}.safetensors"))
    return folder / f"{layout}.safetensors"


def test_peft_and_kohya_layouts_fuse_to_the_same_weights(demo: Personalized, tmp_path: Path):
    from export.lora import fuse_lora

    diffusers_layout = fuse_lora(demo.family, demo.lora, demo.scale)
    assert diffusers_layout.small_sha256 == load_manifest(demo.bundle_dir).small_model_sha256
    for layout in ("peft", "kohya"):
        fused = fuse_lora(demo.family, _relaid(demo.lora, tmp_path, layout), demo.scale)
        assert fused.personalization.adapter_format == layout
        assert fused.small_sha256 == diffusers_layout.small_sha256 and fused.layers == diffusers_layout.layers


def test_a_lora_on_convs_in_two_key_layouts_fuses_whole(sd15: Personalized, tmp_path: Path):
    """A LoRA on resnet convs and projections too, saved through convert_state_dict_to_diffusers: the attention
    keys renamed (lora.down/up), the others in peft's layout, and a conv key first. diffusers' loader reads the
    layout off the first key and drops the renamed half with a warning; ours fuses all of it, to the weights
    diffusers' pipeline gives the same LoRA in peft's layout alone."""
    from safetensors import safe_open

    from export.lora import fuse_lora

    family = sd15.family
    targets = (*ATTENTION, "conv1", "conv2", "proj_in", "proj_out")
    mixed = make_lora(family.small_unet, tmp_path / "mixed", seed=7, targets=targets)
    peft = make_lora(family.small_unet, tmp_path / "peft", seed=7, targets=targets, layout="peft")
    with safe_open(str(mixed), framework="pt") as fh:
        keys = sorted(fh.keys())
    assert ".lora_A." in keys[0] and any(".lora.down." in k for k in keys)  # the case diffusers half-drops
    fused_mixed, fused_peft = fuse_lora(family, mixed), fuse_lora(family, peft)
    assert fused_mixed.personalization.adapter_format == "diffusers-peft"
    assert fused_mixed.layers == fused_peft.layers == len(keys) // 2
    assert fused_mixed.small_sha256 == fused_peft.small_sha256 == weights_sha256(diffusers_fused_small(family, peft,
                                                                                                       1.0))


def test_loras_whose_tensors_do_not_all_land_are_refused(demo: Personalized, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    from export.lora import fuse_lora

    tensors = load_file(str(demo.lora))
    # One layer more than the demo small UNet has (its first level has no attention): diffusers would only warn.
    absent = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({**tensors, f"{absent}.lora.down.weight": torch.randn(4, 16), f"{absent}.lora.up.weight":
               torch.randn(16, 4)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ExportError, match=r"2 of its \d+ tensors name no layer of it"):
        fuse_lora(demo.family, tmp_path / "partial.safetensors")
    # Target modules of another model altogether.
    save_file({"unet.encoder.block.0.q.lora.down.weight": torch.randn(4, 16),
               "unet.encoder.block.0.q.lora.up.weight": torch.randn(16, 4)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ExportError, match="does not fit the family's small UNet"):
        fuse_lora(demo.family, tmp_path / "foreign.safetensors")


def test_the_committed_lora_is_recorded_with_its_mixed_key_layout(committed: Personalized):
    # diffusers' convert_state_dict_to_diffusers renames the attention layers' LoRA keys (lora.down/up) and leaves
    # the feed-forward ones in peft's layout (lora_A/B): the manifest says so rather than naming one layout
    personal = load_manifest(committed.bundle_dir).personalization
    assert personal is not None and personal.adapter_format == "diffusers-peft"
    assert personal.adapter_sha256 == sha256_file(COMMITTED_LORA)
    assert "diffusers-peft format" in committed.printed
