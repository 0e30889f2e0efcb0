"""The Kivy app in a real window (SDL2 offscreen), each run in a subprocess: Kivy's window is process-global.

The subprocess (``python -m device_app.app.screenshots``) types a prompt, presses Generate,
waits for the Clock to deliver the result, screenshots the main screen, presses a rating,
opens the gallery and screenshots it, and writes what the widgets showed to a JSON file.
The subprocess cannot import torch (blocked, as on a phone); the edge daemon runs here.

Needs Kivy's pip wheel (the ``device`` extra) and an OpenGL driver (Mesa's
``libgl1-mesa-dri`` on Debian; llvmpipe renders offscreen without a GPU or display). The
tests skip, saying why, when Kivy cannot open a window on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.device_app.test_app_controller import running_edge
from tests.helpers import NO_TORCH_PRELUDE

REPO = Path(__file__).resolve().parents[2]

# Runs the driver with torch & co. blocked, like the no-torch device test.
LAUNCHER = NO_TORCH_PRELUDE + textwrap.dedent(
    """
    import runpy, sys

    sys.argv = ["screenshots", *sys.argv[1:]]
    runpy.run_module("device_app.app.screenshots", run_name="__main__")
    """
)

#: Upper bound for the app's whole run (it waits on frames and replies, never on the clock): only a hang reaches it.
WAIT_S = 300.0

PROBE = "from kivy.core.window import Window; import sys; sys.exit(0 if Window is not None else 4)"


def kivy_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIVY_", "SDL_"))}
    kivy_home = tmp / "kivy-home"
    kivy_home.mkdir(exist_ok=True)
    env.update(SDL_VIDEODRIVER="offscreen", KIVY_HOME=str(kivy_home), KIVY_NO_ARGS="1", KIVY_LOG_MODE="PYTHON",
               PYTHONPATH=str(REPO), HOME=str(tmp))
    return env


@pytest.fixture(scope="module")
def window_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    pytest.importorskip("kivy", reason="Kivy is not installed (pip install -e '.[device]')")
    env = kivy_env(tmp_path_factory.mktemp("kivy-probe"))
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=WAIT_S)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        pytest.skip(f"Kivy cannot open an offscreen SDL2 window here (install an OpenGL driver, e.g. "
                    f"apt-get install libgl1-mesa-dri): {tail}")
    return env


def drive(env: dict[str, str], tmp_path: Path, bundle: Path, *args: str) -> dict[str, Any]:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "shots"
    state = out / "state.json"
    cmd = [sys.executable, str(launcher), "--bundle", str(bundle), "--settings", str(tmp_path / "settings.json"),
           "--out", str(out), "--state", str(state), "--offline-steps", "2", "4", "--timeout", str(WAIT_S),
           # The app's 5 s open timeout would send a loaded machine's local edge job offline: wait on the edge instead.
           "--open-timeout", str(WAIT_S), *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S + 300)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert state.exists(), f"the app wrote no state (exit {proc.returncode}):\n{log}"
    data = json.loads(state.read_text())
    assert proc.returncode == 0 and data["ok"], f"{data.get('error')}\n{log}"
    assert "is not installed on the device" not in log
    return data


def image_area(png: Path, rect: list[float]) -> np.ndarray:
    """The pixels where the app drew the result (``rect`` in window coordinates, origin bottom-left)."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    height = pixels.shape[0]
    x, y, w, h = (int(round(v)) for v in rect)
    area = pixels[height - (y + h) + 2: height - y - 2, x + 2: x + w - 2]
    assert area.size, f"empty image area {rect} in a {pixels.shape} screenshot"
    return area


def check_screens(data: dict[str, Any], shots: Path) -> dict[str, Any]:
    main, gallery = shots / "main.png", shots / "gallery.png"
    finished = data["phases"]["finished"]
    assert Image.open(main).size == tuple(finished["window_size"])
    area = image_area(main, finished["image_rect"])
    assert area.std() > 10, "the image area is blank"
    whole = np.asarray(Image.open(main).convert("L"), dtype=np.float64)
    assert whole.std() > 10, "the screenshot is blank"
    assert finished["texture_size"] and finished["generate_text"] == "Generate" and not finished["generate_disabled"]
    assert finished["progress_value"] == finished["progress_max"] > 0
    assert data["phases"]["gallery"]["gallery_cells"] == finished["history"] >= 1
    assert np.asarray(Image.open(gallery).convert("L"), dtype=np.float64).std() > 10
    return finished


def test_window_generates_through_a_local_edge(window_env, tiny_family, fp32_bundle_dir, tmp_path):
    with running_edge(tiny_family, tmp_path) as (url, token_file):
        data = drive(window_env, tmp_path, fp32_bundle_dir, "--server", url, "--token-file", str(token_file),
                     "--prompt", "a red bag", "--rate", "1")
    finished = check_screens(data, tmp_path / "shots")
    assert finished["status"].startswith("Done in") and "(edge + device)" in finished["status"]
    assert finished["progress_text"] == "edge 2/2 · device 2/2"
    assert finished["result_prompt"] == "a red bag"
    assert finished["result_text"].startswith("N=4 K=2 (edge 2 · device 2 steps), dpmpp_2m, guidance 5")
    assert "chosen by fixed" in finished["result_text"] and "edge " in finished["result_text"].splitlines()[-1]
    assert finished["link"].startswith("edge: connected")
    rated = data["phases"]["rated"]
    assert rated["status"] == "Rating sent to the edge" and rated["rate_up"] == "down"


def test_window_falls_back_to_the_device_when_the_edge_is_unreachable(window_env, fp32_bundle_dir, tmp_path):
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    data = drive(window_env, tmp_path, fp32_bundle_dir, "--server", "ws://127.0.0.1:9", "--prompt", "a green hat",
                 "--preference", "1.0")
    finished = check_screens(data, tmp_path / "shots")
    assert "device only (offline): edge unreachable" in finished["status"]
    assert finished["result_text"].startswith("device only (offline): N=4 K=0")
    assert finished["progress_text"] == "edge — · device 4/4"
    assert finished["link"] == "edge: offline (device only)"
    assert any("generate 'a green hat'" in e for e in data["events"])
