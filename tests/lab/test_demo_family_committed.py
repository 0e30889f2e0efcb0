"""The committed demo family (models/demo/family/), when it is there: size, model card, loadable, cost ratio."""

from __future__ import annotations

import json

import pytest

from edge_server.family import is_family_folder
from lab.demo import DEMO_FAMILY_DIR

MODELS = DEMO_FAMILY_DIR.parent
MAX_MB = 40  # the budget for the committed weights (family + scorer)

pytestmark = pytest.mark.skipif(not is_family_folder(DEMO_FAMILY_DIR),
                                reason="the trained demo family is not committed yet")


def test_committed_weights_fit_the_budget_and_are_safetensors() -> None:
    weights = [p for p in MODELS.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".onnx")]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total <= MAX_MB * 1e6, f"{total / 1e6:.1f} MB"


def test_model_card_says_how_each_part_was_trained() -> None:
    card = (DEMO_FAMILY_DIR / "README.md").read_text()
    info = json.loads((DEMO_FAMILY_DIR / "training.json").read_text())
    for stage in ("vae", "large", "small"):
        assert f"| {stage} |" in card
        assert info["stages"][stage]["steps"] > 0
    assert "python -m lab.demo_family.train" in card


def test_large_to_small_step_cost_ratio_is_at_least_4_at_the_devices_batch() -> None:
    # rise-eval --bundle measures the pair the relay runs (large in PyTorch, small on ONNX Runtime)
    # at batch 2 (one image with CFG); without its report, the PyTorch-only figure of the training run.
    report = DEMO_FAMILY_DIR / "eval" / "eval.json"
    if report.is_file():
        ratio = json.loads(report.read_text())["step_cost"]["ratio"]
    else:
        ratio = json.loads((DEMO_FAMILY_DIR / "training.json").read_text())["step_cost_ms"]["ratio"]
    assert ratio >= 4


def test_committed_family_loads_with_the_small_unet_sharing_its_spaces() -> None:
    from edge_server.family import load_family

    family = load_family(DEMO_FAMILY_DIR)
    assert family.vae_scale_factor == 4 and family.default_latent_size == 12
    assert family.small_unet.config.cross_attention_dim == family.cross_attention_dim
    large = sum(p.numel() for p in family.large_unet.parameters())
    small = sum(p.numel() for p in family.small_unet.parameters())
    assert small < large / 4
