"""Adaptive handoff in the evaluation harness: arms ``(N, tau)`` beside the fixed splits of ``rise-eval``.

An adaptive plan (:attr:`shared.relay_plan.RelayPlan.handoff_tau`) lets the edge hand off once its
predicted clean latent x0 has settled (:mod:`shared.relay_modes`): each request leaves the large
model at its own step in ``[min_split, k_max]``. This module generates with such plans on the same
torch path ``rise-eval`` uses for fixed splits (:func:`edge_server.relay.prepare` and
:func:`edge_server.batching.batched_step`, prompts batched, one request at a time for timings) and
scores them with the same scorer, so a tau row reads like a fixed row plus the edge steps it used:

- ``edge_steps_mean`` and ``edge_steps_by_items`` (mean handoff step per prompt item count),
  ``edge_steps_hist`` (per item count: how many requests handed off at each step);
- adherence (overall, per item count), Fréchet distance, compute per image (median of single
  requests, as ``rise-eval`` times its rows).

In a batch, the jobs still on the edge take one large-UNet call per step and the jobs already
handed off one small-UNet call: each request's trajectory is the one it would have alone (the
batching core is tested for that), only cut where its own x0 settled.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from edge_server.batching import DenoiseJob, batched_step
from edge_server.family import Family
from edge_server.relay import decode_latents, prepare, run_alone
from shared.bandit.arms import arm_label
from shared.demo_grammar.prompts import prompt_to_scene
from shared.errors import ConfigError, RiseError
from shared.relay_plan import RelayPlan

from .data import N_CELLS, Scene
from .measure import CLOCKS, by_items, quality
from .scorer import Scorer


class AdaptiveEvalError(RiseError, ValueError):
    """Bad adaptive-arm arguments (taus, window, clock), said up front."""


class EvalSettings(Protocol):
    """What of ``rise-eval``'s :class:`~lab.demo_family.evaluate.EvalConfig` the adaptive rows use."""

    steps: int
    sampler: str
    guidance: float
    seed: int
    batch: int
    timing_prompts: int
    clock: str


@dataclass
class AdaptiveGenerated:
    """The images of one adaptive arm and where each request handed off."""

    images: np.ndarray  # uint8 (P, H, W, 3)
    edge_steps: np.ndarray  # int (P,): the large-model steps each request ran (its handoff's split)
    timings: list[dict[str, float]] = field(default_factory=list)  # per timed request: edge_s, device_s, edge_steps


def adaptive_plan(steps: int, tau: float, *, k_max: int | None = None, min_split: int | None = None,
                  sampler: str = "dpmpp_2m", guidance: float = 7.5) -> RelayPlan:
    """The arm ``(N, tau)``: hand off in ``[min_split or 1, k_max or N - 1]`` once x0 settles below ``tau``."""
    try:
        return RelayPlan(steps, steps - 1 if k_max is None else k_max, sampler, guidance, handoff_tau=tau,
                         min_split=min_split)
    except ConfigError as exc:
        raise AdaptiveEvalError(f"adaptive arm tau={tau}: {exc}") from exc


@torch.no_grad()
def generate_adaptive(family: Family, prompts: Sequence[str], plan: RelayPlan, *, seed: int, batch: int = 32,
                      tick: Callable[[int], object] | None = None) -> AdaptiveGenerated:
    """All prompts through the one-process relay with ``plan`` (adaptive or fixed), ``batch`` at a time.

    Request ``i`` uses seed ``seed + i``, as :func:`lab.demo_family.evaluate.generate_torch`; ``tick(b)``
    after each batch of ``b`` images.
    """
    if not prompts:
        raise AdaptiveEvalError("no prompts to generate")
    n = plan.num_inference_steps
    images, edge_steps = [], []
    for start in range(0, len(prompts), batch):
        jobs = [prepare(family, p, plan, seed + start + i) for i, p in enumerate(prompts[start : start + batch])]
        split: dict[int, int] = {}  # id(job) -> its handoff step
        edge: list[DenoiseJob] = list(jobs)
        device: list[DenoiseJob] = []
        while edge or device:
            handed = [job for job in edge if job.done]  # at its handoff (k = 0: before any step)
            edge = [job for job in edge if not job.done]
            for job in handed:  # the device half continues from here
                split[id(job)] = job.next_step
                job.stop_at = n
            device = [job for job in [*device, *handed] if not job.done]
            if edge:
                batched_step(family.large_unet, edge)
            if device:
                batched_step(family.small_unet, device)
        images.append(decode_latents(family, torch.cat([j.latents for j in jobs])))
        edge_steps += [split.get(id(job), n) for job in jobs]  # never handed off: edge-only
        if tick is not None:
            tick(len(jobs))
    return AdaptiveGenerated(np.concatenate(images), np.asarray(edge_steps, dtype=np.int64))


@torch.no_grad()
def time_adaptive(family: Family, prompts: Sequence[str], plan: RelayPlan, *, seed: int,
                  clock: str = "cpu") -> list[dict[str, float]]:
    """Edge and device compute of single requests (batch of one) with ``plan``, and where each handed off."""
    if clock not in CLOCKS:
        raise AdaptiveEvalError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    out = []
    for i, prompt in enumerate(prompts):
        t0 = now()
        job = run_alone(family.large_unet, prepare(family, prompt, plan, seed + i))
        t1 = now()
        used = job.next_step
        job.stop_at = plan.num_inference_steps
        decode_latents(family, run_alone(family.small_unet, job).latents)
        t2 = now()
        out.append({"edge_s": t1 - t0, "device_s": t2 - t1, "edge_steps": float(used)})
    return out


def edge_steps_by_items(edge_steps: np.ndarray, scenes: Sequence[Scene]) -> tuple[dict[str, float],
                                                                                   dict[str, dict[str, int]]]:
    """Mean handoff step per item count, and per item count how many requests handed off at each step."""
    items = np.asarray([s.n_items for s in scenes])
    means = by_items(edge_steps, scenes)
    hist = {str(n): {str(k): int(c) for k, c in sorted(Counter(edge_steps[items == n].tolist()).items())}
            for n in range(1, N_CELLS + 1) if (items == n).any()}
    return means, hist


def adaptive_row(family: Family, prompts: Sequence[str], scenes: Sequence[Scene], plan: RelayPlan, scorer: Scorer,
                 reference: np.ndarray, cfg: EvalSettings, *, timed: Sequence[str] = (),
                 tick: Callable[[int], object] | None = None) -> dict[str, Any]:
    """One adaptive arm's row: what a fixed row of ``rise-eval`` says, plus the edge steps it used."""
    gen = generate_adaptive(family, prompts, plan, seed=cfg.seed, batch=cfg.batch, tick=tick)
    means, hist = edge_steps_by_items(gen.edge_steps, scenes)
    row: dict[str, Any] = {
        "k": plan.split, "tau": plan.handoff_tau, "min_split": plan.min_split, "label": arm_label(plan),
        **quality(gen.images, scenes, scorer, reference),
        "edge_steps_mean": float(gen.edge_steps.mean()), "edge_steps_by_items": means, "edge_steps_hist": hist,
        "edge_steps": gen.edge_steps.tolist(),
    }
    if timed:
        timings = time_adaptive(family, timed, plan, seed=cfg.seed, clock=cfg.clock)
        row["edge_s"] = statistics.median(t["edge_s"] for t in timings)
        row["device_s"] = statistics.median(t["device_s"] for t in timings)
        row["compute_s"] = row["edge_s"] + row["device_s"]
        row["timed_edge_steps_mean"] = statistics.mean(t["edge_steps"] for t in timings)
    return row


def parse_taus(text: str | None) -> tuple[float, ...]:
    """``"0.02,0.05"`` as thresholds in (0, 1]; :class:`AdaptiveEvalError` saying what is wrong."""
    if not text:
        return ()
    try:
        taus = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise AdaptiveEvalError(f"--taus must be comma-separated numbers in (0, 1], got {text!r}") from None
    bad = [t for t in taus if not 0.0 < t <= 1.0]
    if bad or not taus:
        raise AdaptiveEvalError(f"--taus must be comma-separated numbers in (0, 1], got {text!r}")
    return taus


def parse_window(text: str | None) -> tuple[int | None, int | None]:
    """``"2,19"`` as ``(min_split, k_max)``; ``None``: the defaults (1 and N - 1)."""
    if not text:
        return None, None
    parts = [t.strip() for t in text.split(",")]
    if len(parts) != 2 or not all(t.isdigit() for t in parts):
        raise AdaptiveEvalError(f"--tau-window must be two step counts K_MIN,K_MAX, got {text!r}")
    return int(parts[0]), int(parts[1])


def check_adaptive(cfg: EvalSettings, taus: Sequence[float], *, k_max: int | None = None,
                   min_split: int | None = None) -> list[RelayPlan]:
    """The adaptive arms of ``taus``, checked before any work (an :class:`AdaptiveEvalError` for a bad window)."""
    return [adaptive_plan(cfg.steps, tau, k_max=k_max, min_split=min_split, sampler=cfg.sampler,
                          guidance=cfg.guidance) for tau in taus]


def evaluate_adaptive(family: Family, prompts: Sequence[str], cfg: EvalSettings, scorer: Scorer,
                      reference: np.ndarray, taus: Sequence[float], *, k_max: int | None = None,
                      min_split: int | None = None, log: Callable[[str], object] = print) -> list[dict[str, Any]]:
    """The rows of the adaptive arms ``(cfg.steps, tau)`` for each ``tau`` (``rise-eval --taus``): the
    report's ``"adaptive"`` list, which :func:`shared.bandit.profile.profile_from_eval` reads as arms.
    ``reference``: the Fréchet reference features, ``rise-eval``'s (real renderings of the scenes)."""
    plans = check_adaptive(cfg, taus, k_max=k_max, min_split=min_split)
    try:
        scenes = [prompt_to_scene(p) for p in prompts]
    except ValueError as exc:
        raise AdaptiveEvalError(f"the prompts must follow the demo family's grammar: {exc}") from exc
    timed = list(prompts[: max(1, cfg.timing_prompts)])
    rows = []
    for plan in plans:
        row = adaptive_row(family, prompts, scenes, plan, scorer, reference, cfg, timed=timed)
        rows.append(row)
        log(f"  {row['label']}: adherence {row['adherence']:.3f}, edge steps {row['edge_steps_mean']:.2f} "
            f"(by items {', '.join(f'{n}:{v:.1f}' for n, v in row['edge_steps_by_items'].items())})")
    return rows


def format_adaptive_table(rows: Sequence[dict[str, Any]], fixed: Sequence[dict[str, Any]] = ()) -> str:
    """The adaptive rows (and, for comparison, the fixed ones) as a text table: arm, adherence, edge steps."""
    lines = [f"{'arm':<16} {'adherence':>9} {'edge steps':>10} {'compute ms':>10}  edge steps by items"]
    for r in [*fixed, *rows]:
        label = r.get("label") or f"k={r['k']}"
        used = r.get("edge_steps_mean", r["k"])
        compute = f"{r['compute_s'] * 1000:>10.1f}" if "compute_s" in r else f"{'-':>10}"
        by = r.get("edge_steps_by_items")
        tail = " ".join(f"{v:.1f}" for v in by.values()) if by else ""
        lines.append(f"{label:<16} {r['adherence']:>9.4f} {used:>10.2f} {compute}  {tail}")
    return "\n".join(lines)
