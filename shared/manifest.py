"""The device bundle's manifest: what ``rise-export`` wrote and what the device may trust.

A device bundle is a folder made by ``rise-export`` (``export/``)::

    manifest.json                   this module's BundleManifest, as JSON
    unet/model.onnx                 the small denoiser (optimum's layout; maybe + external data)
    vae_decoder/model.onnx          latents -> image
    text_encoder/model.onnx         token ids -> embeddings
    tokenizer/tokenizer.json        a `tokenizers` file (plus the original tokenizer files)
    scheduler/scheduler_config.json the family's scheduler config
    uncond_embedding.safetensors    tensor "uncond": float32 (1, L, D), the unconditional embedding
                                    (SDXL: also "uncond_text_embeds" (1, P), the pooled one)
    model_index.json                the pipeline index optimum's ORT pipelines open the folder with

An SDXL bundle (``family_kind`` "sdxl") also has ``text_encoder_2/model.onnx`` and
``tokenizer_2/``; its UNet takes ``text_embeds`` and ``time_ids`` (``added_cond_names``). An
LCM bundle runs only the ``lcm`` sampler (``samplers``); a distilled UNet
(``time_cond_proj_dim``) takes the guidance scale as ``timestep_cond`` (``guidance``
"embedding", see ``shared.guidance``). Those keys are absent from bundles written before
them, which read as SD1.x bundles. ``prompt_grammar`` names the grammar the family's prompts
follow (``"demo"``: :mod:`shared.demo_grammar`), absent or null for free text: a device reads a
prompt with that grammar's tolerant reader before it encodes one itself.

Every bundle records ``small_model_sha256``, the content hash of the small UNet's weights it
was exported from (:func:`export.lora.weights_sha256`: the tensors, not a file format), absent
from older bundles. A *personalized* bundle (``personalization``, absent or null otherwise)
holds the user's own small UNet: a LoRA fused into the family's small UNet (``kind`` "lora":
the adapter file's name, sha256, format and scale are recorded, the file itself is not
shipped: the fused weights are the bundle) or a full fine-tune of it (``kind`` "fine_tune"),
with ``base_small_model`` / ``base_small_sha256`` naming what it was made from and ``label``,
the short name a device app shows in its bundle picker. Its ``family_id`` stays the
family's: only the small UNet changed, so the edge's handoffs are still accepted.

The manifest lists the sha256 and size of every other file, so a device checks the whole
bundle with :func:`verify_bundle_files` before it loads a graph. This module is read on
the device: it imports neither torch nor onnx, only the standard library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Union

from shared.errors import BundleError, ConfigError, IntegrityError
from shared.validation import (
    check_bool,
    check_choice,
    check_family_id,
    check_float,
    check_int,
    check_str,
    loads_strict,
)

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "rise-device-bundle"
BUNDLE_FORMAT_VERSION = 1
DTYPES = ("fp32", "fp16")
QUANTIZATIONS = (None, "int8")
GRAPH_NAMES = ("unet", "vae_decoder", "text_encoder")  # every bundle's; SDXL adds SDXL_GRAPH
SDXL_GRAPH = "text_encoder_2"
UNCOND_TENSOR = "uncond"  # the tensor's name inside the uncond_embedding safetensors file (float32)
UNCOND_POOLED_TENSOR = "uncond_text_embeds"  # SDXL: the pooled unconditional embedding, same file
FAMILY_KINDS = ("sd", "sdxl")
GUIDANCE_MODES = ("cfg", "embedding")
DEFAULT_SAMPLERS = ("ddim", "euler", "dpmpp_2m")
_SHORT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # a prompt grammar's, an adapter format's
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
PERSONALIZATION_KINDS = ("lora", "fine_tune")
LABEL_MAX_CHARS = 64  # a personalized bundle's label: what fits a line of the device app's bundle picker


@dataclass(frozen=True)
class FileEntry:
    """One bundle file: its sha256 (hex) and size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (ints, or names of dynamic axes)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class ValidationCheck:
    """One comparison of a graph against PyTorch at one set of input shapes."""

    shapes: dict[str, list[int]]
    max_abs_error: float
    output_scale: float  # max |reference output|, floored at 1: what the relative tolerance scales
    tolerance: float  # absolute: rtol * output_scale


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX graph of the bundle and how well it agrees with PyTorch."""

    path: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dtype: str  # the graph's float weights: "fp32" | "fp16"; its inputs/outputs are float32 always
    quantization: str | None  # "int8" if dynamically quantized
    quantized_op_types: list[str]
    opset: int
    rtol: float  # tolerance relative to the output scale, from the graph's dtype
    checks: list[ValidationCheck]
    max_abs_error: float  # max over checks
    note: str | None = None  # e.g. why a graph was left fp32 in an int8 bundle


@dataclass(frozen=True)
class TokenizerInfo:
    """Where the tokenizer is and the ids a device needs to pad prompts as the edge does."""

    folder: str
    tokenizer_json: str  # padding + truncation to text_max_length are baked in
    files: list[str]
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int


def check_sha256_hex(field: str, value: Any, *, error: type[Exception] = BundleError) -> str:
    """``value`` if it is a sha256 hex digest (64 lowercase hex digits)."""
    return check_str(field, value, pattern=_SHA256_HEX, error=error)


def check_label(field: str, value: Any, *, error: type[Exception] = BundleError) -> str:
    """A personalized bundle's label: 1-:data:`LABEL_MAX_CHARS` printable characters, no outer spaces."""
    label = check_str(field, value, min_len=1, max_len=LABEL_MAX_CHARS, printable=True, error=error)
    if label.strip() != label:
        raise error(f"{field} must have no leading or trailing spaces, got {label!r}")
    return label


@dataclass(frozen=True)
class Personalization:
    """What makes a bundle the user's own: its small UNet is a LoRA-fused or fine-tuned copy of the family's.

    The edge's large model, the VAE and the text encoder are the family's, untouched (a LoRA that
    would change the text encoder is refused at export). ``adapter_*`` describe a LoRA and are
    None for a fine-tune.
    """

    kind: str  # PERSONALIZATION_KINDS: "lora" (fused into the base) or "fine_tune" (a whole UNet)
    label: str  # the short name a device app shows for the bundle (default: the adapter file's stem)
    base_small_model: str  # what the family calls the small UNet it was made from ("unet_small", a path)
    base_small_sha256: str  # that UNet's weights' content hash (as small_model_sha256 is computed)
    adapter_file: str | None = None  # the LoRA file's name (no folder); the file is not in the bundle
    adapter_sha256: str | None = None  # that file's sha256
    adapter_scale: float | None = None  # the scale it was fused with (diffusers' fuse_lora lora_scale)
    adapter_format: str | None = None  # its key layout: "peft", "diffusers", "diffusers-peft" (both) or "kohya"

    def describe(self) -> str:
        """One line: what was personalized (the export summary's, a device app's detail line)."""
        if self.kind == "lora":
            return (f"LoRA {self.label!r} ({self.adapter_file}, {self.adapter_format} format, scale "
                    f"{self.adapter_scale:g}) fused into {self.base_small_model}")
        return f"fine-tune {self.label!r} of {self.base_small_model}"

    def check(self) -> None:
        """BundleError naming the first field out of range (see the field comments)."""
        check_choice("manifest key 'personalization.kind'", self.kind, PERSONALIZATION_KINDS, error=BundleError)
        check_label("manifest key 'personalization.label'", self.label)
        check_str("manifest key 'personalization.base_small_model'", self.base_small_model, min_len=1,
                  printable=True, error=BundleError)
        check_sha256_hex("manifest key 'personalization.base_small_sha256'", self.base_small_sha256)
        adapter = {"adapter_file": self.adapter_file, "adapter_sha256": self.adapter_sha256,
                   "adapter_scale": self.adapter_scale, "adapter_format": self.adapter_format}
        if self.kind == "fine_tune":
            given = [key for key, value in adapter.items() if value is not None]
            if given:
                raise BundleError(f"manifest key 'personalization.{given[0]}' must be null for a fine_tune")
            return
        absent = [key for key, value in adapter.items() if value is None]
        if absent:
            raise BundleError(f"manifest key 'personalization.{absent[0]}' is missing: a lora bundle records it")
        name = check_str("manifest key 'personalization.adapter_file'", self.adapter_file, min_len=1, max_len=255,
                         printable=True, error=BundleError)
        if "/" in name or "\\" in name or name in (".", ".."):
            raise BundleError(f"manifest key 'personalization.adapter_file' must be a file name, got {name!r}")
        check_sha256_hex("manifest key 'personalization.adapter_sha256'", self.adapter_sha256)
        check_float("manifest key 'personalization.adapter_scale'", self.adapter_scale, lo=0.0, lo_open=True,
                    error=BundleError)
        check_str("manifest key 'personalization.adapter_format'", self.adapter_format, pattern=_SHORT_NAME,
                  error=BundleError)


@dataclass(frozen=True)
class BundleManifest:
    """Everything a device needs to know about a bundle (see the module docstring)."""

    format: str
    format_version: int
    family_id: str
    family_name: str
    small_model: str
    dtype: str
    quantization: str | None
    latent_channels: int
    vae_scale_factor: int  # spatial downsampling: image side = latent side * vae_scale_factor
    vae_scaling_factor: float  # VAE config scaling_factor: decode(latents / scaling_factor + shift_factor)
    vae_shift_factor: float  # VAE config shift_factor; 0.0 for VAEs without one (all SD1.x/SDXL)
    sample_size: int  # default latent side
    cross_attention_dim: int
    text_max_length: int
    scheduler_config: dict[str, Any]
    tokenizer: TokenizerInfo
    uncond_embedding: str  # safetensors file, tensor UNCOND_TENSOR: text encoder output for "" (float32)
    uncond_shape: list[int]  # (1, text_max_length, D): D = the text encoder's width (= cross_attention_dim in SD)
    graphs: dict[str, GraphEntry]
    files: dict[str, FileEntry]
    versions: dict[str, str]
    opset: int
    created_at: str
    source: str  # "pytorch" (exported here) or "onnx" (an optimum folder, validated here)
    # Added with SDXL and LCM; the defaults are what older (SD1.x-only) bundles mean.
    family_kind: str = "sd"  # FAMILY_KINDS
    pipeline_class: str = "StableDiffusionPipeline"
    samplers: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SAMPLERS))
    guidance: str = "cfg"  # GUIDANCE_MODES: "embedding" when the UNet takes timestep_cond (LCM-distilled)
    time_cond_proj_dim: int | None = None  # width of that embedding
    added_cond_names: list[str] = dataclasses.field(default_factory=list)  # SDXL: ["text_embeds", "time_ids"]
    tokenizer_2: TokenizerInfo | None = None  # SDXL's second tokenizer
    uncond_pooled_shape: list[int] | None = None  # SDXL: (1, P) of UNCOND_POOLED_TENSOR
    prompt_grammar: str | None = None  # the grammar of the family's prompts ("demo"); None: free text
    # The live preview's latent-to-RGB projection the edge fitted (shared.preview.LatentProjection.to_dict);
    # absent from bundles written before it (the device then fits a rougher one itself).
    preview_projection: dict[str, list[float]] | None = None
    # Added with personalized bundles; absent from bundles written before them (None).
    small_model_sha256: str | None = None  # content hash of the small UNet's weights exported (after any fusing)
    personalization: Personalization | None = None  # the user's own small UNet (see Personalization)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Pretty JSON text (stable key order)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> BundleManifest:
        """Build from a parsed dict, checking every key's presence and type (BundleError)."""
        manifest: BundleManifest = _build(cls, data, "manifest")  # _build(cls, ...) builds a cls
        manifest._check()
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes) -> BundleManifest:
        """Parse JSON text; BundleError if it is not JSON or does not fit the schema."""
        try:
            data = loads_strict(text)  # no NaN, no duplicate keys: a device must read what the exporter wrote
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, duplicates, deep nesting
            raise BundleError(f"manifest is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def _check(self) -> None:
        """Checks across keys: values in range and every referenced file listed."""
        if self.format != BUNDLE_FORMAT:
            raise BundleError(f"manifest key 'format' is {self.format!r}, expected {BUNDLE_FORMAT!r}")
        check_family_id("manifest key 'family_id'", self.family_id, error=BundleError)
        if self.format_version > BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"bundle format_version {self.format_version} is newer than this reader's "
                f"({BUNDLE_FORMAT_VERSION}): update RISE"
            )
        if self.dtype not in DTYPES:
            raise BundleError(f"manifest key 'dtype' is {self.dtype!r}, expected one of {DTYPES}")
        if self.quantization not in QUANTIZATIONS:
            raise BundleError(f"manifest key 'quantization' is {self.quantization!r}, expected null or 'int8'")
        for key in ("latent_channels", "vae_scale_factor", "sample_size", "cross_attention_dim", "text_max_length"):
            if getattr(self, key) <= 0:
                raise BundleError(f"manifest key {key!r} must be positive, got {getattr(self, key)}")
        if len(self.uncond_shape) != 3 or self.uncond_shape[:2] != [1, self.text_max_length]:
            raise BundleError(
                f"manifest key 'uncond_shape' is {self.uncond_shape}, expected [1, {self.text_max_length}, D]"
            )
        if self.family_kind not in FAMILY_KINDS:
            raise BundleError(f"manifest key 'family_kind' is {self.family_kind!r}, expected one of {FAMILY_KINDS}")
        if self.guidance not in GUIDANCE_MODES:
            raise BundleError(f"manifest key 'guidance' is {self.guidance!r}, expected one of {GUIDANCE_MODES}")
        if (self.guidance == "embedding") != (self.time_cond_proj_dim is not None):
            raise BundleError("manifest keys 'guidance' and 'time_cond_proj_dim' disagree: an embedded guidance "
                              "scale needs its width, and only then")
        if not self.samplers:
            raise BundleError("manifest key 'samplers' is empty")
        if self.prompt_grammar is not None and not _SHORT_NAME.fullmatch(self.prompt_grammar):
            raise BundleError(f"manifest key 'prompt_grammar' is {self.prompt_grammar!r}, expected a short name "
                              "such as 'demo' (or null)")
        if self.preview_projection is not None:
            # numpy: imported only for a manifest that has a projection (this module itself needs none)
            from shared.preview import LatentProjection

            try:
                LatentProjection.from_dict(self.preview_projection, self.latent_channels)
            except ConfigError as exc:
                raise BundleError(f"manifest key {exc}") from None
        if self.small_model_sha256 is not None:
            check_sha256_hex("manifest key 'small_model_sha256'", self.small_model_sha256)
        if self.personalization is not None:
            if self.small_model_sha256 is None:
                raise BundleError("a personalized bundle needs manifest key 'small_model_sha256'")
            self.personalization.check()
        sdxl = self.family_kind == "sdxl"
        required = GRAPH_NAMES + ((SDXL_GRAPH,) if sdxl else ())
        if sdxl and (self.tokenizer_2 is None or self.uncond_pooled_shape is None or not self.added_cond_names):
            raise BundleError("an sdxl bundle needs manifest keys 'tokenizer_2', 'uncond_pooled_shape' and "
                              "'added_cond_names'")
        missing = [name for name in required if name not in self.graphs]
        if missing:
            raise BundleError(f"manifest key 'graphs' lacks {', '.join(missing)}")
        referenced = [(f"graphs.{name}.path", g.path) for name, g in self.graphs.items()]
        for key, tok in (("tokenizer", self.tokenizer), ("tokenizer_2", self.tokenizer_2)):
            if tok is not None:
                referenced += [(f"{key}.tokenizer_json", tok.tokenizer_json)]
                referenced += [(f"{key}.files[{i}]", rel) for i, rel in enumerate(tok.files)]
        referenced += [("uncond_embedding", self.uncond_embedding)]
        for key, rel in referenced:
            _check_relpath(rel)
            if rel not in self.files:
                raise BundleError(f"manifest key {key!r} names {rel}, which is not listed in 'files'")
        for rel, entry in self.files.items():
            _check_relpath(rel)
            if len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256):
                raise BundleError(f"manifest key 'files.{rel}.sha256' is not a sha256 hex digest")

    def graph_path(self, bundle_dir: str | Path, name: str) -> Path:
        """Absolute path of graph ``name`` inside ``bundle_dir``."""
        if name not in self.graphs:
            raise BundleError(f"bundle has no graph {name!r}")
        return resolve_bundle_path(bundle_dir, self.graphs[name].path)


def _check_relpath(rel: str) -> None:
    """Refuse absolute paths, backslashes and '..' parts: a manifest must not point outside its bundle."""
    pure = PurePosixPath(rel)
    if not rel or "\\" in rel or pure.is_absolute() or ".." in pure.parts or rel.startswith("~"):
        raise BundleError(f"bundle path {rel!r} escapes the bundle folder")


def resolve_bundle_path(bundle_dir: str | Path, rel: str) -> Path:
    """``bundle_dir / rel``, refusing any path (or symlink) that leads outside ``bundle_dir``."""
    _check_relpath(rel)
    root = Path(bundle_dir).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise BundleError(f"bundle path {rel!r} escapes the bundle folder (resolves to {path})")
    return path


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type hint ``tp`` and build dataclasses; BundleError names ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        present = [option for option in options if option is not type(None)]
        if len(present) == 1:  # an optional value: its own error names the innermost key
            return _build(present[0], value, key)
        for option in options:
            if option is type(None):
                continue
            try:
                return _build(option, value, key)
            except BundleError:
                continue
        raise BundleError(f"manifest key {key!r} has type {type(value).__name__}, expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            where = "the manifest" if key == "manifest" else f"manifest key {key!r}"
            raise BundleError(f"{where} must be a JSON object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(tp):
            sub = f.name if key == "manifest" else f"{key}.{f.name}"
            if f.name not in value:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise BundleError(f"manifest key {sub!r} is missing")
            kwargs[f.name] = _build(hints[f.name], value[f.name], sub)
        # tp is a type hint here, so is_dataclass means a dataclass class (never an instance).
        return typing.cast("type[Any]", tp)(**kwargs)  # unknown keys are ignored: later minor versions may add some
    if origin is list:
        if not isinstance(value, list):
            raise BundleError(f"manifest key {key!r} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"manifest key {key!r} must be an object, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {str(k): _build(item, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    field = f"manifest key {key!r}"
    if tp is float:
        return check_float(field, value, error=BundleError)
    if tp is int:
        return check_int(field, value, error=BundleError)
    if tp is str:
        return check_str(field, value, error=BundleError)
    if tp is bool:
        return check_bool(field, value, error=BundleError)
    raise TypeError(f"unsupported manifest type {tp!r} at {key}")  # a bug in this module, not in the bundle


def load_manifest(bundle_dir: str | Path) -> BundleManifest:
    """Read and schema-check ``bundle_dir/manifest.json`` (BundleError if absent or invalid)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return BundleManifest.from_json(text)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bundles hold multi-GB graphs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str | Path) -> FileEntry:
    """The manifest entry (sha256, size) for a file."""
    return FileEntry(sha256=sha256_file(path), size=Path(path).stat().st_size)


def verify_bundle_files(bundle_dir: str | Path, manifest: BundleManifest) -> None:
    """Check every file the manifest lists: inside the bundle, present, right size and sha256.

    Raises IntegrityError naming the first file that is missing or changed, BundleError
    for a path that escapes the bundle folder.
    """
    for rel, entry in sorted(manifest.files.items()):
        path = resolve_bundle_path(bundle_dir, rel)
        if not path.is_file():
            raise IntegrityError(f"bundle file {rel} is missing")
        size = path.stat().st_size
        if size != entry.size:  # cheap check first: no hashing of a truncated download
            raise IntegrityError(f"bundle file {rel} has {size} bytes, the manifest says {entry.size}")
        if sha256_file(path) != entry.sha256:
            raise IntegrityError(f"bundle file {rel} does not match its sha256 in the manifest")
