"""Make docs/screenshots/{main,gallery}-{360x640,1280x800}.png: the real app, a real local edge, the demo family.

    python docs/make_screenshots.py [--out docs/screenshots] [--steps 20] [--random-family] [--size WxH ...]

Exports the trained demo family (``models/demo/family``) to a bundle in a temporary folder
(without it, or with ``--random-family``, builds the tiny random-weights family, whose
pictures are textures), serves it with ``EdgeServer`` on 127.0.0.1 (fixed plan: N steps,
half on the edge), and runs the app in an offscreen SDL2 window
(``python -m device_app.app.screenshots``) for three prompts, rating the last one, once per
window size (a phone in portrait and a desktop window by default), checking that every widget fits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: For the random tiny family (its byte-level tokenizer reads anything).
TINY_PROMPTS = (
    "a lighthouse on a cliff at sunset",
    "two cats sleeping on a blue sofa",
    "a red sneaker on a white table",
)
#: For the demo family: its grammar, one to four items; the last has an item without a position (the note says
#: where it went).
DEMO_PROMPTS = (
    "three things: a yellow dress in the middle, a white ankle boot on the right and a green pullover at the top",
    "a cyan t-shirt in the top left, a purple sandal in the top right, an orange bag in the bottom left "
    "and some white trousers in the bottom right",
    "a red sneaker in the top left and a blue bag",
)
SIZES = ("360x640", "1280x800")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--random-family", action="store_true", help="the tiny random-weights family")
    parser.add_argument("--preference", default="0.8", help="the quality/speed slider (default 0.8)")
    parser.add_argument("--size", action="append", default=None, help=f"window size (repeat; default {SIZES})")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from edge_server.family import is_family_folder, load_family
    from export.cli import main as export_main
    from lab.demo import DEMO_FAMILY_DIR
    from lab.tiny_family import build_tiny_family
    from tests.device_app.test_app_controller import running_edge
    from tests.device_app.test_app_window import kivy_env

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trained = not args.random_family and is_family_folder(DEMO_FAMILY_DIR)
        family_dir = DEMO_FAMILY_DIR if trained else build_tiny_family(tmp / "tiny-sd")
        prompts = DEMO_PROMPTS if trained else TINY_PROMPTS
        print(f"family: {family_dir}" + ("" if trained else " (random weights: the pictures are textures)"))
        bundle = tmp / "bundle"
        if export_main(["--family", str(family_dir), "--out", str(bundle)]) != 0:
            return 1
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with running_edge(load_family(family_dir), tmp, steps=args.steps) as (url, token_file):
            for size in args.size or SIZES:
                run = tmp / size
                run.mkdir()
                state = run / "state.json"
                cmd = [sys.executable, "-m", "device_app.app.screenshots", "--bundle", str(bundle),
                       "--settings", str(run / "settings.json"), "--server", url, "--token-file", str(token_file),
                       "--out", str(run / "shots"), "--rate", "1", "--preference", args.preference, "--size", size,
                       "--check-layout", "--state", str(state)]
                for prompt in prompts:
                    cmd += ["--prompt", prompt]
                env = kivy_env(tmp)
                env["HOME"] = os.environ.get("HOME", str(tmp))
                if subprocess.run(cmd, env=env, cwd=REPO).returncode != 0:
                    return 1
                problems = {k: v for k, v in json.loads(state.read_text())["layout"].items() if v}
                if problems:
                    print(f"{size}: widgets that do not fit: {json.dumps(problems, indent=1)}", file=sys.stderr)
                    return 1
                for name in ("main", "gallery"):
                    target = out / f"{name}-{size}.png"
                    shutil.copyfile(run / "shots" / f"{name}.png", target)
                    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
