"""ONNX Runtime sessions for a device bundle: small UNet, VAE decoder, text encoder.

The bundle's files are checked against the manifest's sha256 before any is loaded, so a
tampered graph is refused rather than run. Inputs are fed in the dtypes the graphs
declare (an fp16 or int8 bundle keeps float32 inputs and outputs, see export/quantize.py).
No torch here: this is the device.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from shared.errors import BundleError
from shared.manifest import UNCOND_TENSOR, BundleManifest, load_manifest, verify_bundle_files

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OnnxGraph:
    """One inference session and the dtypes of its inputs."""

    def __init__(self, path: Path, options: ort.SessionOptions, providers: list[str]) -> None:
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for unreadable graphs
            raise BundleError(f"cannot load ONNX graph {path}: {exc}") from exc
        self.input_types = {i.name: _ORT_TO_NUMPY.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, **inputs: np.ndarray) -> list[np.ndarray]:
        feed = {name: np.asarray(value).astype(self.input_types[name], copy=False) for name, value in inputs.items()}
        outputs: list[np.ndarray] = self.session.run(None, feed)
        return outputs


class DeviceBundle:
    """A verified bundle with lazily created sessions (the text encoder is only needed offline)."""

    def __init__(self, folder: str | Path, *, verify: bool = True, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        self.folder = Path(folder)
        self.manifest: BundleManifest = load_manifest(self.folder)
        if verify:
            verify_bundle_files(self.folder, self.manifest)
        self._options = ort.SessionOptions()
        if threads:
            self._options.intra_op_num_threads = threads
        self._providers = providers or ["CPUExecutionProvider"]
        self._graphs: dict[str, OnnxGraph] = {}
        self._graphs_lock = threading.Lock()  # sessions are built lazily, possibly from worker threads
        uncond = load_file(str(self.folder / self.manifest.uncond_embedding))
        if UNCOND_TENSOR not in uncond:
            raise BundleError(f"{self.manifest.uncond_embedding} has no {UNCOND_TENSOR!r} tensor")
        self.uncond = uncond[UNCOND_TENSOR].astype(np.float32)
        self._tokenizer: Tokenizer | None = None

    @property
    def family_id(self) -> str:
        return self.manifest.family_id

    def graph(self, name: str) -> OnnxGraph:
        """The session for ``name``, built on first use (thread-safe; ORT sessions may run concurrently)."""
        with self._graphs_lock:
            if name not in self._graphs:
                if name not in self.manifest.graphs:
                    raise BundleError(f"bundle {self.folder} has no {name} graph")
                self._graphs[name] = OnnxGraph(self.folder / self.manifest.graphs[name].path, self._options,
                                               self._providers)
            return self._graphs[name]

    def unet(self, sample: np.ndarray, timestep: float, encoder_hidden_states: np.ndarray) -> np.ndarray:
        """Small UNet noise prediction for a (B, C, H, W) sample at one timestep."""
        graph = self.graph("unet")
        # optimum exports the timestep as a scalar; a graph exported with a batch axis gets one per sample
        t = np.asarray(timestep) if graph.input_ranks["timestep"] == 0 else np.full(sample.shape[0], timestep)
        return graph.run(sample=sample, timestep=t, encoder_hidden_states=encoder_hidden_states)[0].astype(np.float32)

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """Text embeddings (B, L, D) on the device, for generating without the edge."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(str(self.folder / self.manifest.tokenizer.tokenizer_json))
        # Padding and truncation to text_max_length are baked into tokenizer.json at export.
        ids = np.array([enc.ids for enc in self._tokenizer.encode_batch(prompts)], dtype=np.int64)
        return self.graph("text_encoder").run(input_ids=ids)[0].astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE-decode latents to uint8 images (B, H, W, 3), with diffusers' scaling and rounding."""
        scaled = latents / np.float32(self.manifest.vae_scaling_factor) + np.float32(self.manifest.vae_shift_factor)
        image = self.graph("vae_decoder").run(latent_sample=scaled.astype(np.float32))[0].astype(np.float32)
        pixels = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        return (pixels * 255).round().astype(np.uint8)
