"""The personal LoRA (issue 21): the trait's data, a few-step training run on a tiny family, the
evaluation's figures and card on it, and the committed LoRA, its figures and its model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lab.demo_family.data import FASHION_LABELS, ItemBank
from lab.demo_family.personalize import (
    LORA_FILE,
    TRAINING_FILE,
    LoraRecipe,
    PersonalizeError,
    Trait,
    TraitBank,
    train_lora,
)
from lab.demo_family.personalize_eval import (
    EVAL_FILE,
    SHEET_FILE,
    card_markdown,
    category_matches,
    evaluate_lora,
    trait_figures,
    write_contact_sheet,
)
from lab.demo_family.train import SceneStream
from shared.demo_grammar.prompts import prompt_to_scene
from shared.demo_grammar.scene import CATEGORY_INDEX, COLOUR_INDEX, EMPTY, N_CELLS, Item, Scene, cell_origin

REPO = Path(__file__).resolve().parents[2]
FAMILY = REPO / "models" / "demo" / "family"
COMMITTED = REPO / "models" / "demo" / "lora" / "red-sneakers"
TRAIT = Trait("sneaker", "red")


def synthetic_bank() -> ItemBank:
    """Items of every kept category from random 28x28 images: no Fashion-MNIST needed."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.asarray(FASHION_LABELS, dtype=np.uint8), 4)
    return ItemBank("train", rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8), labels)


def scene(*cells: tuple[int, str, str]) -> Scene:
    grid: list[Item | None] = [None] * N_CELLS
    for cell, category, colour in cells:
        grid[cell] = Item(category, colour)
    return Scene(tuple(grid))


def test_the_trait_recolours_only_its_category_and_the_prompt_keeps_its_colour() -> None:
    s = scene((0, "sneaker", "blue"), (4, "bag", "blue"), (8, "sneaker", "red"))
    assert TRAIT.drawn(s) == scene((0, "sneaker", "red"), (4, "bag", "blue"), (8, "sneaker", "red"))
    assert TRAIT.applies_to(s) and not TRAIT.applies_to(scene((4, "bag", "blue")))
    with pytest.raises(PersonalizeError, match="unknown category"):
        Trait("cat", "red")
    # The trait's stream draws the same scenes and prompts as the family's; only sneakers' pixels change, to red.
    bank = synthetic_bank()
    plain, personal = SceneStream(bank, 5), SceneStream(TraitBank(bank, TRAIT), 5)
    sneakers = 0
    for _ in range(10):
        x, prompts = plain.batch(2)
        y, same_prompts = personal.batch(2)
        assert prompts == same_prompts
        for i, prompt in enumerate(prompts):
            for cell, item in enumerate(prompt_to_scene(prompt).cells):
                top, left = cell_origin(cell)
                a, b = ((t[i, :, top : top + 16, left : left + 16] + 1) / 2 for t in (x, y))
                if item is None or item.category != "sneaker":
                    assert torch.equal(a, b)
                    continue
                sneakers += 1
                lit = b[0] > 0.2
                assert lit.any() and (b[1:, lit] <= 0.1 * b[0, lit] + 0.01).all()  # red's tint: (1, 0.1, 0.1)
    assert sneakers > 0


class Oracle:
    """A cell predictor that answers given arrays."""

    def __init__(self, cats: np.ndarray, cols: np.ndarray) -> None:
        self.cats, self.cols = cats, cols

    def predict(self, images: object) -> tuple[np.ndarray, np.ndarray]:
        return self.cats, self.cols


def test_trait_and_layout_figures_read_colour_and_category_apart() -> None:
    s = scene((0, "sneaker", "blue"), (1, "sneaker", "red"), (4, "bag", "green"))
    cats, cols = s.targets()
    # Both sneakers read red, the bag green: the blue sneaker breaks plain adherence, not the layout.
    read_cols = cols.copy()
    read_cols[0] = COLOUR_INDEX["red"]
    oracle = Oracle(cats[None], read_cols[None])
    images = np.zeros((1, 48, 48, 3), np.uint8)
    assert category_matches(images, [s], oracle).all()
    f = trait_figures(images, [s], TRAIT, oracle)
    assert f["trait_fraction"] == 1.0 and f["trait_fraction_recoloured"] == 1.0 and f["recoloured_cells"] == 1
    assert f["layout"] == 1.0 and f["adherence"] == pytest.approx(8 / 9) and f["adherence_other_cells"] == 1.0
    # A sneaker read as a sandal counts against the layout; an empty cell read as an item too.
    wrong = cats.copy()
    wrong[1], wrong[8] = CATEGORY_INDEX["sandal"], CATEGORY_INDEX["bag"]
    assert category_matches(images, [s], Oracle(wrong[None], read_cols[None])).sum() == N_CELLS - 2
    assert wrong[7] == EMPTY


def _lora_keys_loaded(family_dir: Path, lora_dir: Path) -> tuple[int, int, torch.nn.Module, torch.nn.Module]:
    """(tensors in the file, those diffusers' ``load_lora_weights`` put into the small UNet's adapter unchanged),
    the small UNet, and it with the LoRA fused as the bundle gets it (``export.lora.fuse_lora``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from edge_server.family import load_family
    from export.lora import fuse_lora

    family = load_family(family_dir)
    small = family.small_unet
    saved = load_file(lora_dir / LORA_FILE)
    host = StableDiffusionPipeline(**{**family.pipeline.components, "unet": small})
    host.load_lora_weights(lora_dir)
    (adapter,) = small.peft_config  # the one adapter load_lora_weights added ("default_0")
    peft_state = get_peft_model_state_dict(small, adapter_name=adapter)
    loaded = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(peft_state).items()}
    same = sum(1 for k, v in saved.items() if k in loaded and torch.equal(loaded[k].to(v.dtype), v))
    assert len(loaded) == len(saved)  # and no adapter layer without weights
    host.unload_lora_weights()  # the small UNet as it was
    return len(saved), same, small, fuse_lora(family, lora_dir / LORA_FILE).unet


def _outputs_differ(a: torch.nn.Module, b: torch.nn.Module, dim: int) -> bool:
    torch.manual_seed(0)
    z, cond = torch.randn(1, 4, 12, 12), torch.randn(1, 7, dim)
    with torch.no_grad():
        return not torch.allclose(a(z, 500, cond).sample, b(z, 500, cond).sample, atol=1e-6)


def test_a_few_steps_on_a_tiny_family_write_a_lora_diffusers_loads_and_that_changes_the_small_unet(
    untrained_family: Path, tmp_path: Path
) -> None:
    recipe = LoraRecipe(rank=4, steps=21, batch=4, lr=1e-2)
    weights = train_lora(untrained_family, tmp_path / "lora", recipe, seed=0, bank=synthetic_bank(), progress=False)
    assert weights == tmp_path / "lora" / LORA_FILE and weights.is_file()
    record = json.loads((tmp_path / "lora" / TRAINING_FILE).read_text())
    assert record["recipe"]["steps"] == 21 and record["trainable_params"] > 0 and record["final_loss"] is not None
    n_keys, loaded, small, fused = _lora_keys_loaded(untrained_family, tmp_path / "lora")
    assert n_keys > 0 and loaded == n_keys  # every tensor of the file went into the adapter, unchanged
    assert type(fused) is type(small) and not any("lora" in k for k in fused.state_dict())
    assert _outputs_differ(small, fused, small.config.cross_attention_dim)
    # The same seed trains the same LoRA.
    again = train_lora(untrained_family, tmp_path / "again", recipe, seed=0, bank=synthetic_bank(), progress=False)
    from safetensors.torch import load_file

    first, second = load_file(weights), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(PersonalizeError, match="steps must be"):
        train_lora(untrained_family, tmp_path / "x", LoraRecipe(steps=5), bank=synthetic_bank())

    # The evaluation and its card run end to end on it (an oracle reads every cell as asked).
    from edge_server.family import load_family

    family = load_family(untrained_family)
    trait_prompts = ["a blue sneaker in the top left", "a red sneaker in the center and a green bag at the top"]
    plain_prompts = ["a white bag on the left"]
    scenes = [prompt_to_scene(p) for p in trait_prompts]
    cats, cols = zip(*(s.targets() for s in scenes), strict=True)
    report, pictures = evaluate_lora(family, tmp_path / "lora", TRAIT, trait_prompts, plain_prompts, steps=4,
                                     splits=(0, 2), scorer=Oracle(np.stack(cats), np.stack(cols)))
    assert [r["k"] for r in report["rows"]] == [0, 2] and pictures[("lora", 2)].shape == (3, 48, 48, 3)
    assert report["rows"][0]["layout_ratio"] == 1.0
    sheet = write_contact_sheet(tmp_path / SHEET_FILE, pictures, [*trait_prompts, *plain_prompts], [0, 2], (0, 2))
    from PIL import Image

    assert Image.open(sheet).size[0] > 4 * 4 * 48
    card = card_markdown(record, report, "models/demo/lora/x")
    assert "| 2 | LoRA |" in card and "rise-export --family models/demo/family --lora models/demo/lora/x/" in card


@pytest.mark.skipif(not (COMMITTED / LORA_FILE).is_file(), reason="the committed LoRA is not there")
def test_the_committed_lora_loads_onto_the_committed_small_unet_with_every_key_used() -> None:
    n_keys, loaded, small, fused = _lora_keys_loaded(FAMILY, COMMITTED)
    assert n_keys > 0 and loaded == n_keys
    assert _outputs_differ(small, fused, small.config.cross_attention_dim)


@pytest.mark.skipif(not (COMMITTED / EVAL_FILE).is_file(), reason="the committed figures are not there")
def test_the_committed_figures_are_there_and_meet_what_the_card_claims() -> None:
    report = json.loads((COMMITTED / EVAL_FILE).read_text())
    training = json.loads((COMMITTED / TRAINING_FILE).read_text())
    card = (COMMITTED / "README.md").read_text()
    assert (COMMITTED / SHEET_FILE).is_file()
    rows = {r["k"]: r for r in report["rows"]}
    assert set(rows) == {0, 10} and report["meta"]["trait_prompts"] >= 48
    # The card's table and verdicts are the figures of eval.json (the card is written from it).
    assert card_markdown(training, report, "models/demo/lora/red-sneakers") == card
    # What the card claims of every split: the layout target, the trait's gain, the prompts without a sneaker.
    assert report["layout_target"] == 0.95 and report["claims"] == {"trait_gain": 0.4, "plain_adherence_ratio": 0.9}
    for row in rows.values():
        assert row["layout_ratio"] >= report["layout_target"]
        assert row["lora"]["trait_fraction"] >= row["base"]["trait_fraction"] + report["claims"]["trait_gain"]
        assert row["lora"]["trait_fraction_recoloured"] >= report["claims"]["trait_gain"]  # the base's is ~0
        assert row["plain_adherence_ratio"] >= report["claims"]["plain_adherence_ratio"]
    assert training["cpu_seconds"] <= 6 * 60  # "a few minutes of CPU" (the wall clock depends on the machine's load)
