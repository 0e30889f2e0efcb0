"""The demo family's scenes: a 3x3 grid of cells, each empty or one tinted Fashion-MNIST item.

Pure Python and numpy, no I/O: the grammar (:mod:`shared.demo_grammar.prompts`), the device side's
prompt checks and the lab's data, scorer and training all read the same tables. Why the grid is as
it is: see :mod:`lab.demo_family.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.errors import RiseError

GRID = 3  # cells per side
CELL = 16  # pixels per cell side
ITEM = 14  # pixels of the item inside its cell (28x28 pooled 2x2), 1 px black margin around it
CANVAS = GRID * CELL  # 48
N_CELLS = GRID * GRID

#: Canonical category names, in index order, and the Fashion-MNIST label each comes from.
CATEGORIES: tuple[str, ...] = (
    "t-shirt", "trousers", "pullover", "dress", "sandal", "sneaker", "bag", "ankle boot",
)
FASHION_LABELS: tuple[int, ...] = (0, 1, 2, 3, 5, 7, 8, 9)  # 4 = coat and 6 = shirt are dropped
CATEGORY_INDEX = {name: i for i, name in enumerate(CATEGORIES)}

#: Named tints (RGB multipliers in [0, 1]), in index order.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.0),
    "yellow": (1.0, 1.0, 0.1),
    "green": (0.1, 0.9, 0.1),
    "cyan": (0.0, 0.9, 1.0),
    "blue": (0.15, 0.3, 1.0),
    "purple": (0.75, 0.15, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
COLOUR_INDEX = {name: i for i, name in enumerate(COLOUR_NAMES)}
COLOUR_RGB = np.asarray(list(COLOURS.values()), dtype=np.float32)


class SceneError(RiseError, ValueError):
    """A scene is malformed (wrong number of cells, unknown category or colour)."""


@dataclass(frozen=True)
class Item:
    """One object in a cell: a Fashion-MNIST category and a colour tint (canonical names)."""

    category: str
    colour: str

    def __post_init__(self) -> None:
        if self.category not in CATEGORY_INDEX:
            raise SceneError(f"unknown category {self.category!r}; known: {', '.join(CATEGORIES)}")
        if self.colour not in COLOUR_INDEX:
            raise SceneError(f"unknown colour {self.colour!r}; known: {', '.join(COLOUR_NAMES)}")


@dataclass(frozen=True)
class Scene:
    """A grid of cells in row-major order (top-left first); ``None`` is an empty cell."""

    cells: tuple[Item | None, ...]

    def __post_init__(self) -> None:
        if len(self.cells) != N_CELLS:
            raise SceneError(f"a scene has {N_CELLS} cells, got {len(self.cells)}")
        if not any(self.cells):
            raise SceneError("a scene holds at least one item")

    @property
    def n_items(self) -> int:
        """Complexity level: the number of items (1..9)."""
        return sum(c is not None for c in self.cells)

    @property
    def n_attributes(self) -> int:
        """Attributes the prompt states: position, category and colour of every item."""
        return 3 * self.n_items

    def items(self) -> list[tuple[int, Item]]:
        """``(cell index, item)`` for the filled cells, in reading order."""
        return [(i, c) for i, c in enumerate(self.cells) if c is not None]

    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-cell target indices: categories (``len(CATEGORIES)`` = empty) and colours (-1 = empty)."""
        cats = np.full(N_CELLS, EMPTY, dtype=np.int64)
        cols = np.full(N_CELLS, -1, dtype=np.int64)
        for i, item in self.items():
            cats[i] = CATEGORY_INDEX[item.category]
            cols[i] = COLOUR_INDEX[item.colour]
        return cats, cols


#: Category index of an empty cell in :meth:`Scene.targets` and in the scorer's predictions.
EMPTY = len(CATEGORIES)


def cell_origin(cell: int) -> tuple[int, int]:
    """Top-left pixel ``(y, x)`` of a cell (row-major index)."""
    if not 0 <= cell < N_CELLS:
        raise SceneError(f"cell index must be in [0, {N_CELLS}), got {cell}")
    return (cell // GRID) * CELL, (cell % GRID) * CELL


def random_scene(rng: np.random.Generator, n_items: int | Sequence[int] | None = None) -> Scene:
    """A random scene: ``n_items`` items (an int, a choice among ints, or uniform over 1..9)
    in random cells, each with a uniform category and colour."""
    if n_items is None:
        k = int(rng.integers(1, N_CELLS + 1))
    elif isinstance(n_items, int):
        k = n_items
    else:
        k = int(rng.choice(np.asarray(n_items)))
    if not 1 <= k <= N_CELLS:
        raise SceneError(f"n_items must be in [1, {N_CELLS}], got {k}")
    cells: list[Item | None] = [None] * N_CELLS
    for cell in rng.choice(N_CELLS, size=k, replace=False):
        cells[int(cell)] = Item(
            CATEGORIES[int(rng.integers(len(CATEGORIES)))], COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        )
    return Scene(tuple(cells))


def cells_of(images: np.ndarray) -> np.ndarray:
    """Split images ``(n, 48, 48, 3)`` into cells ``(n, 9, 16, 16, 3)`` (row-major)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:3] != (CANVAS, CANVAS) or images.shape[3] != 3:
        raise SceneError(f"expected images of shape (n, {CANVAS}, {CANVAS}, 3), got {images.shape}")
    n = images.shape[0]
    cells = images.reshape(n, GRID, CELL, GRID, CELL, 3).transpose(0, 1, 3, 2, 4, 5)
    return cells.reshape(n, N_CELLS, CELL, CELL, 3)
