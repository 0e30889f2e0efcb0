"""``rise-device``: the headless device client.

``rise-device generate`` asks an edge daemon for one image, finishes it on ONNX Runtime
and prints the plan the edge chose (and why), the progress, where the time went and
the handoff's size. ``rise-device bench`` runs many simulated devices from one process
(one websocket connection and one asyncio task each) and prints latency percentiles
and throughput, optionally as JSON. ``rise-device bundles DIR`` lists a folder of bundles
(:mod:`device_app.bundle_library`), one line each; ``rise-device app`` opens the Kivy app.

For a bundle whose family speaks a prompt grammar (the demo family: ``prompt_grammar`` in its
manifest), a prompt is read as the edge reads it (:mod:`shared.demo_grammar.understanding`): one
``rise-device: note: ...`` line on stderr says which words were not understood and what was filled
in (an item placed in a free cell chosen from the seed...), and a prompt of which the family draws
nothing is refused before anything is sent. A free-text prompt longer than the text encoder reads
gets a note too. ``bench`` shows a progress bar on stderr when it is a terminal.

Exit status: 0 on success; 2 on an error that stops the command (connection refused,
a prompt the family draws nothing of, unauthorized, a bad bundle or argument, an edge that sent what was not asked for:
``plan_conflict`` / ``plan_refused`` / ``payload_mismatch``, a missed ``--deadline``),
printed as one ``rise-device: error: ...`` line; ``bench`` exits 1 when it ran but some
requests failed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from device_app.bundle_library import scan_library
from device_app.client import EdgeClient
from device_app.errors import DeviceRunError, EdgeError
from device_app.finish import DeviceStepCount
from device_app.results import GenerationResult
from device_app.runtime import DeviceBundle
from device_app.speculative import EmulatedDevice
from device_app.token_file import read_token
from shared.demo_grammar.prompts import PromptError
from shared.demo_grammar.understanding import PromptReading, example_prompts, read_prompt_as
from shared.errors import ConfigError, RiseError
from shared.manifest import BundleManifest, load_manifest
from shared.protocol import Plan, ProtocolLimits
from shared.relay_plan import MAX_STEPS, RelayPlan
from shared.samplers import SAMPLER_NAMES

PROG = "rise-device"
#: bench's prompts when none is given: prompts of the demo family's grammar (plain English for any other family).
BENCH_PROMPTS = tuple(example_prompts(4, seed=0))
#: The edge's default step limit; the edge it connects to says its own in the welcome.
DEFAULT_EDGE_MAX_STEPS = ProtocolLimits().max_steps


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="RISE device client: the edge runs the large model's first steps, this device "
                    "finishes them with the small model on ONNX Runtime and decodes the image.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,bench,app,bundles}")

    def connection(p: argparse.ArgumentParser, *, threads_default: int | None, threads_help: str) -> None:
        p.add_argument("--server", required=True, help="edge daemon URL, ws://HOST:PORT (or wss://)")
        p.add_argument("--bundle", required=True, help="device bundle folder (made by rise-export)")
        p.add_argument("--token-file", default=None, help="file holding the server's access token")
        p.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to wait for the server's next message about a request (default 120)")
        p.add_argument("--deadline", type=float, default=600.0,
                       help="seconds one request may wait for the edge in all, progress or not (default 600)")
        p.add_argument("--open-timeout", type=float, default=10.0, help="seconds to connect and get the welcome")
        p.add_argument("--threads", type=int, default=threads_default, help=threads_help)
        p.add_argument("--preference", type=float, default=0.5,
                       help="0 = fastest .. 1 = best quality (default 0.5)")
        p.add_argument("--steps", type=int, default=None, help="total steps N (alone: only N is fixed)")
        p.add_argument("--split", type=int, default=None, help="edge steps K; with --steps pins the configuration")
        p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help="sampler of a pinned configuration")
        p.add_argument("--guidance", type=float, default=None, help="guidance scale of a pinned configuration")
        p.add_argument("--decode-on", choices=("device", "edge"), default=None,
                       help="where a pinned configuration decodes (edge: only with K = N)")
        p.add_argument("--height", type=int, default=None, help="image height (one of the server's sizes)")
        p.add_argument("--width", type=int, default=None, help="image width (one of the server's sizes)")
        p.add_argument("--emulate-step-s", type=float, default=None, metavar="S",
                       help="pace each device step to S seconds, like a slower phone (benchmarks)")
        p.add_argument("--emulate-decode-s", type=float, default=0.0, metavar="S",
                       help="with --emulate-step-s: pace the VAE decode to S seconds (default 0)")
        p.add_argument("--no-speculative", action="store_true",
                       help="run plans the edge marks speculative as plain relays (wait for the handoff)")
        p.add_argument("--retries", type=int, default=None,
                       help="retries of a request the server answers busy/rate_limited")

    gen = sub.add_parser("generate", help="generate one image",
                         description="Generate one image through an edge daemon.")
    connection(gen, threads_default=None, threads_help="ORT intra-op threads (default: ORT's choice)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--seed", type=int, default=None, help="seed (default: the server picks one)")
    gen.add_argument("--rating", type=int, choices=(-1, 0, 1), default=None, help="your rating, sent with the report")
    gen.add_argument("--out", required=True, help="output PNG path")
    gen.add_argument("--preview", default=None, metavar="DIR",
                     help="write the live preview's frames (edge-NNN.png, then device-NNN.png) to DIR")
    gen.add_argument("--preview-every", type=int, default=2, metavar="K",
                     help="with --preview: a frame every K steps and at the end of each side (default 2)")

    bench = sub.add_parser("bench", help="many simulated devices from one process",
                           description="Run N concurrent device connections, M requests in total; print "
                                       "latency percentiles and throughput.")
    connection(bench, threads_default=1, threads_help="ORT intra-op threads per bundle (default 1)")
    bench.add_argument("--clients", type=int, default=1, help="concurrent connections (default 1)")
    bench.add_argument("--requests", type=int, required=True, help="requests in total, spread over the clients")
    bench.add_argument("--prompt", action="append", default=None,
                       help="a prompt (repeat for several, used in turn; default: four built-in prompts)")
    bench.add_argument("--seed", type=int, default=None, help="base seed: request i uses seed + i (default: server's)")
    bench.add_argument("--shared-bundle", action="store_true",
                       help="one DeviceBundle (ORT sessions) for all clients instead of one each")
    bench.add_argument("--json", default=None, metavar="OUT", help="write the figures to this JSON file")
    sub.add_parser("app", help="open the Kivy app (rise-device app --help for its options: --bundle, "
                               "--bundles DIR...)")  # main() hands it over
    listing = sub.add_parser("bundles", help="list the bundles of a folder (one per subfolder)",
                             description="List the device bundles in DIR, one line each (folder name, label, family, "
                                         "kind, dtype, size), and the subfolders that are not usable, with why. "
                                         "Quick: no file is hashed.")
    listing.add_argument("dir", metavar="DIR", help="a folder of bundles, one per subfolder")
    return parser


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a command asks for."""

    preference: float
    pinned: RelayPlan | None
    steps: int | None
    height: int | None
    width: int | None


def _default_sampler(bundle: str) -> str:
    """dpmpp_2m, or the bundle's own sampler when it runs no other (an LCM bundle runs only lcm)."""
    try:
        samplers = load_manifest(bundle).samplers
    except RiseError:
        return "dpmpp_2m"  # the bundle's own error is reported when it loads
    return "dpmpp_2m" if "dpmpp_2m" in samplers else samplers[0]


def request_options(args: argparse.Namespace) -> RequestOptions:
    """Check the request arguments together (a pinned configuration needs --steps and --split)."""
    pin_only = [flag for flag, value in (("--sampler", args.sampler), ("--guidance", args.guidance),
                                         ("--decode-on", args.decode_on)) if value is not None]
    pinned = None
    steps = args.steps
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"--steps must be at least 1 and at most the edge's limit (its max_steps, "
                          f"{DEFAULT_EDGE_MAX_STEPS} by default), got {steps}")
    if args.split is not None and steps is not None and not 0 <= args.split <= steps:
        raise ConfigError(f"--split must be in [0, --steps={steps}] (0 = device only, {steps} = edge only), "
                          f"got {args.split}")
    if args.split is not None:
        if args.steps is None:
            raise ConfigError("--split needs --steps: give both to pin a configuration")
        pinned = RelayPlan(
            args.steps, args.split, args.sampler or _default_sampler(args.bundle),
            7.5 if args.guidance is None else args.guidance, args.decode_on or "device",
        )
        steps = None  # the pinned plan carries N
    elif pin_only:
        raise ConfigError(f"{', '.join(pin_only)} pin a configuration: give --steps and --split too")
    if (args.height is None) != (args.width is None):
        raise ConfigError("give --height and --width together")
    if not (0.0 <= args.preference <= 1.0):
        raise ConfigError(f"--preference must be in [0, 1], got {args.preference}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed must be in [0, 2**63), got {args.seed}")
    for name in ("timeout", "open_timeout", "deadline"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.retries is not None and args.retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {args.retries}")
    return RequestOptions(args.preference, pinned, steps, args.height, args.width)


def describe_plan(plan: RelayPlan) -> str:
    return (f"N={plan.num_inference_steps} K={plan.split} (edge {plan.edge_steps} steps, device "
            f"{plan.device_steps} steps), sampler {plan.sampler}, guidance {plan.guidance_scale:g}, "
            f"decode on {plan.decode_on}")


def chosen_by(plan: Plan, pinned: bool) -> str:
    """Who chose a request's configuration, in words."""
    if pinned or plan.scheduler == "pinned":
        return "pinned by this request (--steps and --split)"
    return f"chosen by the edge's {plan.scheduler} scheduler"


def read_for_bundle(manifest: BundleManifest, prompt: str, seed: int) -> PromptReading | None:
    """How the bundle's family reads ``prompt`` (its grammar's reader, as the edge reads it); None: free text."""
    return read_prompt_as(manifest.prompt_grammar, prompt, seed, max_words=manifest.text_max_length - 2)


def check_prompt(manifest: BundleManifest, prompt: str) -> None:
    """PromptError for a prompt of which the bundle's family draws nothing (it would be a blank picture)."""
    reading = read_for_bundle(manifest, prompt, 0)  # whether anything is understood does not depend on the seed
    if reading is not None and reading.scene is None:
        raise PromptError(reading.message or f"the family understood nothing in {prompt!r}")


def prompt_notice(manifest: BundleManifest, prompt: str, plan: Plan) -> str | None:
    """The line to tell the user about the prompt: the edge's notice, else this device's own reading."""
    if plan.notice is not None:
        return plan.notice
    reading = read_for_bundle(manifest, prompt, plan.seed)
    return None if reading is None else reading.message


def cut_notice(bundle: DeviceBundle, prompt: str) -> str | None:
    """The line for a free-text prompt longer than the family's text encoder reads (a grammar's reader says its own)."""
    if bundle.prompt_grammar is not None or not bundle.prompt_is_cut(prompt):
        return None
    return (f"the prompt is longer than this family's text encoder reads ({bundle.manifest.text_max_length} tokens): "
            "the words past that are ignored")


def check_edge_limits(options: RequestOptions, limits: ProtocolLimits) -> None:
    """ConfigError for steps past the limit this edge announced in its welcome."""
    steps = options.pinned.num_inference_steps if options.pinned is not None else options.steps
    if steps is not None and steps > limits.max_steps:
        raise ConfigError(f"--steps must be at most {limits.max_steps} on this edge (its max_steps), got {steps}")


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def _rate(bps: float | None) -> str:
    if bps is None:
        return "n/a"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.2f} {unit}"
    return f"{bps:.0f} bit/s"


# --------------------------------------------------------------------------- generate


class ProgressLine:
    """``progress: edge 3/4 | device 2/4``: rewritten in place on a terminal, printed once otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.plan: RelayPlan | None = None
        self.edge = (0, 0)
        self.device = (0, 0)
        self._device_steps = DeviceStepCount()

    def on_plan(self, plan: RelayPlan) -> None:
        self.plan = plan
        self.edge = (0, plan.edge_steps)
        self.device = (0, plan.device_steps)
        self._device_steps.reset(plan)

    def __call__(self, stage: str, step: int, total: int) -> None:
        if stage == "edge":
            self.edge = (step, total)
        elif self.plan is not None:
            self.device = self._device_steps.count(step, total)
        if self.tty:
            self.stream.write("\r" + self.text())
            self.stream.flush()

    def text(self) -> str:
        parts = [f"{stage} {done}/{total}" if total else f"{stage} -"
                 for stage, (done, total) in (("edge", self.edge), ("device", self.device))]
        return "progress: " + " | ".join(parts)

    def finish(self) -> None:
        self.stream.write(("\r" if self.tty else "") + self.text() + "\n")


async def _generate(args: argparse.Namespace, options: RequestOptions, token: str | None, out: TextIO,
                    err: TextIO) -> int:
    bundle = DeviceBundle(args.bundle, threads=args.threads)
    check_prompt(bundle.manifest, args.prompt)  # refused here, before the edge spends a step on a blank
    progress = ProgressLine(out)

    def on_plan(plan: RelayPlan, why: str) -> None:
        progress.on_plan(plan)
        print(f"plan: {describe_plan(plan)}", file=out)
        print(f"why: {why}", file=out)

    def on_loading(seconds: float) -> None:
        print(f"edge: loading the family first (~{seconds:.1f} s)", file=out)

    frames: list[tuple[str, int, bytes]] = []
    preview_dir = None if args.preview is None else Path(args.preview)
    if preview_dir is not None and args.preview_every < 1:
        raise ConfigError(f"--preview-every must be >= 1, got {args.preview_every}")

    def on_preview(stage: str, step: int, png: bytes) -> None:
        frames.append((stage, step, png))

    async with EdgeClient.connect(
        args.server, bundle, token=token, open_timeout=args.open_timeout, timeout=args.timeout,
        deadline=args.deadline, **client_options(args),
    ) as client:
        welcome = client.welcome
        print(f"connected to {args.server}: server {welcome.server}, protocol v{welcome.version}, "
              f"family {welcome.family_id}, rtt {_ms(client.link.rtt_s)}", file=out)
        check_edge_limits(options, welcome.limits)
        result = await client.generate_with_retry(
            args.prompt, attempts=1 + (3 if args.retries is None else args.retries),
            preference=options.preference, seed=args.seed, pinned=options.pinned, steps=options.steps,
            height=options.height, width=options.width, rating=args.rating,
            on_plan=on_plan, on_loading=on_loading, on_progress=progress,
            on_preview=on_preview if preview_dir is not None else None,
            preview_every=args.preview_every if preview_dir is not None else None,
        )
        progress.finish()
        notice = prompt_notice(bundle.manifest, args.prompt, result.plan) or cut_notice(bundle, args.prompt)
        if notice is not None:
            print(f"{PROG}: note: {notice}", file=err)
        _print_result(result, client, out, pinned=options.pinned is not None)
    target = Path(args.out)
    try:
        from PIL import Image

        target.parent.mkdir(parents=True, exist_ok=True)
        if result.png is not None:
            target.write_bytes(result.png)  # the edge's PNG as sent
        else:
            Image.fromarray(result.image).save(target, format="PNG")
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None
    print(f"wrote {target} ({result.image.shape[1]}x{result.image.shape[0]})", file=out)
    if preview_dir is not None:
        write_preview_frames(preview_dir, frames, out)
    return 0


def write_preview_frames(folder: Path, frames: list[tuple[str, int, bytes]], out: TextIO) -> None:
    """The live preview's frames as ``edge-NNN.png`` / ``device-NNN.png`` (NNN: the step), in arrival order."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stage, step, png in frames:
            (folder / f"{stage}-{step:03d}.png").write_bytes(png)
    except OSError as exc:
        raise ConfigError(f"cannot write the preview frames to {folder}: {exc.strerror or exc}") from None
    nbytes = sum(len(png) for _, _, png in frames)
    by_stage = {stage: sum(1 for s, _, _ in frames if s == stage) for stage in ("edge", "device")}
    print(f"wrote {len(frames)} preview frames to {folder} ({by_stage['edge']} from the edge, "
          f"{by_stage['device']} from this device; {nbytes:,} bytes)", file=out)


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The EdgeClient options the flags set: an emulated slower device, speculative plans run or not."""
    options: dict[str, Any] = {"speculative": not args.no_speculative}
    if args.emulate_step_s is not None:
        try:
            options["emulate"] = EmulatedDevice(args.emulate_step_s, args.emulate_decode_s)
        except ValueError as exc:
            raise ConfigError(f"--emulate-step-s/--emulate-decode-s: {exc}") from None
    elif args.emulate_decode_s:
        raise ConfigError("--emulate-decode-s needs --emulate-step-s")
    return options


def _print_result(result: GenerationResult, client: EdgeClient, out: TextIO, *, pinned: bool = False) -> None:
    t, plan = result.timings, result.plan
    print(f"request {result.request_id}: seed {plan.seed}, {plan.width}x{plan.height}, {chosen_by(plan, pinned)}",
          file=out)
    rows = [
        ("queue (edge)", t.queue_s),
        (f"edge compute ({plan.plan.edge_steps} large-model steps)", t.edge_compute_s),
        ("edge wait (sent -> payload announced)", t.edge_wait_s),
        ("transfer", t.transfer_s),
        ("handoff decode", t.handoff_decode_s),
        (f"device compute ({plan.plan.device_steps} small-model steps, ORT)", t.device_compute_s),
        ("decode (VAE)" if result.png is None else "decode (PNG from the edge)", t.decode_s),
        ("total latency", t.total_latency_s),
    ]
    print("timings:", file=out)
    for label, value in rows:
        print(f"  {label:<48} {_ms(value):>12}", file=out)
    kind = "handoff" if result.png is None else "edge-decoded PNG"
    line = f"{kind}: {result.payload_bytes:,} bytes; overhead (transfer + decode) {_ms(t.handoff_overhead_s)}"
    if plan.plan.device_steps > 0 and t.device_compute_s > 0:  # edge-only: no device compute to compare with
        line += f" = {100 * t.handoff_overhead_s / t.device_compute_s:.1f}% of device compute"
    print(line, file=out)
    link = client.link.snapshot()
    load = result.report.device_load if result.report is not None else client.device_load.sample()
    load_text = "n/a" if load is None else f"{100 * load:.0f}%"
    print(f"link: rtt {_ms(link.rtt_s)}, throughput {_rate(link.bandwidth_bps)}; device load {load_text}", file=out)


# --------------------------------------------------------------------------- bench


@dataclass
class BenchRun:
    """What a bench collected: one record per successful request, error codes, retries."""

    records: list[dict[str, Any]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    wall_s: float = 0.0
    rtt_s: list[float] = field(default_factory=list)
    bandwidth_bps: list[float] = field(default_factory=list)


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def _error_code(exc: BaseException) -> str:
    return getattr(exc, "code", None) or type(exc).__name__


async def _bench_run(
    args: argparse.Namespace, options: RequestOptions, token: str | None, bundles: list[DeviceBundle],
    err: TextIO | None = None,
) -> BenchRun:
    run = BenchRun()
    err = err or sys.stderr
    opened = await asyncio.gather(
        *(EdgeClient.open(args.server, bundles[i % len(bundles)], token=token, client_name=f"rise-bench-{i}",
                          open_timeout=args.open_timeout, timeout=args.timeout, deadline=args.deadline,
                          **client_options(args))
          for i in range(args.clients)),
        return_exceptions=True,
    )
    clients = [c for c in opened if isinstance(c, EdgeClient)]
    failed = [c for c in opened if isinstance(c, BaseException)]
    if failed:  # a bench with fewer clients than asked would mislead: stop
        await asyncio.gather(*(c.close() for c in clients))
        raise failed[0]
    try:
        for client in clients:
            check_edge_limits(options, client.welcome.limits)
    except ConfigError:
        await asyncio.gather(*(c.close() for c in clients))
        raise
    prompts = args.prompt or list(BENCH_PROMPTS)
    manifest = bundles[0].manifest
    noticed: set[str] = set()  # prompts whose notice was shown: once each, not once a request
    bar = tqdm(total=args.requests, desc="bench", unit="request", file=err, disable=not _is_tty(err),
               dynamic_ncols=True)
    counter = itertools.count()
    retries = 1 + (0 if args.retries is None else args.retries)

    def count_retry(error: EdgeError, delay: float) -> None:
        run.retries += 1

    async def device(index: int, client: EdgeClient) -> None:
        while (i := next(counter)) < args.requests:  # closed loop: each device waits for its image
            try:
                result = await client.generate_with_retry(
                    prompts[i % len(prompts)], attempts=retries, on_retry=count_retry,
                    preference=options.preference, seed=None if args.seed is None else args.seed + i,
                    pinned=options.pinned, steps=options.steps, height=options.height, width=options.width,
                )
            except (EdgeError, DeviceRunError) as exc:
                run.errors[_error_code(exc)] += 1
                bar.update(1)
                bar.set_postfix(errors=sum(run.errors.values()), refresh=False)
                if client.closed:
                    break  # this device is gone; the others take the remaining requests
                continue
            bar.update(1)
            prompt = prompts[i % len(prompts)]
            notice = prompt_notice(manifest, prompt, result.plan) if prompt not in noticed else None
            noticed.add(prompt)
            if notice is not None:
                bar.write(f"{PROG}: note: {notice}", file=err)
            p = result.plan.plan
            run.records.append({
                "client": index, "request_id": result.request_id, "payload_bytes": result.payload_bytes,
                "plan": f"N={p.num_inference_steps},K={p.split},{p.sampler},g={p.guidance_scale:g},{p.decode_on}",
                "device_steps": p.device_steps,
                **result.timings.as_dict(),
            })

    started = time.perf_counter()
    try:
        await asyncio.gather(*(device(i, c) for i, c in enumerate(clients)))
    finally:
        bar.close()
        run.wall_s = time.perf_counter() - started
        unsent = args.requests - len(run.records) - sum(run.errors.values())
        if unsent > 0:  # every connection was lost before these could be sent
            run.errors["not_sent"] += unsent
        for client in clients:
            link = client.link.snapshot()
            if link.rtt_s is not None:
                run.rtt_s.append(link.rtt_s)
            if link.bandwidth_bps is not None:
                run.bandwidth_bps.append(link.bandwidth_bps)
        await asyncio.gather(*(c.close() for c in clients))
    return run


def summarize(run: BenchRun, *, server: str, clients: int, requests: int, config: dict[str, Any]) -> dict[str, Any]:
    """The bench figures as a JSON-ready dict (percentiles: numpy's linear interpolation)."""

    def mean(key: str) -> float | None:
        values = [r[key] for r in run.records if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    latencies = np.array([r["total_latency_s"] for r in run.records], dtype=np.float64)
    latency: dict[str, float | None]
    if latencies.size:
        p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
        latency = {"p50": p50, "p95": p95, "p99": p99, "mean": float(latencies.mean()),
                   "min": float(latencies.min()), "max": float(latencies.max())}
    else:
        latency = {k: None for k in ("p50", "p95", "p99", "mean", "min", "max")}
    overhead, compute = mean("handoff_overhead_s"), mean("device_compute_s")
    # The overhead against device compute only where the device computed (an edge-only request has none).
    stepped = [r for r in run.records if r.get("device_steps", 1) > 0 and r.get("device_compute_s")
               and r.get("handoff_overhead_s") is not None]
    fraction = (float(np.mean([r["handoff_overhead_s"] for r in stepped]) / np.mean([r["device_compute_s"]
                                                                                      for r in stepped]))
                if stepped else None)
    return {
        "server": server,
        "clients": clients,
        "requests": requests,
        "ok": len(run.records),
        "errors": dict(sorted(run.errors.items())),
        "retries": run.retries,
        "wall_s": run.wall_s,
        "latency_s": latency,
        "throughput_rps": len(run.records) / run.wall_s if run.wall_s > 0 else None,
        "queue_s_mean": mean("queue_s"),
        "edge_compute_s_mean": mean("edge_compute_s"),
        "edge_wait_s_mean": mean("edge_wait_s"),
        "plan_s_mean": mean("plan_s"),
        "transfer_s_mean": mean("transfer_s"),
        "handoff_decode_s_mean": mean("handoff_decode_s"),
        "handoff_overhead_s_mean": overhead,
        # Against the ORT steps alone (decode excluded): the stricter reading of "device compute".
        "handoff_overhead_fraction": fraction,
        "device_wait_s_mean": mean("device_wait_s"),
        "device_compute_s_mean": compute,
        "decode_s_mean": mean("decode_s"),
        "payload_bytes_mean": mean("payload_bytes"),
        "rtt_s_mean": float(np.mean(run.rtt_s)) if run.rtt_s else None,
        "bandwidth_bps_mean": float(np.mean(run.bandwidth_bps)) if run.bandwidth_bps else None,
        "plans": dict(Counter(r["plan"] for r in run.records).most_common()),
        "config": config,
        "per_request": run.records,
    }


def _print_summary(s: dict[str, Any], out: TextIO) -> None:
    lat = s["latency_s"]
    errors = ", ".join(f"{code} {n}" for code, n in s["errors"].items()) or "none"
    print(f"ok {s['ok']}/{s['requests']}; errors: {errors}; retries {s['retries']}", file=out)
    if lat["p50"] is not None:
        print(f"latency: p50 {lat['p50']:.3f} s  p95 {lat['p95']:.3f} s  p99 {lat['p99']:.3f} s  "
              f"mean {lat['mean']:.3f} s  (min {lat['min']:.3f}, max {lat['max']:.3f})", file=out)
        print(f"throughput: {s['throughput_rps']:.2f} images/s over {s['wall_s']:.2f} s", file=out)
        print(f"mean per request: queue {_ms(s['queue_s_mean'])}, edge compute {_ms(s['edge_compute_s_mean'])}, "
              f"edge wait {_ms(s['edge_wait_s_mean'])}, transfer {_ms(s['transfer_s_mean'])}, "
              f"handoff decode {_ms(s['handoff_decode_s_mean'])}, device compute {_ms(s['device_compute_s_mean'])}, "
              f"decode {_ms(s['decode_s_mean'])}", file=out)
        fraction = s["handoff_overhead_fraction"]
        share = "" if fraction is None else f" = {100 * fraction:.1f}% of device compute"
        print(f"handoff: {s['payload_bytes_mean']:,.0f} bytes; overhead {_ms(s['handoff_overhead_s_mean'])}{share}; "
              f"link rtt {_ms(s['rtt_s_mean'])}, throughput {_rate(s['bandwidth_bps_mean'])}", file=out)
        print("plans: " + ", ".join(f"{plan} x{n}" for plan, n in s["plans"].items()), file=out)


async def _bench(args: argparse.Namespace, options: RequestOptions, token: str | None, out: TextIO,
                 err: TextIO) -> int:
    if args.clients < 1 or args.requests < 1:
        raise ConfigError(f"--clients and --requests must be >= 1, got {args.clients} and {args.requests}")
    # One bundle (ORT sessions) per client by default: each simulated device then owns its
    # sessions as a real one does. The files are verified once; the copies skip the sha256.
    count = 1 if args.shared_bundle else args.clients
    bundles = []
    for i in tqdm(range(count), desc="loading bundles", unit="bundle", file=err, disable=count < 2 or not _is_tty(err),
                  leave=False):
        bundles.append(DeviceBundle(args.bundle, threads=args.threads, verify=(i == 0)))
        if i == 0:
            for prompt in dict.fromkeys(args.prompt or BENCH_PROMPTS):
                check_prompt(bundles[0].manifest, prompt)  # before any client connects
                cut = cut_notice(bundles[0], prompt)
                if cut is not None:
                    print(f"{PROG}: note: {prompt[:40]!r}...: {cut}", file=err)
    how = "one shared bundle" if args.shared_bundle else "one bundle per client"
    print(f"bench: {args.clients} clients, {args.requests} requests against {args.server} "
          f"({how}, {args.threads} ORT thread(s) each)", file=out)
    run = await _bench_run(args, options, token, bundles, err)
    config = {
        "shared_bundle": args.shared_bundle, "threads": args.threads, "prompts": args.prompt or list(BENCH_PROMPTS),
        "preference": options.preference, "seed": args.seed,
        "pinned": None if options.pinned is None else describe_plan(options.pinned), "steps": options.steps,
    }
    summary = summarize(run, server=args.server, clients=args.clients, requests=args.requests, config=config)
    _print_summary(summary, out)
    if args.json:
        target = Path(args.json)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None
        print(f"wrote {target}", file=out)
    return 0 if summary["ok"] == args.requests else 1


# --------------------------------------------------------------------------- bundles


def _list_bundles(folder: str, out: TextIO, err: TextIO) -> int:
    """``rise-device bundles DIR``: one line per bundle, then one per skipped subfolder; 2 if DIR cannot be listed."""
    try:
        library = scan_library(folder)
    except RiseError as exc:
        print(f"{PROG}: error: {exc}", file=err)
        return 2
    for line in library.lines():
        print(line, file=out)
    if not library.bundles:
        print(f"{PROG}: note: no usable bundle in {library.folder}", file=err)
    return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run ``rise-device``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["app"]:  # the app parses its own options
        from device_app.app.app import main as app_main  # imports Kivy: only for the app

        return app_main(argv[1:])
    args = build_parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    if args.command == "bundles":
        return _list_bundles(args.dir, out, err)
    try:
        options = request_options(args)
        token = read_token(args.token_file) if args.token_file else None
        command = _generate if args.command == "generate" else _bench
        return asyncio.run(command(args, options, token, out, err))
    except (RiseError, ValueError) as exc:  # ValueError: a malformed --server URL from websockets
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
