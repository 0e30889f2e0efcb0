"""Hub-shaped SDXL and LCM bundles on the device: conditioning, finishing handoffs, refusals, offline.

The families are ``lab/hub_families.py``'s (published architectures, shrunk), each built, loaded and
exported once per module. The device's conditioning must equal the edge's (``encode_prompts``); a
``k = 0`` handoff finished on the device must equal the family's own diffusers pipeline run with the
small UNet (same seed, scheduler class, guidance), and a mid-``k`` one the one-process torch relay, to
1e-4 on the final latent. The edge half of the same relay is checked in
``tests/edge_server/test_real_families.py``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler
from safetensors.numpy import load_file, save_file

from device_app.app.offline import device_only_handoff, generate_offline, offline_plan
from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.family import Family, encode_prompts, load_family
from edge_server.relay import EdgeRelay, run_torch_relay
from lab.hub_families import build_lcm_dreamshaper, build_sdxl_ssd_1b
from shared.errors import BundleError, ConfigError, HandoffError
from shared.handoff import decode_handoff, encode_handoff
from shared.manifest import MANIFEST_NAME, UNCOND_POOLED_TENSOR
from shared.relay_plan import RelayPlan
from tests.helpers import run_without_torch

PROMPT = "a red fox in the snow"
PROMPTS = [PROMPT, "two things: a blue bag and a white shirt", "", "a very long prompt " * 20]
SEED = 7
TOLERANCE = 1e-4  # max-abs on the final latent / the conditioning, ORT + numpy against torch
SDXL_GUIDANCE = 5.0
LCM_GUIDANCE = 8.5  # LatentConsistencyModelPipeline's default
# At 8.5 the numpy guidance embedding (shared.guidance) is up to 4e-4 from torch's (torch's exp is one ulp off
# for some frequencies), ~1e-4 on the final latent after 4 LCM steps: so the edge sends its own in the handoff
# (added_cond["timestep_cond"]) and the device computes the port's only when it generates alone.
_DIFFUSERS_CLASSES: dict[str, Any] = {
    "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}
ERRORS: dict[str, float] = {}  # what each case measured, printed at the end of the module (pytest -s)


@dataclasses.dataclass(frozen=True)
class Built:
    family: Family
    bundle: DeviceBundle


def _build(builder: Any, root: Path) -> Built:
    from export.onnx_export import ExportOptions, export_bundle

    hub = builder(root / "family", 0)
    family = load_family(hub.folder, hub.small)
    result = export_bundle(ExportOptions(family=hub.folder, out=root / "bundle", small=hub.small), family=family)
    return Built(family, DeviceBundle(result.bundle_dir, threads=1))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(build_sdxl_ssd_1b, tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def lcm(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(build_lcm_dreamshaper, tmp_path_factory.mktemp("lcm"))


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    for case, error in sorted(ERRORS.items()):
        print(f"[hub bundles] {case}: max-abs {error:.3e}")


def _max_abs(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _small_pipeline_latent(family: Family, sampler: str, steps: int, guidance: float) -> np.ndarray:
    """The family's own pipeline with its UNet swapped for the small one: every step on the small model."""
    pipe: Any = family.pipeline
    large, scheduler = pipe.unet, pipe.scheduler
    pipe.unet = family.small_unet
    pipe.scheduler = _DIFFUSERS_CLASSES[sampler].from_config(family.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    try:
        out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(SEED))
    finally:
        pipe.unet, pipe.scheduler = large, scheduler
    latents: np.ndarray = out.images.numpy()
    return latents


# ----------------------------------------------------------------------------- (a) conditioning


def test_sdxl_conditioning_equals_the_edges(sdxl: Built) -> None:
    embeds, added = sdxl.bundle.encode_conditioning(PROMPTS)
    edge = encode_prompts(sdxl.family, PROMPTS)
    assert embeds.shape == tuple(edge.embeds.shape) and sorted(added) == ["text_embeds"]
    ERRORS["sdxl conditioning embeds"] = _max_abs(embeds, edge.embeds)
    ERRORS["sdxl conditioning text_embeds"] = _max_abs(added["text_embeds"], edge.added["text_embeds"])
    assert ERRORS["sdxl conditioning embeds"] <= TOLERANCE
    assert ERRORS["sdxl conditioning text_embeds"] <= TOLERANCE
    np.testing.assert_array_equal(sdxl.bundle.encode_text(PROMPTS), embeds)
    # force_zeros_for_empty_prompt: the bundle's unconditional constants are zeros, as the pipeline's.
    assert sdxl.bundle.uncond_pooled is not None and not sdxl.bundle.uncond_pooled.any()
    assert not sdxl.bundle.uncond.any() and sdxl.bundle.uncond.shape == (1, *embeds.shape[1:])


def test_lcm_conditioning_equals_the_edges(lcm: Built) -> None:
    embeds, added = lcm.bundle.encode_conditioning(PROMPTS)
    edge = encode_prompts(lcm.family, PROMPTS)
    assert added == {} and embeds.shape == tuple(edge.embeds.shape)
    ERRORS["lcm conditioning embeds"] = _max_abs(embeds, edge.embeds)
    assert ERRORS["lcm conditioning embeds"] <= TOLERANCE
    assert lcm.bundle.uncond_pooled is None


# ----------------------------------------------------------------------------- (b) finishing handoffs

_K0_CASES = [("sdxl", "ddim"), ("sdxl", "euler"), ("sdxl", "dpmpp_2m"), ("lcm", "lcm")]


@pytest.mark.parametrize(("kind", "sampler"), _K0_CASES)
def test_device_only_handoff_equals_the_small_pipeline(kind: str, sampler: str, request: pytest.FixtureRequest) -> None:
    built: Built = request.getfixturevalue(kind)
    steps, guidance = (4, LCM_GUIDANCE) if kind == "lcm" else (4, SDXL_GUIDANCE)
    handoff = EdgeRelay(built.family).start(PROMPT, RelayPlan(steps, 0, sampler, guidance), SEED)
    handoff = decode_handoff(encode_handoff(handoff), expected_family=built.bundle.family_id)  # as on the network
    ours = finish_latents(built.bundle, handoff)
    reference = _small_pipeline_latent(built.family, sampler, steps, guidance)
    error = ERRORS[f"{kind} {sampler} k=0/{steps} vs diffusers small-only pipeline"] = _max_abs(ours, reference)
    assert error <= TOLERANCE


@pytest.mark.parametrize(("kind", "sampler"), [("sdxl", "dpmpp_2m"), ("sdxl", "euler"), ("lcm", "lcm")])
def test_mid_split_handoff_equals_the_torch_relay(kind: str, sampler: str, request: pytest.FixtureRequest) -> None:
    built: Built = request.getfixturevalue(kind)
    plan = RelayPlan(4, 2, sampler, LCM_GUIDANCE if kind == "lcm" else SDXL_GUIDANCE)
    handoff = EdgeRelay(built.family).start(PROMPT, plan, SEED)
    ours = finish_latents(built.bundle, decode_handoff(encode_handoff(handoff)))
    reference = run_torch_relay(built.family, PROMPT, plan, SEED)
    error = ERRORS[f"{kind} {sampler} k=2/4 vs torch relay"] = _max_abs(ours, reference)
    assert error <= TOLERANCE


def test_sdxl_without_guidance_feeds_the_conditional_rows_only(sdxl: Built) -> None:
    plan = RelayPlan(3, 1, "euler", 1.0)
    handoff = EdgeRelay(sdxl.family).start(PROMPT, plan, SEED)
    assert not handoff.uses_cfg and handoff.added_uncond == {}
    error = ERRORS["sdxl euler k=1/3 guidance 1 vs torch relay"] = _max_abs(
        finish_latents(sdxl.bundle, handoff), run_torch_relay(sdxl.family, PROMPT, plan, SEED))
    assert error <= TOLERANCE


def test_an_lcm_handoff_without_the_edges_embedding_gets_the_ports(lcm: Built) -> None:
    plan = RelayPlan(4, 2, "lcm", LCM_GUIDANCE)
    handoff = EdgeRelay(lcm.family).start(PROMPT, plan, SEED)
    alone = dataclasses.replace(handoff, added_cond={})  # an edge that does not send it: the numpy port's
    error = ERRORS["lcm lcm k=2/4, the port's guidance embedding, vs torch relay"] = _max_abs(
        finish_latents(lcm.bundle, alone), run_torch_relay(lcm.family, PROMPT, plan, SEED))
    assert error <= 1e-3


# ----------------------------------------------------------------------------- (c) refusals


def _refused(bundle: DeviceBundle, handoff: Any, words: str) -> None:
    with pytest.raises(HandoffError, match=words) as info:
        finish_latents(bundle, handoff)
    assert "\n" not in str(info.value)


def test_a_handoff_the_bundle_cannot_continue_is_refused(sdxl: Built, lcm: Built) -> None:
    xl = EdgeRelay(sdxl.family).start(PROMPT, RelayPlan(3, 1, "ddim", SDXL_GUIDANCE), SEED)
    lc = EdgeRelay(lcm.family).start(PROMPT, RelayPlan(3, 1, "lcm", LCM_GUIDANCE), SEED)
    # Another guidance mode than the bundle's UNet takes.
    _refused(sdxl.bundle, dataclasses.replace(xl, guidance="embedding"), "guidance: expected 'cfg'")
    _refused(lcm.bundle, dataclasses.replace(lc, guidance="cfg"), "guidance: expected 'embedding'")
    # A sampler the bundle does not run.
    _refused(lcm.bundle, dataclasses.replace(lc, sampler="ddim"), r"sampler: expected one this bundle runs \(lcm\)")
    # Other extra conditioning than the bundle's UNet takes.
    no_time_ids = {k: v for k, v in xl.added_cond.items() if k != "time_ids"}
    _refused(sdxl.bundle, dataclasses.replace(xl, added_cond=no_time_ids), "added_cond: expected")
    pooled = {"text_embeds": np.zeros((1, 64), np.float32)}
    _refused(lcm.bundle, dataclasses.replace(lc, added_cond={**lc.added_cond, **pooled}), r"added_cond: expected \[\]")
    _refused(sdxl.bundle, dataclasses.replace(xl, added_cond={**xl.added_cond, "timestep_cond": np.zeros((1, 256))}),
             "added_cond: expected")  # a cfg bundle takes no guidance embedding
    narrow = {"timestep_cond": lc.added_cond["timestep_cond"][:, :128]}
    _refused(lcm.bundle, dataclasses.replace(lc, added_cond=narrow), r"timestep_cond: expected shape \(1, 256\)")
    _refused(sdxl.bundle, dataclasses.replace(xl, added_uncond={}), "added_uncond")
    # An SDXL handoff is for another family than the LCM bundle anyway.
    _refused(lcm.bundle, xl, "family")


def _copy_bundle(bundle: DeviceBundle, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle.folder, tmp_path / "bundle"))


def _edit_manifest(folder: Path, **changes: Any) -> None:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_an_sdxl_bundle_without_its_pooled_uncond_is_refused(sdxl: Built, tmp_path: Path) -> None:
    folder = _copy_bundle(sdxl.bundle, tmp_path)
    path = folder / sdxl.bundle.manifest.uncond_embedding
    save_file({k: v for k, v in load_file(str(path)).items() if k != UNCOND_POOLED_TENSOR}, str(path))
    with pytest.raises(BundleError, match=UNCOND_POOLED_TENSOR):
        DeviceBundle(folder, verify=False)


def test_a_unet_input_the_device_would_not_feed_is_refused(lcm: Built, tmp_path: Path) -> None:
    folder = _copy_bundle(lcm.bundle, tmp_path)
    _edit_manifest(folder, guidance="cfg", time_cond_proj_dim=None)  # says cfg, but the graph takes timestep_cond
    with pytest.raises(BundleError, match="'timestep_cond'"):  # at load, from the graph inputs the manifest lists
        DeviceBundle(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["graphs"]["unet"]["inputs"] = []
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    bundle = DeviceBundle(folder)  # nothing listed to check at load: the graph's own inputs, at first use
    with pytest.raises(BundleError, match="'timestep_cond'"):
        bundle.graph("unet")


def test_a_unet_input_the_manifest_promises_but_the_graph_lacks_is_refused(lcm: Built, tmp_path: Path) -> None:
    folder = _copy_bundle(lcm.bundle, tmp_path)
    _edit_manifest(folder, added_cond_names=["text_embeds"])
    with pytest.raises(BundleError, match="lacks input 'text_embeds'"):
        DeviceBundle(folder)


# ----------------------------------------------------------------------------- (d) offline


def test_sdxl_offline_handoff_carries_what_the_edges_does(sdxl: Built) -> None:
    plan = RelayPlan(3, 0, "euler", SDXL_GUIDANCE)
    mine = device_only_handoff(sdxl.bundle, PROMPT, plan, SEED)
    edge = EdgeRelay(sdxl.family).start(PROMPT, plan, SEED)
    assert mine.guidance == edge.guidance == "cfg"
    assert sorted(mine.added_cond) == sorted(edge.added_cond) == ["text_embeds", "time_ids"]
    assert sorted(mine.added_uncond) == sorted(edge.added_uncond)
    for name in mine.added_cond:
        assert _max_abs(mine.added_cond[name], edge.added_cond[name]) <= TOLERANCE
        assert _max_abs(mine.added_uncond[name], edge.added_uncond[name]) <= TOLERANCE
    np.testing.assert_allclose(mine.cond_embeddings, edge.cond_embeddings, atol=TOLERANCE)
    same_noise = dataclasses.replace(mine, latents=edge.latents)
    error = ERRORS["sdxl euler offline handoff (edge noise) vs edge handoff"] = _max_abs(
        finish_latents(sdxl.bundle, same_noise), finish_latents(sdxl.bundle, edge))
    assert error <= TOLERANCE


def test_lcm_offline_handoff_draws_the_noise_the_sampler_needs(lcm: Built) -> None:
    plan = offline_plan(0.0, min_steps=4, max_steps=4, guidance_scale=LCM_GUIDANCE, samplers=lcm.bundle.manifest.samplers)
    assert plan.sampler == "lcm"
    mine = device_only_handoff(lcm.bundle, PROMPT, plan, SEED)
    edge = EdgeRelay(lcm.family).start(PROMPT, plan, SEED)
    assert mine.guidance == edge.guidance == "embedding" and mine.added_uncond == edge.added_uncond == {}
    # The guidance embedding: the numpy port's alone, torch's from the edge (see LCM_GUIDANCE).
    assert sorted(mine.added_cond) == sorted(edge.added_cond) == ["timestep_cond"]
    assert _max_abs(mine.added_cond["timestep_cond"], edge.added_cond["timestep_cond"]) <= 1e-3
    assert sorted(mine.sampler_state.tensors) == sorted(edge.sampler_state.tensors)
    assert mine.sampler_state.scalars == edge.sampler_state.scalars
    again = device_only_handoff(lcm.bundle, PROMPT, plan, SEED)
    for name, noise in mine.sampler_state.tensors.items():
        np.testing.assert_array_equal(noise, again.sampler_state.tensors[name])  # seeded
        assert not np.array_equal(noise, mine.latents)
    with pytest.raises(ConfigError, match="not one this bundle runs"):
        device_only_handoff(lcm.bundle, PROMPT, RelayPlan(4, 0, "dpmpp_2m", LCM_GUIDANCE), SEED)


@pytest.mark.parametrize("kind", ["sdxl", "lcm"])
def test_offline_generation_gives_a_finite_image(kind: str, request: pytest.FixtureRequest) -> None:
    built: Built = request.getfixturevalue(kind)
    manifest = built.bundle.manifest
    plan = offline_plan(0.0, min_steps=3, max_steps=3, samplers=manifest.samplers)
    assert plan.sampler == ("lcm" if kind == "lcm" else "dpmpp_2m")
    result = generate_offline(built.bundle, PROMPT, plan, SEED)
    side = manifest.sample_size * manifest.vae_scale_factor
    assert result.offline and result.image.shape == (side, side, 3) and result.image.dtype == np.uint8
    assert np.isfinite(result.latents).all() and result.image.std() > 0
    again = generate_offline(built.bundle, PROMPT, plan, SEED)
    np.testing.assert_array_equal(result.image, again.image)


_NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from device_app.app.offline import generate_offline, offline_plan
    from device_app.finish import finish_latents
    from device_app.runtime import DeviceBundle
    from shared.handoff import decode_handoff

    bundle_dir, payload_path, out_path = sys.argv[1:4]
    bundle = DeviceBundle(bundle_dir, threads=1)
    latents = finish_latents(bundle, decode_handoff(open(payload_path, "rb").read(), expected_family=bundle.family_id))
    plan = offline_plan(0.0, min_steps=2, max_steps=2, samplers=bundle.manifest.samplers)
    image = generate_offline(bundle, "a blue bag", plan, 3).image
    assert np.isfinite(latents).all() and image.dtype == np.uint8
    np.save(out_path, latents)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "transformers", "optimum"})
    print("heavy modules loaded:", loaded)
    """
)


@pytest.mark.parametrize("kind", ["sdxl", "lcm"])
def test_the_device_finishes_and_generates_without_torch(kind: str, request: pytest.FixtureRequest,
                                                         tmp_path: Path) -> None:
    built: Built = request.getfixturevalue(kind)
    sampler = "lcm" if kind == "lcm" else "dpmpp_2m"
    plan = RelayPlan(3, 1, sampler, LCM_GUIDANCE if kind == "lcm" else SDXL_GUIDANCE)
    payload = tmp_path / "handoff.safetensors"
    payload.write_bytes(encode_handoff(EdgeRelay(built.family).start(PROMPT, plan, SEED)))
    out = tmp_path / "latents.npy"
    proc = run_without_torch(_NO_TORCH_SCRIPT, str(built.bundle.folder), str(payload), str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heavy modules loaded: []" in proc.stdout
    np.testing.assert_array_equal(np.load(out), finish_latents(built.bundle, decode_handoff(payload.read_bytes())))
