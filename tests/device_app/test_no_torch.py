"""The device path runs where torch cannot be imported (a phone or laptop has none)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.relay import EdgeRelay
from shared.handoff import decode_handoff, encode_handoff
from shared.relay_plan import RelayPlan
from tests.helpers import NO_TORCH_PRELUDE

REPO = Path(__file__).resolve().parents[2]

DEVICE_SCRIPT = NO_TORCH_PRELUDE + textwrap.dedent(
    """
    import sys
    import numpy as np
    from device_app.finish import finish_latents
    from device_app.runtime import DeviceBundle
    from shared.handoff import decode_handoff

    bundle_dir, payload_path, out_path = sys.argv[1:4]
    bundle = DeviceBundle(bundle_dir)
    handoff = decode_handoff(open(payload_path, "rb").read(), expected_family=bundle.family_id)
    latents = finish_latents(bundle, handoff)
    image = bundle.decode(latents)
    np.save(out_path, latents)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "transformers"})
    print("heavy modules loaded:", loaded)
    assert not loaded, loaded
    """
)


def test_device_path_runs_without_torch(tiny_family, fp32_bundle_dir, tmp_path):
    plan = RelayPlan(5, 2, "dpmpp_2m", 5.0)
    handoff = EdgeRelay(tiny_family).start("a blue bag", plan, seed=7)
    payload = tmp_path / "handoff.safetensors"
    payload.write_bytes(encode_handoff(handoff))
    script = tmp_path / "device.py"
    script.write_text(DEVICE_SCRIPT)
    out = tmp_path / "latents.npy"
    proc = subprocess.run(
        [sys.executable, str(script), str(fp32_bundle_dir), str(payload), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "heavy modules loaded: []" in proc.stdout
    in_process = finish_latents(DeviceBundle(fp32_bundle_dir), decode_handoff(payload.read_bytes()))
    np.testing.assert_array_equal(np.load(out), in_process)


def test_blocker_really_blocks_torch(tmp_path):
    """The subprocess guard above would catch a torch import (so the test can fail)."""
    script = tmp_path / "probe.py"
    script.write_text(DEVICE_SCRIPT.split("import numpy")[0] + "import torch\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not installed on the device" in proc.stderr


def test_no_torch_import_in_device_or_shared_sources():
    import ast

    heavy = {"torch", "diffusers", "transformers", "optimum"}
    offenders = []
    for path in [*REPO.joinpath("device_app").rglob("*.py"), *REPO.joinpath("shared").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in heavy]
    assert offenders == []
