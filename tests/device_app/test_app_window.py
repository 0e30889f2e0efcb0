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

import io
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

from device_app.app.backends import APP_PREVIEW_EVERY
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


def drive(env: dict[str, str], tmp_path: Path, bundle: Path | None, *args: str, out: str = "shots",
          expect_ok: bool = True) -> dict[str, Any]:
    """Run the driver (``bundle`` None: the one already in the settings) and return what the widgets showed."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    shots = tmp_path / out
    state = shots / "state.json"
    cmd = [sys.executable, str(launcher), "--settings", str(tmp_path / "settings.json"),
           "--out", str(shots), "--state", str(state), "--offline-steps", "2", "4", "--timeout", str(WAIT_S),
           # The app's 5 s open timeout would send a loaded machine's local edge job offline: wait on the edge instead.
           "--open-timeout", str(WAIT_S), *args]
    if bundle is not None:
        cmd += ["--bundle", str(bundle)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S + 300)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert state.exists(), f"the app wrote no state (exit {proc.returncode}):\n{log}"
    data = json.loads(state.read_text())
    if expect_ok:
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


def assert_fits(data: dict[str, Any], *phases: str) -> None:
    """No widget outside the window, outside its row, overlapping a sibling or cut off, on every screen checked."""
    layout = data["layout"]
    for phase in phases:
        assert phase in layout, f"no layout check for {phase!r}: {sorted(layout)}"
        assert layout[phase] == [], f"{phase} at {data['final']['window_size']}:\n" + "\n".join(layout[phase])


SIZES = ["360x640", "1280x800"]


@pytest.mark.parametrize("size", SIZES)
def test_window_fits_and_generates_through_a_local_edge(window_env, tiny_family, fp32_bundle_dir, tmp_path, size):
    with running_edge(tiny_family, tmp_path) as (url, token_file):
        data = drive(window_env, tmp_path, fp32_bundle_dir, "--server", url, "--token-file", str(token_file),
                     "--prompt", "a red bag", "--rate", "1", "--size", size, "--check-layout", "--preference", "0.6")
    assert data["final"]["window_size"] == [int(v) for v in size.split("x")]
    assert data["final"]["wide"] is (size == "1280x800")  # one column on the phone, side by side on the desktop
    assert_fits(data, "start", "finished", "details", "gallery", "settings")
    finished = check_screens(data, tmp_path / "shots")
    assert data["phases"]["start"]["link"] == "connected"  # connected at start, before any Generate
    assert finished["status"].startswith("Done in")
    assert finished["progress_text"] == "server 2/2 · this device 2/2"
    assert finished["result_prompt"] == "a red bag"
    # Plain words on the main line; N, K, the scheduler and the load only behind Details.
    assert finished["result_text"].splitlines()[0] == "2 steps on the server, 2 on this device — the server's fixed split"
    assert "N=" not in finished["result_text"] and "load" not in finished["result_text"]
    assert finished["details"] == ""
    details = data["phases"]["details"]["details"]
    assert details.startswith("N=4 K=2 (edge 2 · device 2 steps) · dpmpp_2m · guidance 5") and "scheduler fixed" in details
    assert finished["link"] == "connected"
    rated = data["phases"]["rated"]
    assert rated["status"] == "Rating sent to the server" and rated["rate_up"] == "down"


def test_window_cancels_and_the_edge_is_told(window_env, tiny_family, fp32_bundle_dir, tmp_path):
    from tests.device_app.test_app_controller import TOKEN, NotifyingList, fake_edge

    with fake_edge(tiny_family, stall=True) as edge:  # plans, then sends nothing: the request stays in progress
        edge.cancels = cancels = NotifyingList()
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        data = drive(window_env, tmp_path, fp32_bundle_dir, "--server", edge.url, "--token-file", str(token_file),
                     "--cancel", "a red bag", "--size", "360x640", "--check-layout")
        assert cancels.added.wait(WAIT_S), "the edge was never told"
        assert [c.request_id for c in edge.cancels] == list(edge.served)
    assert any("cancel: button 'Cancel'" in e for e in data["events"])  # the button read Cancel while busy
    cancelled = data["phases"]["cancelled"]
    assert cancelled["status"] == "Cancelled" and cancelled["generate_text"] == "Generate"
    assert not cancelled["generate_disabled"] and cancelled["history"] == 0 and cancelled["progress_text"] == ""
    assert_fits(data, "busy", "cancelled", "gallery")


def test_window_shows_the_live_preview_before_the_image(window_env, tiny_family, fp32_bundle_dir, tmp_path):
    import asyncio

    from tests.device_app.test_app_controller import TOKEN, fake_edge

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (230, 20, 20), np.uint8)).save(buffer, format="PNG")  # a red preview
    # The edge runs its steps (a preview on every 2nd), then holds the handoff: the image never comes.
    with fake_edge(tiny_family, preview_png=buffer.getvalue(), hold_handoff=lambda: asyncio.sleep(3600)) as edge:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        data = drive(window_env, tmp_path, fp32_bundle_dir, "--server", edge.url, "--token-file", str(token_file),
                     "--cancel", "a red bag", "--preview-shot", "--size", "360x640", "--check-layout")
        assert [s.request.preview_every for s in edge.served.values()] == [APP_PREVIEW_EVERY]  # the app asked
    preview = data["phases"]["preview"]
    assert preview["generate_text"] == "Cancel" and preview["history"] == 0  # still busy, no image yet
    area = image_area(tmp_path / "shots" / "preview.png", preview["image_rect"])
    red, green, blue = (area[..., i].mean() for i in range(3))
    assert red > 150 and green < 80 and blue < 80, (red, green, blue)  # the preview fills the image area
    assert_fits(data, "busy", "preview", "cancelled")


def test_window_gallery_after_a_restart(window_env, fp32_bundle_dir, tmp_path):
    first = drive(window_env, tmp_path, fp32_bundle_dir, "--server", "", "--prompt", "a red bag",
                  "--prompt", "a blue hat", "--seed", "11", "--size", "360x640", out="first")
    assert first["final"]["history_prompts"] == ["a blue hat", "a red bag"]
    files = sorted((tmp_path / "gallery").glob("*.png"))
    assert len(files) == 2
    text = Image.open(files[0]).text  # as other diffusion tools write theirs
    assert "Seed: 11" in text["parameters"] and json.loads(text["rise"])["seed"] == 11
    # A new app process on the same settings: the gallery is there, with its parameters, and re-opens.
    again = drive(window_env, tmp_path, None, "--open-first", "--size", "1280x800", "--check-layout", out="again")
    start = again["phases"]["start"]
    assert start["history_prompts"] == ["a blue hat", "a red bag"] and start["history_seeds"] == [11, 11]
    assert start["gallery_button"] == "Gallery (2)" and again["phases"]["gallery"]["gallery_cells"] == 2
    reopened = again["phases"]["reopened"]
    assert reopened["result_prompt"] == "a blue hat" and reopened["texture_size"]
    assert reopened["result_text"].startswith("all 3 steps on this device — no server set")
    assert image_area(Path(again["gallery_png"]), [0, 0, 1280, 800]).std() > 10
    assert_fits(again, "start", "gallery", "reopened", "settings")


def test_a_bad_bundle_is_refused_at_start(window_env, fp32_bundle_dir, tmp_path):
    launcher = tmp_path / "app.py"
    launcher.write_text(NO_TORCH_PRELUDE + "import sys\nfrom device_app.app.app import main\nsys.exit(main())\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    for bundle, why in ((tmp_path / "missing", "does not exist"), (broken, "not valid JSON")):
        proc = subprocess.run([sys.executable, str(launcher), "--bundle", str(bundle), "--settings",
                               str(tmp_path / "settings.json")], env=window_env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=WAIT_S)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith(f"rise-device app: error: --bundle {bundle} is not a usable bundle") and why in lines[-1]
        assert not (tmp_path / "settings.json").exists()  # nothing remembered
    # A remembered bundle that went bad: the app opens, says so and offers Settings; Generate is off.
    (tmp_path / "settings.json").write_text(json.dumps({"bundle": str(tmp_path / "missing")}))
    data = drive(window_env, tmp_path, None, "--size", "360x640", "--check-layout")
    start = data["phases"]["start"]
    assert "No usable bundle — choose one in Settings" in start["status"] and start["generate_disabled"]
    assert_fits(data, "start", "gallery", "settings")


LAYOUT_PROBE = textwrap.dedent(
    """
    import json, sys
    from kivy.config import Config
    Config.set("graphics", "width", "300")
    Config.set("graphics", "height", "200")
    from kivy.app import App
    from kivy.clock import Clock
    from kivy.core.window import Window
    from kivy.uix.boxlayout import BoxLayout
    from kivy.uix.button import Button
    from kivy.uix.label import Label
    from device_app.app.layout_check import layout_problems

    class Probe(App):
        def build(self):
            root = BoxLayout(orientation="vertical")
            row = BoxLayout(size_hint_y=None, height=40)
            row.add_widget(Button(text="wide", size_hint_x=None, width=200))
            row.add_widget(Button(text="too", size_hint_x=None, width=200))  # 400 px in a 300 px row
            root.add_widget(row)
            squeezed = BoxLayout(size_hint_y=None, height=40, spacing=-30)  # siblings drawn over each other
            squeezed.add_widget(Button(text="a"))
            squeezed.add_widget(Button(text="b"))
            root.add_widget(squeezed)
            root.add_widget(Label(text="a title cut to one letter", size_hint=(None, None), size=(20, 20)))
            root.add_widget(Label(text="fits"))
            return root

        def on_start(self):
            start = Clock.frames_displayed

            def check(_dt):  # once a few frames are laid out and drawn (frames, not seconds)
                if Clock.frames_displayed < start + 5:
                    return True
                print("PROBLEMS " + json.dumps(layout_problems(self.root, tuple(Window.size))))
                self.stop()
                return False
            Clock.schedule_interval(check, 0)

    Probe().run()
    """
)


def test_the_layout_check_finds_what_does_not_fit(window_env, tmp_path):
    """The geometry check the tests above rely on: it names a row that overflows, overlapping siblings, cut text."""
    probe = tmp_path / "probe.py"
    probe.write_text(LAYOUT_PROBE)
    proc = subprocess.run([sys.executable, str(probe)], env=window_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=WAIT_S)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEMS ")]
    assert lines, proc.stdout + proc.stderr
    problems = json.loads(lines[-1].removeprefix("PROBLEMS "))
    assert any("Button 'too'" in p and "outside its parent BoxLayout" in p for p in problems), problems
    assert any("Button 'too'" in p and "outside the window" in p for p in problems), problems
    assert any("Button 'a'" in p and "overlaps Button 'b'" in p for p in problems), problems
    assert any("'a title cut to one letter'" in p and "larger than the widget" in p for p in problems), problems
    assert not any("'fits'" in p or "Button 'wide'" in p for p in problems), problems
