"""Relay in one process: the edge half in PyTorch, the handoff through bytes, the device half on ORT.

``rise-relay`` is the command-line face; :func:`relay_once` the Python one. The handoff is
serialized and parsed back exactly as it would cross the network, so what this measures
(per-stage time, handoff bytes) is what the networked service pays, minus the transfer.

For a family with a prompt grammar (the demo family), ``rise-relay`` reads the prompt as the edge
does (:meth:`~edge_server.family.Family.read_prompt`): it encodes the family's reading, says in
one line on stderr what it did not understand or filled in, and refuses (exit 2) a prompt of which
the family would draw nothing. :func:`relay_once` encodes the prompt it is given, as is.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from device_app.finish import finish_handoff
from device_app.runtime import DeviceBundle
from edge_server.family import Family, load_family
from edge_server.placement import DTYPE_CHOICES, resolve_placement
from edge_server.relay import EdgeRelay
from shared.errors import RiseError
from shared.handoff import decode_handoff, encode_handoff
from shared.relay_plan import RelayPlan
from shared.samplers import SAMPLER_NAMES


@dataclass
class RelayResult:
    """One request relayed in one process: the image, the final latent, the handoff's size, each stage's time.

    ``timings`` (seconds) has ``edge_s``, ``handoff_encode_s``, ``handoff_decode_s``,
    ``device_s`` (the small model's steps), ``decode_s`` (the VAE) and ``total_s``.
    """

    image: np.ndarray  # uint8 (H, W, 3)
    latents: np.ndarray  # final latent (1, C, h, w) float32
    handoff_bytes: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def relay_once(family: Family, bundle: DeviceBundle, prompt: str, plan: RelayPlan, seed: int, *,
               height: int | None = None, width: int | None = None) -> RelayResult:
    """One request through both halves, with the handoff serialized in between."""
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    t0 = time.perf_counter()
    handoff = EdgeRelay(family).start(prompt, plan, seed, height=height, width=width)
    t = lap("edge_s", t0)
    payload = encode_handoff(handoff)
    t = lap("handoff_encode_s", t)
    received = decode_handoff(payload, expected_family=bundle.family_id)
    lap("handoff_decode_s", t)
    finished = finish_handoff(bundle, received)
    assert finished.image is not None  # decoded: finish_handoff's default
    timings["device_s"] = finished.steps_s
    timings["decode_s"] = finished.decode_s
    timings["total_s"] = time.perf_counter() - t0
    return RelayResult(image=finished.image, latents=finished.latents, handoff_bytes=len(payload), timings=timings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rise-relay",
        description="Generate one image with the relay in one process: large model on the edge "
                    "(PyTorch) for the first K of N steps, small model on ONNX Runtime for the rest.",
    )
    parser.add_argument("--family", required=True, help="family folder (the large model's pipeline folder)")
    parser.add_argument("--small", default=None,
                        help="small denoiser: subfolder of the family (default unet_small) or a path")
    parser.add_argument("--variant", default=None,
                        help="weights variant to load, e.g. fp16 (default: detected for variant-only folders)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="edge half: auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="edge half's compute dtype: auto (default: fp16 on CUDA, else fp32), fp32, fp16, bf16")
    parser.add_argument("--bundle", required=True, help="device bundle made by rise-export from the same family")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--steps", type=int, default=20, help="total denoising steps N (default 20)")
    parser.add_argument("--split", type=int, default=None, help="steps K run on the edge, 0..N (default N/2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                        help="sampler (default: the family's own: lcm for LCM families, else dpmpp_2m)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<=1: off)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    parser.add_argument("--out", required=True, help="output PNG path")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.seed < 2**63:
            raise RiseError(f"--seed must be in [0, 2**63), got {args.seed}")
        split = args.steps // 2 if args.split is None else args.split
        RelayPlan(args.steps, split, args.sampler or "dpmpp_2m", args.guidance)  # flags checked before loading
        if args.threads is not None:
            if args.threads < 1:
                raise RiseError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        placement = resolve_placement(args.device, args.dtype)
        family = load_family(args.family, args.small, variant=args.variant, placement=placement)
        plan = RelayPlan(args.steps, split, args.sampler or family.default_sampler, args.guidance)
        family.check_sampler(plan.sampler)
        t1 = time.perf_counter()
        bundle = DeviceBundle(args.bundle)
        t2 = time.perf_counter()
        if bundle.family_id != family.family_id:
            raise RiseError(f"bundle {args.bundle} was exported from family {bundle.family_id}, "
                            f"not from {family.family_id}")
        reading = family.read_prompt(args.prompt, args.seed)
        if reading is not None and reading.scene is None:
            raise RiseError(reading.message or "the family understood nothing in the prompt")
        if reading is not None and reading.message is not None:
            print(f"rise-relay: note: {reading.message}", file=sys.stderr)
        prompt = args.prompt if reading is None else reading.prompt
        result = relay_once(family, bundle, prompt, plan, args.seed, height=args.height, width=args.width)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(result.image).save(out)
    except RiseError as exc:
        print(f"rise-relay: error: {exc}", file=sys.stderr)
        return 2
    print(f"family {family.family_id}: loaded in {t1 - t0:.2f} s; bundle verified and loaded in {t2 - t1:.2f} s")
    print(f"plan: N={plan.num_inference_steps} K={plan.split} sampler={plan.sampler} "
          f"guidance={plan.guidance_scale} seed={args.seed}")
    if prompt != args.prompt:
        print(f"prompt drawn: {prompt}")
    labels = {
        "edge_s": f"edge: text encoding + {plan.edge_steps} large-model steps (PyTorch)",
        "handoff_encode_s": "handoff encode",
        "handoff_decode_s": "handoff decode + validation",
        "device_s": f"device: {plan.device_steps} small-model steps (ONNX Runtime)",
        "decode_s": "device: VAE decode",
        "total_s": "total",
    }
    for key, label in labels.items():
        print(f"  {label:<52} {result.timings[key] * 1000:9.1f} ms")
    print(f"  handoff size: {result.handoff_bytes} bytes")
    print(f"wrote {out} ({result.image.shape[1]}x{result.image.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
