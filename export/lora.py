"""Personalized small UNets for a device bundle: a LoRA fused into the family's small UNet, or a full fine-tune.

A personalized bundle is the family's bundle with the user's own small UNet in ``unet/``; the
edge's large model, the VAE and the text encoder stay the family's, so the bundle keeps the
family's ``family_id`` and the edge's handoffs are still accepted (see
:class:`shared.manifest.Personalization` for what the manifest records).

- **LoRA** (:func:`fuse_lora`): loaded with diffusers' own LoRA loading, as a pipeline of the
  family's class reads one (``lora_state_dict``: the peft layout, diffusers' own and the
  kohya/A1111 ones it converts; a file mixing diffusers' and peft's is read whole, see
  :func:`_in_peft_layout`), into a copy of the family's small UNet
  (``load_lora_adapter``), fused at ``scale`` (``fuse_lora(lora_scale=...)``) and unloaded,
  which leaves plain UNet weights to export. diffusers only *warns* when an adapter's keys do
  not land; here every key must land on the small UNet and every LoRA layer made must be one
  of the adapter's, or the LoRA is refused (another architecture, wrong target modules). A
  LoRA that also changes the text encoder is refused too: the text encoder is shared with the
  edge, so a personalized bundle can change only the small UNet.
- **Fine-tune** (:func:`check_fine_tune`): a whole UNet folder given as the small denoiser, with
  the family's small UNet it was tuned from named as its base: both must have the same UNet
  architecture config (:func:`first_architecture_difference`).

Everything here runs before the exporter writes anything, so a refused LoRA or fine-tune
leaves no ``--out`` behind. :func:`weights_sha256` is the content hash every bundle records
as ``small_model_sha256``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError, ExportError, FamilyError
from shared.manifest import LABEL_MAX_CHARS, Personalization, check_label, sha256_file

if TYPE_CHECKING:
    from edge_server.family import Family

#: ``--lora-scale`` range: 0 turns the LoRA off (export without it), beyond 4 a LoRA is far outside
#: the range it was trained for (diffusers' examples use 0..1, trainers' previews up to ~2).
LORA_SCALE_MAX = 4.0
ADAPTER_NAME = "rise_personal"  # the adapter's name while it is loaded, before it is fused and unloaded
UNET_PREFIX = "unet."  # diffusers' prefix of a pipeline LoRA's UNet keys
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
#: Config keys that are not the architecture: where it was saved and, for ``sample_size``, a default
#: image size (the bundle's default latent size is the large UNet's).
_NOT_ARCHITECTURE = frozenset({"sample_size"})


@dataclass(frozen=True)
class PersonalizedSmall:
    """The small UNet to export in place of the family's, and what the manifest says about it."""

    unet: Any  # a UNet2DConditionModel (diffusers' classes are untyped for mypy)
    personalization: Personalization
    small_sha256: str  # weights_sha256(unet): the manifest's small_model_sha256
    layers: int  # LoRA layers fused (0 for a fine-tune)


def weights_sha256(module: Any) -> str:
    """Content hash of a module's weights: sha256 over each tensor's name, dtype, shape and bytes, in name order.

    Independent of how the weights were stored (safetensors, fp16 variant upcast on loading...):
    the same tensors give the same hash. The exporter hashes the small UNet as it exports it.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_lora_scale(scale: float) -> float:
    """``scale`` if it is finite and in (0, :data:`LORA_SCALE_MAX`]; ConfigError otherwise."""
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ConfigError(f"--lora-scale must be a finite number in (0, {LORA_SCALE_MAX:g}], got {scale!r}")
    if not 0.0 < scale <= LORA_SCALE_MAX:
        raise ConfigError(f"--lora-scale must be in (0, {LORA_SCALE_MAX:g}] (0 would export the family's own small "
                          f"UNet: leave --lora out), got {scale:g}")
    return float(scale)


def default_label(name: str) -> str:
    """A picker label from a name (a LoRA file's stem, a fine-tune's folder): trimmed, cut to a label's length."""
    label = name.strip()[:LABEL_MAX_CHARS].strip()
    return "".join(c if c.isprintable() else "_" for c in label) or "personal"


def _label(label: str | None, name: str) -> str:
    return check_label("--label", default_label(name) if label is None else label, error=ConfigError)


# ----------------------------------------------------------------------------- LoRA files


def adapter_format(keys: list[str]) -> str:
    """The key layout of a LoRA file: "kohya" (A1111 / kohya-ss), "peft" (``lora_A/lora_B``), "diffusers"
    (``.lora.down`` / ``.lora.up``, its training scripts' files) or "diffusers-peft" (both: diffusers'
    ``convert_state_dict_to_diffusers`` renames the attention layers' LoRA and leaves the others in peft's)."""
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    peft = any(".lora_A." in k or ".lora_B." in k for k in keys)
    diffusers = any(".lora.down." in k or ".lora.up." in k for k in keys)
    if peft and diffusers:
        return "diffusers-peft"
    return "peft" if peft else "diffusers"


def read_lora_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors LoRA file; ExportError if it is not safetensors or holds no LoRA."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ExportError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"LoRA file {path} is not a safetensors file ({exc}); LoRAs are read as safetensors "
                          "only (no pickle)") from exc
    if not keys:
        raise ExportError(f"LoRA file {path} holds no tensors")
    # kohya files carry a scalar ``.alpha`` per layer beside its lora_down/lora_up; every other key is LoRA's.
    stray = [k for k in keys if "lora" not in k.lower() and not k.endswith(".alpha")]
    if stray:
        raise ExportError(f"{path} is not a LoRA: {len(stray)} of its {len(keys)} tensors are not LoRA weights "
                          f"(e.g. {stray[0]!r}; a full model's weights? a fine-tuned UNet is given with --small "
                          "and --base-small)")
    return keys


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers and peft log and warn while loading an adapter; the checks below are what decide, in one line."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL + 10)  # its logger.error on a failed load too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(before)


def _first_line(exc: BaseException) -> str:
    """The telling line of a loader's error (a size mismatch names the first tensor that does not fit)."""
    text = str(exc)
    mismatch = re.search(r"size mismatch for [^\n]*", text)
    line = mismatch.group(0) if mismatch else next((s.strip() for s in text.splitlines() if s.strip()), "")
    line = line.replace(f".{ADAPTER_NAME}.", ".")  # peft's names of the loaded tensors: the adapter's own names
    return f"{type(exc).__name__}: {line[:400]}"


def _unet_state_dict(family: Family, path: Path) -> tuple[dict[str, Any], dict[str, float] | None, Any]:
    """The LoRA's UNet tensors (``unet.``-prefixed, as diffusers' pipelines read them), alphas and metadata."""
    pipeline_cls: Any = type(family.pipeline)
    # As the pipeline's load_lora_weights calls it: SDXL's passes its UNet's config (kohya's SGM block names).
    extra = {"unet_config": family.small_unet.config} if family.kind == "sdxl" else {}  # type: ignore[attr-defined]
    try:
        with _quiet_diffusers():
            state, alphas, metadata = pipeline_cls.lora_state_dict(
                str(path.parent), weight_name=path.name, use_safetensors=True, local_files_only=True,
                return_lora_metadata=True, **extra,
            )
    except Exception as exc:  # diffusers' converters raise what they meet (ValueError, KeyError...)
        raise ExportError(f"diffusers cannot read {path} as a LoRA of a {family.pipeline_class}: "
                          f"{_first_line(exc)}") from exc
    text = [k for k in state if k.startswith(TEXT_ENCODER_PREFIXES)]
    if text:
        raise ExportError(
            f"LoRA {path.name} also changes the text encoder ({len(text)} of its {len(state)} tensors, e.g. "
            f"{text[0]!r}): the text encoder is shared with the edge, so a personalized bundle can change only "
            "the small UNet (train or save the LoRA for the UNet alone)"
        )
    other = [k for k in state if not k.startswith(UNET_PREFIX)]
    if other:
        raise ExportError(f"LoRA {path.name} has tensors for neither the UNet nor the text encoder (e.g. "
                          f"{other[0]!r}; diffusers reads a pipeline LoRA's UNet keys as 'unet.*')")
    not_lora = [k for k in state if "lora" not in k]
    if not_lora:  # diffusers' own check in load_lora_weights
        raise ExportError(f"{path.name} is not a LoRA diffusers loads: tensor {not_lora[0]!r} is not a LoRA weight")
    return state, alphas, metadata


def _in_peft_layout(state: dict[str, Any]) -> dict[str, Any]:
    """The LoRA's UNet tensors by the names peft gives them once loaded (``...to_q.lora_A.weight``), unprefixed.

    Renamed with diffusers' own map (``convert_unet_state_dict_to_peft``, which leaves peft's keys as they
    are), as ``load_lora_adapter`` renames what it is given, with one difference: it picks the layout from
    the first key alone. diffusers' ``convert_state_dict_to_diffusers`` renames the attention layers' LoRA
    (``.lora.down``) and leaves the others (resnet convs, projections, feed-forward) in peft's (``lora_A``),
    so when such a file's first key is a peft one, the renamed half names no layer and is dropped with a
    warning. Renamed here first, every file reaches the loader in one layout.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft({k.removeprefix(UNET_PREFIX): v for k, v in state.items()})


def fuse_lora(family: Family, path: str | Path, scale: float = 1.0, *, label: str | None = None) -> PersonalizedSmall:
    """A copy of the family's small UNet with the LoRA at ``path`` fused in at ``scale``; the family is not changed.

    ExportError, before anything is written, for a file that is not a safetensors LoRA, a LoRA that
    also changes the text encoder, one whose tensors do not all land on the small UNet (another
    architecture or family, other target modules) or do not fit its layers (ranks, widths), and
    one whose fused weights are not finite; ConfigError for a bad ``scale`` or ``label``.
    """
    import torch
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    scale = check_lora_scale(scale)
    name = _label(label, path.stem)
    keys = read_lora_keys(path)
    state, alphas, metadata = _unet_state_dict(family, path)
    expected = _in_peft_layout(state)
    base = family.small_unet
    unet: Any = copy.deepcopy(base)
    where = f"the family's small UNet ({family.small_source})"
    try:
        with _quiet_diffusers():
            unet.load_lora_adapter({UNET_PREFIX + k: v for k, v in expected.items()}, prefix=UNET_PREFIX.rstrip("."),
                                   network_alphas=alphas, metadata=metadata, adapter_name=ADAPTER_NAME)
    except Exception as exc:  # peft: ValueError (no target module found), RuntimeError (size mismatch)...
        raise ExportError(f"LoRA {path.name} does not fit {where}: {_first_line(exc)}") from exc
    loaded = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    unplaced = sorted(set(expected) - set(loaded))
    if unplaced:
        raise ExportError(
            f"LoRA {path.name} does not fit {where}: {len(unplaced)} of its {len(expected)} tensors name no layer "
            f"of it (e.g. {unplaced[0]!r}): a LoRA for another architecture or family?"
        )
    unfilled = sorted(set(loaded) - set(expected))
    if unfilled:
        raise ExportError(f"LoRA {path.name} does not fit {where}: its layer {unfilled[0]!r} got no weights")
    for key, tensor in expected.items():
        if tuple(loaded[key].shape) != tuple(tensor.shape):  # set_peft_model_state_dict raises first, as a rule
            raise ExportError(f"LoRA {path.name} does not fit {where}: {key} has shape {list(tensor.shape)}, the "
                              f"layer takes {list(loaded[key].shape)} (another rank or width)")
    layers = len({k.split(".lora_")[0] for k in expected})
    try:
        with _quiet_diffusers():
            unet.fuse_lora(lora_scale=scale, safe_fusing=True, adapter_names=[ADAPTER_NAME])
    except ValueError as exc:  # safe_fusing: the fused weights hold NaN
        raise ExportError(f"LoRA {path.name} cannot be fused into {where}: {_first_line(exc)}") from exc
    unet.unload_lora()
    unet.eval().requires_grad_(False)
    fused, original = unet.state_dict(), base.state_dict()  # type: ignore[attr-defined]  # diffusers placeholder
    if sorted(fused) != sorted(original):  # unload_lora leaves the plain layers: a change here is a diffusers bug
        raise ExportError(f"fusing LoRA {path.name} changed the small UNet's parameter names")
    if not all(bool(torch.isfinite(t).all()) for t in fused.values()):
        raise ExportError(f"LoRA {path.name} at scale {scale:g} gives non-finite small-UNet weights")
    personalization = Personalization(
        kind="lora", label=name, base_small_model=family.small_source, base_small_sha256=weights_sha256(base),
        adapter_file=path.name, adapter_sha256=sha256_file(path), adapter_scale=scale,
        adapter_format=adapter_format(keys),
    )
    return PersonalizedSmall(unet, personalization, weights_sha256(unet), layers)


# ----------------------------------------------------------------------------- fine-tunes


def first_architecture_difference(base: dict[str, Any], tuned: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first UNet constructor argument two UNet configs disagree on, as (key, base value, tuned value), or None.

    Keys absent from a config take ``UNet2DConditionModel``'s default (configs written by other
    diffusers versions list different keys); lists and tuples compare alike; the class comes first.
    """
    from diffusers import UNet2DConditionModel

    classes = (base.get("_class_name", "UNet2DConditionModel"), tuned.get("_class_name", "UNet2DConditionModel"))
    if classes[0] != classes[1]:
        return "_class_name", classes[0], classes[1]

    def norm(value: Any) -> Any:
        return [norm(v) for v in value] if isinstance(value, list | tuple) else value

    for key, parameter in inspect.signature(UNet2DConditionModel.__init__).parameters.items():
        if key == "self" or key in _NOT_ARCHITECTURE or parameter.kind is not parameter.POSITIONAL_OR_KEYWORD:
            continue
        default = None if parameter.default is parameter.empty else parameter.default
        a, b = norm(base.get(key, default)), norm(tuned.get(key, default))
        if a != b:
            return key, a, b
    return None


def check_fine_tune(family: Family, base_small: str, *, label: str | None = None) -> PersonalizedSmall:
    """The family's small UNet (loaded from ``--small``) recorded as a full fine-tune of ``base_small``.

    FamilyError if the base is not found or the two UNets differ in architecture (naming the first
    config key that differs); ConfigError if both name the same folder. The base is loaded to hash it.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from edge_server.family import detect_variant, resolve_small_unet_folder

    tuned_folder = resolve_small_unet_folder(family.folder, family.small_source)
    base_folder = resolve_small_unet_folder(family.folder, base_small)
    if tuned_folder.resolve() == base_folder.resolve():
        raise ConfigError(f"--small and --base-small both name {base_folder}: --small is the fine-tune, "
                          "--base-small the family's small UNet it was tuned from")
    difference = first_architecture_difference(_unet_config(base_folder), _unet_config(tuned_folder))
    if difference is not None:
        key, was, now = difference
        raise FamilyError(f"fine-tune {family.small_source} does not have the architecture of its base {base_small}: "
                          f"{key} is {now!r} in the fine-tune, {was!r} in the base (a full fine-tune keeps its "
                          "base's UNet config; a new architecture is a new family member)")
    try:
        base: Any = UNet2DConditionModel.from_pretrained(
            base_folder, torch_dtype=torch.float32, local_files_only=True,
            variant=detect_variant([base_folder], None),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FamilyError(f"cannot load the base small UNet {base_small}: {type(exc).__name__}: {exc}") from exc
    personalization = Personalization(
        kind="fine_tune", label=_label(label, _fine_tune_name(tuned_folder)), base_small_model=base_small,
        base_small_sha256=weights_sha256(base),
    )
    return PersonalizedSmall(family.small_unet, personalization, weights_sha256(family.small_unet), 0)


def _unet_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FamilyError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    if not isinstance(config, dict):
        raise FamilyError(f"{folder / 'config.json'} is not a JSON object")
    return config


def _fine_tune_name(folder: Path) -> str:
    """A fine-tune's name for its default label: its folder's, or its pipeline folder's for ``<pipeline>/unet``."""
    return folder.parent.name if folder.name == "unet" and (folder.parent / "model_index.json").is_file() \
        else folder.name
