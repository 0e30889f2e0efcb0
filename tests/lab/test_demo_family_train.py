"""The demo family's training script: tokenizer and model builders (fast); a --quick run (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lab.demo_family.data import random_scene
from lab.demo_family.train import MAX_TOKENS, QUICK, build_tokenizer, build_unet
from shared.demo_grammar.prompts import load_prompts, scene_to_prompt, vocabulary


def test_tokenizer_makes_every_grammar_word_one_token(tmp_path: Path) -> None:
    from transformers import CLIPTokenizerFast

    tok = build_tokenizer(tmp_path / "tokenizer")
    for word in vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == (3 if word == "t-shirt" else 1), (word, tok.convert_ids_to_tokens(ids))
    # The device's fast tokenizer (converted from these files) agrees, and no prompt is truncated.
    fast = CLIPTokenizerFast.from_pretrained(tmp_path / "tokenizer")
    rng = np.random.default_rng(0)
    prompts = load_prompts() + [scene_to_prompt(random_scene(rng, 9), rng) for _ in range(200)]
    for prompt in prompts:
        ids = tok(prompt).input_ids
        assert ids == fast(prompt).input_ids
        assert len(ids) <= MAX_TOKENS


def test_small_unet_is_the_cheaper_member() -> None:
    large = build_unet(QUICK.large, QUICK.text_hidden, 12)
    small = build_unet(QUICK.small, QUICK.text_hidden, 12)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in large.parameters())
    z, cond = torch.zeros(2, 4, 12, 12), torch.zeros(2, 5, QUICK.text_hidden)
    with torch.no_grad():
        assert small(z, 10, cond).sample.shape == large(z, 10, cond).sample.shape == z.shape


@pytest.mark.slow
def test_quick_training_writes_a_loadable_family(tmp_path: Path) -> None:
    from lab.demo_family.data import find_fashion_mnist
    from lab.demo_family.train import main

    try:
        find_fashion_mnist()
    except Exception as exc:
        pytest.skip(str(exc))
    assert main(["--out", str(tmp_path / "fam"), "--quick"]) == 0
    from edge_server.family import load_family

    family = load_family(tmp_path / "fam")
    assert family.vae_scale_factor == 4 and family.default_latent_size == 12
    out = family.pipeline(
        "a red bag in the center", num_inference_steps=3, height=48, width=48, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 48, 48, 3) and np.isfinite(out).all()


def test_a_stage_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from lab.demo_family.train import Stage, TrainConfig

    cfg = replace(TrainConfig(), checkpoint_every_s=0.0, log_every=2, ema_decay=0.9)

    def make(fail_at: int | None) -> tuple[Stage, torch.nn.Module]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        stream = SimpleNamespace(rng=np.random.default_rng(1))
        calls = {"n": 0}

        def loss() -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt  # the process is killed mid-stage
            x = torch.from_numpy(stream.rng.standard_normal((4, 3)).astype(np.float32)) + torch.randn(4, 3)
            return model(x).pow(2).mean()

        stage = Stage("large", {"m": model}, [{"params": list(model.parameters()), "lr": 0.1, "name": "m"}],
                      8, 4, loss, stream, cfg, ema_decay=cfg.ema_decay)  # type: ignore[arg-type]
        return stage, model

    straight, _ = make(None)
    expected = straight.run(tmp_path / "a.ckpt.pt")["m"].weight.detach().clone()
    first, _ = make(6)
    with pytest.raises(KeyboardInterrupt):
        first.run(tmp_path / "b.ckpt.pt")
    assert (tmp_path / "b.ckpt.pt").is_file()
    torch.manual_seed(123)  # the checkpoint restores the RNGs, whatever happened since
    second, _ = make(None)
    resumed = second.run(tmp_path / "b.ckpt.pt")["m"].weight.detach()
    assert torch.allclose(resumed, expected, atol=1e-6)
    assert second.record["loss_history"] == straight.record["loss_history"]


def test_a_stage_resumed_with_a_smaller_budget_anneals_to_zero_over_the_new_budget(tmp_path: Path) -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from lab.demo_family.train import Stage, TrainConfig, TrainingError

    cfg = replace(TrainConfig(), checkpoint_every_s=0.0, log_every=10)

    def make(steps: int, fail_at: int | None) -> Stage:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        groups = [{"params": list(model.parameters()), "lr": 0.1, "name": "m"}]
        calls = {"n": 0}

        def loss() -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt
            return model(torch.randn(4, 3)).pow(2).mean()

        return Stage("large", {"m": model}, groups, steps, 4, loss,
                     SimpleNamespace(rng=np.random.default_rng(1)), cfg)  # type: ignore[arg-type]

    with pytest.raises(KeyboardInterrupt):
        make(400, fail_at=101).run(tmp_path / "c.ckpt.pt")
    stage = make(200, None)
    stage.run(tmp_path / "c.ckpt.pt")
    assert stage.record["steps"] == 200 and stage.record["loss_history"][-1][0] == 200
    steps, lrs = zip(*stage.record["lr_history"], strict=False)
    assert steps == tuple(range(10, 201, 10))  # the log before the kill is kept
    assert list(lrs[10:]) == sorted(lrs[10:], reverse=True)  # steps 110..200 anneal
    assert lrs[9] > 0.08  # at step 100 of the 400-step budget the rate was still near its peak (0.1) ...
    assert lrs[-1] < 1e-4  # ... and the new budget anneals it to the floor at step 200, not 400
    with pytest.raises(KeyboardInterrupt):
        make(400, fail_at=101).run(tmp_path / "d.ckpt.pt")
    with pytest.raises(TrainingError, match="past the new budget"):
        make(80, None).run(tmp_path / "d.ckpt.pt")


def test_the_work_folder_accepts_a_new_step_budget_and_records_it_but_not_another_config(tmp_path: Path) -> None:
    import json
    from dataclasses import replace

    from lab.demo_family.train import TrainConfig, TrainingError, Work

    Work(tmp_path, TrainConfig(), seed=0)
    work = Work(tmp_path, replace(TrainConfig(), large_steps=10), seed=0)
    assert [(c["key"], c["to"], c["stage_state"]) for c in work.changes] == [("large_steps", 10, "not started")]
    assert json.loads((tmp_path / "run.json").read_text())["config"]["large_steps"] == 10
    with pytest.raises(TrainingError, match=r"another config or seed \(lr: 0.0006 -> 1.0, a setting of every stage\)"):
        Work(tmp_path, replace(TrainConfig(), large_steps=10, lr=1.0), seed=0)
    with pytest.raises(TrainingError, match="another config or seed"):
        Work(tmp_path, replace(TrainConfig(), large_steps=10), seed=1)


def test_a_stage_not_started_may_change_its_settings_and_redo_drops_it_and_the_later_stages(tmp_path: Path) -> None:
    from dataclasses import replace

    from lab.demo_family.train import STAGES, TrainConfig, TrainingError, Work

    cfg = TrainConfig()
    work = Work(tmp_path, cfg, seed=0)
    for stage in STAGES:  # every stage finished, as after a full run
        (tmp_path / stage).mkdir()
        (tmp_path / f"{stage}.done.json").write_text("{}")
    with pytest.raises(TrainingError, match="small_lr: 0.0006 -> 0.001, the small stage is finished"):
        Work(tmp_path, replace(cfg, small_lr=1e-3), seed=0)
    with pytest.raises(TrainingError, match="lr: 0.0006 -> 0.001, a setting of every stage"):
        Work(tmp_path, replace(cfg, lr=1e-3), seed=0, redo="small")
    assert (tmp_path / "small.done.json").is_file()  # a refused --redo deletes nothing
    work = Work(tmp_path, replace(cfg, small_lr=1e-3, small_steps=9000), seed=0, redo="large")
    assert [work.stage_state(s) for s in STAGES] == ["finished", "finished", "not started", "not started"]
    assert not (tmp_path / "large").exists() and not (tmp_path / "small").exists() and (tmp_path / "text").is_dir()
    assert {(c["key"], c["stage_state"]) for c in work.changes} == {("small_lr", "not started"), ("small_steps", "not started")}
    work.ckpt("small").write_bytes(b"")  # the small stage under way: its settings are fixed now, its budget is not
    with pytest.raises(TrainingError, match="the small stage is under way"):
        Work(tmp_path, replace(cfg, small_lr=2e-3, small_steps=9000), seed=0)
    work = Work(tmp_path, replace(cfg, small_lr=1e-3, small_steps=8000), seed=0)
    assert [(c["key"], c["stage_state"]) for c in work.changes][-1] == ("small_steps", "under way")
    assert len(work.changes) == 3  # the earlier changes are kept


def test_the_small_stage_draws_its_timesteps_mostly_where_a_relay_runs_it() -> None:
    from lab.demo_family.train import sample_timesteps

    torch.manual_seed(0)
    t = sample_timesteps(20_000, 1000, focus_t=700, focus_p=0.5)
    assert int(t.min()) >= 0 and int(t.max()) == 999  # still the whole schedule ...
    assert abs(float((t < 700).float().mean()) - 0.85) < 0.02  # ... but 0.5 + 0.5 * 0.7 of it below 700
    uniform = sample_timesteps(20_000, 1000)
    assert abs(float((uniform < 700).float().mean()) - 0.70) < 0.02


def test_min_snr_weights_cap_only_the_low_noise_steps() -> None:
    from diffusers import DDPMScheduler

    from lab.demo_family.train import min_snr_weights
    from lab.tiny_family import SD_SCHEDULER_CONFIG

    ac = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod
    snr = ac / (1 - ac)
    w = min_snr_weights(ac, 5.0)
    assert torch.all(w[snr <= 5.0] == 1.0)  # high-noise steps (they fix the layout) keep their full weight
    assert torch.allclose(w[snr > 5.0], 5.0 / snr[snr > 5.0])  # low-noise ones are scaled down to gamma / SNR
    assert w[0] < 0.01 and bool(torch.all(w[1:] >= w[:-1]))  # t = 0 is nearly free; weight grows with noise
    assert torch.all(min_snr_weights(ac, 0.0) == 1.0)  # gamma 0: plain MSE


def test_scene_targets_mark_each_cell_and_ignore_the_colour_of_empty_ones() -> None:
    from lab.demo_family.data import CATEGORIES, CATEGORY_INDEX, COLOUR_INDEX, Item, Scene
    from lab.demo_family.train import scene_targets

    scene = Scene((Item("sneaker", "red"),) + (None,) * 7 + (Item("bag", "white"),))
    cat, col = scene_targets([scene, Scene((None,) * 4 + (Item("dress", "blue"),) + (None,) * 4)])
    assert cat.shape == col.shape == (2, 9)
    assert cat[0, 0] == CATEGORY_INDEX["sneaker"] and col[0, 0] == COLOUR_INDEX["red"]
    assert cat[0, 8] == CATEGORY_INDEX["bag"] and col[0, 8] == COLOUR_INDEX["white"]
    assert bool((cat[0, 1:8] == len(CATEGORIES)).all()) and bool((col[0, 1:8] == -100).all())
    assert cat[1, 4] == CATEGORY_INDEX["dress"] and int((cat[1] == len(CATEGORIES)).sum()) == 8


def test_the_scene_probe_reads_one_cell_per_query_from_the_text_encoders_states(tmp_path: Path) -> None:
    from lab.demo_family.data import CATEGORIES, COLOUR_NAMES
    from lab.demo_family.train import SceneProbe, build_text_encoder, encode

    tok = build_tokenizer(tmp_path / "tokenizer")
    te = build_text_encoder(QUICK, tok)
    probe = SceneProbe(QUICK.text_hidden, QUICK.text_heads)
    cat, col = probe(encode(te, tok, ["a red sneaker in the top left", ""]))
    assert cat.shape == (2, 9, len(CATEGORIES) + 1) and col.shape == (2, 9, len(COLOUR_NAMES))
    cat.sum().backward()  # the probe's loss reaches the text encoder: that is what the text stage trains
    assert te.text_model.embeddings.token_embedding.weight.grad is not None


def test_model_card_has_a_row_per_stage_and_the_parse_accuracy(tmp_path: Path) -> None:
    import json
    from dataclasses import asdict

    from lab.demo_family.train import STAGES, build_untrained_family, write_model_card

    family = build_untrained_family(tmp_path / "fam")
    record = {"steps": 10, "batch": 4, "lr": {"m": 1e-3}, "schedule": "AdamW, one-cycle (cosine) LR, grad-norm clip 1",
              "ema_decay": 0.0, "seconds": 60, "final_loss": 0.5, "loss": "some loss"}
    stages = {name: dict(record) for name in STAGES}
    stages["vae"]["scaling_factor"] = 0.5
    stages["text"]["parse_accuracy"] = {"cell_category": 0.998, "item_colour": 0.997, "scene": 0.981}
    info = {"seed": 0, "command": "python -m lab.demo_family.train --out X", "config": asdict(QUICK),
            "stages": stages, "params": {"vae": 1, "text_encoder": 1, "unet": 4, "unet_small": 1},
            "step_cost_ms": {"unet": 40.0, "unet_small": 8.0, "ratio": 5.0}, "versions": {"torch": "x"},
            "changes": [{"key": "text_steps", "from": 1500, "to": 3500, "at": "2026-12-01T09:20:00", "stage_state": "under way"},
                        {"key": "large_steps", "from": 3000, "to": 2700, "at": "2026-12-01T09:21:00", "stage_state": "not started"},
                        {"key": "small_focus_t", "from": None, "to": 700, "at": "2026-12-01T11:15:00", "stage_state": "not started"}]}
    (family / "training.json").write_text(json.dumps(info))
    card = write_model_card(family).read_text()
    for name in STAGES:
        assert f"| {name} |" in card
    assert "category accuracy 0.998" in card and "whole scenes right 0.981" in card
    assert "text step budget was changed from 1500 to 3500 at 2026-12-01T09:20:00, with the stage under way" in card
    assert "large step budget was changed from 3000 to 2700 at 2026-12-01T09:21:00, before the large stage started" in card
    assert "`small_focus_t` (a setting added to the recipe since the run began) was set to 700" in card
