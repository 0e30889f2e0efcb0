"""The scheduler's standard scenarios in rise-sim, over seeds: the figures the closing notes quote.

    python bench/sim_suite.py [--seeds 5] [--requests 20000] [--devices 500] [--jobs 2] \\
        [--out bench/results/sim_suite.json] [--plots docs/sim] [--only NAME,...]

Every scenario is ``rise-sim`` 's own code (``lab.simulator``: the same worlds, planners, references
and figures), run for each seed in a process pool. Worlds: ``demo`` (the demo family's measured
profile, times as measured on this project's CPU machine) and ``gpu`` (its measured quality with
the ``gpu-edge-phones`` hardware profile: published A100 and iPhone/iPad figures). Scenarios:

- ``mixed`` at rho 0.8, 1.0 and 1.3 in both worlds; ``edge-overload``, ``network-drop`` (SD-sized
  payloads) and ``load-spike`` in the gpu world at rho 0.8;
- ``cold-start``: 2,000 requests, means from the first, the planner built on the *other* world's
  timing (gpu world with the demo's CPU timing and back);
- ``quality-shift``: the small model 0.3 x device share worse than the profile says, half the
  users rate (demo world, rho 0.8): ``linucb`` against ``linucb_no_ratings``;
- ``sustain``: the highest rho in 0.25..2 at which a policy keeps p95 latency <= 5 s (gpu world).

Writes the figures (and each seed's summaries) as JSON and a Markdown table beside it, and the
first seed's plots for the headline scenarios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.simulator import (
    CLAIRVOYANT,
    DEMO_PROFILE,
    P95_TARGET_S,
    REFERENCES,
    SimConfig,
    Simulation,
    adaptation,
    aggregate,
    mean_adaptation,
    plot,
)
from shared.bandit import load_profile

GPU = "gpu-edge-phones"
SUSTAIN_LOADS = (0.25, 0.5, 0.75, 1.0, 1.3, 1.6, 2.0)
PLOTTED = ("demo-mixed-1.0", "gpu-mixed-1.0", "gpu-mixed-1.3", "gpu-edge-overload", "gpu-network-drop")


def scenarios(requests: int, devices: int) -> dict[str, tuple[SimConfig, list[str] | None]]:
    """name -> (config, policies: None = all, plus the clairvoyant oracle)."""
    base = SimConfig(requests=requests, devices=devices)
    out: dict[str, tuple[SimConfig, list[str] | None]] = {}
    for rho in (0.8, 1.0, 1.3):
        out[f"demo-mixed-{rho:.1f}"] = (replace(base, edge_load=rho), None)
        out[f"gpu-mixed-{rho:.1f}"] = (replace(base, edge_load=rho, hardware=GPU), None)
    for scenario in ("edge-overload", "network-drop", "load-spike"):
        out[f"gpu-{scenario}"] = (replace(base, scenario=scenario, edge_load=0.8, hardware=GPU), None)
    cold = replace(base, requests=2000, warmup=0, edge_load=1.0)
    out["gpu-cold-start"] = (replace(cold, hardware=GPU, prior_hardware="profile"), None)
    out["demo-cold-start"] = (replace(cold, prior_hardware=GPU), None)
    out["demo-quality-shift"] = (replace(base, edge_load=0.8, quality_shift=0.3, rating_rate=0.5),
                                 ["linucb", "linucb_no_ratings", "linucb_disjoint", "oracle_priced", "oracle"])
    return out


def run_one(job: tuple[str, SimConfig, list[str] | None, int, str | None]) -> dict[str, Any]:
    """One seed of one scenario: its summaries, the linucb decision times and adaptation, plots."""
    name, config, policies, seed, plots = job
    profile = load_profile(DEMO_PROFILE)
    started = time.perf_counter()
    sim = Simulation(profile, replace(config, seed=seed))
    names = policies if policies is not None else [*sim.policy_names(), CLAIRVOYANT]
    results = sim.run_all(names)
    summaries = {n: r.summary(config.warmup, sim.phases) for n, r in results.items()}
    out: dict[str, Any] = {"name": name, "seed": seed, "summaries": summaries,
                           "seconds": time.perf_counter() - started, "arms": len(sim.arms),
                           "hardware_summary": sim.hardware.source_summary(),
                           "capacity": sim.capacity, "rate": sim.rate}
    decisions = results["linucb"].decision_s if "linucb" in results else None
    if decisions is not None:
        out["decision_ms"] = {"p50": float(np.percentile(decisions, 50) * 1e3),
                              "p99": float(np.percentile(decisions, 99) * 1e3)}
    if sim.world.change_points and "linucb" in results and "oracle_priced" in results:
        out["adaptation"] = [list(row) for row in adaptation(results["linucb"], results["oracle_priced"],
                                                              sim.world.change_points)]
        out["change_labels"] = sim.world.change_labels
    if plots and seed == 0 and name in PLOTTED:
        figures = aggregate([summaries])
        out["plots"] = [str(p) for p in plot(sim, figures, results, Path(plots))]
    return out


def sustain_one(job: tuple[float, int, int, int]) -> dict[str, Any]:
    rho, seed, requests, devices = job
    sim = Simulation(load_profile(DEMO_PROFILE),
                     SimConfig(requests=requests, devices=devices, edge_load=rho, hardware=GPU, seed=seed))
    results = sim.run_all(["linucb", "linucb_disjoint", *REFERENCES])
    return {"rho": rho, "seed": seed,
            "p95": {n: r.summary(sim.config.warmup)["latency_p95_s"] for n, r in results.items()}}


def figures_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["seed"])
    figures = aggregate([r["summaries"] for r in runs])
    figures["arms"], figures["hardware"] = runs[0]["arms"], runs[0]["hardware_summary"]
    figures["capacity_req_s"], figures["arrivals_req_s"] = runs[0]["capacity"], runs[0]["rate"]
    if "decision_ms" in runs[0]:
        figures["linucb_decision_ms"] = {q: max(r["decision_ms"][q] for r in runs) for q in ("p50", "p99")}
    if "adaptation" in runs[0]:
        figures["adaptation"] = mean_adaptation([r["adaptation"] for r in runs], runs[0]["change_labels"])
    figures["plots"] = [p for r in runs for p in r.get("plots", [])]
    figures["seconds"] = sum(r["seconds"] for r in runs)
    return figures


def markdown(results: dict[str, Any]) -> str:
    lines = ["# rise-sim standard scenarios", "",
             f"`python bench/sim_suite.py` ({results['meta']['seeds']} seeds, {results['meta']['requests']} requests "
             f"x {results['meta']['devices']} devices; cold starts 2,000 requests). Utility differences are absolute "
             "(utility = w q + (1 - w)(1 - L / 10 s)); +- = 95% interval over seeds; share = (U - U_best_fixed) / "
             "(U_ref - U_best_fixed), U_ref the best of oracle, oracle_priced, queue_threshold, best fixed.", "",
             "| scenario | arms | best fixed | reference | headroom (abs) | % of best fixed | linucb dU | linucb share "
             "| linucb_disjoint share | oracle (myopic) share | clairvoyant share | p95 linucb / best fixed (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, fig in results["scenarios"].items():
        pol, bf = fig["policies"], fig["best_fixed"]
        if bf is None:  # no fixed arms ran: the quality-shift scenario, below
            continue
        h = fig.get("headroom", {})

        def share(n: str, p: dict[str, Any] = pol) -> str:
            return f"{p[n]['headroom_share']:.2f}" if n in p and "headroom_share" in p[n] else "-"

        lin = pol.get("linucb", {})
        d = f"{lin['vs_best_fixed']:+.4f} +- {lin['vs_best_fixed_ci95']:.4f}" if "vs_best_fixed" in lin else "-"
        p95 = (f"{lin['latency_p95_s']:.2f} / {pol[bf]['latency_p95_s']:.2f}" if lin and bf else "-")
        pct = h.get("percent_of_best_fixed")
        lines.append(f"| {name} | {fig['arms']} | {bf or '-'} | {fig['reference'] or '-'} | "
                     f"{h.get('mean', float('nan')):+.4f} +- {h.get('ci95', float('nan')):.4f} | "
                     f"{'-' if pct is None else f'{pct:+.1f}%'} | {d} | {share('linucb')} | {share('linucb_disjoint')} "
                     f"| {share('oracle')} | {share(CLAIRVOYANT)} | {p95} |")
    for name, fig in results["scenarios"].items():
        if "adaptation" in fig:
            lines += ["", f"{name}: oracle_priced's utility gain over linucb per request, paired, mean over seeds:"]
            lines += [f"- {row['label']} (request {row['request']}): {row['gap_before']:+.4f} in the 500 before, "
                      f"{row['gap_first_500']:+.4f} in the 500 after, {row['gap_next_500']:+.4f} in the next 500"
                      for row in fig["adaptation"]]
            phases = {n: fig["policies"][n].get("phases", {}) for n in ("linucb", "oracle_priced", fig["best_fixed"])}
            lines.append("- utility by phase: " + "; ".join(
                f"{label}: " + ", ".join(f"{n} {v[label]:.4f}" for n, v in phases.items() if label in v)
                for label in phases["linucb"]))
    shift = results["scenarios"].get("demo-quality-shift")
    if shift and {"linucb", "linucb_no_ratings", "oracle_priced"} <= set(shift["policies"]):
        pol = shift["policies"]
        u = {n: pol[n]["utility"] for n in ("linucb", "linucb_no_ratings", "oracle_priced")}
        lost = u["oracle_priced"] - u["linucb_no_ratings"]
        lines += ["", "demo-quality-shift (true quality = the profile's - 0.3 x (N - k) / N, half the users rate): "
                      + ", ".join(f"{n} {pol[n]['utility']:.4f} +- {pol[n]['utility_ci95']:.4f} "
                                  f"(quality {pol[n]['quality']:.3f})" for n in u)
                      + (f"; learning from ratings wins back {(u['linucb'] - u['linucb_no_ratings']) / lost:.2f} of "
                         f"the {lost:+.4f} the profile's wrong quality costs" if lost > 0 else "")]
    decisions = [(n, f["arms"], f["linucb_decision_ms"]) for n, f in results["scenarios"].items()
                 if "linucb_decision_ms" in f]
    if decisions:
        worst = max(decisions, key=lambda d: d[2]["p99"])
        lines += ["", f"linucb decision time, worst scenario ({worst[0]}, {worst[1]} arms): "
                      f"p50 {worst[2]['p50']:.3f} ms, p99 {worst[2]['p99']:.3f} ms (the worst seed)"]
    if "sustain" in results:
        sustained = results["sustain"]
        fixed = {n: v for n, v in sustained.items() if n.startswith(("edge_only", "device_only", "fixed_k"))}
        top = max(fixed, key=lambda n: -1.0 if fixed[n] is None else fixed[n]) if fixed else None
        shown = {n: v for n, v in sustained.items() if n not in fixed}
        if top is not None:
            shown[f"the best fixed arm at it ({top})"] = fixed[top]
        lines += ["", f"Highest load rho (of {', '.join(f'{x:g}' for x in SUSTAIN_LOADS)}) at which the mean p95 over "
                      f"seeds stays <= {P95_TARGET_S:g} s, gpu world: " + ", ".join(
                          f"{n} {'none' if v is None else v}" for n, v in shown.items())]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", help="comma-separated scenario names (and/or 'sustain')")
    parser.add_argument("--out", default="bench/results/sim_suite.json")
    parser.add_argument("--plots", default="docs/sim")
    args = parser.parse_args(argv)
    chosen = scenarios(args.requests, args.devices)
    only = set(args.only.split(",")) if args.only else None
    jobs = [(name, config, policies, seed, args.plots) for name, (config, policies) in chosen.items()
            if only is None or name in only for seed in range(args.seeds)]
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    sustain: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(run_one, jobs):
            runs.setdefault(run["name"], []).append(run)
            print(f"{run['name']} seed {run['seed']}: {run['seconds']:.1f} s", file=sys.stderr, flush=True)
        if only is None or "sustain" in only:
            sustain_jobs = [(rho, seed, args.requests, args.devices) for rho in SUSTAIN_LOADS
                            for seed in range(args.seeds)]
            sustain = list(pool.map(sustain_one, sustain_jobs))
    results: dict[str, Any] = {"meta": {"seeds": args.seeds, "requests": args.requests, "devices": args.devices,
                                        "seconds": time.perf_counter() - started, "command": " ".join(sys.argv)},
                               "scenarios": {name: figures_of(r) for name, r in runs.items()}}
    if sustain:
        names = list(sustain[0]["p95"])
        best: dict[str, float | None] = dict.fromkeys(names)
        for rho in SUSTAIN_LOADS:
            for n in names:
                p95 = float(np.mean([s["p95"][n] for s in sustain if s["rho"] == rho]))
                if p95 <= P95_TARGET_S:
                    best[n] = rho
        results["sustain"] = best
        results["sustain_p95"] = {f"{rho:g}": {n: float(np.mean([s["p95"][n] for s in sustain if s["rho"] == rho]))
                                                for n in names} for rho in SUSTAIN_LOADS}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out} and {out.with_suffix('.md')} ({results['meta']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
