"""Fashion-MNIST scenes for the embedded demo family: loading, items, scene composition.

A *scene* is a 3x3 grid of cells on a 48x48 RGB canvas; each cell is empty (black) or holds
one Fashion-MNIST item of a category, tinted with a named colour. Why this grid:

- 3x3 cells, not 2x2: a calibration run found 2x2 too easy (the small UNet matched the
  large one once the text encoder had parsed the prompt). Nine cells give up to nine items,
  so prompts need real parsing (up to 18 attributes) and the layout real capacity.
- 16 px cells: each 28x28 item is 2x2-average-pooled to 14x14 (an exact, alias-free
  downsampling) and padded by 1 px, so neighbouring items never touch and the scorer can
  crop cells exactly. 48x48 stays cheap to train on 2 cores: with a 4x-downsampling VAE the
  latent is 12x12 (a 4x4 patch per cell), with 8x it is 6x6.
- Eight of the ten Fashion-MNIST classes: "shirt" and "coat" are dropped because at 14 px they
  are mostly confused with t-shirt/pullover (the classic worst classes); keeping them would cap
  the scorer's item accuracy, and so every adherence figure, near 0.85 instead of above 0.95.
- Eight colours (:data:`COLOURS`) far apart in hue, applied by multiplying the grayscale
  item, so a tint never changes the item's shape.

Training scenes are drawn from the Fashion-MNIST *train* split, held-out scenes from its
*test* split, so the two never share a source image (no test image equals a train image
byte for byte: checked on all 10,000 when this was written, and by the tests on a sample).

Pure numpy (no torch), so the device side could import it too.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from shared.demo_grammar.scene import (
    CANVAS,
    CATEGORIES,
    CATEGORY_INDEX,
    CELL,
    COLOUR_INDEX,
    COLOUR_NAMES,
    COLOUR_RGB,
    COLOURS,
    EMPTY,
    FASHION_LABELS,
    GRID,
    ITEM,
    N_CELLS,
    Item,
    Scene,
    SceneError,
    cell_origin,
    cells_of,
    random_scene,
)
from shared.errors import RiseError

# The scene tables and helpers are re-exported: the lab imports them from here.
__all__ = [
    "CANVAS",
    "CATEGORIES",
    "CATEGORY_INDEX",
    "CELL",
    "COLOUR_INDEX",
    "COLOUR_NAMES",
    "COLOUR_RGB",
    "COLOURS",
    "DEFAULT_DIR",
    "EMPTY",
    "ENV_VAR",
    "FASHION_LABELS",
    "GRID",
    "INSTALL_HINT",
    "ITEM",
    "N_CELLS",
    "DatasetMissingError",
    "Item",
    "ItemBank",
    "Scene",
    "SceneError",
    "Split",
    "cell_origin",
    "cells_of",
    "find_fashion_mnist",
    "load_split",
    "random_scene",
    "tint",
    "to_uint8",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the idx files.
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable overriding :data:`DEFAULT_DIR` (a folder holding the four idx files).
ENV_VAR = "RISE_FASHION_MNIST"
#: The command that installs the data on Debian/Ubuntu.
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

Split = Literal["train", "test"]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

class DatasetMissingError(RiseError, FileNotFoundError):
    """The Fashion-MNIST idx files are not where they were looked for."""




def find_fashion_mnist(path: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder holding the Fashion-MNIST idx files.

    Looked up in order: ``path``, ``$RISE_FASHION_MNIST``, :data:`DEFAULT_DIR`. Each file may be
    gzipped (as Debian ships it) or not.
    """
    where = Path(path) if path is not None else Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)
    missing = [name for pair in _FILES.values() for name in pair if _idx_file(where, name) is None]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found in {where} (missing {', '.join(missing)}). "
            f"Install it with `{INSTALL_HINT}` (as root), or point ${ENV_VAR} at a folder "
            "holding the four idx files (gzipped or not)."
        )
    return where


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(file: Path) -> np.ndarray:
    raw = gzip.open(file).read() if file.suffix == ".gz" else file.read_bytes()
    # idx header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then
    # one big-endian uint32 per dimension.
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DatasetMissingError(f"{file} is not a uint8 idx file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetMissingError(f"{file} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


def load_split(split: Split, path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST ``(images uint8 (n, 28, 28), labels uint8 (n,))`` of one split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(path)
    images_name, labels_name = _FILES[split]
    images = _read_idx(_idx_file(folder, images_name))  # type: ignore[arg-type]
    labels = _read_idx(_idx_file(folder, labels_name))  # type: ignore[arg-type]
    if images.shape[0] != labels.shape[0]:
        raise DatasetMissingError(f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def tint(item: np.ndarray, colour: str) -> np.ndarray:
    """Tint a grayscale item (float in [0, 1], shape (h, w)) -> float RGB (h, w, 3)."""
    rgb: np.ndarray = item[..., None] * COLOUR_RGB[COLOUR_INDEX[colour]]
    return rgb


class ItemBank:
    """The items of one split, pooled to 14x14 float32 in [0, 1], grouped by category.

    ``source_ids`` are indices into the raw split, so a rendering can say which source
    images it used (the train/held-out disjointness is checked on them).
    """

    def __init__(self, split: Split, images: np.ndarray, labels: np.ndarray) -> None:
        self.split = split
        keep = np.isin(labels, FASHION_LABELS)
        self.source_ids = np.flatnonzero(keep)
        raw = images[keep].astype(np.float32) / 255.0
        # 2x2 average pooling, 28 -> 14: exact and alias-free.
        pooled = raw.reshape(-1, ITEM, 2, ITEM, 2).mean(axis=(2, 4))
        # Stretch every item to peak 1.0 so a tint reads the same on dark and light garments.
        self.items = pooled / np.maximum(pooled.max(axis=(1, 2), keepdims=True), 1e-6)
        label_to_cat = {label: i for i, label in enumerate(FASHION_LABELS)}
        self.categories = np.asarray([label_to_cat[int(v)] for v in labels[keep]], dtype=np.int64)
        self.by_category = [np.flatnonzero(self.categories == c) for c in range(len(CATEGORIES))]

    @classmethod
    def load(cls, split: Split, path: str | os.PathLike[str] | None = None) -> ItemBank:
        """Load one split's items (``path`` as in :func:`find_fashion_mnist`)."""
        images, labels = load_split(split, path)
        return cls(split, images, labels)

    def subset(self, rows: np.ndarray) -> ItemBank:
        """The same split restricted to some rows of :attr:`items` (e.g. a quick sample)."""
        sub = object.__new__(ItemBank)
        sub.split = self.split
        sub.source_ids, sub.items, sub.categories = self.source_ids[rows], self.items[rows], self.categories[rows]
        sub.by_category = [np.flatnonzero(sub.categories == c) for c in range(len(CATEGORIES))]
        return sub

    def __len__(self) -> int:
        return len(self.items)

    def pick(self, category: str, rng: np.random.Generator) -> int:
        """A random row of :attr:`items` of ``category``."""
        rows = self.by_category[CATEGORY_INDEX[category]]
        return int(rows[rng.integers(len(rows))])

    def render(self, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
        """Compose ``scene`` with random source items: ``(uint8 (48, 48, 3), source ids)``.

        The source ids are indices into the raw split, one per filled cell in reading order.
        """
        canvas = np.zeros((CANVAS, CANVAS, 3), dtype=np.float32)
        sources: list[int] = []
        for cell, item in scene.items():
            row = self.pick(item.category, rng)
            sources.append(int(self.source_ids[row]))
            y, x = cell_origin(cell)
            m = (CELL - ITEM) // 2
            canvas[y + m : y + m + ITEM, x + m : x + m + ITEM] = tint(self.items[row], item.colour)
        return to_uint8(canvas), tuple(sources)

    def sample(
        self, n: int, rng: np.random.Generator, n_items: int | Sequence[int] | None = None
    ) -> tuple[np.ndarray, list[Scene], list[tuple[int, ...]]]:
        """``n`` random scenes and their renderings: ``(uint8 (n, 48, 48, 3), scenes, sources)``."""
        scenes = [random_scene(rng, n_items) for _ in range(n)]
        images = np.empty((n, CANVAS, CANVAS, 3), dtype=np.uint8)
        sources = []
        for i, scene in enumerate(scenes):
            images[i], src = self.render(scene, rng)
            sources.append(src)
        return images, scenes, sources


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, rounded."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
