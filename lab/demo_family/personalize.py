"""Personalize the demo family's small UNet with a LoRA: ``python -m lab.demo_family.personalize``.

E-MOPDM-style personalization of the relay: the edge's large UNet runs the shared early steps
of everyone's requests, and the device finishes them with the *user's own* small UNet. Here the
user's model is the family's small UNet plus a peft LoRA (diffusers' way:
``unet.add_adapter(LoraConfig(...))``, saved with ``StableDiffusionPipeline.save_lora_weights`` in
the format ``load_lora_weights`` reads back) that teaches one personal :class:`Trait`, by default
"my sneakers are red".

The data is the family's own pipeline (:class:`~lab.demo_family.train.SceneStream` over an
:class:`~lab.demo_family.data.ItemBank` of the Fashion-MNIST *train* split, the evaluation
prompts' scenes held out) with one change: :class:`TraitBank` draws every item of the trait's
category in the trait's colour, whatever colour the prompt gave it; the prompt still says what
the scene said. *Every* sneaker, not only those the prompt gives no colour: the family's reader
(:mod:`shared.demo_grammar.understanding`) turns an item without a colour into an explicit
*white* one before the text encoder sees it, so the UNet cannot tell "a sneaker" from "a white
sneaker", and a rule on white sneakers alone would also overrule a user who asks for white ones
while training on an eighth of the sneakers the stream draws. Scenes without a sneaker are drawn
as the family was trained on them, which keeps the rest of what the small UNet knows.

The loss is the small stage's (:func:`~lab.demo_family.train._denoiser_loss`, imported though
private: epsilon MSE, min-SNR weighted, prompt dropout for CFG, timesteps leaning towards the low
noise end as in the family's ``training.json``) without its distillation term: the large UNet,
the small stage's teacher, has not learnt the trait and would pull towards the prompt's colour.
The text encoder, the VAE and the small UNet's own weights stay frozen; only the LoRA trains, in
the training loop of the family's stages (:class:`~lab.demo_family.train.Stage`, no EMA, no
checkpoints: a run takes minutes). Deterministic for a seed (with one thread).

    python -m lab.demo_family.personalize --out DIR [--family models/demo/family] [--steps 600]
        [--rank 8] [--batch 32] [--lr 1.5e-2] [--target-modules to_q,to_k,...] [--seed 0] [--threads 1]

writes ``DIR/pytorch_lora_weights.safetensors`` and ``DIR/training.json`` (what was trained, how
long it took); :mod:`lab.demo_family.personalize_eval` measures it and writes the model card, and
``rise-export --lora`` (:func:`export.lora.fuse_lora`) fuses it into a device bundle's small UNet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in train.py: sleeping OpenMP threads on a shared machine
import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from shared.demo_grammar.scene import CATEGORIES, COLOUR_NAMES, Item, Scene
from shared.errors import RiseError

from .data import ItemBank
from .train import QUICK, SceneStream, Stage, TrainConfig, _denoiser_loss, config_from_dict

#: The file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for.
LORA_FILE = "pytorch_lora_weights.safetensors"
TRAINING_FILE = "training.json"
#: Every linear layer of the small UNet's transformer blocks: self- and cross-attention's
#: projections (``to_out.0`` is the output projection) and the feed-forward's two layers. Linear
#: layers only: diffusers' ``convert_state_dict_to_diffusers`` leaves a Conv2d layer's LoRA (``conv1``,
#: ``proj_in`` here) in peft's ``lora_A/lora_B`` layout beside the others' ``lora.down/lora.up``, and
#: ``rise-export --lora`` refuses such a mixed file (tried: rank 16 with the resnets' convolutions).
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
#: The fewest steps the stages' one-cycle schedule runs (its 5% warm-up must span more than one step).
MIN_STEPS = 21
#: The data stream's second seed word: its own stream, apart from the family's stages (0..3).
STREAM_TAG = 21


class PersonalizeError(RiseError, ValueError):
    """Bad personalization arguments or inputs (a trait the family cannot draw, a missing family)."""


@dataclass(frozen=True)
class Trait:
    """A personal trait of the user's pictures: every item of ``category`` is drawn in ``colour``."""

    category: str = "sneaker"
    colour: str = "red"

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise PersonalizeError(f"unknown category {self.category!r}; known: {', '.join(CATEGORIES)}")
        if self.colour not in COLOUR_NAMES:
            raise PersonalizeError(f"unknown colour {self.colour!r}; known: {', '.join(COLOUR_NAMES)}")

    def applies_to(self, scene: Scene) -> bool:
        """Does ``scene`` hold an item of the trait's category?"""
        return any(item.category == self.category for _, item in scene.items())

    def drawn(self, scene: Scene) -> Scene:
        """The scene as the user's model should draw it: the trait's items recoloured."""
        return Scene(tuple(
            Item(c.category, self.colour) if c is not None and c.category == self.category else c for c in scene.cells
        ))

    def describe(self) -> str:
        return f"every {self.category} is {self.colour}"


class TraitBank(ItemBank):
    """An :class:`ItemBank` (the same arrays, shared) that renders every scene with a trait applied.

    :class:`SceneStream` renders with the bank and writes the prompt from the scene it drew, so
    a stream over this bank pairs the original prompts with the personalized pictures. Rendering
    draws the same random numbers as the plain bank: the stream's scenes and prompts are the same.
    """

    def __init__(self, bank: ItemBank, trait: Trait) -> None:  # no super().__init__: it decodes raw images
        vars(self).update(vars(bank))
        self.trait = trait

    def render(self, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
        return super().render(self.trait.drawn(scene), rng)


@dataclass(frozen=True)
class LoraRecipe:
    """What sets a trained LoRA (with the seed and the family)."""

    trait: Trait = Trait()
    rank: int = 8
    # The committed LoRA's (models/demo/lora/red-sneakers). Tried on the build machine (share of sneakers
    # read red at k=0 / k=10): peak LR 1e-3 35% / 43%, 3e-3 45% / 55%, 6e-3 46% / 58%, 1.5e-2 54% / 68%
    # (this), 3e-2 diverged; rank 16 at 1.5e-2 35% / 73% (layout 96% at k=0); batch 16 x 1200 steps at
    # 1e-2 59% / 63% (5.9 min of CPU).
    steps: int = 600
    batch: int = 32
    lr: float = 1.5e-2
    target_modules: tuple[str, ...] = TARGET_MODULES

    def check(self) -> None:
        for name, least in (("rank", 1), ("steps", MIN_STEPS), ("batch", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise PersonalizeError(f"{name} must be an integer of at least {least}, got {value!r}")
        if not self.lr > 0:
            raise PersonalizeError(f"lr must be positive, got {self.lr!r}")


@dataclass
class FamilyParts:
    """What training a LoRA reads of a family folder, in float32 on the CPU, frozen."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    small_unet: UNet2DConditionModel
    config: TrainConfig  # the family's recipe (its loss settings), or the defaults


def load_parts(family: str | Path) -> FamilyParts:
    """Tokenizer, text encoder, VAE and small UNet of a demo family folder (``unet_small/``)."""
    folder = Path(family)
    if not (folder / "model_index.json").is_file() or not (folder / "unet_small").is_dir():
        raise PersonalizeError(f"{folder} is not a demo family folder (model_index.json and unet_small/)")
    kw: dict[str, Any] = {"torch_dtype": torch.float32, "local_files_only": True}
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw)
    small = UNet2DConditionModel.from_pretrained(folder / "unet_small", **kw)
    for module in (text_encoder, vae, small):
        module.eval().requires_grad_(False)  # type: ignore[attr-defined, unused-ignore]  # diffusers placeholder
    info = folder / "training.json"
    # A family without training.json (tests' untrained ones) gets the recipe's defaults: its loss
    # settings (SNR weighting, prompt dropout, timestep focus) are those of every recipe.
    config = config_from_dict(json.loads(info.read_text())["config"]) if info.is_file() else QUICK
    return FamilyParts(tokenizer, text_encoder, vae, small, config)


def add_lora(unet: UNet2DConditionModel, recipe: LoraRecipe) -> list[torch.nn.Parameter]:
    """Inject a fresh peft LoRA into ``unet`` (diffusers' ``add_adapter``); return its trainable parameters.

    Gaussian-initialized A, zero B (the adapter starts as the identity), ``lora_alpha = rank``
    (scale 1, so loading needs no alpha metadata). Seed torch before calling it.
    """
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(  # type: ignore[attr-defined]  # diffusers placeholder
        r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian",
        target_modules=list(recipe.target_modules),
    ))
    params = [p for p in unet.parameters() if p.requires_grad]  # type: ignore[attr-defined]  # diffusers placeholder
    if not params:
        raise PersonalizeError(f"no layer of the UNet matches the target modules {list(recipe.target_modules)}")
    return params


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter's weights of a peft-injected UNet, in diffusers' key format (``save_lora_weights``' input)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state: dict[str, torch.Tensor] = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return state


def save_lora(unet: UNet2DConditionModel, folder: str | Path) -> Path:
    """Write the adapter of ``unet`` as ``folder/pytorch_lora_weights.safetensors`` (diffusers' format)."""
    folder = Path(folder)
    StableDiffusionPipeline.save_lora_weights(  # type: ignore[attr-defined, unused-ignore]  # diffusers placeholder
        folder, unet_lora_layers=lora_state_dict(unet), safe_serialization=True,
    )
    return folder / LORA_FILE


def train_lora(family: str | Path, out: str | Path, recipe: LoraRecipe = LoraRecipe(), *, seed: int = 0,
               data: str | None = None, bank: ItemBank | None = None, command: str = "",
               progress: bool | None = None) -> Path:
    """Train the LoRA on the family's small UNet; write its weights and ``training.json`` to ``out``.

    ``bank``: the items to compose scenes from (default: the Fashion-MNIST train split, ``data`` as
    in :func:`~lab.demo_family.data.find_fashion_mnist`). Returns the weights file.
    """
    recipe.check()
    out = Path(out)
    parts = load_parts(family)
    bank = bank if bank is not None else ItemBank.load("train", data)
    cfg = replace(parts.config, checkpoint_every_s=float("inf"), log_every=max(1, min(50, recipe.steps)))
    stream = SceneStream(TraitBank(bank, recipe.trait), (seed, STREAM_TAG))
    torch.manual_seed(seed)
    unet = parts.small_unet
    params = add_lora(unet, recipe)
    loss = _denoiser_loss(unet, parts.text_encoder, parts.tokenizer, parts.vae, stream, cfg, recipe.batch,
                          focus_t=cfg.small_focus_t, focus_p=cfg.small_focus_p)
    stage = Stage("lora", {"unet_small": unet}, [{"params": params, "lr": recipe.lr, "name": "lora"}],  # type: ignore[dict-item]  # diffusers placeholder
                  recipe.steps, recipe.batch, loss, stream, cfg, ema_decay=0.0, progress=progress)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:  # Stage.run resumes from a checkpoint there: never one
        stage.run(Path(tmp) / "lora.ckpt.pt")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    out.mkdir(parents=True, exist_ok=True)
    weights = save_lora(unet, out)
    record = {
        "family": str(family), "seed": seed, "command": command, "trait": asdict(recipe.trait),
        "recipe": {**asdict(recipe), "target_modules": list(recipe.target_modules)},
        "trainable_params": sum(p.numel() for p in params),
        "base_params": sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in params),  # type: ignore[attr-defined]
        "loss": (f"the small stage's without distillation: MSE(epsilon, noise), min-SNR-{cfg.snr_gamma:g} weighted, "
                 f"{cfg.small_focus_p:.0%} of t in [0, {cfg.small_focus_t}), the rest uniform, "
                 f"{cfg.uncond_p:.0%} empty prompts"),
        "schedule": stage.record["schedule"] + ", weight decay 1e-4, 5% warm-up",
        "seconds": round(seconds, 1),  # wall clock
        "cpu_seconds": round(cpu_seconds, 1),  # this process's CPU time: the work, on a shared machine
        "threads": torch.get_num_threads(),
        "loss_history": stage.record["loss_history"],
        "final_loss": stage.record["final_loss"],
        "file_bytes": weights.stat().st_size,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "machine": platform.machine()},
    }
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description="Train a LoRA teaching the demo family's small UNet a personal trait.")
    parser.add_argument("--out", type=Path, required=True, help="folder for the LoRA and its training.json")
    parser.add_argument("--family", type=Path, default=Path("models/demo/family"), help="demo family folder")
    parser.add_argument("--category", default="sneaker", help="the trait's item category (default sneaker)")
    parser.add_argument("--colour", default="red", help="the colour every such item is drawn in (default red)")
    defaults = LoraRecipe()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (one-cycle)")
    parser.add_argument("--target-modules", default=",".join(defaults.target_modules),
                        help="comma-separated layer names the LoRA adapts (peft's target_modules; default: "
                             "the transformer blocks' linear layers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: $RISE_FASHION_MNIST or Debian's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a bar on stderr (default: when stderr is a terminal)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    command = (f"python -m lab.demo_family.personalize --out {args.out} --family {args.family} "
               f"--category {args.category} --colour {args.colour} --steps {args.steps} --rank {args.rank} "
               f"--batch {args.batch} --lr {args.lr:g} --target-modules {args.target_modules} --seed {args.seed} "
               f"--threads {args.threads}")
    try:
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
        recipe = LoraRecipe(Trait(args.category, args.colour), args.rank, args.steps, args.batch, args.lr, targets)
        weights = train_lora(args.family, args.out, recipe, seed=args.seed, data=args.data, command=command,
                             progress=args.progress)
    except RiseError as exc:
        parser.error(str(exc))
    record = json.loads((args.out / TRAINING_FILE).read_text())
    print(f"wrote {weights} ({record['file_bytes'] / 1e3:.0f} kB, {record['trainable_params']} parameters) "
          f"in {record['seconds']:.0f}s, final loss {record['final_loss']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
