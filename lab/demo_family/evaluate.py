"""``rise-eval``: quality and compute of every relay split for a family of the demo-family grammar.

For each split ``k`` of ``N`` steps the prompts are generated (large UNet for steps ``[0, k)``,
small UNet for ``[k, N)``) and judged by the demo family's scorer:

- **adherence**: the fraction of the 3x3 cells that read as the prompt says (overall and per
  complexity level = number of items);
- **Fréchet distance** between the scorer's cell features of the generated images and of real
  renderings of the same scenes (Fashion-MNIST *test* items);
- **edge / device compute per image**: edge = text encoding + the ``k`` large-model steps,
  device = the ``N - k`` small-model steps + the VAE decode; both at the batch a request uses
  (one image, classifier-free guidance = 2 rows), median over ``--timing-prompts`` requests;
- **speedup** of edge + device compute against large-only (``k = N``).

The ceilings come first: the scorer's adherence on ``--ceiling-scenes`` real held-out scenes,
and on the same scenes passed through the family's VAE (encode, decode). They are cached per
family VAE, scorer, prompt set and ``--ceiling-scenes`` (:mod:`lab.demo_family.ceiling_cache`:
``$RISE_CACHE_DIR``, else ``~/.cache/rise``; ``--cache-dir``, ``--refresh-ceilings``, ``--no-cache``),
so only the first run pays for the round trip.

Progress bars (ceilings, then the images of every split) are drawn on stderr when it is a
terminal (``--progress`` / ``--no-progress`` force them); stdout carries the same lines and table
as without them.

Without ``--bundle`` the device half runs in PyTorch (the one-process relay of
:func:`edge_server.relay.prepare` / :func:`~edge_server.batching.batched_step`, prompts batched
for throughput, timings taken one request at a time); with ``--bundle`` it runs on ONNX Runtime
through the calls of :func:`lab.local_relay.relay_once`, the handoff serialized in between.
Compute is timed as process CPU time by default (``--clock cpu``): the machines this runs on are
shared, and CPU time counts only the work of the request (``--clock wall`` for elapsed time).

Plots (``--plots DIR``): ``quality_vs_split.png``, ``quality_latency.png`` and
``latent_intensity.png`` (per-step latent mean, std and norm for large-only, small-only and each
relay, the handoff marked: the paper's *latent intensity* finding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypedDict

import numpy as np
import torch

from edge_server.batching import batched_step
from edge_server.family import Family, load_family, uncond_embedding
from edge_server.placement import DTYPE_CHOICES, resolve_placement
from edge_server.relay import decode_latents, prepare, run_alone
from edge_server.torch_types import as_pipeline, as_unet
from shared.demo_grammar.prompts import DEFAULT_PROMPTS_FILE, PromptError, load_prompts, prompt_to_scene
from shared.errors import RiseError
from shared.relay_plan import RelayPlan
from shared.samplers import SAMPLER_NAMES

from ..progress import bar, echo
from .adaptive import check_adaptive, evaluate_adaptive, format_adaptive_table, parse_taus, parse_window
from .ceiling_cache import CeilingCache, cached_ceilings, ceiling_key
from .data import ItemBank, Scene
from .measure import CLOCKS, by_items, quality
from .scorer import Scorer, adherence, default_scorer, frechet_distance

STATS = ("mean", "std", "norm")
#: How compute is timed. "cpu": the process's CPU time, which on a shared machine counts only the
#: work this request did (with one thread, as run by default, it equals the wall time of an idle
#: machine); "wall": elapsed time, what a user waits on a dedicated machine.
CEILING_SEED = 1  # the scorer's model card measures its real ceiling on these scenes
REFERENCE_SEED = 2  # real renderings of the prompts' scenes (the Fréchet reference)
SECOND_RENDER_SEED = 3  # another real rendering of the same scenes (the Fréchet ceilings)


def _no_tick(_: int) -> None:
    return None


class EvalError(RiseError, ValueError):
    """Bad harness arguments (splits, prompts), said up front."""


@dataclass
class Generated:
    """The images of one split, and the per-step latent statistics of their trajectories."""

    images: np.ndarray  # uint8 (P, H, W, 3)
    stats: np.ndarray | None = None  # (P, N + 1, 3): mean, std, norm of the latent after each step (0 = initial)
    timings: list[dict[str, float]] = field(default_factory=list)  # per timed request


# --------------------------------------------------------------------------- metrics


def latent_stats(latents: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(B, 3)``: mean, std and RMS norm (L2 norm / sqrt(size)) of each latent in a batch."""
    x = torch.as_tensor(np.asarray(latents) if not isinstance(latents, torch.Tensor) else latents).double()
    x = x.reshape(x.shape[0], -1)
    return torch.stack([x.mean(1), x.std(1), x.pow(2).mean(1).sqrt()], 1).cpu().numpy()


@torch.no_grad()
def vae_round_trip(family: Family, images: np.ndarray, batch: int = 256,
                   tick: Callable[[int], object] = _no_tick) -> np.ndarray:
    """Real images through the family's VAE (encode: the posterior mode, decode) as uint8;
    ``tick(b)`` after each batch of ``b`` images."""
    vae = as_pipeline(family.pipeline).vae
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
        rec = vae.decode(z).sample.float().cpu()
        out.append(((rec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        tick(len(x))
    return np.concatenate(out)


def ceilings(family: Family, scorer: Scorer, bank: ItemBank, n: int, scenes: Sequence[Scene],
             reference: np.ndarray, tick: Callable[[int], object] = _no_tick) -> dict[str, dict[str, Any]]:
    """Real and VAE ceilings: adherence on ``n`` random real held-out scenes (and through the VAE);
    Fréchet distance of another real rendering of the prompts' scenes (and of it through the VAE).

    ``tick(b)`` as ``b`` more images went through the VAE: ``n + len(scenes)`` in all, the bulk of the work.
    """
    if n < 1:
        raise EvalError(f"ceiling scenes must be at least 1, got {n}")
    real, real_scenes, _ = bank.sample(n, np.random.default_rng(CEILING_SEED))
    second = render(bank, scenes, SECOND_RENDER_SEED)
    out = {}
    for name, images, frechet_images in (
        ("real", real, second),
        ("vae", vae_round_trip(family, real, tick=tick), vae_round_trip(family, second, tick=tick)),
    ):
        adh = adherence(images, real_scenes, scorer)
        out[name] = {
            "adherence": float(adh.mean()),
            "adherence_by_items": by_items(adh, real_scenes),
            "frechet": frechet_distance(scorer.features(frechet_images), reference),
            "n": n,
        }
    return out


def render(bank: ItemBank, scenes: Sequence[Scene], seed: int) -> np.ndarray:
    """Real renderings (uint8) of ``scenes`` with random items of ``bank``."""
    rng = np.random.default_rng(seed)
    return np.stack([bank.render(s, rng)[0] for s in scenes])


# --------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_torch(family: Family, prompts: Sequence[str], steps: int, k: int, *, sampler: str,
                   guidance: float, seed: int, batch: int = 32,
                   tick: Callable[[int], object] = _no_tick) -> Generated:
    """All prompts through the one-process relay, ``batch`` requests per UNet call; ``tick(b)``
    after each batch of ``b`` images.

    Request ``i`` uses seed ``seed + i``; batching changes only float round-off (the step-level
    batching core is tested against one request at a time).
    """
    if not prompts:
        raise EvalError("no prompts to generate")
    plan = RelayPlan(steps, k, sampler, guidance)
    images, stats = [], []
    for start in range(0, len(prompts), batch):
        jobs = [prepare(family, p, plan, seed + start + i) for i, p in enumerate(prompts[start : start + batch])]
        trace = [latent_stats(torch.cat([j.latents for j in jobs]))]
        for job in jobs:
            job.stop_at = steps
        for step in range(steps):
            batched_step(family.large_unet if step < k else family.small_unet, jobs)
            trace.append(latent_stats(torch.cat([j.latents for j in jobs])))
        images.append(decode_latents(family, torch.cat([j.latents for j in jobs])))
        stats.append(np.stack(trace, 1))
        tick(len(jobs))
    return Generated(np.concatenate(images), np.concatenate(stats))


@torch.no_grad()
def time_torch(family: Family, prompts: Sequence[str], steps: int, k: int, *, sampler: str,
               guidance: float, seed: int, clock: str = "cpu",
               tick: Callable[[int], object] = _no_tick) -> list[dict[str, float]]:
    """Edge and device compute of single requests (batch of one), in PyTorch; ``tick(1)`` after each."""
    now = CLOCKS[clock]
    plan = RelayPlan(steps, k, sampler, guidance)
    out = []
    for i, prompt in enumerate(prompts):
        t0 = now()
        job = run_alone(family.large_unet, prepare(family, prompt, plan, seed + i))
        t1 = now()
        job.stop_at = steps
        decode_latents(family, run_alone(family.small_unet, job).latents)
        t2 = now()
        out.append({"edge_s": t1 - t0, "device_s": t2 - t1})
        tick(1)
    return out


def generate_bundle(family: Family, bundle: Any, prompts: Sequence[str], steps: int, k: int, *,
                    sampler: str, guidance: float, seed: int, clock: str = "cpu",
                    tick: Callable[[int], object] = _no_tick) -> Generated:
    """All prompts through the two-sided relay, device half on ONNX Runtime: the calls of
    :func:`~lab.local_relay.relay_once` (edge steps, handoff to bytes and back, then
    :func:`device_app.finish.finish_handoff`: device steps and decode), timed with ``clock``;
    ``tick(1)`` after each image."""
    if not prompts:
        raise EvalError("no prompts to generate")
    from device_app.finish import finish_handoff
    from edge_server.relay import EdgeRelay
    from shared.handoff import decode_handoff, encode_handoff

    now = CLOCKS[clock]
    plan = RelayPlan(steps, k, sampler, guidance)
    edge = EdgeRelay(family)
    images, timings = [], []
    for i, prompt in enumerate(prompts):
        t0 = now()
        handoff = edge.start(prompt, plan, seed + i)
        t1 = now()
        payload = encode_handoff(handoff)
        received = decode_handoff(payload, expected_family=bundle.family_id)
        t2 = now()
        finished = finish_handoff(bundle, received, clock=now)
        assert finished.image is not None  # finish_handoff decodes by default
        images.append(finished.image)
        device_s = finished.steps_s + finished.decode_s
        timings.append({"edge_s": t1 - t0, "device_s": device_s, "handoff_s": t2 - t1, "handoff_bytes": len(payload)})
        tick(1)
    return Generated(np.stack(images), None, timings)


@torch.no_grad()
def step_costs(family: Family, bundle: Any = None, repeats: int = 30, clock: str = "cpu") -> dict[str, float]:
    """Median ms of one denoiser call at batch 2 (one image with CFG): the large UNet in PyTorch,
    the small one in PyTorch or, with a bundle, on ONNX Runtime; and their ratio."""
    size = family.default_latent_size
    unet_module = as_unet(family.large_unet)
    z = torch.randn(2, family.latent_channels, size, size).to(unet_module.device, unet_module.dtype)
    cond = torch.cat([uncond_embedding(family)] * 2).to(unet_module.device, unet_module.dtype)
    t = as_pipeline(family.pipeline).scheduler.config.num_train_timesteps // 2
    large_unet, small_unet = as_unet(family.large_unet), as_unet(family.small_unet)

    def median_ms(call: Callable[[], object]) -> float:
        for _ in range(3):
            call()
        now, times = CLOCKS[clock], []
        for _ in range(repeats):
            t0 = now()
            call()
            times.append(now() - t0)
        return 1000 * statistics.median(times)

    large = median_ms(lambda: large_unet(z, t, cond))
    if bundle is None:
        small = median_ms(lambda: small_unet(z, t, cond))
    else:
        zn, cn = z.float().cpu().numpy(), cond.float().cpu().numpy()
        small = median_ms(lambda: bundle.unet(zn, float(t), cn))
    return {"large_ms": round(large, 3), "small_ms": round(small, 3), "ratio": round(large / small, 2)}


# --------------------------------------------------------------------------- harness


class _SamplingArgs(TypedDict):
    """The keyword arguments every generate/time call of :func:`evaluate` shares."""

    sampler: str
    guidance: float
    seed: int


@dataclass
class EvalConfig:
    steps: int = 20
    splits: tuple[int, ...] = (0, 2, 4, 6, 8, 10, 12, 16, 20)
    sampler: str = "dpmpp_2m"
    guidance: float = 7.5
    seed: int = 0
    batch: int = 32
    ceiling_scenes: int = 1000
    timing_prompts: int = 8
    intensity_prompts: int = 32
    clock: str = "cpu"


def png_size(image: np.ndarray) -> int:
    """Bytes of ``image`` (HxWx3 in [0, 1]) as a PNG: what an edge-decoded image costs to send."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.tell()


#: The counts of :class:`EvalConfig` that must be at least 1 (each one's command-line flag).
POSITIVE_FIELDS = {"batch": "--batch", "ceiling_scenes": "--ceiling-scenes", "timing_prompts": "--timing-prompts",
                   "intensity_prompts": "--intensity-prompts"}


def check_config(cfg: EvalConfig) -> None:
    """EvalError for a count below 1 or an unknown clock (the splits: :func:`check_splits`)."""
    for name, flag in POSITIVE_FIELDS.items():
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise EvalError(f"{flag} must be an integer of at least 1, got {value!r}")
    if cfg.clock not in CLOCKS:
        raise EvalError(f"clock must be one of {', '.join(CLOCKS)}, got {cfg.clock!r}")


def check_splits(steps: int, splits: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique splits, with ``N`` added (the reference of the speedup); EvalError if out of range."""
    bad = [k for k in splits if not 0 <= k <= steps]
    if bad:
        raise EvalError(f"splits must be in [0, {steps}], got {bad}")
    return tuple(sorted({*splits, steps}))


def evaluate(family: Family, prompts: Sequence[str], cfg: EvalConfig, *, bundle: Any = None,
             scorer: Scorer | None = None, data: str | None = None,
             log: Callable[[str], object] = print, cache: CeilingCache | None = None,
             progress: bool | None = None) -> dict[str, Any]:
    """Run the harness; return the report (the ``--json`` document).

    ``cache``: where the ceilings are looked up and stored (``None``: always computed);
    ``progress``: bars on stderr (``None``: when it is a terminal, see :mod:`lab.progress`).
    """
    scorer = scorer or default_scorer()
    check_config(cfg)
    splits = check_splits(cfg.steps, cfg.splits)
    try:
        scenes = [prompt_to_scene(p) for p in prompts]
    except PromptError as exc:
        raise EvalError(f"the prompts must follow the demo family's grammar: {exc}") from exc
    if not scenes:
        raise EvalError("no prompts")
    bank = ItemBank.load("test", data)
    reference = scorer.features(render(bank, scenes, REFERENCE_SEED))
    t0 = time.perf_counter()
    vae = as_pipeline(family.pipeline).vae
    assert isinstance(vae, torch.nn.Module)  # a diffusers AutoencoderKL
    key = ceiling_key(vae, scorer.net, bank, cfg.ceiling_scenes, scenes,
                      (CEILING_SEED, REFERENCE_SEED, SECOND_RENDER_SEED))

    def compute() -> dict[str, Any]:
        with bar(desc="ceilings: VAE round trip", total=cfg.ceiling_scenes + len(scenes), unit="img",
                 setting=progress) as pbar:
            return ceilings(family, scorer, bank, cfg.ceiling_scenes, scenes, reference, tick=pbar.update)

    ceil, source = cached_ceilings(key, compute, cache)
    log(f"ceilings ({cfg.ceiling_scenes} real held-out scenes, {time.perf_counter() - t0:.0f}s, {source}): "
        f"real {ceil['real']['adherence']:.3f}, VAE {ceil['vae']['adherence']:.3f}")
    kw: _SamplingArgs = {"sampler": cfg.sampler, "guidance": cfg.guidance, "seed": cfg.seed}
    timed = list(prompts[: cfg.timing_prompts])
    n_int = min(len(prompts), cfg.intensity_prompts)
    rows, intensity = [], {}
    # Warm-up of both halves (and ORT's lazily created sessions) before anything is timed.
    if bundle is None:
        time_torch(family, timed[:1], cfg.steps, cfg.steps // 2, **kw)
    else:
        generate_bundle(family, bundle, timed[:1], cfg.steps, cfg.steps // 2, clock=cfg.clock, **kw)
    # One bar over every image the splits make: the batch, then the timed (PyTorch) or the
    # latent-statistics (bundle) requests.
    per_split = len(prompts) + (len(timed) if bundle is None else n_int)
    with bar(desc="splits", total=per_split * len(splits), unit="img", setting=progress) as pbar:
        for k in splits:
            t0 = time.perf_counter()
            pbar.set_description(f"split k={k}")
            if bundle is None:
                gen = generate_torch(family, prompts, cfg.steps, k, batch=cfg.batch, tick=pbar.update, **kw)
                gen.timings = time_torch(family, timed, cfg.steps, k, clock=cfg.clock, tick=pbar.update, **kw)
            else:
                gen = generate_bundle(family, bundle, prompts, cfg.steps, k, clock=cfg.clock, tick=pbar.update, **kw)
                gen.stats = generate_torch(family, prompts[:n_int], cfg.steps, k, batch=cfg.batch, tick=pbar.update,
                                           **kw).stats
            row: dict[str, Any] = {"k": k, **quality(gen.images, scenes, scorer, reference)}
            # Median over requests: robust to the other jobs of a shared machine.
            row["edge_s"] = statistics.median(t["edge_s"] for t in gen.timings)
            row["device_s"] = statistics.median(t["device_s"] for t in gen.timings)
            row["compute_s"] = row["edge_s"] + row["device_s"]
            row["image_bytes"] = int(statistics.median(png_size(im) for im in gen.images[:32]))
            if "handoff_bytes" in gen.timings[0]:
                row["handoff_bytes"] = int(max(t["handoff_bytes"] for t in gen.timings))
            assert gen.stats is not None  # both branches set it from generate_torch
            intensity[k] = gen.stats[:n_int].mean(0)  # (N + 1, 3)
            rows.append(row)
            pbar.set_postfix_str(f"adherence at k={k}: {row['adherence']:.3f}", refresh=False)
            log(f"  k={k:>3}: adherence {row['adherence']:.3f}, Fréchet {row['frechet']:.2f}, "
                f"compute {row['compute_s'] * 1000:.0f} ms/image ({time.perf_counter() - t0:.0f}s)")
    cost = step_costs(family, bundle, clock=cfg.clock)
    log(f"per-step cost at batch 2 (CFG): large {cost['large_ms']:.1f} ms, small {cost['small_ms']:.1f} ms, "
        f"ratio {cost['ratio']:.1f}")
    ref = next(r for r in rows if r["k"] == cfg.steps)
    large = intensity[cfg.steps]
    for row in rows:
        row["speedup"] = ref["compute_s"] / row["compute_s"]
        row["relative_adherence"] = row["adherence"] / ref["adherence"] if ref["adherence"] else float("nan")
        k = row["k"]
        if 0 < k < cfg.steps:
            # The relay equals large-only up to step k, so its deviation one step after the handoff
            # is how far the small model's first step lands from where the large one would have gone.
            after = intensity[k][k + 1]
            row["handoff_deviation"] = {
                "mean": float(after[0] - large[k + 1][0]),
                "std_rel": float(after[1] / large[k + 1][1] - 1.0),
                "norm_rel": float(after[2] / large[k + 1][2] - 1.0),
            }
    return {
        "ceilings": ceil,
        "rows": rows,
        "step_cost": cost,
        "intensity": {str(k): {s: v[:, i].tolist() for i, s in enumerate(STATS)} for k, v in intensity.items()},
        "meta": {
            "family": str(family.folder), "family_id": family.family_id, "prompts": len(prompts),
            "steps": cfg.steps, "sampler": cfg.sampler, "guidance": cfg.guidance, "seed": cfg.seed,
            "device": "onnxruntime (bundle)" if bundle is not None else "pytorch",
            "timing_prompts": len(timed) if bundle is None else len(prompts),
            "timing": f"median {cfg.clock} seconds per image, one request at a time (2 UNet rows with CFG)",
            "clock": cfg.clock,
            "intensity_prompts": n_int, "ceiling_scenes": cfg.ceiling_scenes, "torch_threads": torch.get_num_threads(),
            # What the scheduler's profile needs to price a transfer (shared.bandit.profile reads them):
            # the largest handoff payload (it only depends on shapes and sampler state) and a PNG's size.
            "image_bytes": int(statistics.median(r["image_bytes"] for r in rows)),
            **({"handoff_bytes": max(r["handoff_bytes"] for r in rows if "handoff_bytes" in r)}
               if any("handoff_bytes" in r for r in rows) else {}),
        },
    }


# --------------------------------------------------------------------------- report


def _level_groups(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    present = sorted({int(n) for r in rows for n in r["adherence_by_items"]})
    return [(str(n), [str(n)]) for n in present]


def format_table(report: dict[str, Any]) -> str:
    """The printed table: ceilings first, then one line per split."""
    c = report["ceilings"]
    rows = report["rows"]
    levels = [n for n, _ in _level_groups(rows)]
    lines = [
        f"ceilings on {c['real']['n']} real held-out scenes (Fashion-MNIST test items):",
        f"  real scenes    adherence {c['real']['adherence']:.3f}   Fréchet {c['real']['frechet']:.2f}",
        f"  through VAE    adherence {c['vae']['adherence']:.3f}   Fréchet {c['vae']['frechet']:.2f}"
        f"   ({c['vae']['adherence'] / c['real']['adherence']:.1%} of real)",
        "",
    ]
    head = f"{'k':>4} {'adher.':>7} {'vs N':>6} " + " ".join(f"{'n=' + n:>6}" for n in levels) + \
        f" {'Fréchet':>8} {'edge s':>8} {'device s':>9} {'total s':>8} {'speedup':>8}"
    lines += [head, "-" * len(head)]
    for r in rows:
        by = r["adherence_by_items"]
        lines.append(
            f"{r['k']:>4} {r['adherence']:>7.3f} {r['relative_adherence']:>6.1%} "
            + " ".join(f"{by.get(n, float('nan')):>6.3f}" for n in levels)
            + f" {r['frechet']:>8.2f} {r['edge_s']:>8.3f} {r['device_s']:>9.3f} {r['compute_s']:>8.3f}"
            f" {r['speedup']:>7.2f}x"
        )
    m = report["meta"]
    if "step_cost" in report:
        sc = report["step_cost"]
        lines.append(f"per-step cost at batch 2 (CFG): large {sc['large_ms']:.1f} ms (PyTorch), "
                     f"small {sc['small_ms']:.1f} ms "
                     f"({'ONNX Runtime' if m['device'].startswith('onnx') else 'PyTorch'}), ratio {sc['ratio']:.1f}")
    lines.append(f"(N={m['steps']}, {m['sampler']}, guidance {m['guidance']}, {m['prompts']} prompts, device half on "
                 f"{m['device']}; n=items per prompt; times: {m['timing']} over {m['timing_prompts']} prompts)")
    return "\n".join(lines)


def plot(report: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write the three plots; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows, c, m = report["rows"], report["ceilings"], report["meta"]
    n_steps = m["steps"]
    ks = [r["k"] for r in rows]
    paths = []

    # 1. quality against split
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ks, [r["adherence"] for r in rows], "o-", color="black", lw=2, label="all prompts")
    groups = [("1-2 items", (1, 2)), ("3-4 items", (3, 4)), ("5-6 items", (5, 6)), ("7-9 items", (7, 8, 9))]
    for (label, levels), colour in zip(groups, ("tab:green", "tab:blue", "tab:orange", "tab:red"), strict=True):
        vals = [np.mean([r["adherence_by_items"][str(n)] for n in levels if str(n) in r["adherence_by_items"]]
                        or [np.nan])
                for r in rows]
        if not np.all(np.isnan(vals)):
            ax.plot(ks, vals, ".--", color=colour, label=label)
    ax.axhline(c["real"]["adherence"], color="grey", ls=":", label="real scenes (ceiling)")
    ax.axhline(c["vae"]["adherence"], color="grey", ls="-.", label="through the VAE")
    ax.set_xlabel(f"split k (large-model steps of N = {n_steps}; 0 = small only, {n_steps} = large only)")
    ax.set_ylabel("prompt adherence")
    ax.set_title("Quality against split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    fig.tight_layout()
    paths.append(folder / "quality_vs_split.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 2. quality-latency front
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs, ys = [r["compute_s"] for r in rows], [r["adherence"] for r in rows]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for r in rows:
        ax.annotate(f"k={r['k']}", (r["compute_s"], r["adherence"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    front, best = [], -np.inf
    for x, y in sorted(zip(xs, ys, strict=True)):
        if y > best:
            front.append((x, y))
            best = y
    ax.step(*zip(*front, strict=True), where="post", color="tab:blue", alpha=0.6, label="Pareto front")
    ax.axhline(c["vae"]["adherence"], color="grey", ls="-.", label="VAE ceiling")
    large_only = next(r for r in rows if r["k"] == n_steps)
    ax.axhline(0.97 * large_only["adherence"], color="tab:green", ls=":", label="97% of large only")
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel(f"edge + device compute per image ({m.get('clock', 'wall')} s)")
    ax.set_ylabel("prompt adherence")
    ax.set_title("Quality-latency front of the relay splits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    paths.append(folder / "quality_latency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 3. latent intensity
    inten = report["intensity"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    cmap = plt.get_cmap("viridis")
    steps = np.arange(n_steps + 1)
    for k in ks:
        series = inten[str(k)]
        if k == n_steps:
            style = {"color": "black", "lw": 2.2, "label": f"large only (k={k})"}
        elif k == 0:
            style = {"color": "tab:red", "lw": 2.2, "label": "small only (k=0)"}
        else:
            style = {"color": cmap(k / n_steps), "lw": 1.0, "label": f"relay k={k}"}
        for ax, stat in zip(axes, STATS, strict=True):
            ax.plot(steps, series[stat], **style)
            if 0 < k < n_steps:  # the handoff: last large step (k) and the first small one (k + 1)
                ax.plot([k, k + 1], [series[stat][k], series[stat][k + 1]], "o", ms=4, color=style["color"])
    for ax, stat in zip(axes, STATS, strict=True):
        ax.set_xlabel("denoising step")
        ax.set_title({"mean": "latent mean", "std": "latent std", "norm": "latent norm (RMS)"}[stat])
        ax.grid(alpha=0.3)
    devs = [(r["k"], r["handoff_deviation"]) for r in rows if "handoff_deviation" in r]
    if devs:
        worst = max(abs(d["std_rel"]) for _, d in devs)
        axes[1].text(0.02, 0.02, f"max std deviation one step after the handoff: {worst:.1%}",
                     transform=axes[1].transAxes, fontsize=8)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Latent intensity along the trajectory (mean of {m['intensity_prompts']} prompts); "
                 "dots: the handoff (step k -> k+1)")
    fig.tight_layout()
    paths.append(folder / "latent_intensity.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- command line


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error of the tool."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="rise-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True,
                        help="family folder (the demo family, or one trained with its grammar)")
    parser.add_argument("--small", default=None, help="small denoiser (default: the family's unet_small/)")
    parser.add_argument("--variant", default=None,
                        help="weights variant to load, e.g. fp16 (default: detected for variant-only folders)")
    parser.add_argument("--device", default="auto", help="where PyTorch runs: auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="PyTorch's compute dtype: auto (default: fp16 on CUDA, else fp32), fp32, fp16, bf16")
    parser.add_argument("--bundle", default=None,
                        help="device bundle of the family: the device half runs on ONNX Runtime")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS_FILE),
                        help="prompt file, one a line (default: prompts.txt)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use the first L prompts only")
    parser.add_argument("--steps", type=int, default=20, help="total steps N (default 20)")
    parser.add_argument("--splits", default="0,2,4,6,8,10,12,16,20",
                        help="comma-separated k values (N is always added: the speedup's reference)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="dpmpp_2m")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i")
    parser.add_argument("--batch", type=positive_int, default=32,
                        help="requests per UNet call when generating in PyTorch")
    parser.add_argument("--ceiling-scenes", type=positive_int, default=1000,
                        help="real held-out scenes for the ceilings")
    parser.add_argument("--timing-prompts", type=positive_int, default=8, help="requests timed one at a time per split")
    parser.add_argument("--intensity-prompts", type=positive_int, default=32,
                        help="prompts averaged in the latent-intensity plot")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch (and ONNX Runtime) threads")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                        help="time compute as the process's CPU time (default: robust on a shared machine; "
                             "use with --threads 1) or as wall time")
    parser.add_argument("--scorer", default=None, help="scorer folder (default: models/demo/scorer)")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: $RISE_FASHION_MNIST or Debian's)")
    parser.add_argument("--json", default=None, help="write the figures as JSON here")
    parser.add_argument("--plots", default=None, help="write the plots into this folder")
    parser.add_argument("--cache-dir", default=None,
                        help="where the ceilings are cached (default: $RISE_CACHE_DIR, else $XDG_CACHE_HOME/rise, "
                             "else ~/.cache/rise; files under ceilings/)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--refresh-ceilings", action="store_true",
                       help="recompute the ceilings and replace the cached ones")
    cache.add_argument("--no-cache", action="store_true", help="compute the ceilings; neither read nor write the cache")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: when stderr is a terminal)")
    parser.add_argument("--taus", default=None,
                        help="also evaluate adaptive arms (N, tau): comma-separated x0-settling thresholds in (0, 1] "
                             "(lab.demo_family.adaptive; rows in the report's \"adaptive\" list)")
    parser.add_argument("--tau-window", default=None, metavar="K_MIN,K_MAX",
                        help="the adaptive arms' handoff window in edge steps (default 1,N-1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed): return, don't exit
        return exc.code if isinstance(exc.code, int) else 2
    torch.set_num_threads(args.threads)
    try:
        splits = tuple(int(s) for s in args.splits.split(",") if s.strip())
    except ValueError:
        print(f"rise-eval: error: --splits must be comma-separated integers, got {args.splits!r}", file=sys.stderr)
        return 2
    try:
        prompts = load_prompts(args.prompts)[: args.limit]
        cfg = EvalConfig(args.steps, splits, args.sampler, args.guidance, args.seed, args.batch,
                         args.ceiling_scenes, args.timing_prompts, args.intensity_prompts, args.clock)
        RelayPlan(args.steps, 0, args.sampler, args.guidance)  # checks steps, sampler, guidance up front
        check_splits(args.steps, splits)
        taus = parse_taus(args.taus)
        k_min, k_max = parse_window(args.tau_window)
        check_adaptive(cfg, taus, k_max=k_max, min_split=k_min)  # a bad window is refused before any work
        family = load_family(args.family, args.small, variant=args.variant,
                             placement=resolve_placement(args.device, args.dtype))
        bundle = None
        if args.bundle:
            from device_app.runtime import DeviceBundle

            bundle = DeviceBundle(args.bundle, threads=args.threads)
            if bundle.family_id != family.family_id:
                raise EvalError(f"bundle {args.bundle} was exported from {bundle.family_id}, not {family.family_id}")
        scorer = Scorer.load(args.scorer) if args.scorer else default_scorer()
        all_splits = ",".join(map(str, check_splits(args.steps, splits)))
        print(f"rise-eval: {family.family_id}, {len(prompts)} prompts, N={args.steps}, splits {all_splits}",
              flush=True)
        cache = None if args.no_cache else CeilingCache(args.cache_dir, refresh=args.refresh_ceilings)
        report = evaluate(family, prompts, cfg, bundle=bundle, scorer=scorer, data=args.data, log=echo,
                          cache=cache, progress=args.progress)
        if taus:  # adaptive arms in PyTorch beside the fixed rows (their own list: the plots read "rows")
            scenes = [prompt_to_scene(p) for p in prompts]
            reference = scorer.features(render(ItemBank.load("test", args.data), scenes, REFERENCE_SEED))
            report["adaptive"] = evaluate_adaptive(family, prompts, cfg, scorer, reference, taus, k_max=k_max,
                                                   min_split=k_min, log=echo)
    except (RiseError, OSError) as exc:
        print(f"rise-eval: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_table(report))
    if report.get("adaptive"):
        print()
        print(format_adaptive_table(report["adaptive"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plots:
        for path in plot(report, args.plots):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
