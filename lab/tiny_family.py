"""Build a tiny SD1.x-shaped model family on disk, for tests, benchmarks and the demo.

A family is the large model's ``StableDiffusionPipeline`` folder with the small denoiser in
``unet_small/`` (see the design brief). Weights are random (seeded), as in diffusers' own
tests: the shapes, configs and code paths are those of SD1.x, only the sizes are tiny.
The tokenizer is a byte-level CLIP BPE with no merges, written here because no tokenizer
files can be fetched: every character is a token, which CLIP's BPE handles natively.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# For mypy, diffusers' top-level classes are its torch-less placeholders (its __init__ imports dummy_pt_objects
# first under TYPE_CHECKING): untyped constructors and no methods; "diffusers placeholder" below marks those uses.
SD_SCHEDULER_CONFIG = {
    # Stable Diffusion 1.x's scheduler config (the keys every sampler port honours).
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class UNetSize:
    """The knobs that set a tiny UNet's cost."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: int = 8


# Test sizes: fast to build, export and run (large:small per-step cost ~2x on a CPU).
LARGE = UNetSize(block_out_channels=(64, 128), layers_per_block=2)
SMALL = UNetSize(block_out_channels=(32, 64), layers_per_block=1)
# Benchmark sizes: large:small per-step cost ~5x at batch 2 (bench/bench_relay.py measures it).
BENCH_LARGE = UNetSize(block_out_channels=(96, 192), layers_per_block=2)
BENCH_SMALL = UNetSize(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, as CLIP's BPE uses it (transformers 5 no longer exports it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _write_byte_level_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab_tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    options: dict[str, Any] = {"model_max_length": 32, "pad_token": "<|endoftext|>"}
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4
        return CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), **options)
    # transformers 5 builds the tokenizer from the vocabulary itself (it would ignore vocab_file)
    cls: Any = CLIPTokenizer
    tokenizer: CLIPTokenizer = cls(vocab=vocab, merges=[], **options)
    return tokenizer


def _unet(size: UNetSize, sample_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    levels = len(size.block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=size.block_out_channels,
        layers_per_block=size.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=size.attention_head_dim,
        norm_num_groups=min(32, size.block_out_channels[0]),
    )


def build_tiny_family(
    folder: str | Path,
    *,
    seed: int = 0,
    large: UNetSize = LARGE,
    small: UNetSize = SMALL,
    image_size: int = 32,
    small_cross_attention_dim: int | None = None,
    small_latent_channels: int | None = None,
) -> Path:
    """Write a tiny family to ``folder`` and return its path.

    ``small_cross_attention_dim`` / ``small_latent_channels`` deliberately build a broken
    family (for the tests of the compatibility checks).
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000,
        max_position_embeddings=32,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=image_size,
    ).eval()  # type: ignore[attr-defined]  # diffusers placeholder
    latent_size = image_size // 2  # two VAE levels: one 2x downsampling
    unet = _unet(large, latent_size, text_config.hidden_size).eval()  # type: ignore[attr-defined]  # diffusers placeholder
    tokenizer = _write_byte_level_clip_tokenizer(folder / "tokenizer")
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]  # diffusers placeholder
    # Any: the diffusers placeholder has no config, eval or save_pretrained for mypy.
    small_unet: Any = _unet(small, latent_size, small_cross_attention_dim or text_config.hidden_size)
    if small_latent_channels is not None:
        small_unet = UNet2DConditionModel.from_config(
            {**small_unet.config, "in_channels": small_latent_channels, "out_channels": small_latent_channels}
        )
    small_unet.eval().save_pretrained(folder / "unet_small", safe_serialization=True)
    return folder
