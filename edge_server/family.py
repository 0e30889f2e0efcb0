"""Load a model family from a local folder, check its members share a latent space, refuse what we cannot run.

A family is the large model's diffusers pipeline folder (``model_index.json``, ``unet/`` =
the large denoiser); the small denoiser is named by ``small``: a subfolder of the family
folder (default ``unet_small/``), or a path to another pipeline folder (its ``unet/``) or
to a UNet folder. Nothing is fetched from a hub. Weights load in the placement's dtype
(``edge_server.placement``: float32 on a CPU by default) whatever dtype they were saved in, on
its device; a VAE whose config says ``force_upcast`` stays float32. A folder that holds only
``*.<variant>.safetensors`` (the hub's ``fp16`` branch) is found and loaded as that variant.

Kinds we run (:data:`PIPELINE_KINDS`): SD1.x/SD2.x (``StableDiffusionPipeline``), SDXL
(``StableDiffusionXLPipeline``: two text encoders, pooled embeddings and size conditioning)
and LCM (``LatentConsistencyModelPipeline``, or any family whose scheduler is
``LCMScheduler``: only the ``lcm`` sampler; a distilled UNet with ``time_cond_proj_dim`` takes
the guidance scale as an embedding instead of classifier-free guidance). Anything else (another
pipeline class, a DiT/flow-matching folder such as SD3 or Flux, a scheduler or prediction type
without a numpy port, a UNet input we do not feed) is refused here, in one line, before any
step runs: a family is never loaded as another kind.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    LatentConsistencyModelPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging

from edge_server.placement import CPU_FP32, Placement
from shared.demo_grammar.understanding import GRAMMAR_NAME as DEMO_GRAMMAR
from shared.demo_grammar.understanding import PromptReading, read_prompt_as
from shared.errors import ConfigError, FamilyError
from shared.samplers import SAMPLER_NAMES, make_sampler

DEFAULT_SMALL = "unet_small"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")

#: Pipeline class (``model_index.json``'s ``_class_name``) -> the kind of family we run it as.
PIPELINE_KINDS: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}
_PIPELINE_CLASSES: dict[str, Any] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "LatentConsistencyModelPipeline": LatentConsistencyModelPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
#: Scheduler classes whose config is a DDPM-style beta schedule the numpy ports read (the sampler
#: a request names decides the stepping; LCMScheduler families run only ``lcm``).
SCHEDULER_CLASSES = frozenset({
    "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "LCMScheduler",
})
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LCM_SAMPLER = "lcm"
#: The family's own metadata file (``lab.demo_family.train`` writes it); its ``prompt_grammar`` names the grammar
#: the family was trained on (``"demo"``), see :func:`detect_prompt_grammar`.
FAMILY_INFO = "training.json"


def default_sampler_of(samplers: tuple[str, ...]) -> str:
    """The sampler a family of these samplers runs when a request names none: lcm for LCM families, else
    DPM-Solver++ 2M."""
    return LCM_SAMPLER if LCM_SAMPLER in samplers else "dpmpp_2m"


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
    kind: str = "sd"  # a PIPELINE_KINDS value
    pipeline_class: str = "StableDiffusionPipeline"
    samplers: tuple[str, ...] = ("ddim", "euler", "dpmpp_2m")  # the wire names this family runs
    guidance: str = "cfg"  # "embedding" for LCM-distilled UNets (time_cond_proj_dim): no unconditional pass
    time_cond_proj_dim: int | None = None
    variant: str | None = None
    placement: Placement = CPU_FP32
    prompt_grammar: str | None = None  # the grammar its prompts follow ("demo"), None: free text
    text_max_length: int = 77  # the tokenizer's max length: what the text encoder reads, start and end included
    _uncond: Conditioning | None = field(default=None, repr=False)

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

    @property
    def default_sampler(self) -> str:
        """The sampler a request gets when none is asked for: lcm for LCM families, else DPM-Solver++ 2M."""
        return default_sampler_of(self.samplers)

    def read_prompt(self, text: str, seed: int) -> PromptReading | None:
        """How this family reads ``text`` for ``seed`` (its grammar's tolerant reader); None for free-text families.

        The reading's ``prompt`` is what to encode, its ``message`` the one line for the user, and a reading
        with no ``scene`` understood nothing: refuse it (``message`` says why) rather than draw a blank.
        """
        return read_prompt_as(self.prompt_grammar, text, seed, max_words=self.text_max_length - 2)

    def check_sampler(self, sampler: str) -> None:
        """ConfigError unless this family runs ``sampler`` (an LCM family runs only lcm, others all but lcm)."""
        if sampler not in self.samplers:
            raise ConfigError(
                f"family {self.name} ({self.pipeline_class}, scheduler "
                f"{self.scheduler_config.get('_class_name', '?')}) does not run sampler {sampler!r}; "
                f"it runs {', '.join(self.samplers)}"
            )


@dataclass(frozen=True, eq=False)
class Conditioning:
    """What the denoiser reads besides the latent, for a batch of prompts.

    ``embeds`` (B, L, D) are the text encoder hidden states; ``added`` the UNet's
    ``added_cond_kwargs`` (SDXL: ``text_embeds``, the pooled embedding (B, P); ``time_ids``
    (B, 6) are per image size and added by the relay, see :func:`time_ids`).
    """

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def row(self, i: int) -> Conditioning:
        """Prompt ``i``'s conditioning (batch 1), from a batch encoded in one call."""
        return Conditioning(self.embeds[i : i + 1], {name: t[i : i + 1] for name, t in self.added.items()})


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
    for key in ("addition_embed_type", "projection_class_embeddings_input_dim", "time_cond_proj_dim"):
        if large.get(key) != small.get(key):
            raise FamilyError(f"{key} differs: large UNet {large.get(key)!r}, small UNet {small.get(key)!r}")


def check_unet_inputs(cfg: dict[str, Any], role: str, kind: str) -> None:
    """FamilyError for a UNet that needs an input the relay does not feed, or the wrong kind's inputs."""
    unet_class = cfg.get("_class_name", "UNet2DConditionModel")
    if unet_class != "UNet2DConditionModel":
        raise FamilyError(f"{role} denoiser is a {unet_class}: only UNet2DConditionModel denoisers are supported")
    unfed = [(key, cfg[key]) for key in ("class_embed_type", "encoder_hid_dim_type") if cfg.get(key) is not None]
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        unfed.append(("addition_embed_type", cfg["addition_embed_type"]))
    if unfed:
        key, value = unfed[0]
        raise FamilyError(f"{role} UNet has {key}={value!r}: it needs inputs the relay does not feed (unsupported)")
    wants_sdxl = cfg.get("addition_embed_type") == "text_time"
    if wants_sdxl != (kind == "sdxl"):
        needs = "an SDXL pipeline (text_embeds, time_ids)" if wants_sdxl else "addition_embed_type='text_time'"
        raise FamilyError(f"{role} UNet has addition_embed_type={cfg.get('addition_embed_type')!r}: "
                          f"a {kind} family needs {needs}")


def _pipeline_kind(folder: Path, index: dict[str, Any]) -> str:
    cls = index.get("_class_name")
    if cls in PIPELINE_KINDS:
        return PIPELINE_KINDS[cls]
    what = "a DiT/flow-matching family (transformer/)" if (folder / "transformer").is_dir() else "a pipeline"
    raise FamilyError(
        f"{folder} is {what} of class {cls!r}: unsupported (supported: {', '.join(PIPELINE_KINDS)})"
    )


def _family_samplers(folder: Path, scheduler_cfg: dict[str, Any], large_cfg: dict[str, Any]) -> tuple[str, ...]:
    """The samplers this family runs, after refusing a scheduler or prediction type we have no port for."""
    cls = scheduler_cfg.get("_class_name")
    if cls not in SCHEDULER_CLASSES:
        raise FamilyError(
            f"{folder}: scheduler class {cls!r} is unsupported (the device's numpy samplers read "
            f"DDPM-style schedules: {', '.join(sorted(SCHEDULER_CLASSES))})"
        )
    prediction = scheduler_cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise FamilyError(f"{folder}: prediction_type {prediction!r} is unsupported (supported: "
                          f"{', '.join(PREDICTION_TYPES)})")
    lcm = cls == "LCMScheduler" or large_cfg.get("time_cond_proj_dim") is not None
    candidates = (LCM_SAMPLER,) if lcm else tuple(n for n in SAMPLER_NAMES if n != LCM_SAMPLER)
    runnable, reasons = [], []
    for name in candidates:
        try:
            make_sampler(name, scheduler_cfg)
        except ConfigError as exc:
            reasons.append(str(exc))
        else:
            runnable.append(name)
    if not runnable:
        raise FamilyError(f"{folder}: no sampler can run this scheduler config ({'; '.join(reasons)})")
    return tuple(runnable)


def detect_variant(folders: list[Path], variant: str | None) -> str | None:
    """``variant`` if given, else the one variant (``fp16``...) that every weight file of ``folders`` has, if any.

    A folder whose weights are all ``name.<variant>.safetensors`` (no plain ``name.safetensors``)
    is a variant-only download, which diffusers loads only when told the variant.
    """
    if variant is not None:
        return variant
    found: set[str | None] = set()
    for folder in folders:
        for path in folder.glob("*"):
            if path.suffix in _WEIGHT_SUFFIXES and path.is_file():
                parts = path.name.split(".")
                found.add(parts[-2] if len(parts) >= 3 else None)
    plain = None in found
    variants = sorted(v for v in found if v is not None)
    if plain or not variants:
        return None
    if len(variants) > 1:
        raise FamilyError(f"{folders[0].parent} has weights of variants {variants}: pass --variant")
    return variants[0]


def detect_prompt_grammar(folder: str | Path) -> str | None:
    """The prompt grammar a family folder declares, or None (free text, the usual case).

    ``training.json``'s ``"prompt_grammar"`` key; a ``training.json`` without the key that
    ``lab.demo_family.train`` wrote (its ``command`` names the trainer) is the demo family's (``"demo"``).
    """
    path = Path(folder) / FAMILY_INFO
    if not path.is_file():
        return None
    info = _read_json(path)
    grammar = info.get("prompt_grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar:
            raise FamilyError(f"{path}: prompt_grammar must be a name such as 'demo', got {grammar!r}")
        return grammar
    return DEMO_GRAMMAR if "demo_family.train" in str(info.get("command", "")) else None


def _family_id(folder: Path, name: str, parts: tuple[str, ...]) -> str:
    """Content id of the latent + text space: the VAE's and text encoders' weights and configs."""
    digest = hashlib.sha256()
    for part in parts:
        for path in sorted((folder / part).iterdir()):
            if path.name == "config.json" or path.suffix in _WEIGHT_SUFFIXES:
                digest.update(path.name.encode())
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
    return f"{name}-{digest.hexdigest()[:12]}"


@dataclass(frozen=True)
class FamilyInfo:
    """What a family folder is, read from its configs and weight headers without loading a weight.

    The multi-family edge (``edge_server.family_pool``) knows from it, before a family is loaded, the id a
    device's hello names, the sampler and prompt grammar its scheduler and reader need, the image size a
    request gets by default and the memory its weights will take (:meth:`weight_bytes`).
    """

    folder: Path
    small_folder: Path
    family_id: str
    name: str
    kind: str
    pipeline_class: str
    samplers: tuple[str, ...]
    prompt_grammar: str | None
    text_max_length: int
    default_size: int  # image side in pixels (the large UNet's sample size times the VAE's factor)
    family_variant: str | None
    small_variant: str | None
    parameter_count: int  # of every module the edge loads (VAE, text encoder(s), both UNets)

    @property
    def default_sampler(self) -> str:
        return default_sampler_of(self.samplers)

    def weight_bytes(self, placement: Placement = CPU_FP32) -> int:
        """The bytes the loaded weights take in ``placement``'s dtype (a force-upcast VAE counted as it loads)."""
        return self.parameter_count * torch.tensor([], dtype=placement.dtype).element_size()


def _parameter_count(folders: list[Path], variant_of: dict[Path, str | None]) -> int:
    """Parameters in the weight files of ``folders`` (safetensors headers: nothing is loaded); .bin files
    (pickles, never opened here) are estimated from their size as float32."""
    from safetensors import safe_open

    total = 0
    for folder in folders:
        variant = variant_of.get(folder)
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        chosen = [f for f in files if (len(f.name.split(".")) >= 3) == (variant is not None)
                  and (variant is None or f.name.split(".")[-2] == variant)] or files
        for path in chosen:
            if path.suffix == ".bin":
                total += path.stat().st_size // 4
                continue
            try:
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():
                        count = 1
                        for dim in fh.get_slice(key).get_shape():
                            count *= int(dim)
                        total += count
            except (OSError, ValueError) as exc:
                raise FamilyError(f"cannot read the weights header of {path}: {exc}") from exc
    return total


def describe_family(folder: str | Path, small: str | None = None, *, variant: str | None = None) -> FamilyInfo:
    """The checks :func:`load_family` makes and what it would load, without loading it (FamilyError if unusable)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FamilyError(f"family folder {folder} does not exist")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FamilyError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(index_path)
    kind = _pipeline_kind(folder, index)
    for part in _COMPONENTS[kind]:
        if not (folder / part).is_dir():
            raise FamilyError(f"family {folder} has no {part}/ folder")
    if kind == "sdxl" and index.get("requires_aesthetics_score"):
        raise FamilyError(f"{folder}: requires_aesthetics_score (an SDXL refiner) is unsupported")
    small_folder = resolve_small_unet_folder(folder, small)
    large_cfg = _read_json(folder / "unet" / "config.json")
    small_cfg = _read_json(small_folder / "config.json")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    scheduler_cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
    for role, cfg in (("large", large_cfg), ("small", small_cfg)):
        check_unet_inputs(cfg, role, kind)
    check_compatible(large_cfg, small_cfg, vae_cfg)
    samplers = _family_samplers(folder, scheduler_cfg, large_cfg)
    weight_folders = [folder / p for p in _COMPONENTS[kind] if p not in ("tokenizer", "tokenizer_2", "scheduler")]
    family_variant = detect_variant(weight_folders, variant)
    small_variant = detect_variant([small_folder], variant)
    tokenizer_cfg = folder / "tokenizer" / "tokenizer_config.json"
    max_length = _read_json(tokenizer_cfg).get("model_max_length", 77) if tokenizer_cfg.is_file() else 77
    name = folder.resolve().name
    text_parts = ("vae", "text_encoder", "text_encoder_2") if kind == "sdxl" else ("vae", "text_encoder")
    variants: dict[Path, str | None] = {f: family_variant for f in weight_folders}
    variants[small_folder] = small_variant
    return FamilyInfo(
        folder=folder, small_folder=small_folder, family_id=_family_id(folder, name, text_parts), name=name,
        kind=kind, pipeline_class=str(index["_class_name"]), samplers=samplers,
        prompt_grammar=detect_prompt_grammar(folder),
        text_max_length=int(max_length) if isinstance(max_length, int) and 2 < max_length < 100_000 else 77,
        default_size=int(large_cfg.get("sample_size", 64)) * 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1),
        family_variant=family_variant, small_variant=small_variant,
        parameter_count=_parameter_count([*weight_folders, small_folder], variants),
    )


def load_family(folder: str | Path, small: str | None = None, *, variant: str | None = None,
                placement: Placement = CPU_FP32, info: FamilyInfo | None = None) -> Family:
    """Load a family folder (large pipeline + small denoiser) where ``placement`` says; FamilyError if unusable.

    ``variant`` (e.g. ``"fp16"``) picks ``*.<variant>.safetensors`` weights; by default a
    variant-only folder is detected (the family's and, separately, the small denoiser's).
    Everything :func:`describe_family` checks is checked first, before a weight loads; ``info`` is that
    description when the caller has it already (a family pool: it describes each family once, at start, and
    its id must not change across reloads), so the folder is not read and hashed again.
    """
    if info is None:
        info = describe_family(folder, small, variant=variant)
    folder = info.folder
    diffusers_logging.disable_progress_bar()  # a daemon's log is no place for loading bars
    pipeline_cls = _PIPELINE_CLASSES[info.pipeline_class]
    extra: dict[str, Any] = {}
    if info.kind == "sd":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipeline = pipeline_cls.from_pretrained(
            folder, torch_dtype=placement.dtype, local_files_only=True, variant=info.family_variant, **extra,
        )
        small_unet = UNet2DConditionModel.from_pretrained(
            info.small_folder, torch_dtype=placement.dtype, local_files_only=True, variant=info.small_variant,
        )
        if placement.dtype != torch.float32 and getattr(pipeline.vae.config, "force_upcast", False):
            pipeline.vae.to(torch.float32)  # SDXL's VAE overflows in fp16: diffusers upcasts it too
        pipeline.to(placement.device)
        small_unet.to(placement.device)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FamilyError(f"cannot load family {folder}: {type(exc).__name__}: {exc}") from exc
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # e.g. out of device memory
        raise FamilyError(f"cannot place family {folder} on {placement.describe()}: {exc}") from exc
    modules = [pipeline.unet, pipeline.vae, pipeline.text_encoder, small_unet]
    if info.kind == "sdxl":
        modules.append(pipeline.text_encoder_2)
    for module in modules:
        module.eval().requires_grad_(False)
    proj = pipeline.unet.config.time_cond_proj_dim
    return Family(
        folder=folder,
        family_id=info.family_id,
        name=info.name,
        pipeline=pipeline,
        small_unet=small_unet,
        small_source=small or DEFAULT_SMALL,
        scheduler_config=dict(pipeline.scheduler.config),
        vae_scale_factor=2 ** (len(pipeline.vae.config.block_out_channels) - 1),
        latent_channels=int(pipeline.vae.config.latent_channels),
        cross_attention_dim=int(pipeline.unet.config.cross_attention_dim),
        kind=info.kind,
        pipeline_class=info.pipeline_class,
        samplers=info.samplers,
        guidance="embedding" if proj is not None else "cfg",
        time_cond_proj_dim=None if proj is None else int(proj),
        variant=info.family_variant,
        placement=placement,
        prompt_grammar=info.prompt_grammar,
        text_max_length=int(pipeline.tokenizer.model_max_length),
    )


def loaded_bytes(family: Family) -> int:
    """The bytes a loaded family's modules take (parameters and buffers), as placed."""
    pipeline: Any = family.pipeline
    modules = [pipeline.unet, pipeline.vae, pipeline.text_encoder, family.small_unet]
    if family.kind == "sdxl":
        modules.append(pipeline.text_encoder_2)
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


@torch.no_grad()
def encode_prompts(family: Family, prompts: list[str]) -> Conditioning:
    """The prompts' conditioning as the family's own pipeline computes it (``encode_prompt``).

    SD: the text encoder's hidden states (B, L, D), padded to the tokenizer's max length.
    SDXL: both encoders' penultimate hidden states side by side (B, L, D1 + D2) and the second
    encoder's pooled projection as ``text_embeds`` (B, P).
    """
    pipeline: Any = family.pipeline  # diffusers sets a pipeline's modules at runtime: untyped for mypy
    if family.kind == "sdxl":
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, device=family.placement.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
        )
        return Conditioning(embeds=embeds, added={"text_embeds": pooled})
    embeds, _ = pipeline.encode_prompt(prompts, family.placement.device, 1, False)
    return Conditioning(embeds=embeds)


def uncond_conditioning(family: Family) -> Conditioning:
    """The unconditional conditioning (batch 1), computed once per family.

    The empty prompt's, except where an SDXL family sets ``force_zeros_for_empty_prompt``
    (the hub's SDXL does): then zeros, as its pipeline uses without a negative prompt.
    """
    if family._uncond is None:
        cond = encode_prompts(family, [""])
        if family.kind == "sdxl" and family.pipeline.config.force_zeros_for_empty_prompt:  # type: ignore[attr-defined]
            cond = Conditioning(torch.zeros_like(cond.embeds), {k: torch.zeros_like(v) for k, v in cond.added.items()})
        family._uncond = cond
    return family._uncond


def uncond_embedding(family: Family) -> torch.Tensor:
    """The unconditional text embedding (1, L, D) (see :func:`uncond_conditioning`)."""
    return uncond_conditioning(family).embeds


def time_ids(family: Family, height: int, width: int) -> torch.Tensor:
    """SDXL's size conditioning (1, 6) for an image of ``height`` x ``width`` pixels, uncropped.

    ``(original_size, crops_coords_top_left, target_size)`` as the SDXL pipeline builds it by
    default; its check that the UNet's embedding width fits is kept.
    """
    pipeline: Any = family.pipeline  # diffusers' runtime modules
    ids: torch.Tensor = pipeline._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=torch.float32,
        text_encoder_projection_dim=int(pipeline.text_encoder_2.config.projection_dim),
    )
    return ids.to(family.placement.device)


def guidance_embedding(family: Family, guidance_scale: float) -> torch.Tensor | None:
    """An LCM-distilled UNet's ``timestep_cond`` (1, time_cond_proj_dim) for ``guidance_scale``; else None."""
    if family.time_cond_proj_dim is None:
        return None
    pipeline: Any = family.pipeline
    w = torch.tensor(guidance_scale - 1).repeat(1)  # as LatentConsistencyModelPipeline and StableDiffusionPipeline
    embedding: torch.Tensor = pipeline.get_guidance_scale_embedding(w, embedding_dim=family.time_cond_proj_dim)
    return embedding.to(device=family.placement.device, dtype=torch.float32)
