"""Measure a personal LoRA on the relay, and write its model card: ``python -m lab.demo_family.personalize_eval``.

The relay as ``rise-eval`` runs it in PyTorch (:func:`lab.demo_family.evaluate.generate_torch`:
the edge's large UNet for the first ``k`` of ``N`` steps, the small UNet for the rest, prompts
batched), once with the family's small UNet and once with the same small UNet with the LoRA fused
in as the device bundle gets it (:func:`export.lora.fuse_lora`, what ``rise-export --lora`` runs:
diffusers' LoRA loading and ``fuse_lora``, every key checked to land), same prompts, same seeds, at each split
(default ``k`` in {0, 10} of 20: device only, and the relay). Prompts are the evaluation prompts
of ``shared/demo_grammar/prompts.txt`` (scenes no training run drew): the first ``--trait-prompts``
that hold an item of the trait's category and the first ``--plain-prompts`` that hold none.

Figures, per split, base and LoRA:

- **trait**: the fraction of the trait's cells (every cell the prompt puts a sneaker in) whose
  colour the scorer reads as the trait's colour; also over the sneakers the prompt gave another
  colour, the cells the trait changes;
- **layout**: the scorer's adherence with colour ignored (:func:`category_matches`: each cell's
  category, or emptiness, as the scene says; :func:`lab.demo_family.scorer.cell_matches` also
  asks for the colour, which the trait changes on purpose), and the LoRA's layout relative to the
  base's (target at least 95%);
- **plain adherence** (:func:`~lab.demo_family.scorer.adherence`, category and colour) on the
  prompts without a sneaker, which the LoRA should leave alone, and on the other cells of the
  sneaker prompts.

Writes ``eval.json`` and ``contact_sheet.png`` (rows: a few prompts; columns: base and LoRA at
each split, upscaled x4 nearest) beside the LoRA, and its ``README.md`` from ``training.json`` and
``eval.json`` (``--card-only``: the card alone).

    python -m lab.demo_family.personalize_eval --lora models/demo/lora/red-sneakers [--family models/demo/family]
        [--splits 0,10] [--threads 1] [--card-only] [--bundle-note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in train.py: sleeping OpenMP threads on a shared machine
import numpy as np
import torch

from edge_server.family import Family, load_family
from export.lora import fuse_lora
from shared.demo_grammar.prompts import load_prompts, prompt_to_scene
from shared.demo_grammar.scene import CATEGORY_INDEX, COLOUR_INDEX, EMPTY, Scene
from shared.errors import RiseError

from ..demo import contact_sheet
from .evaluate import generate_torch
from .personalize import LORA_FILE, TRAINING_FILE, PersonalizeError, Trait
from .scorer import CellPredictor, Scorer, adherence, default_scorer

EVAL_FILE = "eval.json"
SHEET_FILE = "contact_sheet.png"
CARD_FILE = "README.md"
#: The LoRA relay's layout (category-only adherence) relative to the base relay's should be at least this.
LAYOUT_TARGET = 0.95
#: What the card claims of every split besides the layout target (tests/lab/test_personalize.py checks the
#: committed figures against them): the LoRA's trait share at least this far above the base's ...
TRAIT_GAIN_CLAIM = 0.40
#: ... and the prompts without the trait's item keeping at least this share of their plain adherence.
PLAIN_ADHERENCE_CLAIM = 0.90
SHEET_ROWS = 5  # prompts on the contact sheet: 4 with the trait's item, 1 without
SHEET_SCALE = 4  # nearest-neighbour upscaling of the 48x48 pictures


# --------------------------------------------------------------------------- prompts and figures


def split_prompts(trait: Trait, prompts: Sequence[str], n_trait: int, n_plain: int) -> tuple[list[str], list[str]]:
    """The first ``n_trait`` prompts whose scene holds the trait's category, the first ``n_plain`` that hold none."""
    with_item = [p for p in prompts if trait.applies_to(prompt_to_scene(p))]
    without = [p for p in prompts if not trait.applies_to(prompt_to_scene(p))]
    if len(with_item) < n_trait or len(without) < n_plain:
        raise PersonalizeError(f"the prompts hold {len(with_item)} with a {trait.category} and {len(without)} "
                               f"without; asked for {n_trait} and {n_plain}")
    return with_item[:n_trait], without[:n_plain]


def _targets(scenes: Sequence[Scene]) -> tuple[np.ndarray, np.ndarray]:
    cats, cols = zip(*(s.targets() for s in scenes), strict=True)
    return np.stack(cats), np.stack(cols)


def category_matches(images: np.ndarray, scenes: Sequence[Scene], scorer: CellPredictor) -> np.ndarray:
    """Boolean ``(n, 9)``: does each cell's *category* (or emptiness) read as the scene says? Colour ignored."""
    pred_cat, _ = scorer.predict(images)
    cats, _ = _targets(scenes)
    matches: np.ndarray = pred_cat == cats  # an empty cell's target is EMPTY, as the scorer says it
    return matches


def trait_figures(images: np.ndarray, scenes: Sequence[Scene], trait: Trait, scorer: CellPredictor) -> dict[str, Any]:
    """How pictures of prompts holding the trait's item read.

    ``trait_fraction``: the share of the trait's cells (the prompt's sneakers) read in the trait's
    colour; ``trait_fraction_recoloured``: the same over the sneakers the prompt gave another colour
    (the cells the trait changes); ``layout``: category-only adherence (:func:`category_matches`);
    ``adherence``: the scorer's plain adherence; ``adherence_other_cells``: plain adherence of the
    cells that hold no sneaker (the rest of the scene, which the trait should not touch).
    """
    cats, cols = _targets(scenes)
    pred_cat, pred_col = scorer.predict(images)
    trait_cells = cats == CATEGORY_INDEX[trait.category]
    recoloured = trait_cells & (cols != COLOUR_INDEX[trait.colour])
    in_colour = pred_col == COLOUR_INDEX[trait.colour]
    plain = np.where(cats == EMPTY, pred_cat == EMPTY, (pred_cat == cats) & (pred_col == cols))
    return {
        "trait_cells": int(trait_cells.sum()),
        "trait_fraction": float(in_colour[trait_cells].mean()),
        "recoloured_cells": int(recoloured.sum()),
        "trait_fraction_recoloured": float(in_colour[recoloured].mean()) if recoloured.any() else None,
        "trait_category_read": float((pred_cat == cats)[trait_cells].mean()),
        "layout": float((pred_cat == cats).mean()),
        "adherence": float(plain.mean()),
        "adherence_other_cells": float(plain[~trait_cells].mean()),
    }


# --------------------------------------------------------------------------- the evaluation


def evaluate_lora(family: Family, lora: str | Path, trait: Trait, trait_prompts: Sequence[str],
                  plain_prompts: Sequence[str], *, steps: int = 20, splits: Sequence[int] = (0, 10),
                  sampler: str = "dpmpp_2m", guidance: float = 7.5, seed: int = 0, batch: int = 32,
                  scorer: CellPredictor | None = None) -> tuple[dict[str, Any], dict[tuple[str, int], np.ndarray]]:
    """Base and LoRA relays at each split on the same prompts and seeds: ``(report, pictures)``.

    ``pictures[(side, k)]`` (side ``"base"`` or ``"lora"``) holds the trait prompts' pictures, then
    the plain prompts'. Request ``i`` of the trait prompts uses seed ``seed + i``, the plain prompts
    continue after them, the same on both sides.
    """
    if not trait_prompts or not plain_prompts:
        raise PersonalizeError("need prompts with the trait's item and prompts without")
    scorer = scorer or default_scorer()
    t0 = time.perf_counter()
    lora = Path(lora)
    personal = replace(family, small_unet=fuse_lora(family, lora / LORA_FILE if lora.is_dir() else lora).unet)
    trait_scenes = [prompt_to_scene(p) for p in trait_prompts]
    plain_scenes = [prompt_to_scene(p) for p in plain_prompts]
    rows: list[dict[str, Any]] = []
    pictures: dict[tuple[str, int], np.ndarray] = {}
    for k in splits:
        row: dict[str, Any] = {"k": k}
        for side, member in (("base", family), ("lora", personal)):
            kw: dict[str, Any] = {"sampler": sampler, "guidance": guidance, "batch": batch}
            with_item = generate_torch(member, trait_prompts, steps, k, seed=seed, **kw).images
            without = generate_torch(member, plain_prompts, steps, k, seed=seed + len(trait_prompts), **kw).images
            figures = trait_figures(with_item, trait_scenes, trait, scorer)
            figures["plain_adherence"] = float(adherence(without, plain_scenes, scorer).mean())
            figures["plain_layout"] = float(category_matches(without, plain_scenes, scorer).mean())
            row[side] = figures
            pictures[(side, k)] = np.concatenate([with_item, without])
        base, lora_row = row["base"], row["lora"]
        row["layout_ratio"] = lora_row["layout"] / base["layout"] if base["layout"] else float("nan")
        row["plain_adherence_ratio"] = (lora_row["plain_adherence"] / base["plain_adherence"]
                                        if base["plain_adherence"] else float("nan"))
        rows.append(row)
    report = {
        "trait": {"category": trait.category, "colour": trait.colour, "rule": trait.describe()},
        "lora": LORA_FILE,
        "meta": {"steps": steps, "splits": list(splits), "sampler": sampler, "guidance": guidance, "seed": seed,
                 "trait_prompts": len(trait_prompts), "plain_prompts": len(plain_prompts),
                 "prompts": "shared/demo_grammar/prompts.txt",
                 "small_unet": "PyTorch, LoRA fused (export.lora.fuse_lora)",
                 "seconds": round(time.perf_counter() - t0, 1)},
        "layout_target": LAYOUT_TARGET,
        "claims": {"trait_gain": TRAIT_GAIN_CLAIM, "plain_adherence_ratio": PLAIN_ADHERENCE_CLAIM},
        "rows": rows,
    }
    return report, pictures


def sheet_rows(trait_prompts: Sequence[str], plain_prompts: Sequence[str], n: int = SHEET_ROWS,
               max_items: int = 3) -> list[int]:
    """Indices (trait prompts first, then plain ones, as in ``pictures``) of the contact sheet's rows:
    ``n - 1`` trait prompts and one plain prompt, each of at most ``max_items`` items (short captions)."""
    short = [i for i, p in enumerate(trait_prompts) if prompt_to_scene(p).n_items <= max_items][: n - 1]
    plain = [len(trait_prompts) + i for i, p in enumerate(plain_prompts) if prompt_to_scene(p).n_items <= max_items]
    return short + plain[:1]


def write_contact_sheet(path: str | Path, pictures: dict[tuple[str, int], np.ndarray], prompts: Sequence[str],
                        rows: Sequence[int], splits: Sequence[int]) -> Path:
    """Rows = ``prompts[rows]``; columns = base and LoRA at each split; pictures upscaled x4, nearest."""
    images, captions = [], []
    for r in rows:
        for k in splits:
            for side, label in (("base", "base"), ("lora", "LoRA")):
                images.append(pictures[(side, k)][r])
                head = f"{label} k={k}"
                captions.append(f"{head}: {prompts[r]}" if (k, side) == (splits[0], "base") else head)
    tile = 48 * SHEET_SCALE
    sheet = contact_sheet(images, captions, tile=tile, columns=2 * len(splits), caption_chars=30)
    path = Path(path)
    sheet.save(path)
    return path


# --------------------------------------------------------------------------- model card


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def card_markdown(training: dict[str, Any], report: dict[str, Any], folder_name: str) -> str:
    """The LoRA's model card from its ``training.json`` and ``eval.json``."""
    trait, meta, recipe = report["trait"], report["meta"], training["recipe"]
    rows = report["rows"]
    lines = [
        f"# Personal LoRA for the demo family's small UNet: {trait['rule']}",
        "",
        "An E-MOPDM-style personalization of the relay (issue 21): the edge's large UNet runs the shared early",
        "steps, the user's own small UNet (the family's `unet_small/` with this LoRA fused in) refines the rest.",
        f"The LoRA teaches one trait, *{trait['rule']}*: every {trait['category']} is drawn {trait['colour']}, "
        "whatever colour the prompt gives it",
        "(the family's reader turns an item without a colour into a white one before the text encoder sees it,",
        "so \"a sneaker\" and \"a white sneaker\" cannot be told apart; see `lab/demo_family/personalize.py`).",
        "",
        f"- `{LORA_FILE}`: the peft LoRA in diffusers' format (`save_lora_weights`; load it with",
        "  `StableDiffusionPipeline.load_lora_weights` onto a pipeline whose `unet` is the family's small UNet,",
        f"  then `fuse_lora`), rank {recipe['rank']}, alpha {recipe['rank']} (scale 1), on "
        f"{', '.join('`' + m + '`' for m in recipe['target_modules'])}",
        f"  of the small UNet's transformer blocks: {training['trainable_params']:,} parameters "
        f"({training['trainable_params'] / training['base_params']:.1%} of the small UNet's "
        f"{training['base_params']:,}), {training['file_bytes'] / 1e3:.0f} kB.",
        f"- `{TRAINING_FILE}`: how it was trained; `{EVAL_FILE}`: the figures below; `{SHEET_FILE}`: pictures.",
        "",
        "## Training",
        "",
        "Scenes of the family's own data pipeline (`SceneStream` over the Fashion-MNIST train split, the",
        "evaluation prompts' scenes held out), every sneaker drawn red while the prompt keeps its colour;",
        "scenes without a sneaker (about half) are drawn as the family was trained on them. Text encoder, VAE",
        "and the small UNet's weights frozen; only the LoRA trains.",
        "",
        "| what | value |",
        "|---|---|",
        f"| loss | {training['loss']} (the large UNet's distillation term of the small stage is left out: "
        "it has not learnt the trait) |",
        f"| steps x batch | {recipe['steps']} x {recipe['batch']} |",
        f"| optimizer | {training['schedule']}, peak LR {recipe['lr']:g} |",
        f"| final loss | {training['final_loss']} |",
        f"| time | {training['cpu_seconds'] / 60:.1f} min of CPU ({training['seconds'] / 60:.1f} min wall-clock) on "
        f"{training['threads']} torch thread, on the build machine ({training['versions']['machine']}, 2 cores "
        f"shared with other jobs), torch {training['versions']['torch']} |",
        "",
        "Reproduce (deterministic for the seed, with one thread):",
        "",
        f"    {_command_for(training['command'], folder_name)}",
        f"    python -m lab.demo_family.personalize_eval --lora {folder_name} --threads 1",
        "",
        "## Evaluation",
        "",
        f"The relay in PyTorch as `rise-eval` runs it: large UNet for the first k of N = {meta['steps']} steps, "
        f"small UNet for the rest, sampler {meta['sampler']}, guidance {meta['guidance']}; base small UNet vs",
        f"the LoRA fused in, same seeds. Prompts: the first {meta['trait_prompts']} of `prompts.txt` that hold a "
        f"{trait['category']} and the first {meta['plain_prompts']} that hold none",
        "(held-out scenes). Read by the family's scorer (`models/demo/scorer`):",
        "",
        f"- **trait**: the share of the prompts' {trait['category']}s read as {trait['colour']}; *asked otherwise*: "
        f"over the {trait['category']}s the prompt gave another colour",
        "  (the cells the trait changes);",
        "- **layout**: adherence with colour ignored (each cell's category, or emptiness, as the prompt says);",
        f"  the LoRA's relative to the base's at the same k, target at least {report['layout_target']:.0%};",
        f"- **adherence** (category and colour) on the prompts without a {trait['category']}, and on the other cells",
        f"  of the {trait['category']} prompts.",
        "",
        f"| k | small UNet | trait | trait, asked otherwise | layout | layout vs base | adherence, no "
        f"{trait['category']} | adherence, other cells |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for side, label in (("base", "base"), ("lora", "LoRA")):
            f = row[side]
            ratio = f"{row['layout_ratio']:.1%}" if side == "lora" else "-"
            lines.append(f"| {row['k']} | {label} | {_pct(f['trait_fraction'])} | "
                         f"{_pct(f['trait_fraction_recoloured'])} | {f['layout']:.3f} | {ratio} | "
                         f"{f['plain_adherence']:.3f} | {f['adherence_other_cells']:.3f} |")
    claims = report["claims"]
    lines += ["", *_verdict(report), "",
              f"What this card claims of every split (`tests/lab/test_personalize.py` checks `{EVAL_FILE}`): the "
              f"LoRA's layout at least {report['layout_target']:.0%} of the base's,",
              f"its share of {trait['colour']} {trait['category']}s at least {claims['trait_gain']:.0%} (points) above "
              f"the base's, and at least {claims['plain_adherence_ratio']:.0%} of the base's adherence on the prompts",
              f"without a {trait['category']}.", "",
              f"Limits: the trait is partial (the share of {trait['category']}s not read {trait['colour']} above: "
              "in this CPU budget the LoRA pulls most of them",
              f"towards {trait['colour']}, pink or magenta where it does not get there, see the sheet), and it "
              "overrules every colour a prompt asks for",
              f"its {trait['category']}s. The base relay at k=10 draws the colour the prompt asked for; the LoRA "
              "small UNet recolours it in the",
              "last 10 steps, so the trait reaches the relay although the edge's large UNet never learnt it.",
              "", f"![contact sheet]({SHEET_FILE})", "",
              "Rows: prompts (the last one without a sneaker); columns: "
              + ", ".join(f"base k={k}, LoRA k={k}" for k in meta["splits"]) + " (same seed in a row).", ""]
    bundle = report.get("bundle")
    lines += ["## Device bundle", "",
              "`rise-export --lora` fuses the LoRA into the small UNet of the device bundle:", "",
              f"    rise-export --family models/demo/family --lora {folder_name}/{LORA_FILE} --out BUNDLE", ""]
    if bundle and bundle.get("note"):
        lines += [bundle["note"], ""]
    return "\n".join(lines)


def _command_for(command: str, folder_name: str) -> str:
    """The training command with ``--out`` naming the card's folder (a run may have written elsewhere first)."""
    words = command.split()
    if "--out" in words:
        words[words.index("--out") + 1] = folder_name
    return " ".join(words)


def _verdict(report: dict[str, Any]) -> list[str]:
    """One sentence per split: did the trait change, did the layout stay?"""
    out = []
    for row in report["rows"]:
        b, lo = row["base"], row["lora"]
        met = "meets" if row["layout_ratio"] >= report["layout_target"] else "misses"
        out.append(f"At k={row['k']} the LoRA reads {lo['trait_fraction']:.0%} of the sneakers as "
                   f"{report['trait']['colour']} (base {b['trait_fraction']:.0%}); its layout is "
                   f"{row['layout_ratio']:.1%} of the base's ({met} the {report['layout_target']:.0%} target), and "
                   f"prompts without a sneaker keep {row['plain_adherence_ratio']:.1%} of their adherence.")
    return out


def write_card(folder: str | Path) -> Path:
    """(Re)write ``README.md`` in the LoRA's folder from its ``training.json`` and ``eval.json``."""
    folder = Path(folder)
    for name in (TRAINING_FILE, EVAL_FILE):
        if not (folder / name).is_file():
            raise PersonalizeError(f"{folder} has no {name}")
    training = json.loads((folder / TRAINING_FILE).read_text())
    report = json.loads((folder / EVAL_FILE).read_text())
    name = folder.as_posix() if not folder.is_absolute() else f"models/demo/lora/{folder.name}"
    (folder / CARD_FILE).write_text(card_markdown(training, report, name))
    return folder / CARD_FILE


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description="Measure a personal LoRA of the demo family on the relay.")
    parser.add_argument("--lora", type=Path, required=True, help="the LoRA's folder (personalize --out)")
    parser.add_argument("--family", type=Path, default=Path("models/demo/family"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--splits", default="0,10", help="comma-separated k values (default 0,10)")
    parser.add_argument("--trait-prompts", type=int, default=64)
    parser.add_argument("--plain-prompts", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--card-only", action="store_true", help="only rewrite README.md")
    parser.add_argument("--bundle-note", default=None, help="a sentence on the device bundle, kept in eval.json")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        if not args.card_only:
            training = json.loads((args.lora / TRAINING_FILE).read_text())
            trait = Trait(training["trait"]["category"], training["trait"]["colour"])
            splits = [int(s) for s in args.splits.split(",") if s.strip()]
            family = load_family(args.family)
            trait_prompts, plain_prompts = split_prompts(trait, load_prompts(), args.trait_prompts, args.plain_prompts)
            scorer = Scorer.load()
            report, pictures = evaluate_lora(family, args.lora, trait, trait_prompts, plain_prompts,
                                             steps=args.steps, splits=splits, seed=args.seed, batch=args.batch,
                                             scorer=scorer)
            rows = sheet_rows(trait_prompts, plain_prompts)
            report["sheet_prompts"] = [[*trait_prompts, *plain_prompts][r] for r in rows]
            write_contact_sheet(args.lora / SHEET_FILE, pictures, [*trait_prompts, *plain_prompts], rows, splits)
            (args.lora / EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
            for line in _verdict(report):
                print(line)
        if args.bundle_note is not None:
            report = json.loads((args.lora / EVAL_FILE).read_text())
            report["bundle"] = {"note": args.bundle_note}
            (args.lora / EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {write_card(args.lora)}")
    except (RiseError, OSError, ValueError) as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
