"""Networked-service benchmark: the real daemon and real device clients over loopback.

Prints, all measured in one run on this machine (edge and devices share its cores):
  1. edge throughput with 8 concurrent clients, step-level batching on vs one request at
     a time (--no-batching), on edge-only plans (k = N) so the edge is what is measured;
  2. handoff overhead (edge encode, timed in-process, + transfer + device decode) against
     device compute;
  3. p50 / p95 latency at 1, 4 and 16 clients with the default relay (k = N/2).
Family: the trained demo family (models/demo/family, exported to a bundle in the workdir) when
it is there, else the benchmark tiny family (random weights; cost does not depend on their values);
--family/--bundle pick another.
Usage: python bench/bench_service.py [--family DIR [--bundle B]] [--requests-per-client 4] [--steps 20]
       [--threads N (default: one per core, as rise-edge)] [--workdir bench_out]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
CONFIG = """
[limits]
requests_per_minute = 100000.0
burst = 1000
max_in_flight = 8
"""


def start_edge(family: Path, workdir: Path, *, batching: bool, threads: int) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "edge_server.daemon", "serve", "--family", str(family), "--port", "0",
           "--token-file", str(workdir / "token"), "--config", str(workdir / "edge.toml"), "--max-queue", "256",
           "--threads", str(threads)]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None  # stdout=PIPE
    port = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "serving family" in line:
            port = int(line.rsplit(":", 1)[1])
        if "rise-edge: ready" in line and port:
            return proc, port
    proc.kill()
    raise RuntimeError("rise-edge did not start")


def stop_edge(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def device_bench(port: int, bundle: Path, workdir: Path, clients: int, requests: int, *extra: str) -> dict[str, Any]:
    out = workdir / f"device-bench-{clients}-{requests}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "device_app", "bench", "--server", f"ws://127.0.0.1:{port}", "--bundle", str(bundle),
           "--token-file", str(workdir / "token"), "--clients", str(clients), "--requests", str(requests),
           "--json", str(out), "--shared-bundle", "--retries", "3", "--timeout", "600", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"rise-device bench failed: {proc.stderr.strip()}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", default="bench_out")
    parser.add_argument("--family", type=Path, default=None,
                        help="family folder (default: models/demo/family if present, "
                             "else the bench tiny family)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="its device bundle (default: exported into --workdir)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="the edge daemon's torch threads, both modes (default: one per core, as rise-edge)")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "token").write_text(TOKEN)
    (work / "edge.toml").write_text(CONFIG)

    from edge_server.family import is_family_folder
    from export.cli import main as export_main
    from lab.demo import DEMO_FAMILY_DIR
    from lab.tiny_family import BENCH_LARGE, BENCH_SMALL, build_tiny_family

    family = args.family
    if family is None and is_family_folder(DEMO_FAMILY_DIR):
        family = DEMO_FAMILY_DIR
    if family is None:
        family = work / "bench-family"
        if not is_family_folder(family):
            build_tiny_family(family, large=BENCH_LARGE, small=BENCH_SMALL)
    family = family.resolve()
    bundle = args.bundle or work / f"bundle-{family.parent.name}-{family.name}"
    if not (bundle / "manifest.json").is_file():
        assert export_main(["--family", str(family), "--out", str(bundle), "--force"]) == 0
    print(f"family {family}, bundle {bundle}, edge threads {args.threads}")

    n, per = args.steps, args.requests_per_client
    edge_only = ["--steps", str(n), "--split", str(n), "--sampler", "dpmpp_2m", "--guidance", "7.5"]
    relay = ["--steps", str(n), "--split", str(n // 2), "--sampler", "dpmpp_2m", "--guidance", "7.5"]

    print(f"== 1. edge throughput, 8 clients x {per} requests, edge-only plans N=K={n} ==")
    throughput = {}
    for batching in (True, False):
        proc, port = start_edge(family, work, batching=batching, threads=args.threads)
        try:
            device_bench(port, bundle, work, 1, 1, *edge_only)  # warm-up
            result = device_bench(port, bundle, work, 8, 8 * per, *edge_only)
        finally:
            stop_edge(proc)
        label = "batching" if batching else "one at a time"
        throughput[batching] = result["throughput_rps"]
        print(f"  {label:<14} {result['throughput_rps']:6.2f} images/s   p50 {result['latency_s']['p50']:.2f} s   "
              f"p95 {result['latency_s']['p95']:.2f} s   ok {result['ok']}/{8 * per}  errors {result['errors']}")
    print(f"  step-level batching / one at a time = {throughput[True] / throughput[False]:.2f}x")

    print(f"\n== 2 + 3. default relay N={n}, K={n // 2}, batching on ==")
    proc, port = start_edge(family, work, batching=True, threads=args.threads)
    try:
        device_bench(port, bundle, work, 1, 1, *relay)  # warm-up
        for clients in (1, 4, 16):
            r = device_bench(port, bundle, work, clients, clients * per, *relay)
            lat = r["latency_s"]
            print(f"  {clients:>2} clients: p50 {lat['p50']:.3f} s  p95 {lat['p95']:.3f} s  "
                  f"throughput {r['throughput_rps']:.2f}/s  ok {r['ok']}/{clients * per}  errors {r['errors']}")
            if clients == 1:
                overhead = r["handoff_overhead_s_mean"]
                device = r["device_compute_s_mean"]
                encode = handoff_encode_s(family, n)
                print(f"     handoff: {r.get('payload_bytes_mean', 0):.0f} B; "
                      f"edge encode {encode * 1000:.2f} ms (in-process) "
                      f"+ transfer + device decode {overhead * 1000:.2f} ms "
                      f"= {100 * (encode + overhead) / device:.1f}% "
                      f"of device compute ({device * 1000:.1f} ms)")
    finally:
        stop_edge(proc)


def handoff_encode_s(family_dir: Path, steps: int, repeats: int = 200) -> float:
    """Median time of the edge's ``encode_handoff`` for a default-relay handoff of this family.

    The device's report covers transfer and decode only (the edge encodes before it sends), so the
    encode is timed here, in this process, on the same family and plan.
    """
    import torch
    from bench_relay import median_time  # this script's folder is on sys.path

    from edge_server.family import load_family
    from edge_server.relay import EdgeRelay
    from shared.handoff import encode_handoff
    from shared.relay_plan import RelayPlan

    torch.set_num_threads(1)
    plan = RelayPlan(steps, steps // 2, "dpmpp_2m", 7.5)
    handoff = EdgeRelay(load_family(family_dir)).start("a red sneaker in the top left", plan, seed=0)
    return median_time(lambda: encode_handoff(handoff), repeats)


if __name__ == "__main__":
    main()
