"""Train the embedded demo family from a seed: ``python -m lab.demo_family.train``.

Writes a standard ``StableDiffusionPipeline`` folder: a word-level ``CLIPTokenizer`` for the
prompt grammar, a ``CLIPTextModel``, an ``AutoencoderKL`` (48x48x3 <-> 4x12x12), SD1.x's
scheduler config, the large ``UNet2DConditionModel`` in ``unet/`` and the small one in
``unet_small/`` (same latent space and cross-attention width), weights in fp16 safetensors,
and a model card (``README.md``) saying exactly how each part was trained.

Stages, in order, each one's inputs being the earlier stages' outputs::

    vae    AutoencoderKL on real train-split scenes (L1 + MSE + tiny KL); sets scaling_factor
    text   the text encoder, taught to parse the grammar: a probe of one learned query per grid
           cell attends over its hidden states (as the UNet's cross-attention will) and must read
           back each cell's category (or emptiness) and colour; the probe is then dropped
    large  large UNet, text encoder frozen, through the epsilon loss (10% empty prompts, for CFG)
    small  small UNet, text encoder frozen, distilled from the large one (epsilon loss + match to
           the large UNet's epsilon) with a fraction of the large stage's compute; its timesteps
           lean towards the low-noise end, where a relay runs it

Why a parse stage: trained only through the diffusion loss (an earlier version of this
recipe), the text encoder learnt the binding of colour, category and place so slowly that the
large UNet's adherence stood at 0.31 from step 600 to step 1,500 of 4,000; a calibration run on
2x2 scenes had reached 94% of the VAE ceiling with a text encoder pretrained to parse.

Resumable: every stage checkpoints into the work folder (``--work``, default ``<out>.work``)
every few minutes and when it ends, so running the same command again continues where a
killed run stopped (same seed, same data stream, same optimizer state). A stage's step budget
may change between runs, and so may any setting of a stage not started yet (``--redo`` makes a
finished one not started); run.json and the model card keep every such change.

    python -m lab.demo_family.train --out DIR [--quick] [--threads 2] [--seed 0]
    python -m lab.demo_family.train --out DIR --snapshot SNAP   # a family from a run under way
    python -m lab.demo_family.train --out DIR --redo small      # retrain a stage (and the later ones)
    python -m lab.demo_family.train --out DIR --card-only [--eval-json EVAL.json]

The model card (``README.md``) is written from ``training.json`` at the end of the run; with
``rise-eval --json DIR/eval/eval.json --plots DIR/eval`` beside the weights, ``--card-only``
adds the evaluation table and plots to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

# OpenMP threads that spin while they wait burn the cores a shared machine needs (measured on the
# build machine under load: 2.4x the CPU time per VAE step with 2 threads); make them sleep. Read
# when torch loads OpenMP, so it must be set before the import (running this module: it is).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

# mypy reads diffusers' top-level names as its torch-less placeholders (diffusers/utils/dummy_pt_objects.py:
# classes without the models' methods or an nn.Module base), so uses of the real models below carry a
# `type: ignore[...]  # diffusers placeholder`.
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from lab.progress import bar, echo
from lab.tiny_family import SD_SCHEDULER_CONFIG
from shared.demo_grammar.prompts import MAX_WORDS, eval_scenes, scene_to_prompt, vocabulary
from shared.demo_grammar.understanding import vocabulary_markdown

from .data import (
    CANVAS,
    CATEGORIES,
    CATEGORY_INDEX,
    COLOUR_INDEX,
    COLOUR_NAMES,
    N_CELLS,
    ItemBank,
    Scene,
    random_scene,
)

#: Tokens of the longest prompt plus start and end (every grammar word is one token, except
#: "t-shirt" = 3, which never makes a clause longer than the longest one).
MAX_TOKENS = MAX_WORDS + 2
STAGES = ("vae", "text", "large", "small")


@dataclass(frozen=True)
class UNetSpec:
    """The knobs of a denoiser's size and cost."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[bool, ...]  # cross-attention at each level (down order)
    attention_head_dim: int = 8  # diffusers' name; it is the number of heads


@dataclass(frozen=True)
class TrainConfig:
    """Everything that sets the trained family (with the seed).

    Sizes and budgets calibrated on the 2-core build machine (see the model card for the
    measured times): a 16-channel full-resolution VAE because full-resolution convolutions
    dominate its cost (32 channels cost 3-10x more per step), 64 channels at 24x24 and 12x12 (a
    (16, 32, 64) VAE kept only 94% of the real-scene adherence after 1,200 steps); cross-attention
    at the 6x6 and 3x3 levels of the large UNet, not at 12x12 (a
    3x3 token is one grid cell, and 12x12 attention cost +65% per training step); the small
    UNet is two levels, one layer each, cross-attention at 6x6 only.
    """

    vae_channels: tuple[int, ...] = (16, 64, 64)  # 3 levels: 48 -> 12 (4x12x12 latents)
    vae_layers: int = 1
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    large: UNetSpec = UNetSpec((64, 128, 128), 2, (False, True, True), attention_head_dim=8)
    small: UNetSpec = UNetSpec((32, 64), 1, (False, True), attention_head_dim=4)
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    large_steps: int = 2700
    large_batch: int = 32
    lr: float = 6e-4  # large UNet
    text_steps: int = 3500  # the text stage: parse pretraining of the text encoder (prompts only, no images)
    text_batch: int = 64
    text_lr: float = 1e-3
    small_steps: int = 4500
    small_batch: int = 32
    small_lr: float = 6e-4
    # In a relay the small UNet runs the late steps only (k of N = 8 of 20 hands over at t ~ 600),
    # so its stage draws t below small_focus_t for small_focus_p of the samples (the rest uniform):
    # 85% of its training then lands where it works instead of 70%.
    small_focus_t: int = 700
    small_focus_p: float = 0.5
    uncond_p: float = 0.1  # prompt dropout, so classifier-free guidance has an unconditional model
    distill_weight: float = 1.0  # small stage: weight of the match to the large UNet's epsilon
    # Min-SNR-gamma loss weighting (Hang et al. 2023, as diffusers' train_text_to_image --snr_gamma):
    # per-sample weight min(SNR, gamma) / SNR, so the many easy low-noise steps stop drowning the
    # high-noise ones that fix the layout; 0 = plain MSE.
    snr_gamma: float = 5.0
    ema_decay: float = 0.999  # the saved denoisers are the EMA weights
    grad_clip: float = 1.0
    log_every: int = 100
    checkpoint_every_s: float = 300.0


QUICK = TrainConfig(
    vae_channels=(16, 32, 32), vae_layers=1, text_hidden=32, text_layers=1, text_heads=2,
    large=UNetSpec((32, 64), 1, (False, True), attention_head_dim=8),
    small=UNetSpec((16, 32), 1, (False, True), attention_head_dim=4),
    vae_steps=150, large_steps=150, small_steps=60, large_batch=16, small_batch=16,
    text_steps=100, lr=1e-3, text_lr=1e-3, small_lr=1e-3, ema_decay=0.0, log_every=50, checkpoint_every_s=60.0,
)


# --------------------------------------------------------------------------- tokenizer


def _pieces(word: str) -> list[str]:
    # CLIP's pre-tokenizer splits letters from other characters: "t-shirt" -> "t", "-", "shirt".
    return re.findall(r"[a-z]+|[^\sa-z]", word)


def _bpe_merges(pieces: Sequence[str]) -> list[tuple[str, str]]:
    """Merges that build every piece into one token (BPE training on the pieces, count 1 each).

    Learned the way BPE is trained, so applying them by rank (as CLIP's tokenizer does)
    reproduces the training segmentation: each piece ends as one symbol.
    """
    words = [list(p[:-1]) + [p[-1] + "</w>"] for p in pieces]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:], strict=False):  # adjacent pairs: w[1:] is one shorter
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent; ties in a fixed order
        merges.append(best)
        for i, w in enumerate(words):
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out


def build_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make every grammar word one token.

    The vocabulary also holds every byte, so any other text still tokenizes (as characters).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = sorted({p for w in vocabulary() for p in _pieces(w)})
    merges = _bpe_merges(pieces)
    chars = list(bytes_to_unicode().values())
    tokens = dict.fromkeys(chars + [c + "</w>" for c in chars] + [a + b for a, b in merges])
    tokens.update(dict.fromkeys(["<|startoftext|>", "<|endoftext|>"]))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(  # type: ignore[no-untyped-call, unused-ignore]  # transformers: unannotated __init__
        vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
        model_max_length=MAX_TOKENS, pad_token="<|endoftext|>",
    )
    tok.save_pretrained(folder)
    return tok


# --------------------------------------------------------------------------- models


def build_vae(cfg: TrainConfig) -> AutoencoderKL:
    """The family's VAE: 48x48 RGB <-> 4 x 12 x 12 latents (SD's layout at toy size)."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(  # type: ignore[no-untyped-call, unused-ignore]  # diffusers placeholder
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=cfg.vae_channels, layers_per_block=cfg.vae_layers,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=min(32, cfg.vae_channels[0]), sample_size=CANVAS,
    )


def build_text_encoder(cfg: TrainConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A small CLIP text transformer over the grammar's vocabulary."""
    config = CLIPTextConfig(  # type: ignore[no-untyped-call, unused-ignore]  # transformers: unannotated __init__
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(spec: UNetSpec, cross_attention_dim: int, latent_size: int) -> UNet2DConditionModel:
    """An SD-shaped UNet; cross-attention only at the levels ``spec.attention_levels`` marks."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention_levels))
    return UNet2DConditionModel(  # type: ignore[no-untyped-call, unused-ignore]  # diffusers placeholder
        sample_size=latent_size, in_channels=4, out_channels=4,
        block_out_channels=spec.block_out_channels, layers_per_block=spec.layers_per_block,
        down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
        attention_head_dim=spec.attention_head_dim, norm_num_groups=min(32, spec.block_out_channels[0]),
    )


# --------------------------------------------------------------------------- data


class SceneStream:
    """Endless batches of (images in [-1, 1] (B, 3, 48, 48), prompts) of train-split scenes.

    Scenes of the evaluation prompt set are never drawn (they are held out by composition,
    not only by source image). ``seed`` may be a sequence (e.g. ``(seed, stage)``): each stage
    has its own stream, so resuming one stage never depends on how far another one read.
    """

    def __init__(self, bank: ItemBank, seed: int | Sequence[int], exclude: set[Scene] | None = None) -> None:
        self.bank = bank
        self.rng = np.random.default_rng(seed)
        self.exclude = exclude if exclude is not None else eval_scenes()

    def scene(self) -> Scene:
        scene = random_scene(self.rng)
        while scene in self.exclude:
            scene = random_scene(self.rng)
        return scene

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        images = np.empty((n, CANVAS, CANVAS, 3), dtype=np.uint8)
        prompts = []
        for i in range(n):
            scene = self.scene()
            images[i], _ = self.bank.render(scene, self.rng)
            prompts.append(scene_to_prompt(scene, self.rng))
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, prompts

    def prompt_batch(self, n: int) -> tuple[list[Scene], list[str]]:
        """``n`` scenes and their prompts, nothing rendered (the text stage reads no pixels)."""
        scenes = [self.scene() for _ in range(n)]
        return scenes, [scene_to_prompt(scene, self.rng) for scene in scenes]


def encode(
    text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer | CLIPTokenizerFast, prompts: Sequence[str]
) -> torch.Tensor:
    """SD's conditioning: the last hidden state over max-length-padded tokens."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    hidden: torch.Tensor = text_encoder(ids)[0]
    return hidden


# --------------------------------------------------------------------------- resumable stages


class TrainingError(RuntimeError):
    """The work folder does not match this run (other config or seed), or a stage is missing."""


class Ema:
    """Exponential moving average of some modules' weights (warm-up as in diffusers' EMAModel)."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.live = modules
        self.shadow = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()} if decay > 0 else modules

    @torch.no_grad()
    def update(self, step: int) -> None:
        if self.decay <= 0:
            return
        d = min(self.decay, (1 + step) / (10 + step))
        for name, module in self.live.items():
            shadow = self.shadow[name]
            for e, p in zip(shadow.parameters(), module.parameters(), strict=True):
                e.lerp_(p, 1.0 - d)
            for eb, b in zip(shadow.buffers(), module.buffers(), strict=True):
                eb.copy_(b)


@dataclass
class Stage:
    """One stage's training loop, resumable from a checkpoint file."""

    name: str
    modules: dict[str, torch.nn.Module]  # trained modules (saved in the checkpoint)
    groups: list[dict[str, Any]]  # optimizer parameter groups, each with its "lr"
    steps: int
    batch: int
    loss: Callable[[], torch.Tensor]
    stream: SceneStream
    cfg: TrainConfig
    ema_decay: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)
    progress: bool | None = None  # a bar on stderr (None: when it is a terminal; see lab.progress)

    def run(self, ckpt: Path) -> dict[str, torch.nn.Module]:
        """Train to ``steps`` (resuming from ``ckpt`` if present); return the EMA (or live) modules."""
        cfg = self.cfg
        peak_lr = {g.get("name", "params"): g["lr"] for g in self.groups}  # the scheduler rewrites g["lr"]
        opt = torch.optim.AdamW(self.groups, weight_decay=1e-4 if self.name != "vae" else 0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in self.groups],
            total_steps=self.steps,
            pct_start=0.05 if self.name != "vae" else 0.1,
        )
        ema = Ema(self.modules, self.ema_decay)
        start, elapsed, history, running, count = 0, 0.0, [], 0.0, 0
        lr_history: list[list[float]] = []  # [step, learning rate of the first group] at each log
        if ckpt.is_file():
            state = torch.load(ckpt, weights_only=True)
            for k, m in self.modules.items():
                m.load_state_dict(state["modules"][k])
            if self.ema_decay > 0:
                for k, m in ema.shadow.items():
                    m.load_state_dict(state["ema"][k])
            opt.load_state_dict(state["opt"])
            phases = sched._schedule_phases  # this run's budget, which the checkpoint's may differ from
            sched.load_state_dict(state["sched"])
            if sched.total_steps != self.steps:
                # The step budget changed (see Work): anneal over the new budget from here on.
                if int(state["step"]) >= self.steps:
                    raise TrainingError(f"{ckpt} is at step {state['step']}, past the new budget of {self.steps}")
                echo(f"[{self.name}] step budget {sched.total_steps} -> {self.steps}")
                sched.total_steps, sched._schedule_phases = self.steps, phases
            self.stream.rng.bit_generator.state = state["stream_rng"]
            torch.set_rng_state(state["torch_rng"])
            start, elapsed, history = int(state["step"]), float(state["elapsed"]), list(state["history"])
            lr_history = list(state.get("lr_history", []))
            running, count = state.get("running", (0.0, 0))  # the loss sum of the log interval under way
            echo(f"[{self.name}] resumed from {ckpt} at step {start}/{self.steps} ({elapsed:.0f}s done)")

        def save(step: int) -> None:
            state = {
                "modules": {k: m.state_dict() for k, m in self.modules.items()},
                "ema": {k: m.state_dict() for k, m in ema.shadow.items()} if self.ema_decay > 0 else {},
                "opt": opt.state_dict(), "sched": sched.state_dict(),
                "stream_rng": self.stream.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "step": step, "elapsed": elapsed + (time.perf_counter() - t0), "history": history,
                "lr_history": lr_history,
                "running": (running, count),
            }
            tmp = ckpt.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(ckpt)  # atomic: a kill mid-write leaves the previous checkpoint

        for m in self.modules.values():
            m.train()
        params = [p for g in self.groups for p in g["params"]]
        t0 = last_ckpt = time.perf_counter()
        pbar = bar(desc=self.name, total=self.steps, initial=start, unit="step", setting=self.progress)
        for step in range(start + 1, self.steps + 1):
            loss = self.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call, unused-ignore]  # torch: Tensor.backward is unannotated
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            ema.update(step)
            running, count = running + loss.item(), count + 1
            pbar.set_postfix_str(f"loss {running / count:.4f}", refresh=False)  # the log interval's mean so far
            pbar.update(1)
            if step % cfg.log_every == 0 or step == self.steps:
                history.append([step, round(running / count, 5)])
                lr_history.append([step, float(f"{opt.param_groups[0]['lr']:.4g}")])
                now = time.perf_counter()
                echo(f"[{self.name}] step {step}/{self.steps} loss {running / count:.4f} lr {lr_history[-1][1]:.3g} "
                     f"({elapsed + now - t0:.0f}s, {(now - t0) / (step - start):.3f}s/step)")
                running, count = 0.0, 0
            if time.perf_counter() - last_ckpt > cfg.checkpoint_every_s and step < self.steps:
                save(step)
                last_ckpt = time.perf_counter()
        pbar.close()
        elapsed += time.perf_counter() - t0
        for m in (*self.modules.values(), *ema.shadow.values()):
            m.eval()
        self.record.update({
            "steps": self.steps, "batch": self.batch, "lr": peak_lr,
            "schedule": f"AdamW, one-cycle (cosine) LR, grad-norm clip {cfg.grad_clip:g}",
            "ema_decay": self.ema_decay, "seconds": round(elapsed), "loss_history": history, "lr_history": lr_history,
            "final_loss": history[-1][1] if history else None,
        })
        return ema.shadow


class SceneProbe(torch.nn.Module):
    """Reads a scene back out of the text encoder's hidden states (the text stage's probe).

    One learned query per grid cell attends over all the tokens, padding included (as the
    UNet's cross-attention does at the cell's place), and predicts the cell's category or
    emptiness and its colour. Dropped after the text stage: only the encoder it shaped is kept.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(N_CELLS, dim) * 0.02)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(2 * dim, len(CATEGORIES) + 1 + len(COLOUR_NAMES)))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, D)`` -> category logits ``(B, 9, categories + 1)`` (last = empty), colour logits
        ``(B, 9, colours)``."""
        q = self.queries.expand(hidden.shape[0], -1, -1)
        read, _ = self.attn(q, hidden, hidden, need_weights=False)
        logits = self.mlp(read + q)
        return logits[..., : len(CATEGORIES) + 1], logits[..., len(CATEGORIES) + 1 :]


def scene_targets(scenes: Sequence[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell: category index (``len(CATEGORIES)`` = empty) and colour index (-100 = none, ignored)."""
    cat = torch.full((len(scenes), N_CELLS), len(CATEGORIES), dtype=torch.long)
    col = torch.full((len(scenes), N_CELLS), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for j, item in enumerate(scene.cells):
            if item is not None:
                cat[i, j], col[i, j] = CATEGORY_INDEX[item.category], COLOUR_INDEX[item.colour]
    return cat, col


def _probe_batch(text_encoder: CLIPTextModel, probe: SceneProbe, tokenizer: CLIPTokenizer | CLIPTokenizerFast,
                 stream: SceneStream, n: int) -> tuple[torch.Tensor, ...]:
    """``n`` fresh prompts through encoder and probe: category and colour targets, then their logits."""
    scenes, prompts = stream.prompt_batch(n)
    return (*scene_targets(scenes), *probe(encode(text_encoder, tokenizer, prompts)))


def _text_loss(text_encoder: CLIPTextModel, probe: SceneProbe, tokenizer: CLIPTokenizer | CLIPTokenizerFast,
               stream: SceneStream, batch: int) -> Callable[[], torch.Tensor]:
    def loss() -> torch.Tensor:
        cat, col, cat_logits, col_logits = _probe_batch(text_encoder, probe, tokenizer, stream, batch)
        return F.cross_entropy(cat_logits.flatten(0, 1), cat.flatten()) + \
            F.cross_entropy(col_logits.flatten(0, 1), col.flatten(), ignore_index=-100)

    return loss


@torch.no_grad()
def parse_accuracy(text_encoder: CLIPTextModel, probe: SceneProbe, tokenizer: CLIPTokenizer | CLIPTokenizerFast,
                   stream: SceneStream, n: int = 2048) -> dict[str, float]:
    """How well the probe reads scenes back: per-cell category, per-item colour, whole scenes."""
    cat, col, cat_logits, col_logits = _probe_batch(text_encoder, probe, tokenizer, stream, n)
    cat_ok = cat_logits.argmax(-1) == cat
    filled = col >= 0
    col_ok = (col_logits.argmax(-1) == col) | ~filled
    return {"cell_category": round(float(cat_ok.float().mean()), 4),
            "item_colour": round(float(col_ok[filled].float().mean()), 4),
            "scene": round(float((cat_ok & col_ok).all(1).float().mean()), 4)}


def _vae_loss(vae: AutoencoderKL, stream: SceneStream, batch: int) -> Callable[[], torch.Tensor]:
    def loss() -> torch.Tensor:
        x, _ = stream.batch(batch)
        post = vae.encode(x).latent_dist  # type: ignore[attr-defined]  # diffusers placeholder
        rec: torch.Tensor = vae.decode(post.sample()).sample  # type: ignore[attr-defined]  # diffusers placeholder
        total: torch.Tensor = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        return total

    return loss


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, stream: SceneStream, n: int = 256) -> float:
    """1 / std of the VAE's latents on ``n`` scenes (SD's convention for ``scaling_factor``)."""
    x, _ = stream.batch(n)
    latents = vae.encode(x).latent_dist.sample()  # type: ignore[attr-defined]  # diffusers placeholder
    return float(1.0 / latents.std().item())


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-timestep loss weight ``min(SNR, gamma) / SNR`` for epsilon prediction (1 everywhere if ``gamma`` is 0)."""
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    if gamma <= 0:
        return torch.ones_like(snr)
    return torch.clamp(snr, max=gamma) / snr


def sample_timesteps(n: int, num_train_timesteps: int, focus_t: int = 0, focus_p: float = 0.0) -> torch.Tensor:
    """``n`` training timesteps: uniform, with a ``focus_p`` share drawn below ``focus_t`` instead."""
    t = torch.randint(0, num_train_timesteps, (n,))
    if focus_t > 0 and focus_p > 0:
        focused = torch.rand(n) < focus_p
        t = torch.where(focused, torch.randint(0, focus_t, (n,)), t)
    return t


def _denoiser_loss(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer | CLIPTokenizerFast,
    vae: AutoencoderKL,
    stream: SceneStream, cfg: TrainConfig, batch: int, *,
    teacher: UNet2DConditionModel | None = None, focus_t: int = 0, focus_p: float = 0.0,
) -> Callable[[], torch.Tensor]:
    """Epsilon-prediction loss on SD's noise schedule; plus a match to ``teacher``'s epsilon (text encoder frozen).

    Timesteps are uniform in [0, 1000), except that a ``focus_p`` share of them is drawn in [0, ``focus_t``).
    """
    # DDPMScheduler.from_config keeps the keys it knows (SD_SCHEDULER_CONFIG has DDIM-only ones too).
    noise_sched = DDPMScheduler.from_config(  # type: ignore[no-untyped-call, unused-ignore]  # diffusers placeholder
        SD_SCHEDULER_CONFIG
    )
    weight = min_snr_weights(noise_sched.alphas_cumprod, cfg.snr_gamma)

    def loss() -> torch.Tensor:
        x, prompts = stream.batch(batch)
        prompts = ["" if stream.rng.random() < cfg.uncond_p else p for p in prompts]
        with torch.no_grad():
            z0 = (
                vae.encode(x).latent_dist.sample()  # type: ignore[attr-defined]  # diffusers placeholder
                * vae.config.scaling_factor  # type: ignore[attr-defined]  # diffusers placeholder
            )
        noise = torch.randn_like(z0)
        t = sample_timesteps(z0.shape[0], noise_sched.config.num_train_timesteps, focus_t, focus_p)
        zt = noise_sched.add_noise(z0, noise, t)
        with torch.no_grad():
            cond = encode(text_encoder, tokenizer, prompts)
        eps = unet(zt, t, cond).sample  # type: ignore[operator]  # diffusers placeholder
        per_sample = F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))
        if teacher is not None:
            with torch.no_grad():
                target = teacher(zt, t, cond).sample  # type: ignore[operator]  # diffusers placeholder
            per_sample = per_sample + cfg.distill_weight * F.mse_loss(eps, target, reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weight[t]).mean()

    return loss


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_of(key: str) -> str | None:
    """The stage a config key belongs to, by its name (``small_lr`` -> small); ``None`` for a shared one."""
    head = key.split("_")[0]
    return head if head in STAGES else None


class Work:
    """The work folder: per-stage results (fp32, diffusers folders), checkpoints, records."""

    def __init__(self, folder: Path, cfg: TrainConfig, seed: int, *, redo: str | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        # --redo drops that stage's results and every later stage's (they were trained on them), once
        # the config is checked: until then those stages count as not started.
        redone = STAGES[STAGES.index(redo):] if redo is not None else ()

        def state_of(stage: str) -> str:
            return "not started" if stage in redone else self.stage_state(stage)

        meta = json.loads(json.dumps({"seed": seed, "config": asdict(cfg)}))
        meta_file = folder / "run.json"
        changes: list[dict[str, Any]] = []
        if meta_file.is_file():
            old = json.loads(meta_file.read_text())
            changes = old.get("changes", old.get("budget_changes", []))
            if old["seed"] != seed:
                raise TrainingError(f"{folder} holds a run with another config or seed (seed {old['seed']}, "
                                    f"not {seed}); use another --work folder or delete it")
            # A stage's own settings may change before it starts, and its step budget at any time:
            # a stage under way anneals its learning rate over the new budget from its checkpoint on.
            # Every change is kept in run.json (and the model card).
            for key in sorted(set(old["config"]) | set(meta["config"])):
                before, after = old["config"].get(key), meta["config"].get(key)
                if before == after:
                    continue
                stage = stage_of(key)
                state = state_of(stage) if stage is not None else "shared"
                if not (key.endswith("_steps") or state == "not started"):
                    raise TrainingError(
                        f"{folder} holds a run with another config or seed ({key}: {before!r} -> {after!r}, "
                        f"{'a setting of every stage' if stage is None else f'the {stage} stage is {state}'}); "
                        "use another --work folder, delete it, or --redo the stage"
                    )
                changes.append({"key": key, "from": before, "to": after, "stage_state": state,
                                "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        for stage in redone:
            (folder / f"{stage}.done.json").unlink(missing_ok=True)
            self.ckpt(stage).unlink(missing_ok=True)
            shutil.rmtree(folder / stage, ignore_errors=True)
        meta["changes"] = changes
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        self.changes: list[dict[str, Any]] = changes

    def stage_state(self, stage: str) -> str:
        """"finished", "under way" (a checkpoint) or "not started"."""
        return "finished" if self.done(stage) else "under way" if self.ckpt(stage).is_file() else "not started"

    def done(self, stage: str) -> bool:
        return (self.folder / f"{stage}.done.json").is_file()

    def ckpt(self, stage: str) -> Path:
        return self.folder / f"{stage}.ckpt.pt"

    def record(self, stage: str) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.folder / f"{stage}.done.json").read_text())
        return record

    def finish(self, stage: str, modules: dict[str, Any], record: dict[str, Any]) -> None:
        for name, module in modules.items():
            module.save_pretrained(self.folder / stage / name, safe_serialization=True)
        (self.folder / f"{stage}.done.json").write_text(json.dumps(record, indent=2) + "\n")
        self.ckpt(stage).unlink(missing_ok=True)

    def load(self, stage: str, name: str, cls: type[Any]) -> Any:
        if not self.done(stage):
            raise TrainingError(f"stage {stage!r} has not finished in {self.folder}")
        module = cls.from_pretrained(self.folder / stage / name, torch_dtype=torch.float32)
        return module.eval().requires_grad_(False)


def train_family(
    out: str | Path,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    work: str | Path | None = None,
    data: str | None = None,
    command: str = "",
    stop_after: str | None = None,
    redo: str | None = None,
    progress: bool | None = None,
) -> Path | None:
    """Run (or resume) every stage, then write the family to ``out``; ``None`` if ``stop_after`` stopped it.

    ``redo`` retrains that stage and the later ones from scratch (the earlier ones are kept);
    ``progress``: a bar per stage on stderr, loss in its postfix (``None``: when stderr is a terminal).
    """
    out = Path(out)
    work_dir = Path(work) if work is not None else out.with_name(out.name + ".work")
    w = Work(work_dir, cfg, seed, redo=redo)
    bank = ItemBank.load("train", data)
    exclude = eval_scenes()
    tokenizer = build_tokenizer(work_dir / "tokenizer")
    # The same vocabulary and merges in Rust (ids equal: tested), 3x faster on the training batches.
    fast_tokenizer = CLIPTokenizerFast.from_pretrained(work_dir / "tokenizer")
    latent = CANVAS // 2 ** (len(cfg.vae_channels) - 1)

    def stream(stage: str) -> SceneStream:
        return SceneStream(bank, (seed, STAGES.index(stage)), exclude)

    # vae
    if not w.done("vae"):
        torch.manual_seed(seed * 1000 + 1)
        vae, s = build_vae(cfg), stream("vae")
        groups = [{
            "params": list(vae.parameters()),  # type: ignore[attr-defined]  # diffusers placeholder
            "lr": cfg.vae_lr, "name": "vae",
        }]
        stage = Stage("vae", {"vae": vae}, groups,  # type: ignore[dict-item]  # diffusers placeholder
                      cfg.vae_steps, cfg.vae_batch, _vae_loss(vae, s, cfg.vae_batch), s, cfg, progress=progress)
        vae = cast(AutoencoderKL, stage.run(w.ckpt("vae"))["vae"])  # run() returns the modules it was given
        sf = latent_scaling_factor(vae, s)
        vae.register_to_config(scaling_factor=sf)  # type: ignore[attr-defined]  # diffusers placeholder
        w.finish("vae", {"vae": vae}, {**stage.record, "scaling_factor": sf,
                                          "loss": "L1 + MSE on pixels in [-1, 1] + 1e-6 KL"})
    vae = w.load("vae", "vae", AutoencoderKL)
    if stop_after == "vae":
        return None

    # text: the text encoder, taught to parse the grammar through a per-cell probe
    if not w.done("text"):
        torch.manual_seed(seed * 1000 + 4)
        te, probe, s = build_text_encoder(cfg, tokenizer), SceneProbe(cfg.text_hidden, cfg.text_heads), stream("text")
        groups = [
            {"params": list(te.parameters()) + list(probe.parameters()), "lr": cfg.text_lr, "name": "text_encoder"}
        ]
        stage = Stage("text", {"text_encoder": te, "probe": probe}, groups, cfg.text_steps, cfg.text_batch,
                      _text_loss(te, probe, fast_tokenizer, s, cfg.text_batch), s, cfg, progress=progress)
        result = stage.run(w.ckpt("text"))
        # run() returns the modules it was given (as nn.Module): the encoder and the probe built above.
        te_trained, probe_trained = cast(CLIPTextModel, result["text_encoder"]), cast(SceneProbe, result["probe"])
        accuracy = parse_accuracy(te_trained, probe_trained, fast_tokenizer, stream("text"))
        echo(f"[text] probe accuracy on fresh prompts: {accuracy}")
        w.finish("text", {"text_encoder": result["text_encoder"]},
                 {**stage.record, "parse_accuracy": accuracy,
                  "loss": "cross-entropy of a per-cell attention probe: category or empty, and colour"})
    te = w.load("text", "text_encoder", CLIPTextModel)
    if stop_after == "text":
        return None

    # large: the large UNet, text encoder frozen
    if not w.done("large"):
        torch.manual_seed(seed * 1000 + 2)
        unet, s = build_unet(cfg.large, cfg.text_hidden, latent), stream("large")
        groups = [{
            "params": list(unet.parameters()),  # type: ignore[attr-defined]  # diffusers placeholder
            "lr": cfg.lr, "name": "unet",
        }]
        stage = Stage("large", {"unet": unet}, groups,  # type: ignore[dict-item]  # diffusers placeholder
                      cfg.large_steps, cfg.large_batch,
                      _denoiser_loss(unet, te, fast_tokenizer, vae, s, cfg, cfg.large_batch),
                      s, cfg, ema_decay=cfg.ema_decay, progress=progress)
        result = stage.run(w.ckpt("large"))
        w.finish("large", result, {**stage.record, "uncond_p": cfg.uncond_p,
                                    "loss": "MSE(epsilon) on SD's scaled-linear schedule, t uniform in [0, 1000), "
                                            f"min-SNR-{cfg.snr_gamma:g} weighted"})
    unet = w.load("large", "unet", UNet2DConditionModel)
    if stop_after == "large":
        return None

    # small: distilled from the large UNet, text encoder frozen
    if not w.done("small"):
        torch.manual_seed(seed * 1000 + 3)
        small, s = build_unet(cfg.small, cfg.text_hidden, latent), stream("small")
        teacher = unet if cfg.distill_weight > 0 else None
        groups = [{
            "params": list(small.parameters()),  # type: ignore[attr-defined]  # diffusers placeholder
            "lr": cfg.small_lr, "name": "unet_small",
        }]
        stage = Stage("small", {"unet_small": small}, groups,  # type: ignore[dict-item]  # diffusers placeholder
                      cfg.small_steps, cfg.small_batch,
                      _denoiser_loss(small, te, fast_tokenizer, vae, s, cfg, cfg.small_batch, teacher=teacher,
                                     focus_t=cfg.small_focus_t, focus_p=cfg.small_focus_p),
                      s, cfg, ema_decay=cfg.ema_decay, progress=progress)
        result = stage.run(w.ckpt("small"))
        w.finish("small", result, {**stage.record, "distill_weight": cfg.distill_weight, "uncond_p": cfg.uncond_p,
                                    "loss": f"MSE(epsilon, noise) + {cfg.distill_weight:g} x MSE(epsilon, large UNet's "
                                            f"epsilon), min-SNR-{cfg.snr_gamma:g} weighted, "
                                            f"{cfg.small_focus_p:.0%} of t in [0, {cfg.small_focus_t}), "
                                            "the rest uniform"})
    small = w.load("small", "unet_small", UNet2DConditionModel)

    save_family(out, vae, te, tokenizer, unet, small)
    info = {
        "seed": seed, "command": command, "config": asdict(cfg),
        "prompt_grammar": "demo",  # edge_server.family.detect_prompt_grammar: prompts follow shared.demo_grammar
        "stages": {name: w.record(name) for name in STAGES},
        "changes": w.changes,
        "params": {
            "vae": n_params(vae), "text_encoder": n_params(te), "unet": n_params(unet), "unet_small": n_params(small)
        },
        "step_cost_ms": step_costs(unet, small, cfg.text_hidden, latent),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out)
    return out


@torch.no_grad()
def step_costs(large: UNet2DConditionModel, small: UNet2DConditionModel, dim: int, latent: int,
               rows: int = 2, repeats: int = 30) -> dict[str, float]:
    """Median ms of one UNet call at ``rows`` (2 = one image with CFG), one thread, in PyTorch.

    Timed as process CPU time: on a shared machine wall time mostly measures the other jobs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    z, t, c = torch.randn(rows, 4, latent, latent), torch.full((rows,), 500), torch.randn(rows, MAX_TOKENS, dim)
    out: dict[str, float] = {}
    for name, unet in (("unet", large), ("unet_small", small)):
        for _ in range(3):
            unet(z, t, c)  # type: ignore[operator]  # diffusers placeholder
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            unet(z, t, c)  # type: ignore[operator]  # diffusers placeholder
            times.append(time.process_time() - t0)
        out[name] = round(1000 * sorted(times)[len(times) // 2], 2)
    torch.set_num_threads(threads)
    out["ratio"] = round(out["unet"] / out["unet_small"], 2)
    return out


def save_family(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    small: UNet2DConditionModel,
) -> Path:
    """Write the pipeline folder (fp16 safetensors) with the small UNet in ``unet_small/``."""
    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline(  # type: ignore[no-untyped-call, unused-ignore]  # diffusers placeholder
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),  # type: ignore[no-untyped-call, unused-ignore]  # diffusers
        safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(  # type: ignore[attr-defined]  # diffusers placeholder
        out, safe_serialization=True
    )
    small.to(torch.float16).save_pretrained(  # type: ignore[attr-defined]  # diffusers placeholder
        out / "unet_small", safe_serialization=True
    )
    pipe.to(torch.float32)  # type: ignore[attr-defined]  # diffusers placeholder
    small.to(torch.float32)  # type: ignore[attr-defined]  # diffusers placeholder
    return out


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """The inverse of ``asdict(TrainConfig)`` (as stored in ``run.json`` and ``training.json``)."""
    d = dict(d)
    for key in ("large", "small"):
        spec = dict(d[key])
        spec["block_out_channels"] = tuple(spec["block_out_channels"])
        spec["attention_levels"] = tuple(spec["attention_levels"])
        d[key] = UNetSpec(**spec)
    d["vae_channels"] = tuple(d["vae_channels"])
    return TrainConfig(**d)


def snapshot(work: str | Path, dest: str | Path) -> dict[str, Any]:
    """Write a family from what a run's work folder holds now, to look at a run under way.

    Finished stages are taken as they are; a stage under way gives the (EMA) weights of its
    latest checkpoint; a small stage not started yet gives an untrained small UNet. Returns
    how far each stage was.
    """
    work = Path(work)
    meta = json.loads((work / "run.json").read_text())
    cfg = config_from_dict(meta["config"])
    w = Work(work, cfg, meta["seed"])
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    latent = CANVAS // 2 ** (len(cfg.vae_channels) - 1)
    state: dict[str, Any] = {}

    def from_ckpt(stage: str, name: str, module: torch.nn.Module) -> torch.nn.Module | None:
        ckpt = w.ckpt(stage)
        if not ckpt.is_file():
            return None
        saved = torch.load(ckpt, weights_only=True)
        module.load_state_dict((saved["ema"] or saved["modules"])[name])
        state[stage] = f"checkpoint at step {saved['step']}"
        return module.eval()

    if not w.done("vae"):
        raise TrainingError(f"the VAE stage has not finished in {work}: nothing to look at yet")
    vae = w.load("vae", "vae", AutoencoderKL)
    state["vae"] = "done"
    if not w.done("text"):
        raise TrainingError(f"the text stage has not finished in {work}: nothing to look at yet")
    te = w.load("text", "text_encoder", CLIPTextModel)
    state["text"] = "done"
    if w.done("large"):
        unet = w.load("large", "unet", UNet2DConditionModel)
        state["large"] = "done"
    else:
        fresh = build_unet(cfg.large, cfg.text_hidden, latent)
        unet = from_ckpt("large", "unet", fresh)  # type: ignore[arg-type]  # diffusers placeholder
        if unet is None:
            raise TrainingError(f"the large stage has no checkpoint in {work} yet")
    if w.done("small"):
        small = w.load("small", "unet_small", UNet2DConditionModel)
        state["small"] = "done"
    else:
        fresh = build_unet(cfg.small, cfg.text_hidden, latent)
        small = from_ckpt("small", "unet_small", fresh)  # type: ignore[arg-type]  # diffusers placeholder
        if small is None:
            untrained = build_unet(cfg.small, cfg.text_hidden, latent)
            small = untrained.eval()  # type: ignore[attr-defined]  # diffusers placeholder
            state["small"] = "not started (untrained weights)"
    save_family(Path(dest), vae, te, tokenizer, unet, small)
    (Path(dest) / "SNAPSHOT.json").write_text(json.dumps(state, indent=2) + "\n")
    return state


def build_untrained_family(out: str | Path, cfg: TrainConfig = QUICK, seed: int = 0) -> Path:
    """The family's architecture with random (seeded) weights and no training: for fast tests."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(out / "tokenizer")
    latent = CANVAS // 2 ** (len(cfg.vae_channels) - 1)
    return save_family(out, build_vae(cfg), build_text_encoder(cfg, tokenizer), tokenizer,
                       build_unet(cfg.large, cfg.text_hidden, latent), build_unet(cfg.small, cfg.text_hidden, latent))


# --------------------------------------------------------------------------- model card


def _unet_line(spec: dict[str, Any], params: int) -> str:
    levels = ", ".join(
        f"{c} ch{' + cross-attn' if a else ''}"
        for c, a in zip(spec["block_out_channels"], spec["attention_levels"], strict=True)
    )
    return (f"`UNet2DConditionModel`, {len(spec['block_out_channels'])} levels ({levels}), "
            f"{spec['layers_per_block']} layer(s) per level, mid block with cross-attention, "
            f"{spec['attention_head_dim']} heads; {params / 1e6:.2f} M parameters")


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def write_model_card(folder: str | Path, eval_json: str | Path | None = None) -> Path:
    """(Re)write ``README.md`` beside the weights from ``training.json`` (+ a ``rise-eval --json`` file)."""
    folder = Path(folder)
    info = json.loads((folder / "training.json").read_text())
    cfg, st, params, cost = info["config"], info["stages"], info["params"], info["step_cost_ms"]
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*.safetensors"))}
    total_s = sum(st[s]["seconds"] for s in STAGES)
    lines = [
        "# RISE demo family (Fashion-MNIST scenes, 48x48)",
        "",
        "A tiny text-to-image model family trained from scratch on this repository's build machine, so that",
        "the relay (large UNet on the edge for the first k of N steps, small UNet on the device for the rest)",
        "can be shown and measured on real pictures. A standard diffusers `StableDiffusionPipeline` folder:",
        "`unet/` is the large denoiser, `unet_small/` the small one; both share the VAE's latent space and the",
        "text encoder. Weights are fp16 safetensors (load them in float32 on a CPU).",
        "",
        "Prompts follow the grammar of `shared/demo_grammar/prompts.py` (1-9 Fashion-MNIST items, each",
        "with a colour and a cell of a 3x3 grid, e.g. *a red sneaker in the top left and a pair of blue jeans",
        "on the right*); the scorer in `models/demo/scorer/` measures how well a picture follows its prompt.",
        "",
        *vocabulary_markdown().replace("### ", "## ", 1).splitlines(),
        "",
        "## Architecture",
        "",
        "| part | what | size on disk |",
        "|---|---|---|",
        f"| `tokenizer/` | CLIP BPE whose merges make every grammar word one token; max {MAX_TOKENS} tokens | - |",
        f"| `text_encoder/` | `CLIPTextModel`, {cfg['text_layers']} layers, width {cfg['text_hidden']}, "
        f"{cfg['text_heads']} heads; {params['text_encoder'] / 1e6:.2f} M parameters | "
        f"{sizes.get('text_encoder/model.safetensors', 0) / 1e6:.1f} MB |",
        f"| `vae/` | `AutoencoderKL` 48x48x3 <-> 4x12x12, channels {tuple(cfg['vae_channels'])}, "
        f"{cfg['vae_layers']} resnet layer(s) per level, scaling_factor {st['vae']['scaling_factor']:.4f}; "
        f"{params['vae'] / 1e6:.2f} M parameters | "
        f"{sizes.get('vae/diffusion_pytorch_model.safetensors', 0) / 1e6:.1f} MB |",
        f"| `unet/` (large) | {_unet_line(cfg['large'], params['unet'])} | "
        f"{sizes.get('unet/diffusion_pytorch_model.safetensors', 0) / 1e6:.1f} MB |",
        f"| `unet_small/` (small) | {_unet_line(cfg['small'], params['unet_small'])} | "
        f"{sizes.get('unet_small/diffusion_pytorch_model.safetensors', 0) / 1e6:.1f} MB |",
        "| `scheduler/` | Stable Diffusion 1.x's (scaled-linear betas 0.00085-0.012, 1000 steps, epsilon) | - |",
        "",
        f"Total weights: {sum(sizes.values()) / 1e6:.1f} MB. Per-step cost of one UNet call at batch 2 (one image",
        "with classifier-free guidance), both in PyTorch, one thread, measured after training: "
        f"large {cost['unet']:.1f} ms,",
        f"small {cost['unet_small']:.1f} ms, ratio {cost['ratio']:.1f}. "
        "On the device the small UNet runs on ONNX Runtime,",
        "where it costs less (PyTorch's per-module overhead dominates at this size): `rise-eval --bundle` measures",
        "that pair, the one the relay uses (see Evaluation below when present).",
        "",
        "## Data",
        "",
        "Scenes composed on the fly from the Fashion-MNIST **train** split (Debian's `dataset-fashion-mnist`):",
        "8 of its 10 categories (no coat, no shirt), each item 2x2-average-pooled to 14x14, tinted with one",
        "of 8 colours and placed in a cell of a 3x3 grid of 16-px cells; 1-9 items per scene, uniform; each",
        "scene described by a random paraphrase of the grammar. The 225 scenes of the evaluation prompts",
        "(`shared/demo_grammar/prompts.txt`) are never drawn, and evaluation renders its reference scenes",
        "from the Fashion-MNIST **test** split, so no source image is shared either.",
        "",
        f"## Training (seed {info['seed']:d}, {_fmt_s(total_s)} in all)",
        "",
        "| stage | trains | loss | steps | batch | peak LR | EMA | time | final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    what = {"vae": "VAE", "text": "text encoder (+ a per-cell parse probe, then dropped)",
            "large": "large UNet (text encoder frozen)", "small": "small UNet (text encoder frozen)"}
    for name in STAGES:
        r = st[name]
        lrs = ", ".join(f"{k} {v:g}" for k, v in r["lr"].items())
        lines.append(f"| {name} | {what[name]} | {r['loss']} | {r['steps']} | {r['batch']} | {lrs} | "
                     f"{r['ema_decay'] or '-'} | {_fmt_s(r['seconds'])} | {r['final_loss']} |")
    if "parse_accuracy" in st.get("text", {}):
        acc = st["text"]["parse_accuracy"]
        lines += ["", f"The text stage's probe reads fresh prompts back with per-cell category accuracy "
                      f"{acc['cell_category']:.3f}, item colour accuracy {acc['item_colour']:.3f}, and whole scenes "
                      f"right {acc['scene']:.3f} of the time."]
    small_share = st["small"]["seconds"] / max(st["large"]["seconds"], 1)
    lines += [
        "",
        f"All stages: {st['vae']['schedule']}, 5% warm-up (VAE 10%); denoisers with weight decay 1e-4,",
        f"{int(cfg['uncond_p'] * 100)}% of prompts replaced by the empty prompt (the unconditional model of",
        "classifier-free guidance)." + (" The saved denoisers are the EMA weights." if cfg["ema_decay"] else ""),
        "The small UNet",
        f"is the compressed member: {params['unet_small'] / params['unet']:.0%} of the large one's parameters,",
        "fewer levels and blocks, cross-attention at one level only; it is distilled from the large UNet (its",
        "target mixes the true noise and the large UNet's prediction), in a stage that took "
        f"{small_share:.0%} of the large stage's time (each of its steps also runs the large UNet, the teacher).",
        f"Times are wall-clock on the build machine ({platform.machine()}, 2 cores shared with other jobs), "
        f"torch {info['versions']['torch']}.",
        "",
        "Reproduce (resumable: run the same command again after an interruption):",
        "",
        "    "
        + (info.get("command") or f"python -m lab.demo_family.train --out DIR --seed {info['seed']} --threads 2"),
        "",
    ]
    changes = info.get("changes", info.get("budget_changes", []))
    for change in changes:
        lines.append(_change_line(change))
    if changes:
        lines.append("")
    if eval_json is None and (folder / "eval" / "eval.json").is_file():
        eval_json = folder / "eval" / "eval.json"  # rise-eval --json folder/eval/eval.json
    if eval_json is not None:
        lines += evaluation_section(json.loads(Path(eval_json).read_text()))
    plots = sorted((folder / "eval").glob("*.png")) if (folder / "eval").is_dir() else []
    if plots:  # rise-eval --plots folder/eval
        lines += ["Plots (`rise-eval --plots`):", ""] + [f"![{p.stem}](eval/{p.name})" for p in plots] + [""]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    return folder / "README.md"


def _change_line(change: dict[str, Any]) -> str:
    """The model card's sentence for one recorded config change (see ``Work``)."""
    key, state = change["key"], change.get("stage_state", "under way")
    stage = stage_of(key) or "every"
    if key.endswith("_steps"):
        what = f"This run's {stage} step budget was changed from {change['from']} to {change['to']}"
    elif change["from"] is None:  # a setting the recipe gained after the run began
        what = f"This run's `{key}` (a setting added to the recipe since the run began) was set to {change['to']}"
    else:
        what = f"This run's `{key}` was changed from {change['from']} to {change['to']}"
    if state == "under way":
        return (f"{what} at {change['at']}, with the stage under way: it annealed its learning rate over the new "
                "budget from its checkpoint on, so a fresh run with today's config is close to these weights but "
                "not bit-identical.")
    if state == "not started":
        return (f"{what} at {change['at']}, before the {stage} stage started: a fresh run with today's config "
                "trains it the same way.")
    return f"{what} at {change['at']}, after the {stage} stage had finished: its weights did not change."


def evaluation_section(report: dict[str, Any]) -> list[str]:
    """Markdown for a ``rise-eval --json`` report."""
    c = report["ceilings"]
    meta = report.get("meta", {})
    lines = [
        "## Evaluation (`rise-eval`)",
        "",
        f"{meta.get('prompts', '?')} prompts of `prompts.txt`, N = {meta.get('steps', '?')} steps, sampler "
        f"{meta.get('sampler', '?')}, guidance {meta.get('guidance', '?')}, device half on "
        f"{meta.get('device', '?')}. Ceilings on {c['real'].get('n', '?')} real held-out scenes: "
        f"real {c['real']['adherence']:.3f}, through the VAE {c['vae']['adherence']:.3f}.",
        "",
        "| k | adherence | vs large-only | 1-2 items | 3-4 items | 5-9 items | Fréchet | edge s | device s | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "step_cost" in report:
        sc = report["step_cost"]
        lines[3:3] = [f"Per-step cost at batch 2 (CFG): large {sc['large_ms']:.1f} ms, small {sc['small_ms']:.1f} ms, "
                      f"ratio {sc['ratio']:.1f}.", ""]

    def level_mean(row: dict[str, Any], levels: Sequence[int]) -> str:
        vals = [row["adherence_by_items"][str(n)] for n in levels if str(n) in row["adherence_by_items"]]
        return f"{np.mean(vals):.3f}" if vals else "-"

    for row in report["rows"]:
        lines.append(f"| {row['k']} | {row['adherence']:.3f} | {row.get('relative_adherence', float('nan')):.1%} | "
                     f"{level_mean(row, (1, 2))} | {level_mean(row, (3, 4))} | "
                     f"{level_mean(row, range(5, 10))} | {row['frechet']:.2f} | {row['edge_s']:.3f} | "
                     f"{row['device_s']:.3f} | {row['speedup']:.2f}x |")
    return lines + [""]


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description="Train the RISE demo family (Fashion-MNIST scenes).")
    parser.add_argument("--out", type=Path, required=True, help="family folder to write")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints and stage results (default <out>.work)")
    parser.add_argument("--quick", action="store_true", help="a tiny family in minutes (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: $RISE_FASHION_MNIST or Debian's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the full run: 2)")
    parser.add_argument("--stop-after", choices=STAGES[:-1], default=None, help="stop after this stage (calibration)")
    parser.add_argument("--redo", choices=STAGES, default=None,
                        help="retrain this stage and the later ones from scratch, keeping the earlier ones")
    parser.add_argument("--snapshot", type=Path, default=None, metavar="DIR",
                        help="write a family from the run under way in the work folder to DIR, then exit")
    parser.add_argument("--card-only", action="store_true", help="only rewrite README.md from training.json")
    parser.add_argument("--eval-json", type=Path, default=None, help="with --card-only: add a rise-eval --json report")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a bar per stage on stderr, loss in its postfix (default: when stderr is a terminal)")
    args = parser.parse_args(argv)
    if args.card_only:
        print(f"wrote {write_model_card(args.out, args.eval_json)}")
        return 0
    if args.snapshot is not None:
        work = args.work if args.work is not None else args.out.with_name(args.out.name + ".work")
        try:
            state = snapshot(work, args.snapshot)
        except (TrainingError, OSError) as exc:
            parser.error(str(exc))
        print(f"wrote {args.snapshot}: " + ", ".join(f"{k} {v}" for k, v in state.items()))
        return 0
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else TrainConfig()
    command = "python -m lab.demo_family.train --out " + str(args.out) + (" --quick" if args.quick else "") + \
        f" --seed {args.seed} --threads {args.threads}"
    t0 = time.perf_counter()
    try:
        out = train_family(args.out, replace(cfg), seed=args.seed, work=args.work, data=args.data,
                           command=command, stop_after=args.stop_after, redo=args.redo, progress=args.progress)
    except TrainingError as exc:
        parser.error(str(exc))
    if out is None:
        print(f"stopped after {args.stop_after} ({time.perf_counter() - t0:.0f}s)")
    else:
        print(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
