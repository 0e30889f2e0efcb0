"""Check every exported graph against the PyTorch module it came from.

Each graph runs in onnxruntime (CPU) and in PyTorch (float32) on the same seeded random
inputs at two shapes: batch 1 at the family's default latent size and batch 2 at a second
latent size for the UNet and the VAE decoder; batch 1 (real tokenized prompts) and batch 2
(random ids) at the text length the edge uses for the text encoders. A UNet's extra inputs
are fed when the graph has them: SDXL's ``text_embeds`` (B, P) and ``time_ids`` (B, 6) (its
``added_cond_kwargs`` in PyTorch), an LCM-distilled UNet's ``timestep_cond``. A text encoder
is run with ``output_hidden_states=True`` and every output of the graph is compared
(``last_hidden_state``, ``pooler_output`` / ``text_embeds``, each ``hidden_states.<i>``: the
SDXL device reads the penultimate one). The error of a check is the max-abs difference over
all compared outputs; it must not exceed

    tolerance = RTOL[graph dtype] * max(1, max |PyTorch output|)

i.e. a tolerance relative to the output's scale (a VAE decoder image is ~[-1, 1], CLIP
hidden states reach tens). The relative tolerances, against the fp32 PyTorch module:

- fp32 ``1e-4``: the same arithmetic in another order; measured ~1-3e-6 on the tiny family.
- fp16 ``2e-2``: fp16 keeps 11 significant bits (~5e-4 per op) and the error compounds over
  tens of layers; measured 1.5-4e-3 relative on the tiny family.
- int8 ``1.5e-1``: dynamic quantization rounds weights and activations to 256 levels per
  tensor; measured 2-6e-2 relative on the tiny family.

Past its tolerance, or on a NaN/inf, a graph fails the export with an ExportError naming
the graph, the shapes, the error and the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from shared.errors import ExportError
from shared.manifest import TensorSpec, ValidationCheck

RTOL: dict[str, float] = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1.5e-1}

_ORT_TO_NUMPY = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool",
}
# Inputs each graph must have (optimum's names) and the outputs we can compare with PyTorch.
REQUIRED_INPUTS = {
    "unet": ("sample", "timestep", "encoder_hidden_states"),
    "vae_decoder": ("latent_sample",),
    "text_encoder": ("input_ids",),
    "text_encoder_2": ("input_ids",),
}
PRIMARY_OUTPUT = {
    "unet": "out_sample", "vae_decoder": "sample", "text_encoder": "last_hidden_state",
    "text_encoder_2": "last_hidden_state",
}
# The UNet inputs this module can feed; any other makes the graph unvalidatable (ExportError).
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "timestep_cond", "text_embeds", "time_ids")
# One check: the graph's feeds, and the PyTorch run that gives the reference outputs.
_Case = tuple[dict[str, np.ndarray], Callable[[], dict[str, torch.Tensor]]]


@dataclass
class GraphValidation:
    """The checks of one graph (all passed)."""

    name: str
    rtol: float
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    checks: list[ValidationCheck] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max(c.max_abs_error for c in self.checks)


@dataclass(frozen=True)
class ValidationShapes:
    """The sizes the checks use; from the family unless a caller overrides them."""

    latent_sizes: tuple[int, int]  # latent side for check 1 (batch 1) and check 2 (batch 2)
    text_length: int
    vae_scale_factor: int = 8  # pixels per latent side: SDXL's time_ids are image sizes in pixels


def default_shapes(sample_size: int, up_factor: int, text_length: int, vae_scale_factor: int = 8) -> ValidationShapes:
    """The default latent side, and a second one (half, or one step up) the UNet accepts."""
    second = sample_size // 2
    if second < up_factor or second % up_factor or second == sample_size:
        second = sample_size + up_factor
    return ValidationShapes(latent_sizes=(sample_size, second), text_length=text_length,
                            vae_scale_factor=vae_scale_factor)


def session(path: Path) -> ort.InferenceSession:
    """An onnxruntime CPU session for a graph."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def tensor_specs(args: list[Any]) -> list[TensorSpec]:
    """onnxruntime's NodeArg list as manifest TensorSpecs (dynamic axes keep their names)."""
    return [
        TensorSpec(
            name=a.name,
            dtype=_ORT_TO_NUMPY.get(a.type, a.type),
            shape=[d if isinstance(d, (int, str)) else "?" for d in a.shape],
        )
        for a in args
    ]


def check_io_contract(name: str, sess: ort.InferenceSession, required_inputs: tuple[str, ...] = (),
                      required_outputs: tuple[str, ...] = ()) -> None:
    """Optimum's input names (and ``required_*``, the family's) and float32 float I/O, else ExportError."""
    inputs = {a.name: a for a in sess.get_inputs()}
    missing = [n for n in REQUIRED_INPUTS[name] if n not in inputs]
    if missing:
        raise ExportError(
            f"graph {name} lacks input(s) {', '.join(missing)} (has {', '.join(inputs)}): "
            "not an optimum export of a Stable Diffusion pipeline"
        )
    missing = [n for n in required_inputs if n not in inputs]
    if missing:
        raise ExportError(
            f"graph {name} lacks input(s) {', '.join(missing)} (has {', '.join(inputs)}) that this family's "
            "denoiser reads: not an export of this family's pipeline"
        )
    outputs = [a.name for a in sess.get_outputs()]
    missing = [n for n in (PRIMARY_OUTPUT[name], *required_outputs) if n not in outputs]
    if missing:
        raise ExportError(f"graph {name} lacks output(s) {', '.join(missing)} (has {', '.join(outputs)})")
    for arg in list(sess.get_inputs()) + list(sess.get_outputs()):
        if arg.type in ("tensor(float16)", "tensor(bfloat16)", "tensor(double)"):
            raise ExportError(
                f"graph {name} has {arg.type} {arg.name}: bundle graphs take and return float32 "
                "(export fp32 and let rise-export --dtype fp16 convert the weights)"
            )


def _static_dim(arg: Any, axis: int, fallback: int) -> int:
    """The graph input's size on ``axis`` if the export fixed it, else ``fallback``."""
    dim = arg.shape[axis] if len(arg.shape) > axis else None
    return dim if isinstance(dim, int) else fallback


def _unet_cases(sess: ort.InferenceSession, unet: torch.nn.Module, shapes: ValidationShapes,
                rng: np.random.Generator) -> list[_Case]:
    cfg: Any = unet.config  # diffusers' config object; nn.Module.__getattr__ types it Tensor | Module
    spec = {a.name: a for a in sess.get_inputs()}
    unknown = [n for n in spec if n not in UNET_INPUTS]
    if unknown:
        raise ExportError(f"graph unet has input(s) {', '.join(unknown)} this exporter cannot validate")
    added = [n for n in ("text_embeds", "time_ids") if n in spec]
    if len(added) == 1:
        raise ExportError(f"graph unet has input {added[0]} without its SDXL twin (text_embeds and time_ids "
                          "go together): this exporter cannot validate it")
    cases: list[_Case] = []
    for batch, size in zip((1, 2), shapes.latent_sizes, strict=True):
        sample = rng.standard_normal((batch, cfg.in_channels, size, size), dtype=np.float32)
        hidden = rng.standard_normal((batch, shapes.text_length, cfg.cross_attention_dim), dtype=np.float32)
        t = float(rng.integers(1, 1000))
        t_spec = spec["timestep"]
        t_dtype = np.dtype(_ORT_TO_NUMPY.get(t_spec.type, "float32"))
        timestep = np.array(t, dtype=t_dtype) if len(t_spec.shape) == 0 else np.full((batch,), t, dtype=t_dtype)
        feeds: dict[str, np.ndarray] = {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden}
        kwargs: dict[str, Any] = {}
        if "timestep_cond" in spec:  # LCM-distilled UNets embed the guidance scale here
            cond = rng.standard_normal((batch, cfg.time_cond_proj_dim), dtype=np.float32)
            feeds["timestep_cond"] = cond
            kwargs["timestep_cond"] = torch.from_numpy(cond)
        if added:  # SDXL: the pooled text embedding and the size conditioning (pixels), as the pipeline builds it
            width = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
            pooled = rng.standard_normal((batch, _static_dim(spec["text_embeds"], 1, width)), dtype=np.float32)
            pixels = size * shapes.vae_scale_factor
            ids = np.array([pixels, pixels, 0, 0, pixels, pixels], dtype=np.float32)
            time_ids = np.tile(ids, (batch, 1))
            feeds["text_embeds"], feeds["time_ids"] = pooled, time_ids
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(pooled),
                                           "time_ids": torch.from_numpy(time_ids)}

        def run(feeds: dict[str, np.ndarray] = feeds, kwargs: dict[str, Any] = kwargs) -> dict[str, torch.Tensor]:
            out = unet(
                torch.from_numpy(feeds["sample"]), torch.from_numpy(np.asarray(feeds["timestep"])),
                torch.from_numpy(feeds["encoder_hidden_states"]), **kwargs,
            )
            return {"out_sample": out.sample}

        cases.append((feeds, run))
    return cases


def _vae_decoder_cases(sess: ort.InferenceSession, vae: torch.nn.Module, shapes: ValidationShapes,
                       rng: np.random.Generator) -> list[_Case]:
    cfg: Any = vae.config  # diffusers' config object; nn.Module.__getattr__ types it Tensor | Module
    cases: list[_Case] = []
    for batch, size in zip((1, 2), shapes.latent_sizes, strict=True):
        latent = rng.standard_normal((batch, cfg.latent_channels, size, size), dtype=np.float32)

        def run(latent: np.ndarray = latent) -> dict[str, torch.Tensor]:
            decoded = vae.decode(torch.from_numpy(latent))  # type: ignore[operator]  # AutoencoderKL's, untyped
            return {"sample": decoded.sample}

        cases.append(({"latent_sample": latent}, run))
    return cases


def _text_encoder_cases(sess: ort.InferenceSession, text_encoder: torch.nn.Module, shapes: ValidationShapes,
                        rng: np.random.Generator, tokenizer: Any = None) -> list[_Case]:
    cfg: Any = text_encoder.config  # transformers' config object; nn.Module.__getattr__ types it Tensor | Module
    length = shapes.text_length
    if tokenizer is not None:
        first = np.asarray(
            tokenizer(["a photo of a cat"], padding="max_length", max_length=length, truncation=True).input_ids,
            dtype=np.int64,
        )
    else:
        first = rng.integers(0, cfg.vocab_size, (1, length), dtype=np.int64)
    second = rng.integers(0, cfg.vocab_size, (2, length), dtype=np.int64)
    ids_type = {a.name: a.type for a in sess.get_inputs()}["input_ids"]
    ids_dtype = np.dtype(_ORT_TO_NUMPY.get(ids_type, "int64"))  # optimum may export int32 ids
    cases: list[_Case] = []
    for ids in (first.astype(ids_dtype), second.astype(ids_dtype)):

        def run(ids: np.ndarray = ids) -> dict[str, torch.Tensor]:
            out = text_encoder(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
            reference = {"last_hidden_state": out.last_hidden_state}
            for key in ("pooler_output", "text_embeds"):  # CLIPTextModel / CLIPTextModelWithProjection
                value = getattr(out, key, None)
                if value is not None:
                    reference[key] = value
            for i, hidden in enumerate(out.hidden_states or ()):  # the embeddings, then each layer's output
                reference[f"hidden_states.{i}"] = hidden
            return reference

        cases.append(({"input_ids": ids}, run))
    return cases


@torch.no_grad()
def validate_graph(
    name: str,
    path: Path,
    module: torch.nn.Module,
    graph_dtype: str,
    shapes: ValidationShapes,
    *,
    seed: int = 0,
    tokenizer: Any = None,
    required_inputs: tuple[str, ...] = (),
    required_outputs: tuple[str, ...] = (),
) -> GraphValidation:
    """Compare graph ``name`` at ``path`` with ``module`` at two shapes; ExportError past tolerance.

    ``required_inputs`` / ``required_outputs``: names the family's device path needs beyond
    optimum's SD1.x ones (SDXL's ``text_embeds``, an encoder's penultimate hidden state, ...).
    """
    if graph_dtype not in RTOL:
        raise ExportError(f"no tolerance for graph dtype {graph_dtype!r}")
    rtol = RTOL[graph_dtype]
    try:
        sess = session(path)
    except Exception as exc:
        raise ExportError(f"graph {name} does not load in onnxruntime: {exc}") from exc
    check_io_contract(name, sess, required_inputs, required_outputs)
    rng = np.random.default_rng(seed)
    if name == "unet":
        cases = _unet_cases(sess, module, shapes, rng)
    elif name == "vae_decoder":
        cases = _vae_decoder_cases(sess, module, shapes, rng)
    elif name in ("text_encoder", "text_encoder_2"):
        cases = _text_encoder_cases(sess, module, shapes, rng, tokenizer)
    else:
        raise ExportError(f"unknown graph {name!r}")
    output_names = [a.name for a in sess.get_outputs()]
    result = GraphValidation(
        name=name, rtol=rtol, inputs=tensor_specs(sess.get_inputs()), outputs=tensor_specs(sess.get_outputs())
    )
    for feeds, run in cases:
        shape_text = ", ".join(f"{k}={tuple(v.shape)}" for k, v in feeds.items() if v.ndim)
        try:
            got = dict(zip(output_names, sess.run(None, feeds), strict=True))
        except Exception as exc:
            raise ExportError(f"graph {name} fails to run at {shape_text}: {exc}") from exc
        reference = {k: v.float().numpy() for k, v in run().items()}
        unchecked = [n for n in output_names if n not in reference]
        if unchecked:
            raise ExportError(f"graph {name} has output(s) {', '.join(unchecked)} PyTorch does not give: "
                              "this exporter cannot validate them")
        error, scale = 0.0, 1.0
        for out_name, ref in reference.items():
            if out_name not in got:
                continue  # e.g. a text encoder exported without pooler_output or hidden states
            value = got[out_name]
            if value.shape != ref.shape:
                raise ExportError(
                    f"graph {name} output {out_name} has shape {value.shape} at {shape_text}, "
                    f"PyTorch gives {ref.shape}"
                )
            if not np.all(np.isfinite(value)):
                raise ExportError(f"graph {name} ({graph_dtype}) output {out_name} has NaN/inf at {shape_text}")
            error = max(error, float(np.max(np.abs(value.astype(np.float64) - ref))))
            scale = max(scale, float(np.max(np.abs(ref))))
        tolerance = rtol * scale
        if not error <= tolerance:
            raise ExportError(
                f"graph {name} ({graph_dtype}) disagrees with PyTorch at {shape_text}: "
                f"max-abs error {error:.3g} > tolerance {tolerance:.3g} (rtol {rtol:g} x output scale {scale:.3g})"
            )
        result.checks.append(
            ValidationCheck(
                shapes={k: list(v.shape) for k, v in feeds.items()},
                max_abs_error=error, output_scale=scale, tolerance=tolerance,
            )
        )
    return result
