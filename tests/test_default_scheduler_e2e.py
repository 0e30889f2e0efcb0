"""A default edge on the demo family plans with LinUCB over the profile the family ships: the slider matters.

No flags: ``rise-edge serve --family models/demo/family`` finds ``profile.json`` in the family folder
and serves LinUCB from the profile's prior; the device's quality/speed preference then changes the
configuration it gets (over a real websocket), where the fixed policy gave N=20, K=10 to everyone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from device_app.client import EdgeClient
from device_app.runtime import DeviceBundle
from edge_server.daemon import EdgeConfig, EdgeServer
from edge_server.family import load_family
from export.onnx_export import ExportOptions, export_bundle

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo" / "family"


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    family = load_family(DEMO)
    out = tmp_path_factory.mktemp("demo") / "bundle"
    export_bundle(ExportOptions(family=DEMO, out=out), family=family)
    return family, out


def test_the_slider_changes_the_plan_on_a_default_server(demo_bundle: tuple[object, Path]) -> None:
    family, bundle_dir = demo_bundle
    assert (DEMO / "profile.json").is_file()

    async def main() -> dict[float, object]:
        server = EdgeServer.with_batching_engine(family, EdgeConfig(port=0))  # type: ignore[arg-type]
        port = await server.start()
        try:
            bundle = DeviceBundle(bundle_dir, threads=1)
            plans = {}
            async with EdgeClient.connect(f"ws://127.0.0.1:{port}", bundle) as client:
                for preference in (0.0, 1.0):
                    result = await client.generate("a red sneaker in the top left", preference=preference, seed=1,
                                                   timeout=240)
                    plans[preference] = result.plan
            return plans
        finally:
            await server.stop()

    plans = asyncio.run(main())
    fast, best = plans[0.0], plans[1.0]
    assert fast.scheduler == best.scheduler == "linucb"  # type: ignore[attr-defined]
    assert fast.plan != best.plan  # type: ignore[attr-defined]
    # Speed first asks for no more steps in all than quality first does.
    assert fast.plan.num_inference_steps <= best.plan.num_inference_steps  # type: ignore[attr-defined]
