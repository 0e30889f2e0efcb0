"""Real families (published architectures, shrunk): the edge reproduces each family's own diffusers pipeline.

For every hub family of ``lab/hub_families.py`` and every sampler it runs: ``k = N`` on the edge equals
the family's own pipeline class (same seed, scheduler, guidance), ``k = 0`` equals that pipeline with
the small UNet, and ``0 < k < N`` equals the pipeline with its UNet swapped for the small one after
step ``k`` (diffusers' own step callback): to 1e-4 on the final latent. The device half of the same
relay is checked against these in ``tests/device_app/test_hub_bundles.py``. And what we cannot run
is refused when it loads, in one line, before any step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_server.family import Family, load_family
from edge_server.relay import run_torch_relay
from lab.hub_families import (
    BUILDERS,
    build_flux_style_folder,
    build_sd3_style_folder,
    pipeline_latent,
    with_scheduler_class,
    with_unet_config,
)
from shared.errors import ConfigError, FamilyError
from shared.relay_plan import RelayPlan

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red fox in the snow"
SEED = 7
GUIDANCE = 5.0


class _Families(dict[str, Family]):
    """Each hub family built and loaded on first use, once per module."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Family:
        hub = BUILDERS[name](self.root / name.replace("+", "_"), 0)
        self[name] = load_family(hub.folder, hub.small)
        return self[name]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    return _Families(tmp_path_factory.mktemp("hub"))


_CASES = [(name, sampler) for name, build in BUILDERS.items() for sampler in
          (("lcm",) if name.startswith("lcm") else ("ddim", "euler", "dpmpp_2m"))]


@pytest.mark.parametrize(("name", "sampler"), _CASES)
def test_every_split_equals_the_familys_own_pipeline(families: dict[str, Family], name: str, sampler: str) -> None:
    family = families[name]
    steps = 4 if sampler == "lcm" else 6
    for split in (0, steps // 2, steps):
        ours = run_torch_relay(family, PROMPT, RelayPlan(steps, split, sampler, GUIDANCE), SEED)
        reference = pipeline_latent(family, PROMPT, sampler, steps, split, GUIDANCE, SEED)
        error = float((ours - reference).abs().max())
        assert error <= 1e-4, f"{name} {sampler} k={split}/{steps}: max-abs {error:.3g}"


def test_the_kind_of_each_family_is_read_from_its_folder(families: dict[str, Family]) -> None:
    sdxl, lcm, tiny_sd = families["sdxl+ssd-1b"], families["lcm-dreamshaper"], families["sd15+tiny-sd"]
    assert (sdxl.kind, sdxl.pipeline_class, sdxl.guidance) == ("sdxl", "StableDiffusionXLPipeline", "cfg")
    assert (lcm.samplers, lcm.guidance, lcm.time_cond_proj_dim, lcm.default_sampler) == (("lcm",), "embedding", 256,
                                                                                         "lcm")
    assert tiny_sd.small_unet.dtype == torch.float32  # its fp16-only folder was found and upcast
    assert families["sd15+bk-sdm-tiny"].default_sampler == "dpmpp_2m"
    # The family id covers both SDXL text encoders: another second encoder is another family.
    assert sdxl.family_id != families["sd15+bk-sdm-tiny"].family_id


def test_a_family_refuses_a_sampler_it_does_not_run(families: dict[str, Family]) -> None:
    with pytest.raises(ConfigError, match=r"does not run sampler 'dpmpp_2m'; it runs lcm"):
        run_torch_relay(families["lcm-dreamshaper"], PROMPT, RelayPlan(4, 2, "dpmpp_2m", GUIDANCE), SEED)
    with pytest.raises(ConfigError, match=r"does not run sampler 'lcm'"):
        run_torch_relay(families["sd15+bk-sdm-tiny"], PROMPT, RelayPlan(4, 2, "lcm", GUIDANCE), SEED)


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def sd_family_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return BUILDERS["sd15+bk-sdm-tiny"](tmp_path_factory.mktemp("sd") / "sd15", 0).folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _unsupported(kind: str, sd: Path, tmp_path: Path) -> tuple[Path, str]:
    """A folder of an unsupported kind, and the words its refusal must contain."""
    if kind == "sd3":
        return build_sd3_style_folder(tmp_path / "sd3"), "StableDiffusion3Pipeline"
    if kind == "flux":
        return build_flux_style_folder(tmp_path / "flux"), "FluxPipeline"
    if kind == "scheduler":
        return with_scheduler_class(_copy(sd, tmp_path), "FlowMatchEulerDiscreteScheduler"), "scheduler class"
    if kind == "class_embed":
        return with_unet_config(_copy(sd, tmp_path), "small", class_embed_type="timestep"), "class_embed_type"
    if kind == "addition_embed":
        return with_unet_config(_copy(sd, tmp_path), "large", addition_embed_type="text_image"), "addition_embed_type"
    if kind == "prediction":
        folder = _copy(sd, tmp_path)
        config = folder / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "flow"}))
        return folder, "prediction_type 'flow'"
    if kind == "pipeline":
        folder = _copy(sd, tmp_path)
        index = folder / "model_index.json"
        index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusionUpscalePipeline"}))
        return folder, "StableDiffusionUpscalePipeline"
    raise AssertionError(kind)


UNSUPPORTED = ("sd3", "flux", "scheduler", "class_embed", "addition_embed", "prediction", "pipeline")


@pytest.mark.parametrize("kind", UNSUPPORTED)
def test_an_unsupported_family_is_refused_when_it_loads(kind: str, sd_family_folder: Path, tmp_path: Path) -> None:
    folder, words = _unsupported(kind, sd_family_folder, tmp_path)
    with pytest.raises(FamilyError, match="unsupported") as info:
        load_family(folder)
    message = str(info.value)
    assert words in message and "\n" not in message


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("kind", ["sd3", "scheduler", "class_embed"])
def test_the_daemon_and_relay_refuse_it_with_one_line_and_exit_2(kind: str, sd_family_folder: Path,
                                                                 tmp_path: Path) -> None:
    folder, words = _unsupported(kind, sd_family_folder, tmp_path)
    for command in (("edge_server.daemon", "serve", "--family", str(folder), "--port", "0"),
                    ("lab.local_relay", "--family", str(folder), "--bundle", str(tmp_path), "--prompt", "x", "--out",
                     str(tmp_path / "x.png"))):
        result = _run(*command)
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_the_daemon_refuses_a_configured_sampler_the_family_does_not_run(families: dict[str, Family]) -> None:
    result = _run("edge_server.daemon", "serve", "--family", str(families["lcm-dreamshaper"].folder), "--port", "0",
                  "--sampler", "dpmpp_2m")
    assert result.returncode == 2 and "does not run sampler 'dpmpp_2m'" in result.stderr, result.stderr[-2000:]
