"""Load a model family from a local folder and check that its members share a latent space.

A family is the large model's diffusers pipeline folder (``model_index.json``, ``unet/`` =
the large denoiser); the small denoiser is named by ``small``: a subfolder of the family
folder (default ``unet_small/``), or a path to another pipeline folder (its ``unet/``) or
to a UNet folder. Nothing is fetched from a hub. Weights load in float32 whatever dtype
they were saved in, since the edge computes in float32 on a CPU.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from shared.errors import FamilyError

DEFAULT_SMALL = "unet_small"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


# For mypy, diffusers' top-level names are its torch-less placeholder classes (its __init__ imports
# dummy_pt_objects first under TYPE_CHECKING): their modules, configs and loaders are untyped.
@dataclass
class Family:
    """A loaded family: the large pipeline plus the small denoiser, in float32, eval mode."""

    folder: Path
    family_id: str
    name: str
    pipeline: StableDiffusionPipeline
    small_unet: UNet2DConditionModel
    small_source: str
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    vae_scale_factor: int = 8
    latent_channels: int = 4
    cross_attention_dim: int = 768

    @property
    def large_unet(self) -> UNet2DConditionModel:
        unet: UNet2DConditionModel = self.pipeline.unet  # type: ignore[attr-defined]  # a module set at runtime
        return unet

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.pipeline.vae.config.scaling_factor)  # type: ignore[attr-defined]  # set at runtime

    @property
    def default_latent_size(self) -> int:
        return int(self.large_unet.config.sample_size)  # type: ignore[attr-defined]  # diffusers' runtime config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FamilyError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise FamilyError(f"{path} is not a JSON object")
    return data


def is_family_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a pipeline folder (has ``model_index.json``); ``load_family`` checks the rest."""
    return (Path(folder) / "model_index.json").is_file()


def resolve_small_unet_folder(family_folder: Path, small: str | None) -> Path:
    """Where the small denoiser's UNet folder (with ``config.json``) lives."""
    name = small or DEFAULT_SMALL
    candidates = [family_folder / name, Path(name)]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
        if is_family_folder(candidate) and (candidate / "unet" / "config.json").is_file():
            return candidate / "unet"
    if small is None:
        raise FamilyError(
            f"family {family_folder} has no second denoiser: no {DEFAULT_SMALL}/ folder in it "
            "(name the small UNet with --small SUBFOLDER_OR_PATH)"
        )
    raise FamilyError(
        f"small denoiser {small!r} not found: neither {family_folder / name} nor {name} "
        "is a UNet folder (config.json) or a pipeline folder (model_index.json + unet/)"
    )


def check_compatible(large: dict[str, Any], small: dict[str, Any], vae: dict[str, Any]) -> None:
    """Raise FamilyError naming the first config value that large, small and VAE disagree on."""
    latent = vae.get("latent_channels", 4)
    for role, cfg in (("large", large), ("small", small)):
        for key in ("in_channels", "out_channels"):
            if cfg.get(key) != latent:
                raise FamilyError(
                    f"{role} UNet has {key}={cfg.get(key)} but the VAE has latent_channels={latent}: "
                    "the two denoisers must share the VAE's latent space"
                )
    if large.get("cross_attention_dim") != small.get("cross_attention_dim"):
        raise FamilyError(
            f"cross-attention width differs: large UNet {large.get('cross_attention_dim')}, "
            f"small UNet {small.get('cross_attention_dim')}; both must read the same text encoder"
        )
    for key in ("addition_embed_type", "projection_class_embeddings_input_dim"):
        if large.get(key) != small.get(key):
            raise FamilyError(f"{key} differs: large UNet {large.get(key)!r}, small UNet {small.get(key)!r}")


def _family_id(folder: Path, name: str) -> str:
    """Content id of the latent + text space: the VAE's and text encoder's weights and configs."""
    digest = hashlib.sha256()
    for part in ("vae", "text_encoder"):
        for path in sorted((folder / part).iterdir()):
            if path.name == "config.json" or path.suffix in _WEIGHT_SUFFIXES:
                digest.update(path.name.encode())
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
    return f"{name}-{digest.hexdigest()[:12]}"


def load_family(folder: str | Path, small: str | None = None) -> Family:
    """Load a family folder (large pipeline + small denoiser) in float32; FamilyError if unusable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FamilyError(f"family folder {folder} does not exist")
    index = folder / "model_index.json"
    if not index.is_file():
        raise FamilyError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise FamilyError(f"family {folder} has no {part}/ folder")
    small_folder = resolve_small_unet_folder(folder, small)
    large_cfg = _read_json(folder / "unet" / "config.json")
    small_cfg = _read_json(small_folder / "config.json")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    check_compatible(large_cfg, small_cfg, vae_cfg)
    diffusers_logging.disable_progress_bar()  # a daemon's log is no place for loading bars
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
            local_files_only=True,
        )
        small_unet = UNet2DConditionModel.from_pretrained(
            small_folder, torch_dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise FamilyError(f"cannot load family {folder}: {exc}") from exc
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder, small_unet):
        module.eval().requires_grad_(False)
    name = folder.resolve().name
    return Family(
        folder=folder,
        family_id=_family_id(folder, name),
        name=name,
        pipeline=pipeline,
        small_unet=small_unet,
        small_source=small or DEFAULT_SMALL,
        scheduler_config=dict(pipeline.scheduler.config),
        vae_scale_factor=2 ** (len(pipeline.vae.config.block_out_channels) - 1),
        latent_channels=int(pipeline.vae.config.latent_channels),
        cross_attention_dim=int(pipeline.unet.config.cross_attention_dim),
    )


@torch.no_grad()
def encode_prompts(family: Family, prompts: list[str]) -> torch.Tensor:
    """Text encoder output (B, L, D) for prompts padded to the tokenizer's max length, as SD does."""
    pipeline: Any = family.pipeline  # diffusers sets a pipeline's modules at runtime: untyped for mypy
    tokenizer = pipeline.tokenizer
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    hidden: torch.Tensor = pipeline.text_encoder(ids)[0]
    return hidden


def uncond_embedding(family: Family) -> torch.Tensor:
    """The unconditional embedding (1, L, D): the text encoder's output for the empty prompt."""
    return encode_prompts(family, [""])
