"""Random-weight families with the published architectures of real checkpoints, channels shrunk.

Each builder writes what an operator would have on disk after downloading the checkpoints: the
large model's pipeline folder as the hub ships it (its pipeline class, its ``scheduler_config.json``
verbatim, keys of other schedulers and omissions included) and the small denoiser beside it, with
the same block types, mid block or none, transformer depth per block, attention heads, linear
projections, addition embeddings and guidance embedding as the published UNet configs. Only the
widths are shrunk (and the text encoders to two layers), so every family builds in seconds on a CPU
and runs the code paths of the real one. Weights are random (seeded), as in diffusers' own tests.

Used by the family tests (``tests/edge_server/test_real_families.py``) and by
``bench/family_table.py``, which prints the exactness / export table of the issue.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    LatentConsistencyModelPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from edge_server.family import Family
from lab.tiny_family import _write_byte_level_clip_tokenizer

# ----------------------------------------------------------------------------- hub scheduler configs

# As published (scheduler/scheduler_config.json of each checkpoint), keys of other schedulers included.
SD1_SCHEDULER = {  # runwayml/stable-diffusion-v1-5, CompVis/stable-diffusion-v1-4, nota-ai/bk-sdm-small/-tiny
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD21_V_SCHEDULER = {  # stabilityai/stable-diffusion-2-1 (768, v-prediction), nota-ai/bk-sdm-v2-small
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SD21_BASE_SCHEDULER = {  # stabilityai/stable-diffusion-2-1-base (512, epsilon)
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SDXL_SCHEDULER = {  # stabilityai/stable-diffusion-xl-base-1.0, segmind/SSD-1B, segmind/Segmind-Vega
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
LCM_SCHEDULER = {  # SimianLuo/LCM_Dreamshaper_v7
    "_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "original_inference_steps": 50,
    "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False, "timestep_scaling": 10.0,
    "timestep_spacing": "leading", "trained_betas": None,
}
HUB_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": SD1_SCHEDULER, "sd2.1-v": SD21_V_SCHEDULER, "sd2.1-base": SD21_BASE_SCHEDULER, "sdxl": SDXL_SCHEDULER,
    "lcm": LCM_SCHEDULER,
}
_SCHEDULER_CLASSES: dict[str, Any] = {
    "PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "LCMScheduler": LCMScheduler,
}

# ----------------------------------------------------------------------------- UNet architectures

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def _sd15_unet(width: int, text_dim: int, sample: int, **extra: Any) -> dict[str, Any]:
    """runwayml/stable-diffusion-v1-5's UNet: 4 levels, 2 layers each, a cross-attention mid block, 8 heads."""
    return dict(block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2,
                down_block_types=_SD_DOWN, up_block_types=_SD_UP, attention_head_dim=8,
                cross_attention_dim=text_dim, sample_size=sample, norm_num_groups=4, **extra)


def _bk_sdm_tiny_unet(width: int, text_dim: int, sample: int, **extra: Any) -> dict[str, Any]:
    """nota-ai/bk-sdm-tiny: SD1.5 without its mid block and innermost level, one layer per block."""
    return dict(block_out_channels=(width, 2 * width, 4 * width), layers_per_block=1,
                down_block_types=_SD_DOWN[:3], up_block_types=_SD_UP[1:], mid_block_type=None,
                attention_head_dim=8, cross_attention_dim=text_dim, sample_size=sample, norm_num_groups=4, **extra)


def _tiny_sd_unet(width: int, text_dim: int, sample: int) -> dict[str, Any]:
    """segmind/tiny-sd: SD1.5's four levels without the mid block, one layer per block."""
    return dict(block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=1,
                down_block_types=_SD_DOWN, up_block_types=_SD_UP, mid_block_type=None,
                attention_head_dim=8, cross_attention_dim=text_dim, sample_size=sample, norm_num_groups=4)


def _sd21_unet(width: int, text_dim: int, sample: int) -> dict[str, Any]:
    """stabilityai/stable-diffusion-2-1: SD's blocks, heads [5, 10, 20, 20], linear projections, upcast attention."""
    return dict(block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2,
                down_block_types=_SD_DOWN, up_block_types=_SD_UP, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=True, cross_attention_dim=text_dim,
                sample_size=sample, norm_num_groups=4)


def _bk_sdm_v2_small_unet(width: int, text_dim: int, sample: int) -> dict[str, Any]:
    """nota-ai/bk-sdm-v2-small: SD2.1's UNet without the mid block, one layer per block."""
    return {**_sd21_unet(width, text_dim, sample), "layers_per_block": 1, "mid_block_type": None}


_SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


def _sdxl_unet(width: int, text_dim: int, sample: int, pooled_dim: int, time_dim: int,
               depth: tuple[int, ...] = (1, 2, 10)) -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-base-1.0: 3 levels, transformer depth [1, 2, 10], heads [5, 10, 20],
    text_time addition embedding (pooled text + 6 size/crop ids)."""
    return dict(block_out_channels=(width, 2 * width, 4 * width), layers_per_block=2,
                down_block_types=_SDXL_DOWN, up_block_types=_SDXL_UP, attention_head_dim=(5, 10, 20),
                transformer_layers_per_block=depth, use_linear_projection=True, cross_attention_dim=text_dim,
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim, sample_size=sample,
                norm_num_groups=4)


def _ssd_1b_unet(width: int, text_dim: int, sample: int, pooled_dim: int, time_dim: int) -> dict[str, Any]:
    """segmind/SSD-1B-shaped: SDXL's blocks and embeddings with the transformer depth cut (here [1, 2, 4])."""
    return _sdxl_unet(width, text_dim, sample, pooled_dim, time_dim, depth=(1, 2, 4))


# ----------------------------------------------------------------------------- building blocks

TEXT_WIDTH = 32  # CLIP-L's 768, shrunk
TEXT_WIDTH_2 = 64  # OpenCLIP-bigG's 1280 (SDXL's second encoder), shrunk
LATENT = 8  # latent side (64x64 pixel images with the 8x VAE)


def _text_encoder(width: int, *, projection: int | None = None, act: str = "quick_gelu") -> Any:
    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=width, intermediate_size=2 * width, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, max_position_embeddings=32,
        hidden_act=act, projection_dim=projection or width,
    )
    model = CLIPTextModelWithProjection(config) if projection is not None else CLIPTextModel(config)
    return model.eval()


def _vae(**extra: Any) -> Any:
    """SD's VAE: four levels (an 8x latent), channels shrunk."""
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=LATENT * 8, **extra,
    ).eval()  # type: ignore[attr-defined]  # diffusers placeholder


def _scheduler(config: dict[str, Any]) -> Any:
    return _SCHEDULER_CLASSES[config["_class_name"]].from_config(config)


def _write_scheduler_as_published(folder: Path, config: dict[str, Any]) -> None:
    """Overwrite ``scheduler_config.json`` with the hub's own file (diffusers writes every key it has)."""
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))


def _new_unet(**config: Any) -> Any:
    # Any: mypy sees diffusers' torch-less placeholder class (no eval, no save_pretrained).
    return UNet2DConditionModel(**config).eval()  # type: ignore[attr-defined]  # diffusers placeholder


def _save_unet(config: dict[str, Any], folder: Path, *, variant: str | None = None) -> None:
    unet = _new_unet(**config)
    if variant == "fp16":
        unet = unet.to(torch.float16)
    unet.save_pretrained(folder, safe_serialization=True, variant=variant)


def _save_sd_style(folder: Path, pipeline_cls: Any, scheduler_config: dict[str, Any], *, vae: Any, text_encoder: Any,
                   unet: Any) -> None:
    """An SD-shaped pipeline (one text encoder, no safety checker) saved to ``folder``, its scheduler as published.

    The modules come built by the caller, in the order that fixes their seeded random weights.
    """
    pipe: Any = pipeline_cls(
        vae=vae, text_encoder=text_encoder, tokenizer=_write_byte_level_clip_tokenizer(folder / "tokenizer"),
        unet=unet, scheduler=_scheduler(scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_scheduler_as_published(folder, scheduler_config)


@dataclass(frozen=True)
class HubFamily:
    """A built family: its folder, the ``small`` argument that names its small denoiser, what it is."""

    name: str
    folder: Path
    small: str | None  # None: unet_small/ inside the folder
    pipeline_class: str
    samplers: tuple[str, ...]


def build_sd15_bk_sdm_tiny(folder: Path, seed: int = 0) -> HubFamily:
    """SD1.5 (PNDM hub config) with a BK-SDM-tiny-shaped small UNet in ``unet_small/``."""
    torch.manual_seed(seed)
    text = _text_encoder(TEXT_WIDTH)
    _save_sd_style(folder, StableDiffusionPipeline, SD1_SCHEDULER, vae=_vae(), text_encoder=text,
                   unet=_new_unet(**_sd15_unet(16, TEXT_WIDTH, LATENT)))
    _save_unet(_bk_sdm_tiny_unet(8, TEXT_WIDTH, LATENT), folder / "unet_small")
    return HubFamily("sd15+bk-sdm-tiny", folder, None, "StableDiffusionPipeline", ("ddim", "euler", "dpmpp_2m"))


def build_sd15_tiny_sd(folder: Path, seed: int = 0) -> HubFamily:
    """SD1.5 with tiny-sd as its own pipeline folder (``<folder>-tiny-sd``) holding only fp16-variant weights."""
    sd = build_sd15_bk_sdm_tiny(folder, seed)
    small_folder = folder.parent / f"{folder.name}-tiny-sd"
    torch.manual_seed(seed + 1)
    pipe: Any = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                        requires_safety_checker=False)
    pipe.unet = _new_unet(**_tiny_sd_unet(8, TEXT_WIDTH, LATENT))
    pipe.to(torch.float16).save_pretrained(small_folder, safe_serialization=True, variant="fp16")
    _write_scheduler_as_published(small_folder, SD1_SCHEDULER)
    return HubFamily("sd15+tiny-sd", sd.folder, str(small_folder), "StableDiffusionPipeline", sd.samplers)


def build_sd21_v_bk_sdm_v2_small(folder: Path, seed: int = 0) -> HubFamily:
    """SD2.1-v (v-prediction, DDIM hub config, OpenCLIP-style gelu text encoder) with BK-SDM-v2-small."""
    torch.manual_seed(seed)
    _save_sd_style(folder, StableDiffusionPipeline, SD21_V_SCHEDULER, vae=_vae(),
                   text_encoder=_text_encoder(TEXT_WIDTH, act="gelu"),
                   unet=_new_unet(**_sd21_unet(20, TEXT_WIDTH, LATENT)))
    _save_unet(_bk_sdm_v2_small_unet(20, TEXT_WIDTH, LATENT), folder / "unet_small")
    return HubFamily("sd21-v+bk-sdm-v2-small", folder, None, "StableDiffusionPipeline", ("ddim", "euler", "dpmpp_2m"))


def build_sdxl_ssd_1b(folder: Path, seed: int = 0) -> HubFamily:
    """SDXL base (Euler hub config, two text encoders, force_zeros_for_empty_prompt, VAE force_upcast)
    with an SSD-1B-shaped small UNet in ``unet_small/``."""
    torch.manual_seed(seed)
    text_dim = TEXT_WIDTH + TEXT_WIDTH_2
    time_dim = 8  # SDXL's addition_time_embed_dim 256, shrunk
    tokenizer = _write_byte_level_clip_tokenizer(folder / "tokenizer")
    tokenizer_2 = _write_byte_level_clip_tokenizer(folder / "tokenizer_2")
    pipe: Any = StableDiffusionXLPipeline(
        vae=_vae(force_upcast=True, scaling_factor=0.13025), text_encoder=_text_encoder(TEXT_WIDTH),
        text_encoder_2=_text_encoder(TEXT_WIDTH_2, projection=TEXT_WIDTH_2, act="gelu"),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=_new_unet(**_sdxl_unet(20, text_dim, LATENT, TEXT_WIDTH_2, time_dim)),
        scheduler=_scheduler(SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_scheduler_as_published(folder, SDXL_SCHEDULER)
    _save_unet(_ssd_1b_unet(20, text_dim, LATENT, TEXT_WIDTH_2, time_dim), folder / "unet_small")
    return HubFamily("sdxl+ssd-1b", folder, None, "StableDiffusionXLPipeline", ("ddim", "euler", "dpmpp_2m"))


def build_lcm_dreamshaper(folder: Path, seed: int = 0) -> HubFamily:
    """LCM-Dreamshaper-v7 (LatentConsistencyModelPipeline, LCMScheduler hub config, SD1.5 UNet with a
    256-wide guidance embedding) with a BK-SDM-tiny-shaped LCM-distilled small UNet."""
    torch.manual_seed(seed)
    _save_sd_style(folder, LatentConsistencyModelPipeline, LCM_SCHEDULER, vae=_vae(),
                   text_encoder=_text_encoder(TEXT_WIDTH),
                   unet=_new_unet(**_sd15_unet(16, TEXT_WIDTH, LATENT, time_cond_proj_dim=256)))
    _save_unet(_bk_sdm_tiny_unet(8, TEXT_WIDTH, LATENT, time_cond_proj_dim=256), folder / "unet_small")
    return HubFamily("lcm-dreamshaper", folder, None, "LatentConsistencyModelPipeline", ("lcm",))


#: Every supported family, by name.
BUILDERS: dict[str, Callable[[Path, int], HubFamily]] = {
    "sd15+bk-sdm-tiny": build_sd15_bk_sdm_tiny,
    "sd15+tiny-sd": build_sd15_tiny_sd,
    "sd21-v+bk-sdm-v2-small": build_sd21_v_bk_sdm_v2_small,
    "sdxl+ssd-1b": build_sdxl_ssd_1b,
    "lcm-dreamshaper": build_lcm_dreamshaper,
}

# ----------------------------------------------------------------------------- what we refuse


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def build_sd3_style_folder(folder: Path) -> Path:
    """An SD3-shaped folder (configs only): ``StableDiffusion3Pipeline``, a ``transformer/``, flow matching."""
    folder.mkdir(parents=True)
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.29.0.dev0",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    for part in ("transformer", "vae", "scheduler", "unet_small"):
        (folder / part).mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    return folder


def build_flux_style_folder(folder: Path) -> Path:
    """A Flux-shaped folder (configs only): ``FluxPipeline`` with a ``transformer/``."""
    build_sd3_style_folder(folder)
    _edit_json(folder / "model_index.json", _class_name="FluxPipeline",
               transformer=["diffusers", "FluxTransformer2DModel"])
    return folder


def with_scheduler_class(family: Path, class_name: str) -> Path:
    """Rewrite a built family's scheduler config to another class (e.g. one we have no port for)."""
    _edit_json(family / "scheduler" / "scheduler_config.json", _class_name=class_name)
    return family


def with_unet_config(family: Path, role: str, **changes: Any) -> Path:
    """Rewrite the large (``unet``) or small (``unet_small``) UNet's config (e.g. an input we do not feed)."""
    _edit_json(family / ("unet" if role == "large" else "unet_small") / "config.json", **changes)
    return family


# ----------------------------------------------------------------------------- the reference


#: The diffusers scheduler class behind each sampler's wire name (DPM-Solver's defaults are ++ 2M).
DIFFUSERS_SAMPLERS: dict[str, Any] = {
    "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}


def pipeline_latent(family: Family, prompt: str, sampler: str, steps: int, split: int, guidance: float,
                    seed: int) -> torch.Tensor:
    """The final latent of the family's own pipeline, its UNet swapped for the small one after step ``split``.

    ``split = steps``: the large model alone; ``0``: the small model alone; between: the relay, with
    the swap done by diffusers' own ``callback_on_step_end``, independently of our relay code.
    """
    pipe: Any = family.pipeline
    large, scheduler = pipe.unet, pipe.scheduler
    pipe.scheduler = DIFFUSERS_SAMPLERS[sampler].from_config(family.scheduler_config)
    pipe.unet = family.small_unet if split == 0 else large
    pipe.set_progress_bar_config(disable=True)

    def swap(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i + 1 == split:
            p.unet = family.small_unet
        return kwargs

    try:
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=swap)
    finally:
        pipe.unet, pipe.scheduler = large, scheduler
    latents: torch.Tensor = out.images
    return latents
