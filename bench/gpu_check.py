#!/usr/bin/env python3
"""One-shot check of the edge on a lent GPU: exactness on CUDA, UNet step times, daemon throughput, a profile.

Written to run ONCE on a GPU machine (``bench/gpu_check.sh`` installs the carried wheels, then runs this)
within about 7 minutes, and to tell as much as it can even when something breaks: every part runs in its
own try/except (as does each sub-measurement), records its error and traceback in the JSON, and the next
part runs; the JSON is rewritten after every part, so a run killed midway still leaves what it measured.

Parts (``--parts``, in this order):
  env        versions, the device, the TF32 switches
  exactness  the tiny family (lab/tiny_family) relayed with ``run_torch_relay`` on the device in fp32, fp16 and
             bf16 against the CPU in fp32 (final latent: max-abs, relative to the latent's largest value, pass
             at <= 1e-3 for fp32; decoded images: PSNR) for ddim / euler / dpmpp_2m, fp32 once more with TF32
             off (CUDA only); the SDXL-shaped hub family (lab/hub_families) in fp16 against the CPU; whether a
             seed gives the same initial noise (``prepare``) on the CPU and on the device
  unet       random-weight UNets of the real SD1.5 (860 M) and BK-SDM-tiny (323 M) architectures in fp16,
             64x64 latents, text (rows, 77, 768): ms per call and per row at 2..64 rows, CUDA events, OOM caught
  daemon     an SD1.5-sized family (random weights: SD1.5 UNet, BK-SDM-tiny small UNet, CLIP-L-sized text
             encoder, SD's VAE) built on the device, saved and loaded with ``load_family``; the engine's own
             batched step at 1..32 requests; then the real daemon (``EdgeServer.with_batching_engine``) on
             127.0.0.1 with 1, 8 and 32 loopback clients asking for pinned edge-only plans (k = N = 20,
             guidance 7.5; the client only receives and checks the handoff), batching on vs one at a time:
             requests/s, p50/p95 latency, and the batched / one-at-a-time ratio
  profile    ``gpu_profile_<device>.json`` (the device's figures, with a ``bench_timing`` section in the
             ``--bench`` format of ``python -m shared.bandit.profile``, which rise-sim reads through a profile)
             and that section alone as ``gpu_bench_<device>.json``

Writes under ``--out`` (default: $OUT, else bench/results/): gpu_check.json (everything), gpu_check.log,
gpu_profile_<slug>.json, gpu_bench_<slug>.json. Big scratch files (the families) go to a temporary folder.

Usage: python bench/gpu_check.py [--device cuda] [--dtype fp16] [--parts env,exactness,unet,daemon,profile]
                                 [--budget-s 420] [--out DIR] [--family-mode disk|memory] [--max-batch-rows 64]
       python bench/gpu_check.py --device cpu --smoke        (tiny sizes everywhere; < 60 s on 2 cores)
       python bench/gpu_check.py --to-bench gpu_check.json [--out-file bench.json]   (report -> --bench file)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python bench/gpu_check.py` without PYTHONPATH
    sys.path.insert(0, str(REPO))

PARTS = ("env", "exactness", "unet", "daemon", "profile")
SAMPLERS = ("ddim", "euler", "dpmpp_2m")
PROMPT = "a red sneaker in the top left"
SEED = 1234
GUIDANCE = 7.5
FP32_REL_TOL = 1e-3
REPORT_NAME = "gpu_check.json"
LOG_NAME = "gpu_check.log"


@dataclass(frozen=True)
class Sizes:
    """Every size the parts use: :data:`FULL` on the GPU, :data:`SMOKE` for the CPU smoke run."""

    exact_steps: int
    exact_split: int
    unet_width: int  # the large UNet's first block width (SD1.5: 320)
    small_width: int  # BK-SDM-tiny's (320)
    text_dim: int  # CLIP-L: 768
    text_layers: int
    text_heads: int
    text_ff: int
    text_vocab: int
    sample: int  # latent side (SD1.5: 64, i.e. 512 px)
    norm_groups: int
    vae_channels: tuple[int, ...]
    unet_rows: tuple[int, ...]
    unet_warmup: int
    unet_iters: int
    clients: tuple[int, ...]
    requests_per_client: int  # at least this many per client...
    min_requests: int  # ...and at least this many per configuration
    daemon_steps: int
    engine_requests: tuple[int, ...]  # batched_step sizes (requests; 2 rows each)
    engine_repeats: int
    daemon_budget_s: float  # the daemon part's share of the budget


FULL = Sizes(
    exact_steps=20, exact_split=10, unet_width=320, small_width=320, text_dim=768, text_layers=12, text_heads=12,
    text_ff=3072, text_vocab=49408, sample=64, norm_groups=32, vae_channels=(128, 256, 512, 512),
    unet_rows=(2, 4, 8, 16, 32, 64), unet_warmup=3, unet_iters=10, clients=(1, 8, 32), requests_per_client=3,
    min_requests=24, daemon_steps=20, engine_requests=(1, 2, 4, 8, 16, 32), engine_repeats=5, daemon_budget_s=240.0,
)
SMOKE = Sizes(
    exact_steps=3, exact_split=2, unet_width=16, small_width=8, text_dim=32, text_layers=2, text_heads=4,
    text_ff=64, text_vocab=1000, sample=8, norm_groups=4, vae_channels=(8, 16, 16, 16), unet_rows=(2, 4),
    unet_warmup=1, unet_iters=3, clients=(1, 2), requests_per_client=2, min_requests=2, daemon_steps=4,
    engine_requests=(1, 2), engine_repeats=2, daemon_budget_s=60.0,
)


class Skip(Exception):
    """A measurement that cannot run here (e.g. CUDA-only on a CPU): recorded as ``{"skipped": reason}``."""


class Interrupted(BaseException):
    """SIGTERM (the wrapper's timeout): stop, keep what was measured."""


# ----------------------------------------------------------------------------- log, JSON, budget


class Log:
    """Prints a line with the elapsed time, and keeps a copy in ``gpu_check.log``."""

    def __init__(self, path: Path | None) -> None:
        self.t0 = time.perf_counter()
        self.fh = path.open("w", encoding="utf-8") if path is not None else None

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {message}"
        print(line, flush=True)
        if self.fh is not None:
            self.fh.write(line + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def jsonable(value: Any) -> Any:
    """``value`` with tuples, paths, numpy and torch scalars made plain JSON; inf/nan as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        with contextlib.suppress(Exception):
            return jsonable(item())
    return str(value)


def write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(doc), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Budget:
    """The run's wall-clock budget: parts and daemon configurations size themselves from what is left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def attempt(record: dict[str, Any], key: str, fn: Callable[[], Any], log: Log) -> Any:
    """``record[key] = fn()``; a Skip or an error is recorded there instead (the caller goes on)."""
    try:
        value = fn()
    except Skip as exc:
        record[key] = {"skipped": str(exc)}
        log(f"  {key}: skipped ({exc})")
        return None
    except Exception as exc:  # one measurement failing must not lose the others
        record[key] = error_record(exc)
        log(f"  {key}: FAILED {type(exc).__name__}: {exc}")
        return None
    record[key] = value
    return value


def error_record(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__)[-12:]}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


# ----------------------------------------------------------------------------- the run's context


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    log: Log
    budget: Budget
    out: Path
    scratch: Path
    report: dict[str, Any]

    @property
    def cuda(self) -> bool:
        return str(self.args.device).startswith("cuda")

    def placement(self, dtype: str) -> Any:
        from edge_server.placement import resolve_placement

        return resolve_placement(self.args.device, dtype)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.budget.elapsed(), 2)
        write_json(self.out / REPORT_NAME, self.report)


def edge_dtype(ctx: Context) -> str:
    """The dtype the UNet timings and the daemon use: --dtype, else fp16 on CUDA and fp32 on a CPU."""
    if ctx.args.dtype != "auto":
        return str(ctx.args.dtype)
    return "fp16" if ctx.cuda else "fp32"


# ----------------------------------------------------------------------------- part: env


def part_env(ctx: Context) -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = ctx.report["parts"]["env"]  # filled in place: what was read survives a failed import
    out.update({"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "argv": sys.argv[1:], "smoke": bool(ctx.args.smoke),
                "device_arg": ctx.args.device})
    versions: dict[str, str | None] = {}
    for dist in ("torch", "diffusers", "transformers", "tokenizers", "huggingface-hub", "safetensors", "numpy",
                 "websockets", "prometheus-client", "Pillow", "onnxruntime", "accelerate"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    out["versions"] = versions
    import torch

    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    with contextlib.suppress(Exception):
        out["cudnn"] = torch.backends.cudnn.version()
    if ctx.cuda:
        placement = ctx.placement("fp32")
        index = placement.device.index or 0
        prop = torch.cuda.get_device_properties(index)
        out["device"] = {"name": prop.name, "capability": f"{prop.major}.{prop.minor}",
                         "memory_gib": round(prop.total_memory / 2**30, 1),
                         "multiprocessors": prop.multi_processor_count, "index": index}
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            out["device"]["nvidia_smi"] = smi.stdout.strip()
        out["tf32"] = tf32_flags()
    else:
        out["device"] = {"name": f"cpu ({platform.processor() or platform.machine()})"}
    import diffusers  # an import failure is this part's error

    out["diffusers_file"] = diffusers.__file__

    ctx.log(f"  torch {versions['torch']} (CUDA {out['torch_cuda']}), diffusers {versions['diffusers']}, "
            f"transformers {versions['transformers']}, device {out['device']['name']}")
    return out


def tf32_flags() -> dict[str, Any]:
    import torch

    flags: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        flags["cudnn.allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    with contextlib.suppress(Exception):
        flags["cuda.matmul.allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    with contextlib.suppress(Exception):
        flags["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return flags


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    import torch

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------- part: exactness


def compare(out_latents: Any, ref_latents: Any, out_image: Any, ref_image: Any) -> dict[str, Any]:
    """Final latents (max-abs, relative to the reference's largest value, relative L2) and image PSNR."""
    import numpy as np
    import torch

    out, ref = out_latents.detach().float().cpu(), ref_latents.detach().float().cpu()
    diff = (out - ref).abs()
    scale = float(ref.abs().max())
    result: dict[str, Any] = {
        "max_abs": float(diff.max()),
        "ref_scale": scale,
        "rel": float(diff.max()) / scale if scale > 0 else float("inf"),
        "rel_l2": float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)),
        "finite": bool(torch.isfinite(out).all()),
    }
    if out_image is not None and ref_image is not None:
        mse = float(np.mean((out_image.astype(np.float64) - ref_image.astype(np.float64)) ** 2))
        result["psnr_db"] = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
        result["image_max_abs"] = int(np.abs(out_image.astype(np.int16) - ref_image.astype(np.int16)).max())
    return result


def _relay(family: Any, plan: Any) -> tuple[Any, Any]:
    from edge_server.relay import decode_latents, run_torch_relay

    latents = run_torch_relay(family, PROMPT, plan, SEED)
    return latents.float().cpu(), decode_latents(family, latents)


def _family_compare(ctx: Context, name: str, folder: Path, small: str | None, dtypes: list[tuple[str, str, bool]],
                    record: dict[str, Any]) -> None:
    """Relay ``folder``'s family on the CPU in fp32 (the reference) and on the device in each dtype; compare."""
    from edge_server.family import load_family
    from edge_server.placement import CPU_FP32
    from shared.relay_plan import RelayPlan

    s = ctx.sizes
    plans = {sampler: RelayPlan(s.exact_steps, s.exact_split, sampler, GUIDANCE) for sampler in SAMPLERS}
    cpu = load_family(folder, small, placement=CPU_FP32)
    refs = {}
    for sampler, plan in plans.items():
        refs[sampler] = _relay(cpu, plan)
    for label, dtype, cuda_only in dtypes:
        entry: dict[str, Any] = {}
        record[label] = entry
        if cuda_only and not ctx.cuda:
            record[label] = {"skipped": "CUDA only (the CPU has no TF32)"}
            continue
        t0 = time.perf_counter()
        try:
            family = load_family(folder, small, placement=ctx.placement(dtype))
        except Exception as exc:
            record[label] = error_record(exc)
            ctx.log(f"  {name} {label}: load FAILED {exc}")
            continue
        guard = tf32_off() if label == "fp32_no_tf32" else contextlib.nullcontext()
        with guard:
            for sampler, plan in plans.items():
                def one(family: Any = family, plan: Any = plan, sampler: str = sampler) -> dict[str, Any]:
                    latents, image = _relay(family, plan)
                    return compare(latents, refs[sampler][0], image, refs[sampler][1])

                got = attempt(entry, sampler, one, ctx.log)
                if got is not None:
                    if dtype == "fp32":
                        got["pass"] = bool(got["finite"] and got["rel"] <= FP32_REL_TOL)
                    ctx.log(f"  {name} {label:<13} {sampler:<8} max-abs {got['max_abs']:.3g}  rel {got['rel']:.3g}  "
                            f"PSNR {got.get('psnr_db', float('nan')):.1f} dB"
                            + (f"  {'pass' if got['pass'] else 'FAIL'}" if "pass" in got else ""))
        entry["wall_s"] = round(time.perf_counter() - t0, 2)
        del family


def _initial_noise(ctx: Context, folder: Path) -> dict[str, Any]:
    """The seed's initial noise from ``prepare`` on the CPU and on the device: identical, bit for bit."""
    import torch

    from edge_server.family import load_family
    from edge_server.placement import CPU_FP32
    from edge_server.relay import prepare
    from shared.relay_plan import RelayPlan

    s = ctx.sizes
    cpu = load_family(folder, placement=CPU_FP32)
    device = load_family(folder, placement=ctx.placement(edge_dtype(ctx)))
    out: dict[str, Any] = {"device": str(device.placement.device), "dtype": device.placement.dtype_name}
    for sampler in SAMPLERS:
        plan = RelayPlan(s.exact_steps, s.exact_split, sampler, GUIDANCE)
        a = prepare(cpu, PROMPT, plan, SEED).latents
        b = prepare(device, PROMPT, plan, SEED).latents.cpu()
        out[sampler] = {"identical": bool(torch.equal(a, b)), "max_abs": float((a - b).abs().max()),
                        "dtype": str(b.dtype)}
    out["pass"] = all(out[sampler]["identical"] for sampler in SAMPLERS)
    ctx.log(f"  initial noise CPU vs {out['device']}: {'identical' if out['pass'] else 'DIFFERENT'}")
    return out


def part_exactness(ctx: Context) -> dict[str, Any]:
    from lab.hub_families import build_sdxl_ssd_1b
    from lab.tiny_family import build_tiny_family

    s = ctx.sizes
    out: dict[str, Any] = {"steps": s.exact_steps, "split": s.exact_split, "guidance": GUIDANCE, "seed": SEED,
                           "prompt": PROMPT, "fp32_rel_tolerance": FP32_REL_TOL, "device": ctx.args.device}
    if ctx.cuda:
        out["tf32_as_found"] = tf32_flags()
    else:
        out["note"] = ("device is the CPU: the 'device' runs are CPU runs (fp32 equals the reference); the "
                       "CUDA-only fp32-without-TF32 run is skipped")
    tiny_dir = build_tiny_family(ctx.scratch / "tiny-family")
    tiny: dict[str, Any] = {}
    out["tiny"] = tiny
    dtypes = [("fp32", "fp32", False), ("fp32_no_tf32", "fp32", True), ("fp16", "fp16", False), ("bf16", "bf16", False)]
    _family_compare(ctx, "tiny", tiny_dir, None, dtypes, tiny)
    attempt(out, "initial_noise", lambda: _initial_noise(ctx, tiny_dir), ctx.log)

    def sdxl() -> dict[str, Any]:
        hub = build_sdxl_ssd_1b(ctx.scratch / "sdxl-ssd-1b")
        record: dict[str, Any] = {"family": hub.name}
        _family_compare(ctx, "sdxl", hub.folder, hub.small, [("fp16", "fp16", False)], record)
        return record

    attempt(out, "sdxl_ssd_1b", sdxl, ctx.log)
    out["summary"] = exactness_summary(out)
    return out


def exactness_summary(out: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: fp32 pass, worst fp32 relative error, worst fp16/bf16 PSNR, noise identical."""
    summary: dict[str, Any] = {}
    tiny = out.get("tiny", {})
    for label in ("fp32", "fp32_no_tf32", "fp16", "bf16"):
        runs = [v for k, v in tiny.get(label, {}).items() if k in SAMPLERS and isinstance(v, dict) and "rel" in v]
        if not runs:
            continue
        summary[label] = {"worst_rel": max(r["rel"] for r in runs), "worst_max_abs": max(r["max_abs"] for r in runs),
                          "worst_psnr_db": min(r.get("psnr_db", float("inf")) for r in runs), "samplers": len(runs)}
        if label.startswith("fp32"):
            summary[label]["pass"] = all(r.get("pass", False) for r in runs) and len(runs) == len(SAMPLERS)
    sdxl = out.get("sdxl_ssd_1b", {}).get("fp16", {})
    runs = [v for k, v in sdxl.items() if k in SAMPLERS and isinstance(v, dict) and "psnr_db" in v]
    if runs:
        summary["sdxl_fp16_worst_psnr_db"] = min(r["psnr_db"] for r in runs)
    noise = out.get("initial_noise", {})
    if isinstance(noise, dict) and "pass" in noise:
        summary["initial_noise_identical"] = noise["pass"]
    return summary


# ----------------------------------------------------------------------------- part: unet step time


def unet_configs(s: Sizes) -> dict[str, dict[str, Any]]:
    """The two denoisers' configs: SD1.5's and BK-SDM-tiny's published architectures at ``s``'s widths."""
    from lab.hub_families import _bk_sdm_tiny_unet, _sd15_unet

    return {
        "sd15": {**_sd15_unet(s.unet_width, s.text_dim, s.sample), "norm_num_groups": s.norm_groups},
        "bk_sdm_tiny": {**_bk_sdm_tiny_unet(s.small_width, s.text_dim, s.sample), "norm_num_groups": s.norm_groups},
    }


def time_calls(ctx: Context, fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Milliseconds per call of ``fn`` after ``warmup`` calls: CUDA events per call on CUDA, else perf_counter."""
    import torch

    for _ in range(warmup):
        fn()
    ctx.sync()
    if not ctx.cuda:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    pairs = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [float(start.elapsed_time(end)) for start, end in pairs]


def part_unet(ctx: Context) -> dict[str, Any]:
    import torch
    from diffusers import UNet2DConditionModel

    s = ctx.sizes
    placement = ctx.placement(edge_dtype(ctx))
    device, dtype = placement.device, placement.dtype
    out: dict[str, Any] = {"dtype": placement.dtype_name, "device": str(device), "latent": s.sample, "tokens": 77,
                           "text_dim": s.text_dim, "warmup": s.unet_warmup, "iters": s.unet_iters,
                           "timer": "cuda_events" if ctx.cuda else "perf_counter (CUDA events need CUDA)"}
    for name, config in unet_configs(s).items():
        record: dict[str, Any] = {}
        out[name] = record
        try:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            with torch.device(device):
                unet: Any = UNet2DConditionModel(**config)
            unet = unet.to(dtype).eval().requires_grad_(False)
            record["params_m"] = round(sum(p.numel() for p in unet.parameters()) / 1e6, 2)
            record["build_s"] = round(time.perf_counter() - t0, 2)
        except Exception as exc:
            out[name] = error_record(exc)
            ctx.log(f"  {name}: build FAILED {exc}")
            continue
        rows_record: dict[str, Any] = {}
        record["rows"] = rows_record
        for rows in s.unet_rows:
            try:
                x = torch.randn(rows, 4, s.sample, s.sample, device=device, dtype=dtype)
                t = torch.randint(1, 1000, (rows,), device=device)
                ehs = torch.randn(rows, 77, s.text_dim, device=device, dtype=dtype)
                if ctx.cuda:
                    torch.cuda.reset_peak_memory_stats(device)

                def call(x: Any = x, t: Any = t, ehs: Any = ehs, unet: Any = unet) -> Any:
                    with torch.inference_mode():
                        return unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]

                times = time_calls(ctx, call, s.unet_warmup, s.unet_iters)
                ms = median(times)
                entry: dict[str, Any] = {"ms_median": ms, "ms_per_row": ms / rows, "ms_min": min(times),
                                         "ms_all": [round(v, 3) for v in times]}
                if ctx.cuda:
                    entry["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                rows_record[str(rows)] = entry
                ctx.log(f"  {name:<12} rows {rows:>3}: {ms:8.2f} ms/call  {ms / rows:7.3f} ms/row")
            except torch.cuda.OutOfMemoryError as exc:
                rows_record[str(rows)] = {"oom": True, "error": str(exc).splitlines()[0]}
                ctx.log(f"  {name:<12} rows {rows:>3}: out of memory")
                del exc
                torch.cuda.empty_cache()
                break
            except Exception as exc:
                rows_record[str(rows)] = error_record(exc)
                ctx.log(f"  {name:<12} rows {rows:>3}: FAILED {exc}")
        del unet
        if ctx.cuda:
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- the SD1.5-sized family


def _text_encoder(s: Sizes) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=s.text_dim, intermediate_size=s.text_ff,
        num_attention_heads=s.text_heads, num_hidden_layers=s.text_layers, max_position_embeddings=77,
        vocab_size=s.text_vocab, hidden_act="quick_gelu", layer_norm_eps=1e-05, projection_dim=s.text_dim,
    )
    return CLIPTextModel(config).eval()


def _vae(s: Sizes) -> Any:
    from diffusers import AutoencoderKL

    levels = len(s.vae_channels)
    vae: Any = AutoencoderKL(  # Any: mypy sees diffusers' torch-less placeholder class
        block_out_channels=s.vae_channels, layers_per_block=2, in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=s.norm_groups, sample_size=s.sample * 2 ** (levels - 1),
    )
    return vae.eval()


def build_sd15_parts(ctx: Context, tokenizer_folder: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The SD1.5-sized pipeline (random weights) and the BK-SDM-tiny small UNet, built on the device."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    import lab.tiny_family
    from lab.hub_families import SD1_SCHEDULER, _scheduler

    s = ctx.sizes
    placement = ctx.placement(edge_dtype(ctx))
    configs = unet_configs(s)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(placement.device):  # random init on the GPU: seconds instead of a minute on the CPU
        text, vae = _text_encoder(s), _vae(s)
        unet: Any = UNet2DConditionModel(**configs["sd15"])
        small: Any = UNet2DConditionModel(**configs["bk_sdm_tiny"])
    for module in (text, vae, unet, small):
        module.to(placement.dtype).eval().requires_grad_(False)
    tokenizer = lab.tiny_family._write_byte_level_clip_tokenizer(tokenizer_folder)
    tokenizer.model_max_length = 77
    pipe: Any = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(SD1_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    ctx.sync()
    info = {"build_s": round(time.perf_counter() - t0, 2)}
    for name, module in (("unet", unet), ("unet_small", small), ("text_encoder", text), ("vae", vae)):
        info[f"{name}_params_m"] = round(sum(p.numel() for p in module.parameters()) / 1e6, 2)
    return pipe, small, info


def family_in_memory(pipe: Any, small: Any, placement: Any) -> Any:
    """A :class:`Family` from built modules, without the disk round trip (the loader's fields, filled by hand)."""
    import torch

    from edge_server.family import Family

    if placement.dtype != torch.float32 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # as load_family does
    return Family(
        folder=Path("<memory>"), family_id="gpu-check-sd15-random", name="gpu-check-sd15", pipeline=pipe,
        small_unet=small, small_source="<memory>", scheduler_config=dict(pipe.scheduler.config),
        vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
        latent_channels=int(pipe.vae.config.latent_channels),
        cross_attention_dim=int(pipe.unet.config.cross_attention_dim), samplers=SAMPLERS, placement=placement,
    )


def sd15_family(ctx: Context, record: dict[str, Any]) -> Any:
    """Build the SD1.5-sized family; ``disk`` mode saves it and loads it back with ``load_family``."""
    import torch

    from edge_server.family import load_family
    from lab.hub_families import SD1_SCHEDULER, _write_scheduler_as_published

    folder = ctx.scratch / "sd15-family"
    pipe, small, info = build_sd15_parts(ctx, folder / "tokenizer")
    record.update(info)
    placement = ctx.placement(edge_dtype(ctx))
    ctx.log(f"  built SD1.5-sized family in {info['build_s']:.1f} s: UNet {info['unet_params_m']} M, "
            f"small {info['unet_small_params_m']} M, text {info['text_encoder_params_m']} M, "
            f"VAE {info['vae_params_m']} M")
    if ctx.args.family_mode == "disk":
        try:
            t0 = time.perf_counter()
            pipe.save_pretrained(folder, safe_serialization=True)
            _write_scheduler_as_published(folder, SD1_SCHEDULER)
            small.save_pretrained(folder / "unet_small", safe_serialization=True)
            record["save_s"] = round(time.perf_counter() - t0, 2)
            record["folder_gib"] = round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30, 2)
            del pipe, small
            if ctx.cuda:
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            family = load_family(folder, placement=placement)
            ctx.sync()
            record["load_s"] = round(time.perf_counter() - t0, 2)
            record["mode"] = "disk"
            ctx.log(f"  saved ({record['folder_gib']} GiB) in {record['save_s']:.1f} s, "
                    f"load_family in {record['load_s']:.1f} s")
            return family
        except Exception as exc:  # fall back to the in-memory family, saying why
            record["disk_error"] = error_record(exc)
            ctx.log(f"  save/load FAILED ({exc}); building the family in memory instead")
            pipe, small, _ = build_sd15_parts(ctx, folder / "tokenizer")
    record["mode"] = "memory"
    return family_in_memory(pipe, small, placement)


# ----------------------------------------------------------------------------- part: daemon


def engine_steps(ctx: Context, family: Any, record: dict[str, Any]) -> None:
    """The engine's own ``batched_step`` (UNet + guidance + each request's scheduler) at 1..32 requests,
    plus the other edge-side times a profile takes: text encoding, VAE decode, handoff size."""
    from edge_server.batching import batched_step
    from edge_server.family import encode_prompts
    from edge_server.relay import EdgeRelay, decode_latents, prepare
    from shared.handoff import encode_handoff
    from shared.relay_plan import RelayPlan

    s = ctx.sizes
    n = s.daemon_steps
    plan = RelayPlan(n, n, "dpmpp_2m", GUIDANCE)

    def fresh(b: int) -> list[Any]:
        jobs = [prepare(family, f"{PROMPT} {i}", plan, seed=i) for i in range(b)]
        for i, job in enumerate(jobs):  # requests at different steps, as in the service
            job.next_step = (3 * i) % max(1, n // 2)
        return jobs

    def timed(fn: Callable[[], Any]) -> float:
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        return time.perf_counter() - t0

    steps: dict[str, Any] = {}
    record["batched_step_s"] = steps
    for b in s.engine_requests:
        try:
            for _ in range(2):  # warm-up
                batched_step(family.large_unet, fresh(b))
            times = []
            for _ in range(s.engine_repeats):
                jobs = fresh(b)

                def step(jobs: list[Any] = jobs) -> None:
                    batched_step(family.large_unet, jobs)

                times.append(timed(step))
            steps[str(b)] = {"median_s": median(times), "min_s": min(times), "rows": 2 * b}
            ctx.log(f"  batched_step {b:>3} requests ({2 * b:>3} rows): {median(times) * 1e3:8.2f} ms")
        except Exception as exc:
            steps[str(b)] = error_record(exc)
            ctx.log(f"  batched_step {b} requests: FAILED {exc}")
            break

    def text_encode() -> float:
        times = [timed(lambda: encode_prompts(family, [PROMPT])) for _ in range(6)]
        return median(times[1:])

    attempt(record, "text_encode_s", text_encode, ctx.log)

    def edge_decode() -> float:
        job = prepare(family, PROMPT, plan, seed=0)
        times = [timed(lambda: decode_latents(family, job.latents)) for _ in range(4)]
        return median(times[1:])

    attempt(record, "edge_decode_s", edge_decode, ctx.log)

    def handoff_bytes() -> int:
        relay_plan = RelayPlan(n, n // 2, "dpmpp_2m", GUIDANCE)  # the default relay's handoff (k = N/2)
        return len(encode_handoff(EdgeRelay(family).start(PROMPT, relay_plan, seed=0)))

    attempt(record, "handoff_bytes", handoff_bytes, ctx.log)


async def _client(url: str, family_id: str, plan: Any, count: int, stop_at: float, go: asyncio.Event,
                  index: int, timeout: float) -> dict[str, Any]:
    """One loopback device: ``count`` pinned requests one after another (none after ``stop_at``); the handoff is
    received, checked by the protocol (decoded, matched to the plan) and discarded."""
    from websockets.asyncio.client import connect

    from shared.protocol import (
        ClientConnection,
        Error,
        FrameRejected,
        Generate,
        HandoffReceived,
        ProtocolLimits,
        ResultReceived,
    )

    limits = ProtocolLimits()
    conn = ClientConnection(family_id=family_id, client_name="rise-gpu-check")
    done: list[tuple[float, float]] = []
    errors: list[str] = []
    payload_bytes = 0
    ws = await connect(url, max_size=limits.websocket_max_size, compression=None, open_timeout=60,
                       ping_interval=None, close_timeout=5)
    try:
        async def flush() -> None:
            for frame in conn.data_to_send():
                await ws.send(frame)

        async def events() -> list[Any]:
            frame = await asyncio.wait_for(ws.recv(), timeout)
            now = time.monotonic()
            got = conn.receive_text(frame, now) if isinstance(frame, str) else conn.receive_bytes(frame, now)
            await flush()
            return got

        await flush()
        while conn.welcome is None:
            for event in await events():
                if isinstance(event, Error) or (isinstance(event, FrameRejected) and event.fatal):
                    raise RuntimeError(f"the edge refused the hello: {event}")
        await go.wait()
        for i in range(count):
            if time.perf_counter() >= stop_at:
                break
            rid = conn.new_request_id()
            conn.send_generate(Generate(request_id=rid, prompt=f"{PROMPT} {index}-{i}", seed=1000 * index + i,
                                        pinned=plan))
            sent = time.perf_counter()
            await flush()
            finished = False
            while not finished:
                for event in await events():
                    if isinstance(event, (HandoffReceived, ResultReceived)) and event.announcement.request_id == rid:
                        done.append((sent, time.perf_counter()))
                        payload_bytes = len(event.payload if isinstance(event, HandoffReceived) else event.png)
                        finished = True
                    elif isinstance(event, Error) and event.request_id in (rid, None):
                        errors.append(f"{event.code}: {event.message}")
                        finished = finished or event.request_id == rid
                    elif isinstance(event, FrameRejected):
                        errors.append(f"rejected: {event.error.code}: {event.error.message}")
                        if event.fatal:
                            raise RuntimeError(f"connection closed by a protocol error: {event.error.message}")
    finally:
        await ws.close()
    return {"done": done, "errors": errors, "payload_bytes": payload_bytes}


async def _one_configuration(url: str, family_id: str, plan: Any, clients: int, per_client: int, cap_s: float,
                             timeout: float) -> dict[str, Any]:
    go = asyncio.Event()
    t_connect = time.perf_counter()
    stop_at = t_connect + cap_s
    tasks = [asyncio.create_task(_client(url, family_id, plan, per_client, stop_at, go, i, timeout))
             for i in range(clients)]
    await asyncio.sleep(0)
    await asyncio.sleep(0.2)  # let the clients connect and say hello before the clock starts
    t0 = time.perf_counter()
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    done = [span for r in results if isinstance(r, dict) for span in r["done"]]
    errors = [e for r in results if isinstance(r, dict) for e in r["errors"]]
    errors += [f"client failed: {type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    latencies = [end - start for start, end in done]
    span = (max(end for _, end in done) - t0) if done else wall
    asked = clients * per_client
    return {
        "clients": clients, "requests_per_client": per_client, "asked": asked, "ok": len(done), "errors": len(errors),
        "error_samples": errors[:5], "capped": len(done) + len(errors) < asked, "cap_s": round(cap_s, 1),
        "wall_s": round(wall, 3), "rps": len(done) / span if done and span > 0 else 0.0,
        "latency_s": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                      "mean": statistics.fmean(latencies) if latencies else float("nan")},
        "payload_bytes": max((r["payload_bytes"] for r in results if isinstance(r, dict)), default=0),
    }


def expected_budget_s(s: Sizes, clients: tuple[int, ...], per_client: dict[int, int], step_s: dict[int, float],
                      max_requests_per_call: int) -> dict[str, float]:
    """Predicted wall time of each configuration from the measured batched step times (requests -> seconds)."""
    import numpy as np

    sizes = sorted(step_s)
    def t(b: int) -> float:
        return float(np.interp(b, sizes, [step_s[k] for k in sizes]))

    out = {}
    for c in clients:
        total = c * per_client[c]
        b = min(c, max_requests_per_call)
        out[f"batching_{c}"] = math.ceil(total / b) * s.daemon_steps * t(b)
        out[f"one_at_a_time_{c}"] = total * s.daemon_steps * t(1)
    return out


def part_daemon(ctx: Context) -> dict[str, Any]:
    from edge_server.config import EdgeConfig
    from edge_server.daemon import EdgeServer
    from shared.relay_plan import RelayPlan

    s = ctx.sizes
    part_deadline = time.perf_counter() + min(s.daemon_budget_s, max(30.0, ctx.budget.left() - 20.0))
    out: dict[str, Any] = {"steps": s.daemon_steps, "split": s.daemon_steps, "guidance": GUIDANCE,
                           "sampler": "dpmpp_2m", "max_batch_rows": ctx.args.max_batch_rows,
                           "dtype": edge_dtype(ctx), "device": ctx.args.device}
    family_record: dict[str, Any] = {}
    out["family"] = family_record
    family = sd15_family(ctx, family_record)
    family_record["family_id"] = family.family_id
    family_record["placement"] = family.placement.describe()
    engine: dict[str, Any] = {}
    out["engine"] = engine
    try:
        engine_steps(ctx, family, engine)
    except Exception as exc:
        engine["error"] = error_record(exc)

    per_client = {c: max(s.requests_per_client, math.ceil(s.min_requests / c)) for c in s.clients}
    out["requests_per_client"] = {str(c): n for c, n in per_client.items()}
    measured = {int(b): v["median_s"] for b, v in engine.get("batched_step_s", {}).items() if "median_s" in v}
    if measured:
        expected = expected_budget_s(s, s.clients, per_client, measured, ctx.args.max_batch_rows // 2)
        out["expected_s"] = {k: round(v, 1) for k, v in expected.items()}
        ctx.log(f"  expected: {sum(expected.values()):.0f} s for the {2 * len(s.clients)} configurations "
                f"({', '.join(f'{k} {v:.0f} s' for k, v in expected.items())}); "
                f"{part_deadline - time.perf_counter():.0f} s left for them")
    plan = RelayPlan(s.daemon_steps, s.daemon_steps, "dpmpp_2m", GUIDANCE)
    order = [(b, c) for b in (True, False) for c in sorted(s.clients, reverse=True)]
    runs: list[dict[str, Any]] = []
    out["runs"] = runs

    async def main() -> None:
        remaining = list(order)
        for batching in (True, False):
            config = EdgeConfig(host="127.0.0.1", port=0, max_batch_rows=ctx.args.max_batch_rows, max_queue=512,
                                batching=batching, request_timeout_s=900.0, shutdown_grace_s=5.0,
                                ping_interval_s=None, ping_timeout_s=None,
                                limits={"requests_per_minute": 1e6, "burst": 100000, "max_in_flight": 4})
            server = EdgeServer.with_batching_engine(family, config)
            if batching:  # the engine measured what a UNet row costs on this device (edge_server.row_budget)
                budget = getattr(server.engine, "row_budget", None)
                memory = getattr(budget, "memory", None)
                out["row_budget"] = {"rows": getattr(server.engine, "max_batch_rows", None),
                                     "memory": dataclasses.asdict(memory) if memory is not None else None}
                ctx.log(f"  row budget: {out['row_budget']['rows']} rows per UNet call"
                        f"{f' ({memory.describe()})' if memory is not None else ''}")
            port = await server.start()
            url = f"ws://127.0.0.1:{port}"
            family_id = server.service.family_id
            try:
                warm = await _one_configuration(url, family_id, plan, 1, 1, 600.0, 600.0)  # warm-up
                if warm["ok"] != 1:
                    raise RuntimeError(f"the warm-up request failed: {warm['error_samples']}")
                for clients in sorted(s.clients, reverse=True):
                    cap = max(5.0, (part_deadline - time.perf_counter()) / max(1, len(remaining)))
                    remaining.remove((batching, clients))
                    before = server.engine.stats()
                    try:
                        result = await _one_configuration(url, family_id, plan, clients, per_client[clients], cap,
                                                          timeout=max(120.0, 4 * cap))
                    except Exception as exc:
                        runs.append({"batching": batching, "clients": clients, **error_record(exc)})
                        continue
                    after = server.engine.stats()
                    calls = after.unet_calls - before.unet_calls
                    result["batching"] = batching
                    result["engine"] = {"unet_calls": calls, "rows": after.rows_total - before.rows_total,
                                        "mean_requests_per_call": (after.rows_total - before.rows_total) / 2 / calls
                                        if calls else 0.0}
                    runs.append(result)
                    lat = result["latency_s"]
                    ctx.log(f"  {'batching' if batching else 'one at a time':<13} {clients:>2} clients: "
                            f"{result['rps']:7.2f} req/s  p50 {lat['p50']:.2f} s  p95 {lat['p95']:.2f} s  "
                            f"ok {result['ok']}/{result['asked']}  errors {result['errors']}"
                            f"{f'  (capped at {cap:.0f} s)' if result['capped'] else ''}  "
                            f"{result['engine']['mean_requests_per_call']:.1f} requests/UNet call")
            finally:
                await server.stop()

    asyncio.run(main())
    ratio = {}
    for c in s.clients:
        on = next((r for r in runs if r.get("batching") is True and r.get("clients") == c and r.get("rps")), None)
        off = next((r for r in runs if r.get("batching") is False and r.get("clients") == c and r.get("rps")), None)
        if on and off:
            ratio[str(c)] = on["rps"] / off["rps"]
    out["ratio_batched_over_one_at_a_time"] = ratio
    if ratio:
        ctx.log("  batched / one at a time: " + ", ".join(f"{c} clients {r:.2f}x" for c, r in ratio.items()))
    return out


# ----------------------------------------------------------------------------- part: profile


def bench_timing_from_report(report: dict[str, Any]) -> dict[str, Any]:
    """The ``--bench`` timing keys of ``python -m shared.bandit.profile`` from a gpu_check report.

    ``edge_batch_step_s`` is by requests in the batch (each guided: 2 UNet rows), as the profile and
    rise-sim read it: the daemon part's measured ``batched_step`` (UNet + guidance + schedulers) when
    there, else the unet part's SD1.5 forward at 2 rows per request (the UNet alone, a little less).
    """
    parts = report.get("parts", {})
    daemon = parts.get("daemon", {}) if isinstance(parts.get("daemon"), dict) else {}
    engine = daemon.get("engine", {}) if isinstance(daemon.get("engine"), dict) else {}
    table = {k: v["median_s"] for k, v in engine.get("batched_step_s", {}).items()
             if isinstance(v, dict) and "median_s" in v}
    timing: dict[str, Any] = {}
    source = "daemon.engine.batched_step_s (UNet + guidance + each request's scheduler step)"
    if not table:
        unet = parts.get("unet", {}) if isinstance(parts.get("unet"), dict) else {}
        rows = unet.get("sd15", {}).get("rows", {}) if isinstance(unet.get("sd15"), dict) else {}
        table = {str(int(r) // 2): v["ms_median"] / 1e3 for r, v in rows.items()
                 if isinstance(v, dict) and "ms_median" in v and int(r) % 2 == 0}
        source = "unet.sd15.rows (the UNet forward alone, 2 rows per request)"
    if table:
        table = dict(sorted(table.items(), key=lambda kv: int(kv[0])))
        timing["edge_batch_step_s"] = {k: round(v, 6) for k, v in table.items()}
        if "1" in table:
            timing["edge_step_s"] = round(table["1"], 6)
    for key in ("text_encode_s", "edge_decode_s"):
        if isinstance(engine.get(key), float):
            timing[key] = round(engine[key], 6)
    if isinstance(engine.get("handoff_bytes"), int):
        timing["handoff_bytes"] = engine["handoff_bytes"]
    timing["_source"] = source if table else None
    return timing


def validate_bench_timing(timing: dict[str, Any]) -> str:
    """Check the section with the profile's own validation (stand-ins for the device-side keys it lacks)."""
    from shared.bandit.profile import Timing

    keys = {k: v for k, v in timing.items() if not k.startswith("_")}
    Timing(**{"edge_step_s": 1.0, "device_step_s": 1.0, "edge_decode_s": 0.0, "device_decode_s": 0.0,
              "handoff_bytes": 1, "image_bytes": 1, **keys})
    return "ok (shared.bandit.profile.Timing accepts it)"


SIM_NOTE = (
    "rise-sim (lab/simulator.py) reads a rise-profile (shared/bandit/profile.py, load_profile): quality per arm "
    "from rise-eval plus 'timing'. The edge half of 'timing' is measured here: bench_timing has edge_step_s (one "
    "guided request's step alone), edge_batch_step_s (a batched step by requests in the batch, 2 UNet rows each; "
    "the simulator interpolates it and extrapolates its last segment), text_encode_s, edge_decode_s and "
    "handoff_bytes, in the --bench format: python -m shared.bandit.profile --eval EVAL.json:N ... "
    "--bench gpu_bench_<device>.json --out profile.json puts them into a profile (device_step_s, device_decode_s "
    "and image_bytes still come from rise-eval on the device side). Run rise-sim with --max-batch up to the "
    "largest measured batch. The weights are random, so these are cost figures only (cost does not depend on "
    "weight values); the exactness figures are of random-weight families too."
)


def part_profile(ctx: Context) -> dict[str, Any]:
    report = ctx.report
    parts = report["parts"]
    env = parts.get("env", {})
    device = env.get("device", {}) if isinstance(env.get("device"), dict) else {}
    name = str(device.get("name") or ctx.args.device)
    device_slug = slug(name) + ("-smoke" if ctx.args.smoke else "")
    unet = parts.get("unet", {})
    daemon = parts.get("daemon", {})
    exactness = parts.get("exactness", {})
    step_ms = {}
    for key in ("sd15", "bk_sdm_tiny"):
        rows = unet.get(key, {}).get("rows", {}) if isinstance(unet.get(key), dict) else {}
        step_ms[key] = {r: v["ms_median"] for r, v in rows.items() if isinstance(v, dict) and "ms_median" in v}
    timing = bench_timing_from_report(report)
    validation = "no timing measured"
    if any(not k.startswith("_") for k in timing):
        try:
            validation = validate_bench_timing(timing)
        except Exception as exc:
            validation = f"FAILED: {exc}"
    profile = {
        "format": "rise-gpu-profile", "version": 1,
        "device": {**device, "slug": device_slug},
        "versions": {**(env.get("versions") or {}), "cuda": env.get("torch_cuda"), "python": env.get("python")},
        "dtype": unet.get("dtype") or daemon.get("dtype") or edge_dtype(ctx),
        "smoke": bool(ctx.args.smoke),
        "edge_unet_step_ms_by_rows": step_ms,
        "unet_params_m": {k: unet.get(k, {}).get("params_m") for k in ("sd15", "bk_sdm_tiny")
                          if isinstance(unet.get(k), dict)},
        "throughput": {
            "steps": daemon.get("steps"), "guidance": daemon.get("guidance"),
            "max_batch_rows": daemon.get("max_batch_rows"),
            "runs": [{k: r.get(k) for k in ("batching", "clients", "ok", "asked", "rps", "latency_s", "capped",
                                             "error")} for r in daemon.get("runs", [])],
            "ratio_batched_over_one_at_a_time": daemon.get("ratio_batched_over_one_at_a_time"),
        },
        "exactness": exactness.get("summary") if isinstance(exactness, dict) else None,
        "bench_timing": timing,
        "bench_timing_validation": validation,
        "note": SIM_NOTE,
    }
    path = ctx.out / f"gpu_profile_{device_slug}.json"
    write_json(path, profile)
    bench_path = ctx.out / f"gpu_bench_{device_slug}.json"
    write_json(bench_path, {k: v for k, v in timing.items() if not k.startswith("_")})
    ctx.log(f"  wrote {path.name} and {bench_path.name} (bench timing: {validation})")
    return {"profile_file": str(path), "bench_file": str(bench_path), "bench_timing": timing,
            "bench_timing_validation": validation}


# ----------------------------------------------------------------------------- driver


PART_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "env": part_env, "exactness": part_exactness, "unet": part_unet, "daemon": part_daemon, "profile": part_profile,
}
#: A part needs about this much of the budget left to be worth starting (seconds; the profile is instant).
PART_MIN_S = {"env": 0.0, "exactness": 20.0, "unet": 15.0, "daemon": 45.0, "profile": 0.0}


def run_part(ctx: Context, name: str) -> None:
    entry: dict[str, Any] = {"ok": False}
    ctx.report["parts"][name] = entry
    min_left = 0.0 if ctx.args.smoke else PART_MIN_S[name]
    if ctx.budget.left() < min_left:
        entry["skipped"] = f"time budget: {ctx.budget.left():.0f} s left, the part needs ~{min_left:.0f} s"
        ctx.log(f"== {name}: skipped ({entry['skipped']})")
        ctx.save()
        return
    ctx.log(f"== {name} ({ctx.budget.left():.0f} s of the budget left)")
    t0 = time.perf_counter()
    cuda_mem = None
    try:
        if ctx.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        result = PART_FUNCS[name](ctx)
        entry.update(result)
        entry["ok"] = True
        if ctx.cuda:
            import torch

            cuda_mem = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except Skip as exc:
        entry["skipped"] = str(exc)
    except Exception as exc:
        entry.update(error_record(exc))
        ctx.log(f"== {name} FAILED: {type(exc).__name__}: {exc}")
        for line in entry["traceback"][-4:]:
            ctx.log("   " + line.rstrip().replace("\n", "\n   "))
    finally:
        entry["wall_s"] = round(time.perf_counter() - t0, 2)
        if cuda_mem is not None:
            entry["peak_cuda_mem_gib"] = cuda_mem
        ctx.save()
        ctx.log(f"== {name}: {'ok' if entry['ok'] else 'not ok'} in {entry['wall_s']:.1f} s")
        with contextlib.suppress(Exception):
            import gc

            gc.collect()
            if ctx.cuda:
                import torch

                torch.cuda.empty_cache()


def summary_lines(report: dict[str, Any]) -> list[str]:
    parts = report.get("parts", {})
    lines = [f"{'part':<10} {'status':<8} {'wall s':>7}  figures"]
    for name in PARTS:
        entry = parts.get(name)
        if entry is None:
            continue
        status = "ok" if entry.get("ok") else ("skipped" if "skipped" in entry else "FAILED")
        figures = ""
        if name == "exactness" and entry.get("ok"):
            sm = entry.get("summary", {})
            bits = []
            for label in ("fp32", "fp32_no_tf32"):
                if label in sm:
                    bits.append(f"{label} rel {sm[label]['worst_rel']:.2g} {'pass' if sm[label]['pass'] else 'FAIL'}")
            for label in ("fp16", "bf16"):
                if label in sm:
                    bits.append(f"{label} PSNR >= {sm[label]['worst_psnr_db']:.1f} dB")
            if "sdxl_fp16_worst_psnr_db" in sm:
                bits.append(f"sdxl fp16 PSNR >= {sm['sdxl_fp16_worst_psnr_db']:.1f} dB")
            if "initial_noise_identical" in sm:
                bits.append(f"noise identical {sm['initial_noise_identical']}")
            figures = "; ".join(bits)
        elif name == "unet" and entry.get("ok"):
            bits = []
            for key in ("sd15", "bk_sdm_tiny"):
                rows = entry.get(key, {}).get("rows", {}) if isinstance(entry.get(key), dict) else {}
                ok = {r: v for r, v in rows.items() if isinstance(v, dict) and "ms_median" in v}
                if ok:
                    bits.append(f"{key} " + " ".join(f"{r}:{v['ms_median']:.1f}" for r, v in ok.items()) + " ms")
            figures = "; ".join(bits)
        elif name == "daemon" and entry.get("ok"):
            runs = entry.get("runs", [])
            bits = [f"{'on' if r.get('batching') else 'off'}/{r.get('clients')}: {r.get('rps', 0):.2f} rps"
                    for r in runs if "rps" in r]
            ratio = entry.get("ratio_batched_over_one_at_a_time", {})
            if ratio:
                bits.append("ratio " + ", ".join(f"{c}: {v:.2f}x" for c, v in ratio.items()))
            figures = "; ".join(bits)
        elif name == "profile" and entry.get("ok"):
            figures = Path(entry.get("profile_file", "")).name
        elif "error" in entry:
            figures = entry["error"][:100]
        elif "skipped" in entry:
            figures = entry["skipped"][:100]
        lines.append(f"{name:<10} {status:<8} {entry.get('wall_s', 0):>7.1f}  {figures}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                        help="the UNet timings' and the daemon's dtype (default: fp16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes everywhere (the CPU test of this script)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else bench/results)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget (default 420 s; smoke 120 s): later parts size or skip themselves")
    parser.add_argument("--family-mode", choices=("disk", "memory"), default="disk",
                        help="daemon family: built, saved and loaded with load_family (disk), or used as built")
    parser.add_argument("--max-batch-rows", type=int, default=64,
                        help="the daemon's max UNet rows per call (64 = 32 guided requests; rise-edge's default 16)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --smoke, where the cores are shared with the "
                             "test run; else torch's own default)")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the temporary family folders")
    parser.add_argument("--to-bench", type=Path, default=None, metavar="REPORT",
                        help="convert a gpu_check.json to the --bench timing file of shared.bandit.profile; exit")
    parser.add_argument("--out-file", type=Path, default=None, help="with --to-bench: where (default: stdout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.to_bench is not None:
        timing = bench_timing_from_report(json.loads(args.to_bench.read_text(encoding="utf-8")))
        text = json.dumps({k: v for k, v in timing.items() if not k.startswith("_")}, indent=1) + "\n"
        if args.out_file:
            args.out_file.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return 0 if timing.get("_source") else 1
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        build_parser().error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    out = args.out or Path(os.environ.get("OUT") or REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / LOG_NAME)
    budget = Budget(args.budget_s if args.budget_s is not None else (120.0 if args.smoke else 420.0))
    scratch = Path(tempfile.mkdtemp(prefix="rise-gpu-check-"))
    report: dict[str, Any] = {"format": "rise-gpu-check", "version": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "sizes": dataclasses.asdict(SMOKE if args.smoke else FULL), "parts": {}}
    ctx = Context(args=args, sizes=SMOKE if args.smoke else FULL, log=log, budget=budget, out=out, scratch=scratch,
                  report=report)

    def on_term(signum: int, _frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    if threads is not None:
        with contextlib.suppress(Exception):
            import torch

            torch.set_num_threads(threads)
    faulthandler.dump_traceback_later(max(10.0, budget.seconds + 30.0), exit=False)  # stacks in the log if stuck
    log(f"gpu_check: device {args.device}, {'smoke' if args.smoke else 'full'} sizes, parts {','.join(parts)}, "
        f"budget {budget.seconds:.0f} s, out {out}, scratch {scratch}")
    rc = 0
    try:
        for name in parts:
            run_part(ctx, name)
    except (Interrupted, KeyboardInterrupt) as exc:
        report["interrupted"] = f"{type(exc).__name__}: {exc} after {budget.elapsed():.0f} s"
        log(f"interrupted: {exc}; the JSON keeps what was measured")
        rc = 130
    finally:
        faulthandler.cancel_dump_traceback_later()
        ctx.save()
        for line in summary_lines(report):
            log(line)
        log(f"wrote {out / REPORT_NAME} and {out / LOG_NAME} in {budget.elapsed():.0f} s")
        log.close()
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if rc == 0 and not all(report["parts"].get(p, {}).get("ok") for p in parts):
        rc = 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
