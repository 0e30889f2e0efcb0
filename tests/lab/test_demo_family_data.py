"""The demo family's data, prompts, scorer and metrics (fast: a few seconds after loading the data)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lab.demo_family import data
from lab.demo_family.data import EMPTY, N_CELLS, Item, ItemBank, Scene, SceneError, cells_of, random_scene
from shared.demo_grammar.prompts import (
    MAX_WORDS,
    PromptError,
    heldout_prompts,
    load_prompts,
    prompt_to_scene,
    scene_to_prompt,
    vocabulary,
    words,
)
from shared.errors import RiseError

# What the committed scorer must reach on the held-out samples below (measured: see
# models/demo/scorer/README.md); a retrained scorer below these is a regression.
MIN_ITEM_ACCURACY = 0.93
MIN_REAL_ADHERENCE = 0.95


def _data_or_skip() -> Path:
    try:
        return data.find_fashion_mnist()
    except data.DatasetMissingError:
        pytest.skip(f"Fashion-MNIST is not installed: `{data.INSTALL_HINT}` (as root), or set ${data.ENV_VAR}")


@pytest.fixture(scope="module")
def train_bank() -> ItemBank:
    return ItemBank.load("train", _data_or_skip())


@pytest.fixture(scope="module")
def test_bank() -> ItemBank:
    return ItemBank.load("test", _data_or_skip())


# ----------------------------------------------------------------------------- data


def test_missing_data_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(data.DatasetMissingError, match="apt-get install dataset-fashion-mnist") as err:
        data.find_fashion_mnist(tmp_path)
    assert isinstance(err.value, RiseError) and isinstance(err.value, FileNotFoundError)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(data.DatasetMissingError, match=str(tmp_path)):
        data.load_split("test")


def test_env_var_and_plain_idx_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder of uncompressed idx files, found through the environment variable.
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    labels = np.array([7, 8], dtype=np.uint8)
    for stem in ("train", "t10k"):
        (tmp_path / f"{stem}-images-idx3-ubyte").write_bytes(
            b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes()
        )
        (tmp_path / f"{stem}-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + labels.tobytes())
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    got_images, got_labels = data.load_split("train")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    bank = ItemBank.load("test")
    assert [data.CATEGORIES[c] for c in bank.categories] == ["sneaker", "bag"]


def test_scene_validation() -> None:
    with pytest.raises(SceneError):
        Scene((None,) * 4)
    with pytest.raises(SceneError):
        Scene((None,) * N_CELLS)  # at least one item
    with pytest.raises(SceneError, match="colour"):
        Item("bag", "mauve")
    with pytest.raises(SceneError, match="category"):
        Item("shirt", "red")  # dropped: too close to t-shirt at 14 px
    scene = Scene((Item("bag", "red"),) + (None,) * 7 + (Item("dress", "white"),))
    assert scene.n_items == 2 and scene.n_attributes == 6
    cats, cols = scene.targets()
    assert cats.tolist() == [6] + [EMPTY] * 7 + [3] and cols.tolist() == [0] + [-1] * 7 + [7]


def test_scenes_are_deterministic_per_seed(test_bank: ItemBank) -> None:
    a_img, a_scenes, a_src = test_bank.sample(20, np.random.default_rng(5))
    b_img, b_scenes, b_src = test_bank.sample(20, np.random.default_rng(5))
    c_img, c_scenes, _ = test_bank.sample(20, np.random.default_rng(6))
    np.testing.assert_array_equal(a_img, b_img)
    assert a_scenes == b_scenes and a_src == b_src
    assert a_scenes != c_scenes
    assert a_img.shape == (20, 48, 48, 3) and a_img.dtype == np.uint8


def test_rendering_matches_scene(test_bank: ItemBank) -> None:
    images, scenes, sources = test_bank.sample(30, np.random.default_rng(0))
    cells = cells_of(images)
    for img_cells, scene, src in zip(cells, scenes, sources, strict=False):
        assert len(src) == scene.n_items
        for cell, item in enumerate(scene.cells):
            patch = img_cells[cell].astype(np.float32) / 255
            if item is None:
                assert patch.max() == 0
                continue
            assert patch[0].max() == 0 and patch[:, -1].max() == 0  # the 1 px margin stays black
            # The tint is a per-channel multiplier of one grayscale item: the brightest pixel
            # shows the colour itself (items are stretched to peak 1).
            peak = patch.reshape(-1, 3)[patch.sum(-1).argmax()]
            np.testing.assert_allclose(peak, data.COLOURS[item.colour], atol=1 / 255 + 1e-6)


def test_train_and_heldout_scenes_use_disjoint_source_images(train_bank: ItemBank, test_bank: ItemBank) -> None:
    train_raw, _ = data.load_split("train")
    test_raw, _ = data.load_split("test")
    _, _, train_src = train_bank.sample(200, np.random.default_rng(0))
    _, _, test_src = test_bank.sample(200, np.random.default_rng(0))
    assert max(i for s in train_src for i in s) < len(train_raw)
    # Disjoint by content, not only by index: no held-out source image occurs in the train split.
    train_hashes = {hashlib.sha1(im.tobytes()).digest() for im in train_raw}
    used = {i for s in test_src for i in s}
    assert not any(hashlib.sha1(test_raw[i].tobytes()).digest() in train_hashes for i in used)
    assert test_bank.split == "test" and train_bank.split == "train"


# ----------------------------------------------------------------------------- prompts


def test_prompt_round_trip_on_random_scenes() -> None:
    rng = np.random.default_rng(0)
    longest = 0
    for _ in range(3000):
        scene = random_scene(rng)
        prompt = scene_to_prompt(scene, rng)
        assert prompt_to_scene(prompt) == scene, prompt
        assert prompt_to_scene(prompt.upper() + ".") == scene  # case and a final full stop are ignored
        assert set(words(prompt)) <= set(vocabulary())
        longest = max(longest, len(words(prompt)))
    assert longest <= MAX_WORDS


def test_prompt_paraphrases_parse_to_the_same_scene() -> None:
    scene = prompt_to_scene("a red sneaker in the top left and a blue bag in the bottom right")
    for paraphrase in (
        "two things: a crimson trainer at the upper left, a blue handbag at the lower right corner",
        "a picture of a blue purse in the bottom right, and a red running shoe in the top left corner",
        "bottom right: a blue bag; top left: a red sneaker",
    ):
        assert prompt_to_scene(paraphrase) == scene
    # "top" is a t-shirt and a position; the grammar keeps them apart.
    assert prompt_to_scene("a white top at the top").cells[1] == Item("t-shirt", "white")
    assert prompt_to_scene("some orange jeans on the left").cells[3] == Item("trousers", "orange")


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("a mauve bag in the top left", "colour"),
        ("a red shirt in the top left", "category"),
        ("a red bag somewhere", "item and a position"),
        ("a red bag in the center and a blue dress in the middle", "two items"),
        ("three things: a red bag in the center", "announces 3"),
        ("", "no items"),
    ],
)
def test_bad_prompts_raise(prompt: str, match: str) -> None:
    with pytest.raises(PromptError, match=match) as err:
        prompt_to_scene(prompt)
    assert isinstance(err.value, RiseError) and isinstance(err.value, ValueError)


def test_committed_prompt_set() -> None:
    prompts = load_prompts()
    assert prompts == heldout_prompts()  # regenerate with `python -m shared.demo_grammar.prompts --write`
    assert len(prompts) >= 200
    scenes = [prompt_to_scene(p) for p in prompts]
    assert len(set(scenes)) == len(scenes)
    levels = np.bincount([s.n_items for s in scenes], minlength=N_CELLS + 1)[1:]
    assert levels.min() == levels.max() == len(prompts) // N_CELLS  # every complexity level, evenly
    assert max(len(words(p)) for p in prompts) <= MAX_WORDS


# ----------------------------------------------------------------------------- metrics


class Oracle:
    """Reads cells perfectly: it looks each cell's pixels up in what the renderer drew there."""

    def __init__(self, images: np.ndarray, scenes: list[Scene]) -> None:
        self.table: dict[bytes, tuple[int, int]] = {}
        for cells, scene in zip(cells_of(images), scenes, strict=False):
            for patch, cat, col in zip(cells, *scene.targets(), strict=False):
                self.table[patch.tobytes()] = (int(cat), int(col))

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = np.asarray([[self.table[p.tobytes()] for p in cells] for cells in cells_of(images)])
        return out[..., 0], out[..., 1]


def test_adherence_with_an_oracle(test_bank: ItemBank) -> None:
    from lab.demo_family.scorer import adherence, item_recall

    images, scenes, _ = test_bank.sample(40, np.random.default_rng(3), n_items=[3, 4, 5])
    oracle = Oracle(images, scenes)
    np.testing.assert_array_equal(adherence(images, scenes, oracle), 1.0)
    prompts = [scene_to_prompt(s, np.random.default_rng(0)) for s in scenes]
    np.testing.assert_array_equal(adherence(images, prompts, oracle), 1.0)  # prompts are parsed
    # Swap a filled cell with an empty one in every image: exactly those two cells go wrong.
    swapped = images.copy()
    for img, scene in zip(swapped, scenes, strict=False):
        filled = next(i for i, c in enumerate(scene.cells) if c is not None)
        empty = next(i for i, c in enumerate(scene.cells) if c is None)
        (fy, fx), (ey, ex) = data.cell_origin(filled), data.cell_origin(empty)
        a, b = img[fy : fy + 16, fx : fx + 16].copy(), img[ey : ey + 16, ex : ex + 16].copy()
        img[fy : fy + 16, fx : fx + 16], img[ey : ey + 16, ex : ex + 16] = b, a
    np.testing.assert_allclose(adherence(swapped, scenes, oracle), 1 - 2 / N_CELLS)
    recall = item_recall(swapped, scenes, oracle)
    np.testing.assert_allclose(recall, [1 - 1 / s.n_items for s in scenes])
    # An image of another scene scores what the two scenes share.
    other = np.roll(images, 1, axis=0)
    assert adherence(other, scenes, oracle).mean() < 0.8


def test_frechet_distance() -> None:
    from lab.demo_family.scorer import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 6))
    assert abs(frechet_distance(a, a)) < 1e-8
    # Two isotropic Gaussians: |mu_a - mu_b|^2 + d (s_a - s_b)^2.
    b = rng.normal(loc=1.0, scale=2.0, size=(4000, 6))
    assert frechet_distance(a, b) == pytest.approx(6 * 1.0 + 6 * 1.0, rel=0.1)
    assert frechet_distance(a.reshape(-1, 2, 6), b) == pytest.approx(frechet_distance(a, b))  # per-cell pooling
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :5])


def test_committed_scorer_reads_held_out_items_and_scenes(test_bank: ItemBank) -> None:
    from lab.demo_family.scorer import Scorer, adherence, item_accuracy

    scorer = Scorer.load()
    rng = np.random.default_rng(7)
    sample = rng.choice(len(test_bank), size=1500, replace=False)
    acc = item_accuracy(scorer, test_bank.subset(sample))
    assert acc["item"] >= MIN_ITEM_ACCURACY, acc
    assert acc["empty"] == 1.0
    images, scenes, _ = test_bank.sample(150, np.random.default_rng(11))
    assert adherence(images, scenes, scorer).mean() >= MIN_REAL_ADHERENCE
    feats = scorer.features(images[:4])
    assert feats.shape == (4, N_CELLS, 128) and np.isfinite(feats).all()
