"""``rise-device generate --preview DIR``: the live preview's frames, from the edge's steps and this device's."""

from __future__ import annotations

import asyncio
import io
import logging

import numpy as np
from PIL import Image

from device_app.cli import main
from tests.device_app.fake_edge import FakeEdge


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_writes_the_edge_and_device_frames(tiny_family, fp32_bundle_dir, tmp_path, capsys):
    frames = tmp_path / "frames"
    edge_png = _png(77)

    async def scenario() -> tuple[int, FakeEdge]:
        async with FakeEdge(tiny_family, preview_png=edge_png) as edge:
            code = await asyncio.to_thread(main, [
                "generate", "--server", edge.url, "--bundle", str(fp32_bundle_dir), "--prompt", "a red bag",
                "--seed", "3", "--steps", "6", "--split", "2", "--out", str(tmp_path / "img.png"),
                "--preview", str(frames), "--preview-every", "2",
            ])
            return code, edge

    code, edge = asyncio.run(asyncio.wait_for(scenario(), 90))
    out = capsys.readouterr().out
    assert code == 0
    assert next(iter(edge.served.values())).request.preview_every == 2  # asked of the edge
    assert sorted(p.name for p in frames.iterdir()) == ["device-004.png", "device-006.png", "edge-002.png"]
    assert (frames / "edge-002.png").read_bytes() == edge_png  # the edge's frame as it sent it
    device_frame = np.asarray(Image.open(frames / "device-006.png"))
    latent_side = np.asarray(Image.open(tmp_path / "img.png")).shape[0] // tiny_family.vae_scale_factor
    assert device_frame.shape == (latent_side, latent_side, 3)  # drawn here, from the device's own x0
    assert "wrote 3 preview frames" in out and "1 from the edge, 2 from this device" in out


def test_no_preview_flag_asks_the_edge_for_none(tiny_family, fp32_bundle_dir, tmp_path):
    async def scenario() -> FakeEdge:
        async with FakeEdge(tiny_family, preview_png=_png(5)) as edge:
            code = await asyncio.to_thread(main, [
                "generate", "--server", edge.url, "--bundle", str(fp32_bundle_dir), "--prompt", "a red bag",
                "--steps", "4", "--split", "2", "--out", str(tmp_path / "img.png"),
            ])
            assert code == 0
            return edge

    edge = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert next(iter(edge.served.values())).request.preview_every is None


def test_a_first_release_edge_is_asked_no_previews_and_the_device_still_draws_its_own(
        tiny_family, fp32_bundle_dir, tmp_path, caplog):
    """An edge of protocol version 1 refuses a request with preview_every: it is not asked, and the user is told."""
    frames = tmp_path / "frames"

    async def scenario() -> tuple[int, FakeEdge]:
        async with FakeEdge(tiny_family, preview_png=_png(9), versions=(1,)) as edge:
            code = await asyncio.to_thread(main, [
                "generate", "--server", edge.url, "--bundle", str(fp32_bundle_dir), "--prompt", "a red bag",
                "--seed", "3", "--steps", "6", "--split", "2", "--out", str(tmp_path / "img.png"),
                "--preview", str(frames), "--preview-every", "2",
            ])
            return code, edge

    with caplog.at_level(logging.WARNING, logger="rise.device.client"):
        code, edge = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert code == 0
    assert next(iter(edge.served.values())).request.preview_every is None  # not asked of it
    assert sorted(p.name for p in frames.iterdir()) == ["device-004.png", "device-006.png"]
    [said] = [r.getMessage() for r in caplog.records if "previews" in r.getMessage()]
    assert "speaks protocol version 1: it sends no live previews of its steps (this device still draws its own)" \
        in said
