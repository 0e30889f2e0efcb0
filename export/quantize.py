"""Lower-precision forms of an exported fp32 graph: fp16 weights, or dynamic int8.

Both keep every graph input and output float32, so the device feeds every bundle the same
arrays whatever its dtype. fp16 uses the converter that ships with onnxruntime
(``onnxruntime.transformers.float16``); int8 uses ``onnxruntime.quantization.quantize_dynamic``
(weights int8 ahead of time, activations quantized at run time: no calibration data needed).
A quantized graph is only kept if onnxruntime's CPU execution provider can load it (not
every ``*Integer`` kernel exists for every type combination); otherwise we try again with
MatMul only, and as a last resort keep the graph fp32 and say so in the manifest.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

from shared.errors import ExportError

ONNX_MODEL_NAME = "model.onnx"
# Protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1 << 30


@dataclass
class QuantizeResult:
    """What happened to one graph under ``--quantize int8``."""

    quantized: bool
    op_types: list[str] = field(default_factory=list)  # op types the quantizer added (MatMulInteger, ...)
    note: str | None = None


def model_bytes(path: Path) -> int:
    """Size of a graph on disk, including its external data files."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.name))


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """The external data files a graph's tensors point at (relative to the graph's folder)."""
    # _get_all_tensors walks initializers, Constant attributes and subgraphs alike (onnx has no public twin).
    return {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}


def _is_large(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return bool(external_data_files(model)) or model_bytes(path) > EXTERNAL_DATA_THRESHOLD


def save_model(model: onnx.ModelProto, path: Path, *, large: bool) -> None:
    """Save a graph, its weights in ``<name>_data`` beside it when large (optimum's convention)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if large:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=path.name + "_data", size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def session_error(path: Path) -> str | None:
    """None if onnxruntime's CPU EP can load the graph, else the first line of its error."""
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (non-exported) exception types
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def convert_to_fp16(src: Path, dst: Path) -> None:
    """Write ``src`` with fp16 weights and compute to ``dst``; inputs/outputs stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    large = _is_large(src)
    with tempfile.TemporaryDirectory() as tmp:
        if large:
            # In-memory shape inference fails past 2 GiB; the path-based one streams from disk.
            inferred = Path(tmp) / ONNX_MODEL_NAME
            onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
            # The inferred copy keeps the external data references, relative to the source graph's folder.
            model = onnx.load(str(inferred), load_external_data=False)
            onnx.load_external_data_for_model(model, str(src.parent))
        else:
            model = onnx.load(str(src))
        try:
            model16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)
        except Exception as exc:
            raise ExportError(f"fp16 conversion of {src} failed: {exc}") from exc
    save_model(model16, dst, large=large)
    error = session_error(dst)
    if error is not None:
        raise ExportError(f"the fp16 form of {src.parent.name} does not load in onnxruntime: {error}")


# Tried in order: everything the dynamic quantizer knows (Conv, MatMul, Gather, ...), then MatMul only.
_INT8_ATTEMPTS: tuple[tuple[str, list[str] | None], ...] = (("all", None), ("MatMul/Gemm only", ["MatMul", "Gemm"]))


def quantize_int8(src: Path, dst: Path) -> QuantizeResult:
    """Write a dynamically int8-quantized ``src`` to ``dst``, or ``src`` itself if none runs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = _is_large(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    source_ops = {node.op_type for node in onnx.load(str(src), load_external_data=False).graph.node}
    failures: list[str] = []
    root_logger = logging.getLogger()
    for label, op_types in _INT8_ATTEMPTS:
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on every call
        try:
            quantize_dynamic(
                src, dst, op_types_to_quantize=op_types, weight_type=QuantType.QInt8,
                use_external_data_format=large,
            )
        except Exception as exc:
            failures.append(f"{label}: quantizer failed: {exc}")
            continue
        finally:
            root_logger.setLevel(level)
        error = session_error(dst)
        if error is None:
            new_ops = {node.op_type for node in onnx.load(str(dst), load_external_data=False).graph.node}
            note = None if not failures else f"int8 {label}; " + "; ".join(failures)
            return QuantizeResult(quantized=True, op_types=sorted(new_ops - source_ops), note=note)
        failures.append(f"{label}: onnxruntime CPU cannot run it: {error}")
        for leftover in dst.parent.glob(dst.name + "*"):
            leftover.unlink()
    copy_graph(src, dst)
    return QuantizeResult(quantized=False, note="kept fp32, no int8 form runs: " + "; ".join(failures))


def copy_graph(src: Path, dst: Path) -> None:
    """Copy a graph and its external data files (everything named ``<model>.onnx*`` or listed as data)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=False)
    names = {src.name} | external_data_files(model)
    for name in sorted(names):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ExportError(f"graph {src} points at external data outside its folder: {name}")
        target = dst.parent / (dst.name if name == src.name else name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src.parent / name, target)
