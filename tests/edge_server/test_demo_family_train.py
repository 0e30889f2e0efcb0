"""The demo family's training script: tokenizer and model builders (fast); a --quick run (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_server.demo_family.data import random_scene
from edge_server.demo_family.prompts import load_prompts, scene_to_prompt, vocabulary
from edge_server.demo_family.train import MAX_TOKENS, QUICK, build_tokenizer, build_unet


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
    from edge_server.demo_family.data import find_fashion_mnist
    from edge_server.demo_family.train import main

    try:
        find_fashion_mnist()
    except Exception as exc:  # noqa: BLE001
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

    from edge_server.demo_family.train import Stage, TrainConfig

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
