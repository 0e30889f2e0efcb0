"""The README's first command: generate a few pictures with the default relay configuration.

Both halves run as the real service: an edge daemon on 127.0.0.1 and a device client talking to
it over a websocket (lab/loopback.py). With the trained demo family committed
(``models/demo/family/``, Fashion-MNIST scenes on a 3x3 grid; see its model card), this exports
its device bundle on the first run, relays a handful of the family's evaluation prompts (large
UNet on the edge for the first k steps, small UNet on ONNX Runtime for the rest, the handoff
serialized in between), writes every picture and a contact sheet with the prompts as captions,
and prints where they are.

Without it (or with ``--random-family``) it falls back to a *tiny family with random weights*
(lab/tiny_family.py): every stage runs for real, but the pictures are textures, not
objects. It says so when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from device_app.results import GenerationResult
from device_app.runtime import DeviceBundle
from edge_server.family import is_family_folder, load_family
from lab.loopback import generate_over_loopback
from lab.tiny_family import build_tiny_family
from shared.errors import RiseError
from shared.relay_plan import RelayPlan

#: Where the trained demo family is committed.
DEMO_FAMILY_DIR = Path(__file__).resolve().parents[1] / "models" / "demo" / "family"
#: Prompts for the random tiny family (its byte-level tokenizer reads anything).
TINY_PROMPTS = (
    "a red sneaker in the top left",
    "a blue bag in the bottom right and a green pullover in the top left",
    "two things: a yellow dress in the center and a white ankle boot on the right",
)
N_DEMO_PROMPTS = 6  # the first prompts of prompts.txt: one per complexity level 1..6
DEFAULT_PLAN = RelayPlan(num_inference_steps=20, split=10, sampler="dpmpp_2m", guidance_scale=7.5)


def demo_prompts(n: int = N_DEMO_PROMPTS) -> list[str]:
    """The first ``n`` evaluation prompts of the demo family (levels interleaved: 1, 2, 3 ... items)."""
    from shared.demo_grammar.prompts import load_prompts

    return load_prompts()[:n]


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], *, tile: int = 192,
                  columns: int = 3, caption_chars: int = 30) -> Image.Image:
    """One PNG-ready image: every picture upscaled (nearest) to ``tile`` px, its caption below."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images for the contact sheet")
    try:
        font = ImageFont.load_default(size=12)  # Pillow's scalable default font (needs FreeType)
        line_h = 15
    except (TypeError, OSError, ImportError):
        font, line_h = ImageFont.load_default(), 13
    wrapped = [textwrap.wrap(c, caption_chars) or [""] for c in captions]
    cap_h = line_h * max(len(w) for w in wrapped) + 8
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    pad = 8
    sheet = Image.new("RGB", (columns * (tile + pad) + pad, rows * (tile + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x = pad + (i % columns) * (tile + pad)
        y = pad + (i // columns) * (tile + cap_h + pad)
        sheet.paste(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((tile, tile), Image.Resampling.NEAREST),
                    (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + tile + 4 + j * line_h), line, fill="black", font=font)
    return sheet


def _ensure_bundle(family_dir: Path, bundle_dir: Path, family_id: str) -> None:
    """Export the family's device bundle unless ``bundle_dir`` already holds this family's."""
    manifest = bundle_dir / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("family_id") == family_id:
                return
        except (OSError, json.JSONDecodeError):
            pass
    from export.cli import main as export_main

    print(f"exporting the device bundle of {family_dir} to {bundle_dir} (first run only)...", flush=True)
    if export_main(["--family", str(family_dir), "--out", str(bundle_dir), "--force"]) != 0:
        raise RiseError(f"could not export the bundle of {family_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    default_family = DEMO_FAMILY_DIR.relative_to(DEMO_FAMILY_DIR.parents[2])
    parser.add_argument("--family", default=None, help=f"a family of the demo grammar (default: {default_family})")
    parser.add_argument("--random-family", action="store_true",
                        help="use the random tiny family even if the trained one exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    family_dir = Path(args.family) if args.family else DEMO_FAMILY_DIR
    trained = not args.random_family and is_family_folder(family_dir)
    try:
        if trained:
            bundle_dir = out / "demo-bundle"
            prompts = demo_prompts()
            print(f"demo family: {family_dir}")
        else:
            if args.family and not args.random_family:
                raise RiseError(f"{family_dir} is not a family folder (no model_index.json)")
            print("NOTE: the trained demo family is not in the repository (models/demo/family/); this demo runs\n"
                  "      the relay on a tiny SD1.x-shaped family with RANDOM weights, so the images are textures,\n"
                  "      not objects.")
            family_dir, bundle_dir = out / "tiny-family", out / "tiny-bundle"
            prompts = list(TINY_PROMPTS)
            if not is_family_folder(family_dir):
                build_tiny_family(family_dir)
                print(f"built tiny family in {family_dir}")
        family = load_family(family_dir)
        _ensure_bundle(family_dir, bundle_dir, family.family_id)
        bundle = DeviceBundle(bundle_dir)
        plan = DEFAULT_PLAN
        print(f"relay over loopback: an edge daemon on 127.0.0.1 and a device client; N={plan.num_inference_steps} "
              f"steps, the first K={plan.split} on the edge (large UNet, PyTorch), the rest on the device "
              f"(small UNet, ONNX Runtime); sampler {plan.sampler}, guidance {plan.guidance_scale}")
        images = []

        def save(i: int, result: GenerationResult) -> None:
            path = out / f"image_{i}.png"
            Image.fromarray(result.image).save(path)
            images.append(result.image)
            t = result.timings
            print(f"  {path}  edge {(t.edge_compute_s or 0) * 1000:.0f} ms, device "
                  f"{(t.device_compute_s + t.decode_s) * 1000:.0f} ms, handoff {result.handoff_bytes} B, "
                  f"total {t.total_latency_s * 1000:.0f} ms  <- {prompts[i]!r}", flush=True)

        generate_over_loopback(family, bundle, prompts, plan, seeds=range(len(prompts)), on_result=save)
        sheet_path = out / "contact_sheet.png"
        contact_sheet(images, prompts).save(sheet_path)
    except RiseError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"done: {len(images)} pictures in {out}/, contact sheet (prompts as captions): {sheet_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
