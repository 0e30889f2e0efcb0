"""The device against a malicious edge (tests/device_app/malicious_edge.py): it checks what it
receives against what it asked for, before any ONNX Runtime or Pillow work.

One test per hole a security review found, on real sockets: a handoff far larger than the
plan (and a plan of 500 steps), a PNG bomb, progress frames forever. Then the checks of
:mod:`device_app.expected` on their own. Deterministic: the deadline runs on a fake clock.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

import device_app.client as client_module
from device_app.cli import main
from device_app.client import EdgeClient
from device_app.errors import EdgeError, EdgeMismatch, EdgeTimeout
from device_app.expected import DeviceLimits, check_handoff, check_plan, decode_png, default_size, png_size
from device_app.finish import check_handoff_fits
from device_app.runtime import DeviceBundle
from shared.errors import ConfigError, HandoffError
from shared.handoff import encode_handoff
from shared.protocol import Generate, Plan
from shared.relay_plan import RelayPlan
from tests.device_app.malicious_edge import MaliciousEdge, Turn, handoff_of_shape, png_bomb

N_SIX = RelayPlan(6, 0, "dpmpp_2m", 5.0)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    """Run a test coroutine in a fresh event loop; a hang fails after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def bundle(fp32_bundle_dir: Path) -> DeviceBundle:
    return DeviceBundle(fp32_bundle_dir, threads=1)


@pytest.fixture(autouse=True)
def pillow_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_png lowers Pillow's process-wide bomb limit: give the other tests theirs back."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


@pytest.fixture
def no_ort(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail the request loudly if the client ever hands the payload to the device half."""
    calls: list[Any] = []

    def reached(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise AssertionError("the device half (ORT) was reached")

    monkeypatch.setattr(client_module, "finish_handoff", reached)
    return calls


def send_plan(turn: Turn, plan: RelayPlan, height: int = 32, width: int = 32) -> None:
    turn.conn.send_plan(turn.rid, plan, seed=1, height=height, width=width, scheduler="evil", why="trust me")


def handoff_script(bundle: DeviceBundle, plan: RelayPlan, shape: tuple[int, ...]) -> Any:
    async def script(turn: Turn) -> None:
        send_plan(turn, plan)
        await turn.flush()
        payload = encode_handoff(handoff_of_shape(bundle, plan, shape, request_id=turn.rid))
        turn.conn.send_handoff(turn.rid, payload)
        await turn.flush()

    return script


# --------------------------------------------------------------------------- hole 1: the handoff's size


def test_a_plan_of_500_steps_with_a_batch_of_8_latents_is_refused_at_the_plan(bundle, no_ort):
    """The review's case: (8, 4, 48, 48) with N = 500 against a 16x16 bundle; the welcome allows 1000 steps."""
    plan = RelayPlan(500, 0, "dpmpp_2m", 5.0)

    async def scenario() -> tuple[MaliciousEdge, EdgeError]:
        async with MaliciousEdge(bundle.family_id, handoff_script(bundle, plan, (8, 4, 48, 48))) as edge:
            async with EdgeClient.connect(edge.url, bundle, warm_up=False, rtt_interval_s=None) as client:
                assert client.server_limits.max_steps == 1000
                with pytest.raises(EdgeMismatch) as refused:
                    await client.generate("x")
                await asyncio.sleep(0.2)  # let the cancel reach the edge
            return edge, refused.value

    edge, error = run(scenario())
    assert error.code == "plan_refused" and error.request_id == "r1"
    assert "500 steps, over this device's limit of 100" in str(error) and "\n" not in str(error)
    # The edge is told: a cancel, or (when its handoff had already arrived) a "cancelled" error.
    told = [c.request_id for c in edge.cancels] + [e.request_id for e in edge.errors if e.code == "cancelled"]
    assert told == ["r1"] and not edge.reports
    assert no_ort == []


@pytest.mark.parametrize("shape", [(8, 4, 48, 48), (1, 4, 48, 48), (1, 3, 16, 16), (2, 4, 16, 16)])
def test_a_handoff_latent_other_than_the_plan_announced_is_refused_before_ort(bundle, no_ort, shape):
    async def scenario() -> tuple[MaliciousEdge, EdgeError]:
        async with MaliciousEdge(bundle.family_id, handoff_script(bundle, N_SIX, shape)) as edge:
            async with EdgeClient.connect(edge.url, bundle, warm_up=False, rtt_interval_s=None) as client:
                with pytest.raises(EdgeMismatch) as refused:
                    await client.generate("x")
                await asyncio.sleep(0.2)  # let the error reach the edge
            return edge, refused.value

    edge, error = run(scenario())
    assert error.code == "payload_mismatch" and error.request_id == "r1"
    assert f"latent has shape {shape}, expected (1, 4, 16, 16)" in str(error) and "\n" not in str(error)
    [told] = edge.errors
    assert (told.code, told.request_id) == ("bad_handoff", "r1") and not edge.reports
    assert no_ort == []


def test_the_handoff_the_plan_announced_is_finished(bundle):
    """The control: the same script with the right shape gives an image (the checks refuse only mismatches)."""

    async def scenario() -> Any:
        async with MaliciousEdge(bundle.family_id, handoff_script(bundle, N_SIX, (1, 4, 16, 16))) as edge:
            async with EdgeClient.connect(edge.url, bundle, rtt_interval_s=None) as client:
                result = await client.generate("x")
                await asyncio.sleep(0.2)
            return edge, result

    edge, result = run(scenario())
    assert result.latents.shape == (1, 4, 16, 16) and result.image.shape == (32, 32, 3)
    assert [r.request_id for r in edge.reports] == ["r1"] and not edge.errors


def test_the_cli_prints_a_refused_plan_as_one_line_and_exits_2(bundle, fp32_bundle_dir, tmp_path, capsys, no_ort):
    plan = RelayPlan(500, 0, "dpmpp_2m", 5.0)
    out = tmp_path / "x.png"

    async def scenario() -> int:
        async with MaliciousEdge(bundle.family_id, handoff_script(bundle, plan, (8, 4, 48, 48))) as edge:
            return await asyncio.to_thread(main, [
                "generate", "--server", edge.url, "--bundle", str(fp32_bundle_dir), "--prompt", "x", "--out", str(out),
            ])

    assert run(scenario()) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("rise-device: error: plan_refused: request r1: the server's plan has 500 steps")
    assert not out.exists() and no_ort == []


# --------------------------------------------------------------------------- hole 2: a PNG bomb


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(12000, 12000)


def png_script(png: bytes) -> Any:
    async def script(turn: Turn) -> None:
        send_plan(turn, RelayPlan(3, 3, "dpmpp_2m", 5.0, decode_on="edge"))  # the bundle's default 32x32
        await turn.flush()
        turn.conn.send_result(turn.rid, png)
        await turn.flush()

    return script


def test_a_png_bomb_is_refused_from_its_header_without_decoding(bundle, bomb, monkeypatch):
    decoded: list[Any] = []

    def load(self: Any) -> Any:
        decoded.append(self.size)
        raise AssertionError("Pillow decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    assert len(bomb) < 500_000  # 432 MB of pixels

    async def scenario() -> tuple[MaliciousEdge, EdgeError]:
        async with MaliciousEdge(bundle.family_id, png_script(bomb)) as edge:
            async with EdgeClient.connect(edge.url, bundle, warm_up=False, rtt_interval_s=None) as client:
                with pytest.raises(EdgeMismatch) as refused:
                    await client.generate("x")
                await asyncio.sleep(0.2)
            return edge, refused.value

    edge, error = run(scenario())
    assert error.code == "payload_mismatch" and "PNG is 12000x12000 (width x height), the plan 32x32" in str(error)
    [told] = edge.errors
    assert (told.code, told.request_id) == ("bad_handoff", "r1") and not edge.reports
    assert decoded == []


def test_a_png_of_the_planned_size_is_decoded(bundle):
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(buffer, format="PNG")

    async def scenario() -> Any:
        async with MaliciousEdge(bundle.family_id, png_script(buffer.getvalue())) as edge:
            async with EdgeClient.connect(edge.url, bundle, warm_up=False, rtt_interval_s=None) as client:
                return await client.generate("x")

    result = run(scenario())
    assert result.image.shape == (32, 32, 3) and int(result.image[0, 0, 0]) == 200 and result.latents is None


# --------------------------------------------------------------------------- hole 3: progress forever


def test_progress_frames_do_not_extend_the_requests_deadline(bundle):
    sent: list[int] = []
    ticks = itertools.count(0.0, 1.0)  # one fake second per reading: no real time involved

    async def progress_forever(turn: Turn) -> None:
        send_plan(turn, RelayPlan(6, 3, "dpmpp_2m", 5.0))
        await turn.flush()
        for i in range(5000):  # "forever"; the bound only stops a client that would never give up
            if turn.cancelled.is_set():
                return
            turn.conn.send_progress(turn.rid, i % 3 + 1, 3)
            sent.append(i)
            await turn.flush()
            await asyncio.sleep(0)
        await turn.ws.close()

    async def scenario() -> tuple[MaliciousEdge, EdgeError]:
        async with MaliciousEdge(bundle.family_id, progress_forever) as edge:
            async with EdgeClient.connect(edge.url, bundle, warm_up=False, rtt_interval_s=None, timeout=60.0,
                                          deadline=30.0, clock=lambda: next(ticks)) as client:
                with pytest.raises(EdgeTimeout) as timed_out:
                    await client.generate("x")
                await asyncio.sleep(0.2)
            return edge, timed_out.value

    edge, error = run(scenario())
    assert error.code == "deadline" and isinstance(error, TimeoutError)
    assert "within the 30 s deadline" in str(error) and "\n" not in str(error)
    assert [c.request_id for c in edge.cancels] == ["r1"]
    assert len(sent) < 1000  # about one fake second a frame: the client gave up at 30, long before the edge


def test_a_deadline_must_be_positive():
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="deadline"):
            client_module._checked_deadline(bad)
    assert client_module._checked_deadline(float("inf")) is None and client_module._checked_deadline(None) is None


# --------------------------------------------------------------------------- the checks alone


def request(**fields: Any) -> Generate:
    return Generate(request_id="r1", prompt="x", **fields)


def plan_message(plan: RelayPlan = N_SIX, height: int = 32, width: int = 32) -> Plan:
    return Plan(request_id="r1", plan=plan, seed=1, height=height, width=width, scheduler="evil", why="")


def test_check_plan_against_the_request_and_the_devices_limits(bundle):
    limits = DeviceLimits()
    assert default_size(bundle) == (32, 32)
    check_plan(bundle, request(), plan_message(), limits)
    check_plan(bundle, request(height=64, width=64), plan_message(height=64, width=64), limits)
    cases = [
        (request(), plan_message(height=48, width=48), "plan_conflict", "bundle's default 32x32"),
        (request(height=64, width=64), plan_message(), "plan_conflict", "expected 64x64 as requested"),
        (request(), plan_message(RelayPlan(101, 3)), "plan_refused", "101 steps, over this device's limit of 100"),
        (request(height=4096, width=4096), plan_message(height=4096, width=4096), "plan_refused", "pixels"),
        (request(height=33, width=32), plan_message(height=33, width=32), "plan_refused", "VAE factor 2"),
    ]
    for req, plan, code, words in cases:
        with pytest.raises(EdgeMismatch, match=words) as refused:
            check_plan(bundle, req, plan, limits)
        assert refused.value.code == code
    check_plan(bundle, request(), plan_message(RelayPlan(500, 3)), DeviceLimits(max_steps=500))
    with pytest.raises(ConfigError, match="max_steps"):
        DeviceLimits(max_steps=0)


def test_check_handoff_against_the_plan(bundle):
    good = handoff_of_shape(bundle, N_SIX, (1, 4, 16, 16), request_id="r1")
    check_handoff(bundle, good, plan_message())
    for plan, words in ((plan_message(height=64, width=64), re.escape("expected (1, 4, 32, 32)")),
                        (plan_message(RelayPlan(7, 0)), "num_inference_steps 6, the plan 7")):
        with pytest.raises(EdgeMismatch, match=words):
            check_handoff(bundle, good, plan)
    wide = handoff_of_shape(bundle, N_SIX, (1, 4, 16, 16), request_id="r1")
    object.__setattr__(wide, "cond_embeddings", np.zeros((1, 512, 32), dtype=np.float32))
    with pytest.raises(EdgeMismatch, match="text embeddings have shape"):
        check_handoff(bundle, wide, plan_message())


def test_the_bundle_refuses_a_latent_with_other_channels_on_every_path(bundle):
    handoff = handoff_of_shape(bundle, N_SIX, (1, 3, 16, 16), request_id="r1")
    with pytest.raises(HandoffError, match="expected 4 channels"):
        check_handoff_fits(bundle, handoff)  # offline, rise-relay and rise-eval finish through it too


def test_png_size_reads_the_header_only(bomb):
    assert png_size(bomb) == (12000, 12000)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24)).save(buffer, format="PNG")
    png = buffer.getvalue()
    assert png_size(png) == (40, 24)
    broken_crc = png[:29] + struct.pack(">I", 0) + png[33:]
    zero_width = png[:16] + struct.pack(">I", 0) + png[20:]
    for bad, words in ((png[:20], "no IHDR"), (b"GIF89a" + png[6:], "no IHDR"), (broken_crc, "malformed"),
                       (zero_width, "malformed")):
        with pytest.raises(EdgeMismatch, match=words) as refused:
            png_size(bad)
        assert refused.value.code == "payload_mismatch"


def test_decode_png_checks_the_size_and_lowers_pillows_bomb_limit():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 16), (1, 2, 3)).save(buffer, format="PNG")
    image = decode_png(buffer.getvalue(), plan_message(height=16, width=32), DeviceLimits())
    assert image.shape == (16, 32, 3) and tuple(image[0, 0]) == (1, 2, 3)
    assert Image.MAX_IMAGE_PIXELS == DeviceLimits().max_image_pixels
    with pytest.raises(EdgeMismatch, match="PNG is 32x16"):
        decode_png(buffer.getvalue(), plan_message(height=32, width=32), DeviceLimits())
    with pytest.raises(EdgeMismatch, match="over this device's limit of 256"):
        decode_png(buffer.getvalue(), plan_message(height=16, width=32), DeviceLimits(max_image_pixels=256))
