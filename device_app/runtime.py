"""ONNX Runtime sessions for a device bundle: small UNet, VAE decoder, text encoder(s).

The bundle's files are checked against the manifest's sha256 before any is loaded, so a
tampered graph is refused rather than run. Inputs are fed in the dtypes the graphs
declare (an fp16 or int8 bundle keeps float32 inputs and outputs, see export/quantize.py).

An SDXL bundle (``family_kind`` "sdxl") has a second text encoder and tokenizer and a UNet
that also takes ``text_embeds`` and ``time_ids``; an LCM-distilled UNet (``guidance``
"embedding") takes ``timestep_cond``. The UNet graph's inputs must be exactly the ones the
manifest says the device feeds, else the bundle is refused (:class:`BundleError`) before a step runs.
No torch here: this is the device.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from shared.demo_grammar.understanding import PromptReading, read_prompt_as
from shared.errors import BundleError
from shared.manifest import (
    SDXL_GRAPH,
    UNCOND_POOLED_TENSOR,
    UNCOND_TENSOR,
    BundleManifest,
    TokenizerInfo,
    load_manifest,
    verify_bundle_files,
)

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
#: The UNet inputs every bundle feeds; ``added_cond_names`` and ``timestep_cond`` come on top.
UNET_BASE_INPUTS = ("sample", "timestep", "encoder_hidden_states")
TIMESTEP_COND = "timestep_cond"
#: What optimum names a text encoder's outputs (``output_hidden_states``: one per layer, embeddings first).
LAST_HIDDEN_STATE = "last_hidden_state"
POOLED_TEXT_EMBEDS = "text_embeds"
_HIDDEN_STATE = re.compile(r"hidden_states\.(\d+)")


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

    def run_named(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`run`, with the outputs by name."""
        return dict(zip(self.output_names, self.run(**inputs), strict=True))


def expected_unet_inputs(manifest: BundleManifest) -> tuple[str, ...]:
    """The UNet inputs the device feeds for this manifest: the base three, the added conditioning, timestep_cond."""
    extra = tuple(manifest.added_cond_names) + ((TIMESTEP_COND,) if manifest.guidance == "embedding" else ())
    return UNET_BASE_INPUTS + extra


def check_unet_inputs(manifest: BundleManifest, graph_inputs: Collection[str], where: str) -> None:
    """BundleError naming the first UNet input the device would not feed, or would feed but the graph lacks."""
    expected = expected_unet_inputs(manifest)
    unfed = [name for name in graph_inputs if name not in expected]
    if unfed:
        raise BundleError(
            f"{where}: unet input {unfed[0]!r} is not one the device feeds for a {manifest.family_kind} bundle with "
            f"{manifest.guidance!r} guidance ({', '.join(expected)})"
        )
    lacking = [name for name in expected if name not in graph_inputs]
    if lacking:
        why = "added_cond_names" if lacking[0] in manifest.added_cond_names else "guidance"
        if lacking[0] in UNET_BASE_INPUTS:
            why = "every bundle"
        raise BundleError(f"{where}: the unet graph lacks input {lacking[0]!r}, which the manifest's {why} "
                          "says it takes")


def penultimate_hidden_state(outputs: Mapping[str, np.ndarray], graph: str) -> np.ndarray:
    """``hidden_states[-2]`` of a text encoder exported with its hidden states (SDXL's conditioning layer)."""
    layers = {int(m.group(1)): arr for name, arr in outputs.items() if (m := _HIDDEN_STATE.fullmatch(name))}
    if len(layers) < 2 or sorted(layers) != list(range(len(layers))):
        raise BundleError(f"{graph} graph has no hidden_states.0..N outputs: an sdxl bundle needs the "
                          "penultimate layer (export it with output_hidden_states)")
    return layers[len(layers) - 2]


class DeviceBundle:
    """A verified bundle with lazily created sessions (the text encoders are only needed offline)."""

    def __init__(self, folder: str | Path, *, verify: bool = True, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        self.folder = Path(folder)
        self.manifest: BundleManifest = load_manifest(self.folder)
        if verify:
            verify_bundle_files(self.folder, self.manifest)
        unet_entry = self.manifest.graphs["unet"]
        if unet_entry.inputs:  # the exporter records the graph's inputs: refuse a mismatch before any session
            check_unet_inputs(self.manifest, [spec.name for spec in unet_entry.inputs], f"bundle {self.folder}")
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
        #: SDXL: the pooled unconditional embedding (1, P); None for SD bundles.
        self.uncond_pooled: np.ndarray | None = None
        if self.is_sdxl:
            if UNCOND_POOLED_TENSOR not in uncond:
                raise BundleError(f"{self.manifest.uncond_embedding} has no {UNCOND_POOLED_TENSOR!r} tensor, "
                                  "which an sdxl bundle needs")
            pooled = uncond[UNCOND_POOLED_TENSOR].astype(np.float32)
            if list(pooled.shape) != self.manifest.uncond_pooled_shape:
                raise BundleError(f"{self.manifest.uncond_embedding}: {UNCOND_POOLED_TENSOR!r} has shape "
                                  f"{list(pooled.shape)}, the manifest says {self.manifest.uncond_pooled_shape}")
            self.uncond_pooled = pooled
        self._tokenizers: dict[str, Tokenizer] = {}

    @property
    def family_id(self) -> str:
        return self.manifest.family_id

    @property
    def is_sdxl(self) -> bool:
        return self.manifest.family_kind == "sdxl"

    @property
    def prompt_grammar(self) -> str | None:
        """The grammar the family's prompts follow (the manifest's ``prompt_grammar``); None: free text."""
        return self.manifest.prompt_grammar

    def read_prompt(self, text: str, seed: int) -> PromptReading | None:
        """How this bundle's family reads ``text`` for ``seed`` (None: a free-text family, encode ``text`` as is).

        Encode the reading's ``prompt``, show its ``message``; a reading with no ``scene`` understood
        nothing, and is refused with that message rather than drawn as a blank picture.
        """
        return read_prompt_as(self.prompt_grammar, text, seed, max_words=self.manifest.text_max_length - 2)

    def graph(self, name: str) -> OnnxGraph:
        """The session for ``name``, built on first use (thread-safe; ORT sessions may run concurrently)."""
        with self._graphs_lock:
            if name not in self._graphs:
                if name not in self.manifest.graphs:
                    raise BundleError(f"bundle {self.folder} has no {name} graph")
                graph = OnnxGraph(self.folder / self.manifest.graphs[name].path, self._options, self._providers)
                if name == "unet":
                    check_unet_inputs(self.manifest, list(graph.input_types), f"bundle {self.folder}")
                self._graphs[name] = graph
            return self._graphs[name]

    def unet(self, sample: np.ndarray, timestep: float, encoder_hidden_states: np.ndarray, *,
             added: Mapping[str, np.ndarray] | None = None, timestep_cond: np.ndarray | None = None) -> np.ndarray:
        """Small UNet noise prediction for a (B, C, H, W) sample at one timestep.

        ``added``: the extra conditioning by graph input name (SDXL: ``text_embeds`` (B, P), ``time_ids``
        (B, 6)), one row per sample; ``timestep_cond``: an LCM-distilled UNet's guidance embedding (B, D).
        """
        graph = self.graph("unet")
        # optimum exports the timestep as a scalar; a graph exported with a batch axis gets one per sample
        t = np.asarray(timestep) if graph.input_ranks["timestep"] == 0 else np.full(sample.shape[0], timestep)
        feed = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states}
        feed.update(added or {})
        if timestep_cond is not None:
            feed[TIMESTEP_COND] = timestep_cond
        missing = [name for name in graph.input_types if name not in feed]
        extra = [name for name in feed if name not in graph.input_types]
        if missing or extra:
            what = f"needs input {missing[0]!r}, which was not given" if missing else f"has no input {extra[0]!r}"
            raise BundleError(f"bundle {self.folder}: the unet graph {what}")
        return graph.run(**feed)[0].astype(np.float32)

    def _tokenizer(self, info: TokenizerInfo) -> Tokenizer:
        tokenizer = self._tokenizers.get(info.tokenizer_json)
        if tokenizer is None:
            tokenizer = Tokenizer.from_file(str(self.folder / info.tokenizer_json))
            self._tokenizers[info.tokenizer_json] = tokenizer
        return tokenizer

    def _token_ids(self, info: TokenizerInfo, prompts: list[str]) -> np.ndarray:
        # Padding and truncation to the encoder's max length are baked into tokenizer.json at export.
        return np.array([enc.ids for enc in self._tokenizer(info).encode_batch(prompts)], dtype=np.int64)

    def prompt_is_cut(self, text: str) -> bool:
        """Whether the text encoder reads less than all of ``text`` (``text_max_length`` tokens, start and end
        included): what it would leave out is worth a word to the user."""
        return bool(self._tokenizer(self.manifest.tokenizer).encode(text).overflowing)

    def encode_conditioning(self, prompts: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The prompts' conditioning as the family's pipeline computes it: embeddings (B, L, D) and added inputs.

        SD: the text encoder's last hidden state, no added inputs. SDXL: both encoders' penultimate
        hidden states side by side (B, L, D1 + D2) and ``{"text_embeds": ...}``, the second encoder's
        pooled projection (B, P) (``time_ids`` depend on the image size: the caller adds them).
        """
        first = self.graph("text_encoder").run_named(input_ids=self._token_ids(self.manifest.tokenizer, prompts))
        if not self.is_sdxl:
            embeds = first.get(LAST_HIDDEN_STATE, next(iter(first.values())))
            return embeds.astype(np.float32), {}
        assert self.manifest.tokenizer_2 is not None  # the manifest's check: an sdxl bundle has tokenizer_2
        second = self.graph(SDXL_GRAPH).run_named(input_ids=self._token_ids(self.manifest.tokenizer_2, prompts))
        if POOLED_TEXT_EMBEDS not in second:
            raise BundleError(f"{SDXL_GRAPH} graph has no {POOLED_TEXT_EMBEDS!r} output (the pooled projection)")
        embeds = np.concatenate(
            [penultimate_hidden_state(first, "text_encoder"), penultimate_hidden_state(second, SDXL_GRAPH)], axis=-1
        )
        return embeds.astype(np.float32), {POOLED_TEXT_EMBEDS: second[POOLED_TEXT_EMBEDS].astype(np.float32)}

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """Text embeddings (B, L, D) on the device, for generating without the edge (:meth:`encode_conditioning`)."""
        return self.encode_conditioning(prompts)[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE-decode latents to uint8 images (B, H, W, 3), with diffusers' scaling and rounding."""
        scaled = latents / np.float32(self.manifest.vae_scaling_factor) + np.float32(self.manifest.vae_shift_factor)
        image = self.graph("vae_decoder").run(latent_sample=scaled.astype(np.float32))[0].astype(np.float32)
        pixels = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        return (pixels * 255).round().astype(np.uint8)
