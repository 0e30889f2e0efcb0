"""rise-eval's cache of reference ceilings: a second run reads them, any change of what they depend on recomputes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lab.demo_family.ceiling_cache import (
    CACHE_ENV,
    CeilingCache,
    CeilingKey,
    cached_ceilings,
    ceiling_key,
    default_cache_dir,
    module_digest,
    scenes_digest,
)
from shared.demo_grammar.prompts import load_prompts, prompt_to_scene

FIGURES = {name: {"adherence": 0.5, "adherence_by_items": {"1": 0.5}, "frechet": 1.25, "n": 10}
           for name in ("real", "vae")}


def _key(**change: Any) -> CeilingKey:
    fields: dict[str, Any] = {"vae": "v", "vae_placement": "torch.float32 on cpu", "scorer": "s", "bank": "b",
                              "scenes": "p", "n": 10, "seeds": (1, 2, 3)}
    return CeilingKey(**{**fields, **change})


class Counted:
    """The expensive computation, counted."""

    def __init__(self, figures: dict[str, Any]) -> None:
        self.figures, self.calls = figures, 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return self.figures


def test_the_second_lookup_reads_the_file_and_does_not_compute(tmp_path: Path) -> None:
    cache, compute = CeilingCache(tmp_path), Counted(FIGURES)
    first, where = cached_ceilings(_key(), compute, cache)
    assert compute.calls == 1 and first == FIGURES and where.startswith("computed, cached in ")
    second, where = cached_ceilings(_key(), compute, cache)
    assert compute.calls == 1  # the hit did not call it
    assert second == FIGURES and where == f"cache {cache.path(_key())}"
    assert cache.path(_key()).parent == tmp_path / "ceilings"


@pytest.mark.parametrize("change", [{"vae": "v2"}, {"vae_placement": "torch.float16 on cuda"}, {"scorer": "s2"},
                                    {"bank": "b2"}, {"scenes": "p2"}, {"n": 11}, {"seeds": (1, 2, 4)}])
def test_a_changed_key_part_recomputes(tmp_path: Path, change: dict[str, Any]) -> None:
    cache, compute = CeilingCache(tmp_path), Counted(FIGURES)
    cached_ceilings(_key(), compute, cache)
    cached_ceilings(_key(**change), compute, cache)
    assert compute.calls == 2
    assert cache.path(_key(**change)) != cache.path(_key())
    cached_ceilings(_key(), compute, cache)  # the first key's file is still there
    assert compute.calls == 2


def test_refresh_recomputes_and_replaces_and_no_cache_always_computes(tmp_path: Path) -> None:
    cached_ceilings(_key(), Counted(FIGURES), CeilingCache(tmp_path))
    newer = {name: {**fig, "adherence": 0.75} for name, fig in FIGURES.items()}
    compute = Counted(newer)
    figures, _ = cached_ceilings(_key(), compute, CeilingCache(tmp_path, refresh=True))
    assert compute.calls == 1 and figures == newer
    assert CeilingCache(tmp_path).load(_key()) == newer  # replaced
    figures, where = cached_ceilings(_key(), compute, None)  # --no-cache
    assert compute.calls == 2 and where == "computed"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"key": "someone else's", "ceilings": FIGURES}),
                                     json.dumps({"ceilings": {"real": {}}}), "[]"])
def test_a_damaged_or_foreign_file_is_recomputed_and_replaced(tmp_path: Path, content: str) -> None:
    cache, compute = CeilingCache(tmp_path), Counted(FIGURES)
    cache.path(_key()).parent.mkdir(parents=True)
    cache.path(_key()).write_text(content)
    figures, _ = cached_ceilings(_key(), compute, cache)
    assert compute.calls == 1 and figures == FIGURES
    assert cache.load(_key()) == FIGURES


def test_an_unwritable_cache_costs_the_computation_only(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    compute = Counted(FIGURES)
    figures, where = cached_ceilings(_key(), compute, CeilingCache(blocker))
    assert figures == FIGURES and where == "computed"


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "rise"


def test_the_fingerprints_see_weights_placement_and_scenes() -> None:
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    net = torch.nn.Sequential(conv, norm)
    before = module_digest(net)
    assert module_digest(net) == before  # deterministic
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] += 1e-6  # one weight, slightly
    assert module_digest(net) != before
    changed = module_digest(net)
    assert norm.running_mean is not None  # track_running_stats=True
    norm.running_mean.add_(1.0)  # buffers count too
    assert module_digest(net) != changed
    assert module_digest(net.half()) != module_digest(net.float())

    scenes = [prompt_to_scene(p) for p in load_prompts()[:4]]
    assert scenes_digest(scenes) == scenes_digest(list(scenes))
    assert scenes_digest(scenes) != scenes_digest(scenes[::-1])
    assert scenes_digest(scenes) != scenes_digest(scenes[:3])


class _Bank:
    """The attributes of an ItemBank the key reads."""

    split = "test"
    items = np.zeros((4, 14, 14), np.float32)
    categories = np.arange(4)
    source_ids = np.arange(4)


def test_ceiling_key_of_a_float16_vae_differs_from_its_float32_self() -> None:
    vae = torch.nn.Linear(2, 2)
    scorer = torch.nn.Linear(2, 2)
    scenes = [prompt_to_scene(load_prompts()[0])]
    fp32 = ceiling_key(vae, scorer, _Bank(), 10, scenes, (1, 2, 3))  # type: ignore[arg-type]  # duck-typed bank
    assert fp32 == ceiling_key(vae, scorer, _Bank(), 10, scenes, (1, 2, 3))  # type: ignore[arg-type]
    fp16 = ceiling_key(vae.half(), scorer, _Bank(), 10, scenes, (1, 2, 3))  # type: ignore[arg-type]
    assert fp16.vae_placement == "torch.float16 on cpu" and fp16.digest() != fp32.digest()


# --------------------------------------------------------------------------- through rise-eval


@pytest.fixture
def family(fashion_mnist: None, untrained_family: Path) -> Path:
    return untrained_family  # (tests/lab/conftest.py) rise-eval needs the data as well


def _argv(family: Path, cache: Path, *extra: str) -> list[str]:
    return ["--family", str(family), "--limit", "2", "--steps", "2", "--splits", "0", "--ceiling-scenes", "8",
            "--timing-prompts", "1", "--intensity-prompts", "2", "--cache-dir", str(cache), *extra]


def test_rise_eval_computes_its_ceilings_once_per_family_and_prompt_set(
        family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import lab.demo_family.evaluate as evaluate

    calls: list[int] = []
    real_ceilings = evaluate.ceilings

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(args[3])  # n
        return real_ceilings(*args, **kwargs)

    monkeypatch.setattr(evaluate, "ceilings", counted)
    cache = tmp_path / "cache"
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    assert evaluate.main(_argv(family, cache, "--json", str(first))) == 0
    assert evaluate.main(_argv(family, cache, "--json", str(second))) == 0
    assert calls == [8]  # the second run read them
    assert "computed, cached in" in capsys.readouterr().out
    assert json.loads(second.read_text())["ceilings"] == json.loads(first.read_text())["ceilings"]
    assert len(list((cache / "ceilings").glob("*.json"))) == 1

    assert evaluate.main(_argv(family, cache, "--ceiling-scenes", "9")) == 0  # another n: another key
    assert evaluate.main(_argv(family, cache, "--limit", "3")) == 0  # another prompt set: another key
    assert calls == [8, 9, 8]
    assert evaluate.main(_argv(family, cache, "--refresh-ceilings")) == 0
    assert calls == [8, 9, 8, 8]
    assert len(list((cache / "ceilings").glob("*.json"))) == 3
    assert evaluate.main(_argv(family, tmp_path / "unused", "--no-cache")) == 0
    assert calls == [8, 9, 8, 8, 8] and not (tmp_path / "unused").exists()
    capsys.readouterr()
    assert evaluate.main(_argv(family, cache, "--no-cache", "--refresh-ceilings")) == 2
    assert "not allowed with" in capsys.readouterr().err
