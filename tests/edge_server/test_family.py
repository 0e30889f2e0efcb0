"""Family loading: where the small denoiser comes from, dtype, and the compatibility checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from edge_server.family import load_family
from lab.tiny_family import build_tiny_family
from shared.errors import FamilyError, RiseError


def test_loads_large_and_small_in_float32(tiny_family):
    assert tiny_family.large_unet.dtype == torch.float32 and tiny_family.small_unet.dtype == torch.float32
    assert tiny_family.small_source == "unet_small"
    assert (tiny_family.latent_channels, tiny_family.vae_scale_factor, tiny_family.cross_attention_dim) == (4, 2, 32)
    n_large = sum(p.numel() for p in tiny_family.large_unet.parameters())
    n_small = sum(p.numel() for p in tiny_family.small_unet.parameters())
    assert n_small < n_large


def test_family_id_is_stable_and_content_derived(tiny_family_dir, tiny_family, tmp_path):
    assert load_family(tiny_family_dir).family_id == tiny_family.family_id
    other = build_tiny_family(tmp_path / "tiny-sd", seed=1)  # same name, other VAE weights
    assert load_family(other).family_id != tiny_family.family_id


def test_small_from_a_path_to_another_pipeline_or_unet_folder(tiny_family_dir, tmp_path):
    unet_only = tmp_path / "small-unet"
    shutil.copytree(tiny_family_dir / "unet_small", unet_only)
    assert load_family(tiny_family_dir, small=str(unet_only)).small_source == str(unet_only)
    pipeline = tmp_path / "small-pipeline"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    for f in unet_only.iterdir():
        shutil.copy(f, pipeline / "unet" / f.name)
    family = load_family(tiny_family_dir, small=str(pipeline))
    assert sum(p.numel() for p in family.small_unet.parameters()) == sum(
        p.numel() for p in UNet2DConditionModel.from_pretrained(unet_only).parameters())


def test_fp16_weights_load_as_float32(tmp_path):
    folder = build_tiny_family(tmp_path / "fam")
    UNet2DConditionModel.from_pretrained(folder / "unet_small").half().save_pretrained(folder / "unet_small")
    assert load_family(folder).small_unet.dtype == torch.float32


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: shutil.rmtree(d / "unet_small") or d, "no second denoiser"),
        (lambda d: (d / "model_index.json").unlink() or d, "model_index.json"),
        (lambda d: shutil.rmtree(d / "vae") or d, "no vae/"),
    ],
)
def test_broken_family_folders(tmp_path, make, message):
    folder = make(build_tiny_family(tmp_path / "fam"))
    with pytest.raises(FamilyError, match=message):
        load_family(folder)


def test_unknown_small_name(tiny_family_dir):
    with pytest.raises(FamilyError, match="not found"):
        load_family(tiny_family_dir, small="no-such-unet")


def test_mismatched_latent_channels(tmp_path):
    folder = build_tiny_family(tmp_path / "fam", small_latent_channels=8)
    with pytest.raises(FamilyError, match="in_channels=8 .* latent_channels=4"):
        load_family(folder)


def test_mismatched_cross_attention_width(tmp_path):
    folder = build_tiny_family(tmp_path / "fam", small_cross_attention_dim=48)
    with pytest.raises(FamilyError, match="cross-attention width differs: large UNet 32, small UNet 48"):
        load_family(folder)


def test_family_errors_are_catchable_as_rise_errors():
    assert issubclass(FamilyError, RiseError) and issubclass(FamilyError, ValueError)


def test_corrupt_config_is_a_family_error(tmp_path):
    folder = build_tiny_family(tmp_path / "fam")
    (folder / "unet_small" / "config.json").write_text("{not json")
    with pytest.raises(FamilyError, match="cannot read"):
        load_family(Path(folder))
