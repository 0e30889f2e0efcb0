"""Where the edge computes (``--device`` / ``--dtype``): the dtype paths on a CPU, and clear refusals.

No GPU here: bf16 and fp16 on the CPU run the same code paths a CUDA edge runs (modules in the low
precision, latents and samplers in float32, everything handed off as CPU float32), and a CUDA device
this machine lacks is refused in one line. The CUDA runs themselves are ``bench/gpu_check.py``'s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from edge_server.family import load_family
from edge_server.placement import resolve_placement
from edge_server.relay import EdgeRelay, decode_latents, prepare, run_torch_relay
from shared.errors import ConfigError
from shared.handoff import decode_handoff, encode_handoff
from shared.relay_plan import RelayPlan

ROOT = Path(__file__).resolve().parents[2]
# Max-abs error of the final latent relative to its scale, against fp32 (measured on the tiny
# family, 8 steps: bf16 ~8e-3, fp16 ~1.5e-3; bf16 keeps 8 significant bits, fp16 11).
RELATIVE_TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3}


@pytest.fixture(scope="module")
def low_precision(tiny_family_dir: Path) -> dict[str, object]:
    return {name: load_family(tiny_family_dir, placement=resolve_placement("cpu", name)) for name in RELATIVE_TOLERANCE}


def test_auto_is_the_cpu_in_fp32_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    placement = resolve_placement()
    assert (placement.device.type, placement.dtype) == ("cpu", torch.float32)


@pytest.mark.parametrize(("device", "words"), [
    ("cuda", "has no CUDA device"), ("cuda:1", "has no CUDA device"), ("cuda:x", "cuda:N"),
    ("tpu", "auto, cpu, cuda or cuda:N"),
])
def test_a_device_this_machine_lacks_is_refused_in_one_line(device: str, words: str) -> None:
    if torch.cuda.is_available() and words == "has no CUDA device":
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=words) as info:
        resolve_placement(device, "auto")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="--dtype"):
        resolve_placement("cpu", "fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_rise_edge_on_a_cuda_device_it_lacks_exits_2(tiny_family_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_server.daemon", "serve", "--family", str(tiny_family_dir), "--port", "0",
         "--device", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2 and len(errors) == 1 and "no CUDA device" in errors[0], result.stderr[-2000:]


@pytest.mark.parametrize("dtype", sorted(RELATIVE_TOLERANCE))
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_low_precision_relays_match_fp32(tiny_family, low_precision, dtype: str, sampler: str) -> None:
    plan = RelayPlan(8, 4, sampler, 5.0)
    reference = run_torch_relay(tiny_family, "a red sneaker", plan, 3)
    ours = run_torch_relay(low_precision[dtype], "a red sneaker", plan, 3)
    assert ours.dtype == torch.float32  # the sampler runs in float32 whatever the network's dtype
    error = float((ours - reference).abs().max()) / float(reference.abs().max())
    assert error <= RELATIVE_TOLERANCE[dtype], f"{dtype} {sampler}: relative max-abs {error:.3g}"


@pytest.mark.parametrize("dtype", sorted(RELATIVE_TOLERANCE))
def test_what_the_edge_hands_off_is_cpu_float32(low_precision, dtype: str) -> None:
    family = low_precision[dtype]
    assert family.large_unet.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    handoff = EdgeRelay(family).start("a blue bag", RelayPlan(6, 3, "dpmpp_2m", 5.0), 5)
    arrays = [handoff.latents, handoff.cond_embeddings, handoff.timesteps, *handoff.sampler_state.tensors.values()]
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays)
    assert decode_handoff(encode_handoff(handoff)).split == 3
    image = decode_latents(family, torch.from_numpy(handoff.latents))
    assert image.dtype == np.uint8 and image.shape[-1] == 3


def test_a_seed_gives_the_same_noise_whatever_the_placement(tiny_family, low_precision) -> None:
    plan = RelayPlan(6, 3, "ddim", 5.0)
    expected = randn_tensor((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(9), dtype=torch.float32)
    for family in (tiny_family, *low_precision.values()):
        job = prepare(family, "a hat", plan, 9)
        assert job.latents.dtype == torch.float32
        assert torch.equal(job.latents.cpu(), expected)  # DDIM's init_noise_sigma is 1


def test_a_force_upcast_vae_stays_fp32(tmp_path: Path) -> None:
    from lab.hub_families import build_sdxl_ssd_1b

    family = load_family(build_sdxl_ssd_1b(tmp_path / "sdxl").folder, placement=resolve_placement("cpu", "bf16"))
    pipeline: object = family.pipeline
    assert family.large_unet.dtype == torch.bfloat16
    assert pipeline.vae.dtype == torch.float32  # type: ignore[attr-defined]  # SDXL's VAE config: force_upcast
