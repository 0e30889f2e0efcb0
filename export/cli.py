"""``rise-export``: turn a model family into a device bundle (ONNX graphs + manifest.json).

    rise-export --family DIR [--small NAME_OR_PATH] [--variant NAME] --out BUNDLE
                [--dtype fp32|fp16] [--quantize int8] [--from-onnx DIR] [--opset N] [--force]
                [--lora FILE [--lora-scale S] | --small PATH --base-small NAME_OR_PATH] [--label NAME]

Families: SD1.x/SD2.x (``StableDiffusionPipeline``), SDXL (``StableDiffusionXLPipeline``) and
LCM (``LatentConsistencyModelPipeline``). Any error a user can fix (a missing folder, a family
without a second denoiser, members that do not share a latent space, a family of a kind we
cannot run (SD3, Flux, an unknown scheduler class, a UNet input the device does not feed),
a non-empty --out, a graph that disagrees with PyTorch) prints exactly one line
``rise-export: error: <message>`` on stderr and exits with 2; an unsupported family is
refused before any graph is exported.

Personalized bundles
--------------------
The device's small UNet may be the user's own while the edge's large model stays the family's:

    rise-export --family models/demo/family --lora my_style.safetensors [--lora-scale 0.8] [--label "my style"] --out B
    rise-export --family DIR --small my_tuned_unet/ --base-small unet_small [--label NAME] --out B

``--lora`` loads a LoRA (safetensors: the peft layout, diffusers' own as its training scripts
save it, or the kohya/A1111 one diffusers converts) into the family's small UNet with
diffusers' own LoRA loading, fuses it at ``--lora-scale`` (default 1; finite, in (0, 4]) and
exports the fused UNet as usual. ``--small PATH --base-small NAME_OR_PATH`` exports a full
fine-tune, checked to have the base's UNet architecture config (the first key that differs is
named). The VAE, the text encoder and the scheduler stay the family's, and so does the
bundle's ``family_id``, so the edge's handoffs are still accepted; the manifest records
``personalization`` (kind, label, base small UNet and its weights' hash, the adapter file's
name, sha256, format and scale) and every bundle ``small_model_sha256``. The adapter file is
not copied: the fused weights are the bundle. Refused in one line, before ``--out`` is created:
a file that is not a safetensors LoRA, a LoRA whose tensors do not all land on the small UNet
or do not fit its layers (another architecture or family, other target modules, ranks or
widths), a LoRA that also changes the text encoder (shared with the edge), a bad
``--lora-scale`` or ``--label``, a fine-tune of another architecture, and ``--from-onnx``
with either (a personalized UNet is exported from PyTorch). The summary's last lines say what
was personalized.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from shared.errors import ConfigError, RiseError

if TYPE_CHECKING:
    from export.onnx_export import ExportResult

PROG = "rise-export"
EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error of the tool."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    parser = _OneLineParser(
        prog=PROG,
        description="Export a model family (large pipeline folder + small denoiser; SD1.x/2.x, SDXL or LCM) as a "
        "device bundle: the small UNet, VAE decoder and text encoder(s) as ONNX, checked against PyTorch, plus "
        "manifest.json and the model_index.json optimum's ORT pipelines open the folder with.",
    )
    parser.add_argument("--family", required=True, type=Path, metavar="DIR",
                        help="the large model's diffusers pipeline folder (model_index.json, unet/, vae/, ...)")
    parser.add_argument("--small", metavar="NAME_OR_PATH", default=None,
                        help="the small denoiser: a subfolder of DIR or a UNet/pipeline folder (default: unet_small)")
    parser.add_argument("--variant", metavar="NAME", default=None,
                        help="load the *.NAME.safetensors weights (e.g. fp16); default: detected, so a folder "
                        "with only fp16-variant weights needs no flag")
    parser.add_argument("--out", required=True, type=Path, metavar="BUNDLE", help="the bundle folder to write")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                        help="weights of the graphs; inputs and outputs stay float32 (default: fp32)")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="dynamic int8 quantization (onnxruntime), of fp32 graphs")
    parser.add_argument("--from-onnx", type=Path, metavar="DIR", default=None,
                        help="take the graphs from an optimum export folder (unet/, vae_decoder/, text_encoder/) "
                        "instead of exporting; they are validated against --family")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: optimum's for each graph)")
    parser.add_argument("--force", action="store_true", help="replace a previous bundle in --out")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for loading, tracing and validating (default: torch's)")
    parser.add_argument("--lora", type=Path, metavar="FILE", default=None,
                        help="personalize: fuse this LoRA (safetensors; peft, diffusers or kohya layout) into the "
                        "small UNet before exporting it; it must change only the small UNet")
    parser.add_argument("--lora-scale", type=float, metavar="S", default=None,
                        help="the LoRA's scale when fused (diffusers' lora_scale), in (0, 4] (default: 1)")
    parser.add_argument("--base-small", metavar="NAME_OR_PATH", default=None,
                        help="personalize: --small is a full fine-tune of this small UNet (a subfolder of DIR or a "
                        "path); both must have the same UNet architecture config")
    parser.add_argument("--label", metavar="NAME", default=None,
                        help="a personalized bundle's name in the device app's picker (default: the LoRA file's "
                        "stem, or the fine-tune's folder name; at most 64 characters)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar on stderr, a step per graph exported and validated "
                        "(default: when stderr is a terminal)")
    return parser


def _summary(result: ExportResult) -> str:
    """A plain table: one row per graph with its size and its max-abs error against PyTorch."""
    manifest = result.manifest
    rows = [("graph", "dtype", "size MB", "max-abs err", "worst check: err / tol", "shapes checked")]
    for name, graph in manifest.graphs.items():
        size = sum(e.size for rel, e in manifest.files.items() if rel.startswith(f"{name}/") and ".onnx" in rel)
        kind = graph.quantization or graph.dtype
        worst = max(graph.checks, key=lambda c: c.max_abs_error / c.tolerance)
        rows.append((
            name, kind, f"{size / 1e6:.2f}", f"{graph.max_abs_error:.2e}",
            f"{worst.max_abs_error:.2e} / {worst.tolerance:.2e}", str(len(graph.checks)),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    notes = [f"note: {name}: {g.note}" for name, g in manifest.graphs.items() if g.note]
    if manifest.personalization is not None:
        notes.append(f"personalized: {manifest.personalization.describe()}; the family ({manifest.family_id}) and "
                     "its edge model unchanged")
    return "\n".join([*lines, *notes, f"time: {timing}"])


def main(argv: list[str] | None = None) -> int:
    """Run ``rise-export``; return the exit code (0 ok, 2 on any error the user can fix)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed): return, don't exit
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # diffusers logs import-time notices (e.g. optimum and optimum-onnx both own `optimum/`) on
    # stderr; the tool's stderr is for its own error line. RISE users can still opt back in.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        # Heavy imports (torch, optimum) only once the arguments are known to be well formed.
        from export.onnx_export import ExportOptions, export_bundle
        from export.progress import echo

        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        options = ExportOptions(
            family=args.family, out=args.out, small=args.small, variant=args.variant, dtype=args.dtype,
            quantize=args.quantize, from_onnx=args.from_onnx, opset=args.opset, force=args.force,
            lora=args.lora, lora_scale=args.lora_scale, label=args.label, base_small=args.base_small,
        )
        result = export_bundle(options, log=lambda message: echo(f"{PROG}: {message}"), progress=args.progress)
    except RiseError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
