"""Text encoding on the edge: the prompts admitted together in one call vs one call each, and the cached uncond.

The engine encodes every prompt it admits in a round with one text-encoder call and computes the
unconditional embedding once per family. This prints both ratios, measured side by side in one run
(median of repeated rounds, explicit threads), on a CLIP-L-sized random-weight text encoder
(hidden 768, 12 layers, 77 tokens) or the tiny test family's (``--tiny``).

    python bench/bench_text_encoding.py [--threads 1] [--batch 8] [--rounds 5] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from edge_server.family import Family, encode_prompts, load_family, uncond_conditioning
from lab.tiny_family import build_tiny_family

PROMPTS = ["a red sneaker in the top left", "a blue bag on the right", "two hats and a dress", "a white shirt",
           "a pullover in the middle", "an ankle boot at the bottom", "a coat and a sandal", "a green trouser"]


def _clip_l_family(folder: Path) -> Family:
    """The tiny family with its text encoder swapped for a CLIP-L-sized one (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    build_tiny_family(folder)
    family = load_family(folder)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, vocab_size=1000, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1)
    pipeline: object = family.pipeline
    pipeline.text_encoder = CLIPTextModel(config).eval()  # type: ignore[attr-defined]  # diffusers' runtime module
    pipeline.tokenizer.model_max_length = 77  # type: ignore[attr-defined]
    return family


def _median_s(fn: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="prompts admitted together (default 8)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the tiny test family's text encoder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        family = load_family(build_tiny_family(Path(tmp) / "tiny")) if args.tiny else _clip_l_family(Path(tmp) / "f")
        encode_prompts(family, prompts)  # warm-up
        one_by_one = _median_s(lambda: [encode_prompts(family, [p]) for p in prompts], args.rounds)
        batched = _median_s(lambda: encode_prompts(family, prompts), args.rounds)
        recomputed = _median_s(lambda: [encode_prompts(family, [""]) for _ in prompts], args.rounds)
        uncond_conditioning(family)
        cached = _median_s(lambda: [uncond_conditioning(family) for _ in prompts], args.rounds)
    encoder = "tiny" if args.tiny else "CLIP-L-sized (768 wide, 12 layers, 77 tokens)"
    print(f"text encoder: {encoder}, {args.batch} prompts, {args.threads} thread(s), median of {args.rounds}")
    print(f"  one call per prompt: {one_by_one * 1e3:8.1f} ms   one call for all: {batched * 1e3:8.1f} ms   "
          f"ratio {one_by_one / batched:5.2f}x")
    print(f"  uncond per request:  {recomputed * 1e3:8.1f} ms   cached per family: {cached * 1e3:8.3f} ms   "
          f"(saves {recomputed / args.batch * 1e3:.1f} ms a request)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
