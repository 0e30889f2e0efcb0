"""The README's first command: generate a few pictures with the default relay configuration.

Until the trained demo family lands (issue 7), this builds a *tiny family with random
weights* (edge_server/tiny_family.py), exports its device bundle and relays a handful of
prompts through it: every stage runs for real, but the pictures are noise-like textures,
not objects. It says so when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from device_app.runtime import DeviceBundle
from edge_server.family import load_family
from edge_server.local_relay import relay_once
from edge_server.tiny_family import build_tiny_family
from shared.errors import RiseError
from shared.relay_plan import RelayPlan

DEMO_PROMPTS = (
    "a red sneaker top left",
    "a blue bag bottom right and a green shirt top left",
    "two things: a yellow dress and a white ankle boot",
)
DEFAULT_PLAN = RelayPlan(num_inference_steps=20, split=10, sampler="dpmpp_2m", guidance_scale=7.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_server.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    family_dir, bundle_dir = out / "tiny-family", out / "tiny-bundle"
    print("NOTE: the trained demo family is not in the repository yet; this demo runs the relay on a\n"
          "      tiny SD1.x-shaped family with RANDOM weights, so the images are textures, not objects.")
    try:
        if not (family_dir / "model_index.json").is_file():
            build_tiny_family(family_dir)
            print(f"built tiny family in {family_dir}")
        if not (bundle_dir / "manifest.json").is_file():
            from export.cli import main as export_main

            if export_main(["--family", str(family_dir), "--out", str(bundle_dir), "--force"]) != 0:
                return 2
        family = load_family(family_dir)
        bundle = DeviceBundle(bundle_dir)
        plan = DEFAULT_PLAN
        print(f"relay: N={plan.num_inference_steps}, K={plan.split} on the edge, sampler {plan.sampler}")
        for i, prompt in enumerate(DEMO_PROMPTS):
            result = relay_once(family, bundle, prompt, plan, seed=i)
            path = out / f"image_{i}.png"
            Image.fromarray(result.image).save(path)
            t = result.timings
            print(f"  {path}  edge {t['edge_s'] * 1000:.0f} ms, device {t['device_s'] * 1000:.0f} ms, "
                  f"handoff {result.handoff_bytes} B  <- {prompt!r}")
    except RiseError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"done: pictures in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
