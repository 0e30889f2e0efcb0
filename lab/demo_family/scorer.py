"""The demo family's scorer: a per-cell CNN, prompt adherence and a Fréchet distance.

The *adherence* of an image to its prompt is the fraction of the 9 grid cells whose
category and colour (or emptiness) the scorer reads as the prompt's scene says. The scorer
is a small CNN applied to each 16x16 cell: it predicts the category (or "empty") and the
colour. It is trained on real Fashion-MNIST *train* items, tinted and composed into scenes
exactly as :mod:`lab.demo_family.data` does, with mild degradations (shifts, blur,
noise, gain) so that it reads decoded latents as it reads real scenes; its held-out accuracy is
measured on the *test* split. Its penultimate layer gives the features of
:func:`frechet_distance` (an FID on cells, computed with this scorer instead of Inception).

``python -m lab.demo_family.scorer --train`` trains and saves it under
``models/demo/scorer/``; ``--eval`` measures it (item accuracy, adherence on real held-out scenes).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from shared.demo_grammar.prompts import prompt_to_scene
from shared.errors import RiseError

from .data import (
    CANVAS,
    CATEGORIES,
    CELL,
    COLOUR_NAMES,
    COLOUR_RGB,
    EMPTY,
    GRID,
    ITEM,
    N_CELLS,
    ItemBank,
    Scene,
    cells_of,
)

#: Where the committed scorer lives (``<repo>/models/demo/scorer``).
DEFAULT_SCORER_DIR = Path(__file__).resolve().parents[2] / "models" / "demo" / "scorer"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ScorerError(RiseError):
    """The scorer's weights are missing or do not match its architecture."""


class CellPredictor(Protocol):
    """Anything that reads the cells of images: the scorer, or an oracle in tests."""

    def predict(self, images: np.ndarray | Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
        """``(categories (n, 9), colours (n, 9))``; category :data:`EMPTY` = empty cell."""
        ...


class CellNet(nn.Module):
    """Conv(32) -> pool -> Conv(64)x2 -> pool -> FC(128) -> category (8 + empty) and colour heads.

    One full-resolution conv only: a second one at 16x16 would double the training time on
    2 CPU cores (about 0.2M parameters in all). Run it channels-last: 25% faster on a CPU.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(3, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (CELL // 4) ** 2, feature_dim), nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.category = nn.Linear(feature_dim, len(CATEGORIES) + 1)
        self.colour = nn.Linear(feature_dim, len(COLOUR_NAMES))

    def features(self, cells: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)`` of cells ``(B, 3, 16, 16)`` in [0, 1]."""
        feats: torch.Tensor = self.body(cells)
        return feats

    def forward(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dropout(self.features(cells))
        return self.category(h), self.colour(h)


def _as_float_images(images: np.ndarray | Sequence[object]) -> np.ndarray:
    # Accept uint8 or float arrays (n, 48, 48, 3), or a list of PIL images / arrays.
    arr = np.asarray(images) if isinstance(images, np.ndarray) else np.stack([np.asarray(im) for im in images])
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


class Scorer:
    """A trained :class:`CellNet` with numpy in, numpy out."""

    def __init__(self, net: CellNet, config: dict[str, object] | None = None) -> None:
        # torch's stubs for Module.to lack the memory_format keyword (accepted at runtime).
        self.net = net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.config = dict(config or {})

    @classmethod
    def load(cls, folder: str | Path | None = None) -> Scorer:
        """Load a saved scorer (default: the committed one in :data:`DEFAULT_SCORER_DIR`)."""
        folder = Path(folder or DEFAULT_SCORER_DIR)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise ScorerError(
                f"no scorer weights at {weights}; train them with `python -m lab.demo_family.scorer --train`"
            )
        config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
        net = CellNet(int(config.get("width", 32)), int(config.get("feature_dim", 128)))
        state = {k: v.float() for k, v in load_file(weights).items()}  # fp32 whatever was saved
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ScorerError(f"{weights} does not match the scorer architecture: {exc}") from exc
        return cls(net, config)

    def save(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.net.state_dict().items()}, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return folder

    @torch.no_grad()
    def _run(self, images: np.ndarray | Sequence[object], batch: int = 256) -> tuple[np.ndarray, ...]:
        cells = cells_of(_as_float_images(images))  # (n, 9, 16, 16, 3)
        n = cells.shape[0]
        flat = _to_tensor(cells.reshape(-1, CELL, CELL, 3))
        cats, cols, feats = [], [], []
        for start in range(0, flat.shape[0], batch * N_CELLS):
            h = self.net.features(flat[start : start + batch * N_CELLS])
            cats.append(self.net.category(h).argmax(1))
            cols.append(self.net.colour(h).argmax(1))
            feats.append(h)
        return (
            torch.cat(cats).numpy().reshape(n, N_CELLS),
            torch.cat(cols).numpy().reshape(n, N_CELLS),
            torch.cat(feats).numpy().reshape(n, N_CELLS, -1),
        )

    def predict(self, images: np.ndarray | Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
        """Per-cell ``(categories (n, 9), colours (n, 9))`` of images ``(n, 48, 48, 3)``.

        Category :data:`~lab.demo_family.data.EMPTY` marks an empty cell (its colour
        is meaningless). Images are uint8, or float in [0, 1].
        """
        cats, cols, _ = self._run(images)
        return cats, cols

    def features(self, images: np.ndarray | Sequence[object]) -> np.ndarray:
        """Penultimate-layer features ``(n, 9, 128)``: one vector per cell."""
        return self._run(images)[2]


@lru_cache(maxsize=1)
def default_scorer() -> Scorer:
    """The committed scorer, loaded once."""
    return Scorer.load()


def _targets(scenes: Sequence[Scene | str]) -> tuple[np.ndarray, np.ndarray]:
    # Prompts are accepted too: their parse is the target.
    parsed = [prompt_to_scene(s) if isinstance(s, str) else s for s in scenes]
    cats, cols = zip(*(s.targets() for s in parsed), strict=True) if parsed else ((), ())
    return (
        np.asarray(cats, dtype=np.int64).reshape(-1, N_CELLS),
        np.asarray(cols, dtype=np.int64).reshape(-1, N_CELLS),
    )


def cell_matches(
    images: np.ndarray | Sequence[object], scenes: Sequence[Scene | str], scorer: CellPredictor | None = None
) -> np.ndarray:
    """Boolean ``(n, 9)``: does each cell read as its scene says (category and colour, or empty)?"""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    pred_cat, pred_col = (scorer or default_scorer()).predict(images)
    cats, cols = _targets(scenes)
    empty = cats == EMPTY
    matches: np.ndarray = np.where(empty, pred_cat == EMPTY, (pred_cat == cats) & (pred_col == cols))
    return matches


def adherence(
    images: np.ndarray | Sequence[object], scenes: Sequence[Scene | str], scorer: CellPredictor | None = None
) -> np.ndarray:
    """Per-image adherence ``(n,)``: the fraction of cells matching the scene (or prompt)."""
    adh: np.ndarray = cell_matches(images, scenes, scorer).mean(axis=1)
    return adh


def item_recall(
    images: np.ndarray | Sequence[object], scenes: Sequence[Scene | str], scorer: CellPredictor | None = None
) -> np.ndarray:
    """Per-image fraction of the prompt's *items* drawn right (empty cells ignored)."""
    matches = cell_matches(images, scenes, scorer)
    filled = _targets(scenes)[0] != EMPTY
    recall: np.ndarray = (matches & filled).sum(axis=1) / filled.sum(axis=1)
    return recall


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n, d)`` (or ``(n, 9, d)``,
    pooled over cells).

    ``|mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A^1/2 B A^1/2)^1/2)``, with the matrix square
    roots from ``numpy.linalg.eigh``: scipy is not a dependency, and both matrices are
    symmetric PSD, so eigh is exact and never yields the complex parts ``sqrtm`` can.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least two feature vectors on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    mid = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(mid, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


# --------------------------------------------------------------------------- training


def _random_cells(
    bank: ItemBank, n: int, rng: np.random.Generator, *, p_empty: float, max_shift: int
) -> tuple[np.ndarray, ...]:
    """``n`` cells cropped from random scenes, with labels: ``(cells (n,16,16,3), cats, cols)``.

    Each cell is cropped from a 3x3 neighbourhood of random items, shifted by up to
    ``max_shift`` px, so neighbours bleed in as they may in a generated image.
    """
    pad = max_shift
    side = 3 * CELL + 2 * pad
    canvas = np.zeros((n, side, side, 3), dtype=np.float32)
    m = (CELL - ITEM) // 2
    filled = rng.random((n, 9)) >= p_empty
    rows = rng.integers(len(bank), size=(n, 9))
    colours = rng.integers(len(COLOUR_NAMES), size=(n, 9))
    for c in range(9):
        y, x = pad + (c // 3) * CELL + m, pad + (c % 3) * CELL + m
        sel = filled[:, c]
        canvas[sel, y : y + ITEM, x : x + ITEM] = (
            bank.items[rows[sel, c]][..., None] * COLOUR_RGB[colours[sel, c]][:, None, None, :]
        )
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=(2, n))
    idx = np.arange(n)[:, None, None]
    ys = (pad + CELL + dy)[:, None, None] + np.arange(CELL)[None, :, None]
    xs = (pad + CELL + dx)[:, None, None] + np.arange(CELL)[None, None, :]
    cells = canvas[idx, ys, xs]  # the centre cell (index 4), shifted
    cats = np.where(filled[:, 4], bank.categories[rows[:, 4]], EMPTY)
    cols = np.where(filled[:, 4], colours[:, 4], -1)
    return cells, cats, cols


def _degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur, gain, per-channel gain and noise on cells ``(B, 3, 16, 16)``, as a decoder may add."""
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        sigma = u(0.3, 1.0, int(blur.sum()))
        r = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)  # (nb, 5) separable kernels, one per cell
        xb = x[blur]
        nb = xb.shape[0]
        xb = F.pad(xb, (2, 2, 2, 2), mode="replicate").reshape(1, nb * 3, CELL + 4, CELL + 4)
        kk = k.repeat_interleave(3, 0)
        xb = F.conv2d(xb, kk[:, None, None, :], groups=nb * 3)
        xb = F.conv2d(xb, kk[:, None, :, None], groups=nb * 3)
        x = x.clone()
        x[blur] = xb.reshape(nb, 3, CELL, CELL)
    x = x * u(0.65, 1.15, b, 1, 1, 1) * u(0.88, 1.12, b, 3, 1, 1)
    noisy = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    x = x + noisy * u(0.0, 0.06, b, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _to_tensor(cells: np.ndarray) -> torch.Tensor:
    # (n, 16, 16, 3) numpy -> (n, 3, 16, 16) float32 torch, channels-last in memory as it came.
    return torch.from_numpy(np.ascontiguousarray(cells, dtype=np.float32)).permute(0, 3, 1, 2)


def item_accuracy(scorer: Scorer, bank: ItemBank, seed: int = 0) -> dict[str, float]:
    """Accuracy on every item of ``bank`` (centred, clean, one random colour each) and on empty cells."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(len(COLOUR_NAMES), size=len(bank))
    m = (CELL - ITEM) // 2
    cells = np.zeros((len(bank), CELL, CELL, 3), dtype=np.float32)
    cells[:, m : m + ITEM, m : m + ITEM] = bank.items[..., None] * COLOUR_RGB[colours][:, None, None, :]
    cells = np.concatenate([cells, np.zeros((256, CELL, CELL, 3), np.float32)])
    with torch.no_grad():
        h = scorer.net.features(_to_tensor(cells))
        cat = scorer.net.category(h).argmax(1).numpy()
        col = scorer.net.colour(h).argmax(1).numpy()
    n = len(bank)
    cat_ok = cat[:n] == bank.categories
    col_ok = col[:n] == colours
    per_cat = {CATEGORIES[c]: float(cat_ok[bank.categories == c].mean()) for c in range(len(CATEGORIES))}
    return {
        "category": float(cat_ok.mean()),
        "colour": float(col_ok.mean()),
        "item": float((cat_ok & col_ok).mean()),
        "empty": float((cat[n:] == EMPTY).mean()),
        **{f"category/{k}": v for k, v in per_cat.items()},
    }


def real_scene_adherence(scorer: CellPredictor, bank: ItemBank, n: int = 1000, seed: int = 1) -> dict[str, float]:
    """Mean adherence (overall and per item count) on ``n`` real scenes of ``bank``."""
    images, scenes, _ = bank.sample(n, np.random.default_rng(seed))
    adh = adherence(images, scenes, scorer)
    levels = np.asarray([s.n_items for s in scenes])
    out = {"adherence": float(adh.mean()), "item_recall": float(item_recall(images, scenes, scorer).mean())}
    for level in range(1, N_CELLS + 1):
        if (levels == level).any():
            out[f"adherence/{level}"] = float(adh[levels == level].mean())
    for how in ("blur", "down-up"):
        out[f"adherence/{how}"] = float(adherence(softened(images, how), scenes, scorer).mean())
    return out


def softened(images: np.ndarray, how: str) -> np.ndarray:
    """Real scenes degraded as a decoder may degrade them, to check the scorer's robustness.

    ``"blur"``: Gaussian blur (sigma 0.8 px); ``"down-up"``: 2x average-pooled then bilinearly
    upsampled (the detail a 4x-downsampling VAE is likely to lose first).
    """
    x = torch.from_numpy(_as_float_images(images)).permute(0, 3, 1, 2)
    if how == "blur":
        r = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-(r**2) / (2 * 0.8**2))
        k = (k / k.sum()).repeat(3, 1)
        x = F.pad(x, (2, 2, 2, 2), mode="replicate")
        x = F.conv2d(F.conv2d(x, k[:, None, None, :], groups=3), k[:, None, :, None], groups=3)
    elif how == "down-up":
        x = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"how must be 'blur' or 'down-up', got {how!r}")
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def train_scorer(
    train_bank: ItemBank,
    *,
    seed: int = 0,
    steps: int = 4000,
    batch: int = 256,
    lr: float = 3e-3,
    width: int = 32,
    log_every: int = 200,
) -> Scorer:
    """Train a :class:`CellNet` on cells of random train-split scenes (AdamW, one-cycle LR)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    net = CellNet(width).to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stub lacks memory_format
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    net.train()
    for step in range(1, steps + 1):
        # Mostly aligned crops (as decoded grids are) with some 1-2 px shifts for robustness.
        cells, cats, cols = _random_cells(train_bank, batch, rng, p_empty=0.2, max_shift=1 if step % 4 else 2)
        x = _to_tensor(cells)
        x = _degrade(x, gen) if step % 3 else x  # a third of the batches stay clean
        cat_logits, col_logits = net(x)
        cats_t, cols_t = torch.from_numpy(cats), torch.from_numpy(cols)
        loss = F.cross_entropy(cat_logits, cats_t, label_smoothing=0.05)
        loss = loss + F.cross_entropy(col_logits, cols_t, ignore_index=-1)  # no colour for empty cells
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call, unused-ignore]  # torch: Tensor.backward is unannotated
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            acc = (cat_logits.argmax(1) == cats_t).float().mean().item()
            print(
                f"step {step}/{steps} loss {loss.item():.3f} batch category acc {acc:.3f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    config = {
        "architecture": "CellNet", "width": width, "feature_dim": 128, "cell": CELL, "grid": GRID,
        "canvas": CANVAS, "categories": list(CATEGORIES), "colours": list(COLOUR_NAMES),
        "seed": seed, "steps": steps, "batch": batch, "lr": lr,
    }
    return Scorer(net.eval(), config)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lab.demo_family.scorer (--train | --eval) [--out DIR]``."""
    parser = argparse.ArgumentParser(description="Train or evaluate the demo family's scorer.")
    parser.add_argument("--train", action="store_true", help="train and save the scorer")
    parser.add_argument("--eval", action="store_true", help="measure a saved scorer")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_SCORER_DIR, help="scorer folder (written by --train, read by --eval)"
    )
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: $RISE_FASHION_MNIST or Debian's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--scenes", type=int, default=1000, help="real held-out scenes for the adherence ceiling")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the build machines share 2 cores)")
    args = parser.parse_args(argv)
    if not (args.train or args.eval):
        parser.error("say --train and/or --eval")
    torch.set_num_threads(args.threads)
    test_bank = ItemBank.load("test", args.data)
    if args.train:
        t0 = time.perf_counter()
        scorer = train_scorer(ItemBank.load("train", args.data), seed=args.seed, steps=args.steps, batch=args.batch)
        scorer.config["train_seconds"] = round(time.perf_counter() - t0)
    else:
        scorer = Scorer.load(args.out)
    acc = item_accuracy(scorer, test_bank)
    real = real_scene_adherence(scorer, test_bank, n=args.scenes)
    for key, value in {**acc, **real}.items():
        print(f"{key:>24s}  {value:.4f}")
    if args.train:
        scorer.config["heldout"] = {k: round(v, 4) for k, v in {**acc, **real}.items()}
        scorer.config["heldout_scenes"] = args.scenes
        print(f"saved to {scorer.save(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
