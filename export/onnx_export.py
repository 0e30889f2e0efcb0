"""Model family -> device bundle: the small UNet, VAE decoder and text encoder as ONNX + manifest.

The graphs come from optimum's ONNX exporter (``optimum-onnx``), which knows the UNet
signatures of SD1.x, SDXL and LCM, and keep its folder layout (``unet/model.onnx``,
``vae_decoder/model.onnx``, ``text_encoder/model.onnx``; SDXL adds ``text_encoder_2/``), so
a folder made by ``optimum-cli export onnx`` is accepted too (``from_onnx``). Then, per
``dtype`` / ``quantize``, the graphs are converted (``export.quantize``), every graph is
checked against PyTorch (``export.validate``), and ``manifest.json`` records the family (its
kind, pipeline class, samplers and guidance mode), the latent space, the scheduler, the
tokenizer(s), the unconditional embedding (SDXL: and the pooled one), the sha256 of every
file, the measured errors and the small UNet's content hash (``small_model_sha256``).

A personalized bundle (``lora``, or ``base_small`` for a full fine-tune given as ``small``)
exports the user's own small UNet instead of the family's: :mod:`export.lora` fuses or checks
it, right after the family loads and before anything is written, and the manifest records
what was personalized (``personalization``); everything else is the family's, ``family_id``
included.

Every bundle also holds the ``model_index.json`` of the small pipeline, so optimum's ORT
pipelines (``ORTStableDiffusionPipeline``, ``ORTStableDiffusionXLPipeline``,
``ORTLatentConsistencyModelPipeline``) open a bundle folder as it is. They need no
``vae_encoder/`` for text-to-image, so the bundle has none.

The bundle is built in a staging folder beside ``out`` and moved into place only when
everything passed, so a failed export never leaves a half bundle behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import inspect
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.tokenizer import TOKENIZER_JSON, TokenizerSummary
from shared.errors import ConfigError, ExportError, FamilyError
from shared.manifest import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    GRAPH_NAMES,
    MANIFEST_NAME,
    SDXL_GRAPH,
    UNCOND_POOLED_TENSOR,
    UNCOND_TENSOR,
    BundleManifest,
    FileEntry,
    GraphEntry,
    TokenizerInfo,
    file_entry,
    load_manifest,
    verify_bundle_files,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from edge_server.family import Family

UNCOND_FILE = "uncond_embedding.safetensors"
ONNX_MODEL_NAME = "model.onnx"
MODEL_INDEX_NAME = "model_index.json"  # diffusers' (and optimum's ORT pipelines') pipeline index
SDXL_ADDED_COND = ("text_embeds", "time_ids")  # the SDXL UNet's added_cond_kwargs, as graph inputs
VERSIONED_PACKAGES = (
    "rise", "torch", "diffusers", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers",
)


@dataclass
class ExportOptions:
    """What ``rise-export`` was asked to do (see ``export.cli`` for the flags)."""

    family: Path
    out: Path
    small: str | None = None
    variant: str | None = None  # weights variant (e.g. fp16) passed to load_family; None: auto-detected
    dtype: str = "fp32"
    quantize: str | None = None
    from_onnx: Path | None = None
    opset: int | None = None
    force: bool = False
    seed: int = 0  # of the validation inputs
    # A personalized bundle (export.lora): a LoRA fused into the small UNet, or --small as a fine-tune of base_small.
    lora: Path | None = None  # a safetensors LoRA file
    lora_scale: float | None = None  # fuse_lora's lora_scale (None: 1.0); only with lora
    label: str | None = None  # the bundle's name in a device app's picker (default: the LoRA's / fine-tune's name)
    base_small: str | None = None  # the family's small UNet that ``small`` was fine-tuned from


@dataclass
class ExportResult:
    """The written bundle, its manifest and how long each phase took (seconds)."""

    bundle_dir: Path
    manifest: BundleManifest
    timings: dict[str, float] = field(default_factory=dict)


def _quiet(_: str) -> None:
    return None


def check_options(options: ExportOptions) -> None:
    """Refuse bad flag combinations and a non-empty output folder before any heavy work."""
    if options.dtype not in ("fp32", "fp16"):
        raise ConfigError(f"--dtype must be fp32 or fp16, not {options.dtype!r}")
    if options.quantize not in (None, "int8"):
        raise ConfigError(f"--quantize must be int8, not {options.quantize!r}")
    if options.quantize == "int8" and options.dtype != "fp32":
        raise ConfigError("--quantize int8 works on fp32 graphs: use it with --dtype fp32")
    if options.variant is not None and (not options.variant or "/" in options.variant or "." in options.variant):
        raise ConfigError(f"--variant must be a plain name such as fp16, not {options.variant!r}")
    if options.opset is not None and not 14 <= options.opset <= 23:
        raise ConfigError(f"--opset must be between 14 and 23, not {options.opset}")
    _check_personalization_options(options)
    if not Path(options.family).is_dir():  # before importing torch: a typo should fail in a blink
        raise FamilyError(f"family folder {options.family} does not exist")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not options.force:
            raise ExportError(f"output folder {out} is not empty (pass --force to replace the bundle in it)")
        if not (out / MANIFEST_NAME).is_file():
            # --force replaces a previous bundle, never an arbitrary folder a typo pointed at.
            raise ExportError(f"output folder {out} is not empty and holds no {MANIFEST_NAME}: refusing to replace it")
    if options.from_onnx is not None:
        src = Path(options.from_onnx)
        if not src.is_dir():
            raise ExportError(f"--from-onnx folder {src} does not exist")
        missing = [f"{name}/{ONNX_MODEL_NAME}" for name in GRAPH_NAMES if not (src / name / ONNX_MODEL_NAME).is_file()]
        if missing:
            raise ExportError(f"--from-onnx folder {src} lacks {', '.join(missing)} (optimum's layout)")


def _check_personalization_options(options: ExportOptions) -> None:
    """Refuse personalization flags that do not go together (before torch is imported)."""
    from export.lora import check_lora_scale
    from shared.manifest import check_label

    if options.lora is not None and options.base_small is not None:
        raise ConfigError("--lora and --base-small are two kinds of personalized bundle: give one (a LoRA is fused "
                          "into the small UNet; --base-small records --small as a full fine-tune of it)")
    if options.lora is None and options.lora_scale is not None:
        raise ConfigError("--lora-scale needs --lora")
    if options.base_small is not None and options.small is None:
        raise ConfigError("--base-small needs --small: the fine-tuned UNet to export")
    personalized = options.lora is not None or options.base_small is not None
    if options.label is not None:
        if not personalized:
            raise ConfigError("--label names a personalized bundle: use it with --lora or --base-small")
        check_label("--label", options.label, error=ConfigError)
    if personalized and options.from_onnx is not None:
        raise ConfigError("a personalized bundle is exported from PyTorch (its small UNet is the user's own): "
                          "leave out --from-onnx")
    if options.lora_scale is not None:
        check_lora_scale(options.lora_scale)
    if options.lora is not None and not Path(options.lora).is_file():
        raise ExportError(f"LoRA file {options.lora} does not exist")


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Hide the tracer's per-branch warnings: our validation at two shapes is the real check."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        yield


def small_pipeline(family: Family) -> StableDiffusionPipeline:
    """A new pipeline object of the family's class sharing its modules, with the small UNet as its ``unet``.

    The family's config values that are constructor arguments (SDXL's
    ``force_zeros_for_empty_prompt``) are kept; a safety checker is never required.
    """
    pipeline: Any = family.pipeline  # diffusers sets a pipeline's modules and config at runtime: untyped
    cls = type(pipeline)
    parameters = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {**pipeline.components, "unet": family.small_unet}
    for name in parameters:
        if name != "self" and name not in kwargs and name in pipeline.config:
            kwargs[name] = pipeline.config[name]
    if "requires_safety_checker" in parameters:
        kwargs["requires_safety_checker"] = False
    small: StableDiffusionPipeline = cls(**kwargs)
    return small


def model_index(pipeline: Any, class_name: str) -> dict[str, Any]:
    """The ``model_index.json`` of ``pipeline`` as diffusers writes it (``[library, class]`` per component)."""
    import diffusers

    index: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": diffusers.__version__}
    for key, value in sorted(dict(pipeline.config).items()):
        if key.startswith("_"):
            continue  # _name_or_path: a path on the exporting machine
        index[key] = list(value) if isinstance(value, tuple) else value
    return _json_safe(index, "pipeline config")


def optimum_export(family: Family, output: Path, opset: int | None = None) -> None:
    """Export the family's text encoder(s), VAE and small UNet with optimum into ``output`` (optimum's layout)."""
    from optimum.exporters.onnx import onnx_export_from_model

    pipe = small_pipeline(family)
    try:
        with _quiet_tracing():
            # Optimum's own validation is off: it runs one shape at a fixed atol; ours runs two
            # shapes against the fp32 PyTorch modules with a tolerance per graph dtype.
            onnx_export_from_model(pipe, output, task="text-to-image", opset=opset, do_validation=False)
    except Exception as exc:
        raise ExportError(f"optimum could not export the pipeline: {type(exc).__name__}: {exc}") from exc


def _graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _weights_dtype(path: Path) -> str:
    """'fp16' if most float weights of the graph are float16, else 'fp32' (int8 graphs keep fp32 biases)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kinds = [t.data_type for t in model.graph.initializer]
    return "fp16" if kinds.count(onnx.TensorProto.FLOAT16) > kinds.count(onnx.TensorProto.FLOAT) else "fp32"


def _copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    """Copy a graph folder's non-ONNX files (optimum's ``config.json``)."""
    for path in src_dir.iterdir():
        if path.is_file() and path.suffix == ".json":
            shutil.copy2(path, dst_dir / path.name)


def _versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    if versions["rise"] == "unknown":  # run from a source checkout, not installed
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError, KeyError):
            versions["rise"] = tomllib.loads(pyproject.read_text())["project"]["version"]
    return versions


def _listed_files(root: Path) -> dict[str, FileEntry]:
    return {
        path.relative_to(root).as_posix(): file_entry(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST_NAME
    }


def _json_safe(config: dict[str, Any], what: str = "scheduler config") -> dict[str, Any]:
    """A diffusers config as plain JSON values (diffusers configs may hold tuples)."""
    try:
        safe: dict[str, Any] = json.loads(json.dumps(config, default=list))
        return safe
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{what} is not JSON-serializable: {exc}") from exc


def _place(stage_bundle: Path, out: Path, stage: Path) -> None:
    """Move the finished bundle to ``out``, replacing a previous bundle there (checked earlier)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = stage / "previous"
        os.replace(out, old)  # same filesystem (stage is beside out): a rename
    os.replace(stage_bundle, out)


def _tokenizer_info(folder: str, tok: TokenizerSummary) -> TokenizerInfo:
    return TokenizerInfo(
        folder=folder, tokenizer_json=f"{folder}/{TOKENIZER_JSON}", files=[f"{folder}/{n}" for n in tok.files],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )


def _expected_io(family: Family) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """Inputs and outputs each graph must have beyond the SD1.x ones, for the family's kind and guidance."""
    pipeline: Any = family.pipeline
    inputs: dict[str, tuple[str, ...]] = {}
    outputs: dict[str, tuple[str, ...]] = {}
    unet_inputs: tuple[str, ...] = ()
    if family.kind == "sdxl":
        unet_inputs += SDXL_ADDED_COND
        # The device reads each encoder's penultimate hidden state (diffusers' hidden_states[-2]) and
        # the second encoder's pooled projection.
        for name, encoder in (("text_encoder", pipeline.text_encoder), (SDXL_GRAPH, pipeline.text_encoder_2)):
            penultimate = f"hidden_states.{int(encoder.config.num_hidden_layers) - 1}"
            outputs[name] = (penultimate, "text_embeds") if name == SDXL_GRAPH else (penultimate,)
    if family.guidance == "embedding":
        unet_inputs += ("timestep_cond",)
    inputs["unet"] = unet_inputs
    return inputs, outputs


def export_bundle(
    options: ExportOptions,
    *,
    family: Family | None = None,
    log: Callable[[str], None] = _quiet,
    progress: bool | None = None,
) -> ExportResult:
    """Export a device bundle as ``options`` say; return its manifest and phase timings.

    ``family`` skips loading when the caller already holds it (tests, the demo). ``progress``: a bar
    on stderr with a step per graph exported, converted and validated (``None``: when stderr is a
    terminal; :mod:`export.progress`); ``log`` gets a line per step as well. Raises
    ConfigError / FamilyError / ExportError (all RiseError) for anything a user can fix;
    a family of a kind we cannot run is refused (FamilyError) before any graph is exported.
    """
    check_options(options)
    import torch
    from safetensors.numpy import save_file

    from edge_server.family import load_family, uncond_conditioning
    from edge_server.preview import fit_family_projection
    from export.lora import check_fine_tune, fuse_lora, weights_sha256
    from export.progress import bar
    from export.quantize import convert_to_fp16, copy_graph, quantize_int8
    from export.tokenizer import write_bundle_tokenizer
    from export.validate import default_shapes, validate_graph

    out = Path(options.out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if family is None:
        log(f"loading family {options.family} (small: {options.small or 'unet_small'})")
        family = load_family(options.family, options.small, variant=options.variant)
    elif options.small is not None and options.small != family.small_source:
        raise ConfigError(f"family was loaded with small={family.small_source!r}, options say {options.small!r}")
    elif options.variant is not None and options.variant != family.variant:
        raise ConfigError(f"family was loaded with variant={family.variant!r}, options say {options.variant!r}")
    timings["load"] = time.perf_counter() - start
    # Personalization comes before anything is written: a refused LoRA or fine-tune leaves no --out behind.
    phase = time.perf_counter()
    personal = None
    if options.lora is not None:
        log(f"fusing LoRA {options.lora} into the small UNet")
        personal = fuse_lora(family, Path(options.lora), 1.0 if options.lora_scale is None else options.lora_scale,
                             label=options.label)
    elif options.base_small is not None:
        log(f"checking the small UNet {family.small_source} as a fine-tune of {options.base_small}")
        personal = check_fine_tune(family, options.base_small, label=options.label)
    if personal is not None:
        family = dataclasses.replace(family, small_unet=personal.unet)  # the caller's family is left as it was
        log(f"personalized: {personal.personalization.describe()}")
        timings["personalize"] = time.perf_counter() - phase
    small_sha256 = weights_sha256(family.small_unet) if personal is None else personal.small_sha256
    sdxl = family.kind == "sdxl"
    names = GRAPH_NAMES + ((SDXL_GRAPH,) if sdxl else ())
    from_onnx_2 = None if options.from_onnx is None else Path(options.from_onnx) / SDXL_GRAPH / ONNX_MODEL_NAME
    if from_onnx_2 is not None and sdxl and not from_onnx_2.is_file():
        raise ExportError(f"--from-onnx folder {options.from_onnx} lacks {SDXL_GRAPH}/{ONNX_MODEL_NAME}, "
                          f"which an SDXL family ({family.pipeline_class}) needs")
    extra_inputs, extra_outputs = _expected_io(family)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.rise-export-", dir=out.parent))
    # Steps: optimum's export (or taking the graphs), each graph copied or converted, the side
    # files, each graph validated.
    pbar = bar("rise-export", 2 + 2 * len(names), progress)

    def step(what: str) -> None:
        pbar.set_description_str(what)
        log(what)

    try:
        bundle = stage / "bundle"
        bundle.mkdir()
        phase = time.perf_counter()
        if options.from_onnx is None:
            source, raw = "pytorch", stage / "optimum"
            step(f"exporting {', '.join(n for n in names if n != 'unet')}, unet (small) with optimum")
            optimum_export(family, raw, options.opset)
        else:
            source, raw = "onnx", Path(options.from_onnx)
            step(f"taking the graphs from {raw}")
        pbar.update(1)
        timings["export"] = time.perf_counter() - phase

        phase = time.perf_counter()
        graph_info: dict[str, dict[str, Any]] = {}
        for name in names:  # optimum's vae_encoder is not copied: the device never encodes images
            src, dst = raw / name / ONNX_MODEL_NAME, bundle / name / ONNX_MODEL_NAME
            dst.parent.mkdir(parents=True)
            info: dict[str, Any] = {"quantization": None, "quantized_op_types": [], "note": None}
            if options.quantize == "int8":
                step(f"quantizing {name} to int8")
                q = quantize_int8(src, dst)
                info.update(
                    quantization="int8" if q.quantized else None, quantized_op_types=q.op_types, note=q.note
                )
            elif options.dtype == "fp16" and _weights_dtype(src) != "fp16":
                step(f"converting {name} to fp16")
                convert_to_fp16(src, dst)
            else:
                pbar.set_description_str(f"copying {name}")
                copy_graph(src, dst)
            _copy_side_files(src.parent, dst.parent)
            graph_info[name] = info
            pbar.update(1)
        timings["convert"] = time.perf_counter() - phase

        step("writing scheduler, tokenizer(s), unconditional embedding and model_index.json")
        pipeline: Any = family.pipeline  # diffusers sets a pipeline's modules at runtime: untyped for mypy
        pipeline.scheduler.save_pretrained(bundle / "scheduler")
        tok = write_bundle_tokenizer(pipeline.tokenizer, Path(family.folder) / "tokenizer", bundle / "tokenizer")
        tok_2 = None
        if sdxl:
            tok_2 = write_bundle_tokenizer(
                pipeline.tokenizer_2, Path(family.folder) / "tokenizer_2", bundle / "tokenizer_2"
            )
            if tok_2.max_length != tok.max_length:
                raise ExportError(f"the SDXL tokenizers pad to different lengths ({tok.max_length} and "
                                  f"{tok_2.max_length}): their hidden states cannot be concatenated")
        uncond_cond = uncond_conditioning(family)
        uncond = uncond_cond.embeds.detach().to(torch.float32).contiguous().numpy()
        tensors = {UNCOND_TENSOR: uncond}
        pooled = None
        if sdxl:
            pooled = uncond_cond.added["text_embeds"].detach().to(torch.float32).contiguous().numpy()
            tensors[UNCOND_POOLED_TENSOR] = pooled
        save_file(tensors, str(bundle / UNCOND_FILE))
        index = model_index(small_pipeline(family), family.pipeline_class)
        (bundle / MODEL_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        pbar.update(1)

        phase = time.perf_counter()
        unet_config = family.small_unet.config  # type: ignore[attr-defined]  # diffusers' runtime config
        up_factor = 2 ** (len(unet_config.block_out_channels) - 1)
        shapes = default_shapes(family.default_latent_size, up_factor, tok.max_length, family.vae_scale_factor)
        modules = {"unet": family.small_unet, "vae_decoder": pipeline.vae, "text_encoder": pipeline.text_encoder}
        tokenizers = {"text_encoder": pipeline.tokenizer}
        if sdxl:
            modules[SDXL_GRAPH] = pipeline.text_encoder_2
            tokenizers[SDXL_GRAPH] = pipeline.tokenizer_2
        graphs: dict[str, GraphEntry] = {}
        for name in names:
            path = bundle / name / ONNX_MODEL_NAME
            info = graph_info[name]
            weights = _weights_dtype(path)
            check_dtype = "int8" if info["quantization"] == "int8" else weights
            step(f"validating {name} ({check_dtype}) against PyTorch at two shapes")
            result = validate_graph(
                name, path, modules[name], check_dtype, shapes, seed=options.seed, tokenizer=tokenizers.get(name),
                required_inputs=extra_inputs.get(name, ()), required_outputs=extra_outputs.get(name, ()),
            )
            graphs[name] = GraphEntry(
                path=f"{name}/{ONNX_MODEL_NAME}",
                inputs=result.inputs,
                outputs=result.outputs,
                dtype=weights,
                quantization=info["quantization"],
                quantized_op_types=info["quantized_op_types"],
                opset=_graph_opset(path),
                rtol=result.rtol,
                checks=result.checks,
                max_abs_error=result.max_abs_error,
                note=info["note"],
            )
            pbar.update(1)
            pbar.set_postfix_str(f"{name}: max-abs err {result.max_abs_error:.1e}", refresh=False)
        timings["validate"] = time.perf_counter() - phase

        vae_config = pipeline.vae.config
        shift = vae_config.get("shift_factor")  # SD3/Flux-style VAEs shift as well as scale
        manifest = BundleManifest(
            format=BUNDLE_FORMAT,
            format_version=BUNDLE_FORMAT_VERSION,
            family_id=family.family_id,
            family_name=family.name,
            small_model=family.small_source,
            dtype=options.dtype,
            quantization=options.quantize,
            latent_channels=int(family.latent_channels),
            vae_scale_factor=int(family.vae_scale_factor),
            vae_scaling_factor=float(vae_config.scaling_factor),
            vae_shift_factor=0.0 if shift is None else float(shift),
            sample_size=int(family.default_latent_size),
            cross_attention_dim=int(family.cross_attention_dim),
            text_max_length=tok.max_length,
            scheduler_config=_json_safe(dict(family.scheduler_config)),
            tokenizer=_tokenizer_info("tokenizer", tok),
            uncond_embedding=UNCOND_FILE,
            uncond_shape=list(uncond.shape),
            graphs=graphs,
            files=_listed_files(bundle),
            versions=_versions(),
            opset=max(g.opset for g in graphs.values()),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            source=source,
            family_kind=family.kind,
            pipeline_class=family.pipeline_class,
            samplers=list(family.samplers),
            guidance=family.guidance,
            time_cond_proj_dim=family.time_cond_proj_dim,
            added_cond_names=list(SDXL_ADDED_COND) if sdxl else [],
            tokenizer_2=None if tok_2 is None else _tokenizer_info("tokenizer_2", tok_2),
            uncond_pooled_shape=None if pooled is None else list(pooled.shape),
            prompt_grammar=family.prompt_grammar,
            preview_projection=fit_family_projection(family).to_dict(),
            small_model_sha256=small_sha256,
            personalization=None if personal is None else personal.personalization,
        )
        (bundle / MANIFEST_NAME).write_text(manifest.to_json())
        verify_bundle_files(bundle, load_manifest(bundle))  # the reader's own check, before we publish
        _place(bundle, out, stage)
    finally:
        pbar.close()
        shutil.rmtree(stage, ignore_errors=True)
    timings["total"] = time.perf_counter() - start
    log(f"bundle written to {out}")
    return ExportResult(bundle_dir=out, manifest=manifest, timings=timings)
