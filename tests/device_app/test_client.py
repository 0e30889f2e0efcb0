"""The device client against a real websocket server on 127.0.0.1 (tests/device_app/fake_edge.py).

Every test runs its own event loop with ``asyncio.run`` (no pytest-asyncio), bounded by
a timeout so a hang fails instead of blocking the suite. The CLI's ``main`` runs its own
loop, so the tests call it in a worker thread while the server runs in theirs.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from device_app.cli import main
from device_app.client import EdgeClient
from device_app.errors import DeviceRunError, EdgeConnectionError, EdgeError, EdgeTimeout
from device_app.finish import finish_latents
from device_app.results import GenerationResult
from device_app.runtime import DeviceBundle
from device_app.telemetry import DeviceLoad, Ewma, LinkEstimator, busy_fraction
from edge_server.relay import EdgeRelay
from shared.errors import RiseError
from shared.relay_plan import RelayPlan
from tests.device_app.fake_edge import FakeEdge
from tests.helpers import NO_TORCH_PRELUDE

TOKEN = "s3cret-token"
REPO = Path(__file__).resolve().parents[2]


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    """Run a test coroutine in a fresh event loop; a hang fails after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def bundle(fp32_bundle_dir: Path) -> DeviceBundle:
    return DeviceBundle(fp32_bundle_dir, threads=1)


def in_process(family: Any, bundle: DeviceBundle, prompt: str, result: GenerationResult) -> np.ndarray:
    """The final latent of the same request relayed in one process (no network)."""
    handoff = EdgeRelay(family).start(prompt, result.plan.plan, result.plan.seed, request_id=result.request_id)
    return finish_latents(bundle, handoff)


# --------------------------------------------------------------------------- end to end


def test_one_generation_equals_the_in_process_relay(tiny_family, bundle):
    plans, progress = [], []

    async def scenario() -> tuple[FakeEdge, GenerationResult]:
        async with FakeEdge(tiny_family, token=TOKEN) as edge:
            async with EdgeClient.connect(edge.url, bundle, token=TOKEN, client_name="test") as client:
                assert client.welcome.family_id == bundle.family_id
                assert client.link.rtt_s is not None  # measured at connect, so the request carries it
                result = await client.generate(
                    "a red sneaker", seed=11, preference=0.3,
                    on_plan=lambda plan, why: plans.append((plan, why)),
                    on_progress=lambda *event: progress.append(event),
                )
                await client.rate(result.request_id, 1)
                await asyncio.sleep(0.2)  # let the report and rating reach the server
            return edge, result

    edge, result = run(scenario())
    ref = in_process(tiny_family, bundle, "a red sneaker", result)
    assert np.abs(result.latents - ref).max() <= 1e-4
    np.testing.assert_array_equal(result.image, bundle.decode(ref)[0])
    assert result.image.shape == (32, 32, 3) and result.image.dtype == np.uint8

    plan = result.plan.plan
    assert plans == [(plan, result.plan.why)] and result.plan.seed == 11
    assert progress == [("edge", s, plan.split) for s in range(1, plan.split + 1)] + [
        ("device", s, plan.num_inference_steps) for s in range(plan.split + 1, plan.num_inference_steps + 1)
    ]
    served = edge.served[result.request_id]
    assert served.request.preference == 0.3 and served.request.rtt_s is not None
    assert result.payload_bytes == served.payload_bytes > 0

    t = result.timings
    assert t.queue_s is not None and t.edge_compute_s is not None
    assert min(t.edge_wait_s, t.transfer_s, t.handoff_decode_s, t.device_compute_s, t.decode_s) >= 0
    assert t.total_latency_s >= t.edge_wait_s + t.device_compute_s + t.decode_s
    [report] = edge.reports
    assert report == result.report and report.request_id == result.request_id
    assert report.device_compute_s == pytest.approx(t.device_compute_s + t.decode_s)
    assert report.total_latency_s == t.total_latency_s and report.rtt_s is not None
    assert [(r.request_id, r.rating) for r in edge.ratings] == [(result.request_id, 1)]


def test_eight_concurrent_clients_all_get_correct_images(tiny_family, bundle):
    prompts = [f"object number {i}" for i in range(8)]

    async def one_device(url: str, i: int) -> list[GenerationResult]:
        async with EdgeClient.connect(url, bundle, token=TOKEN, client_name=f"device-{i}") as client:
            if i == 0:  # two requests in flight on one connection
                return list(await asyncio.gather(
                    client.generate(prompts[0], seed=100), client.generate(prompts[0], seed=200)
                ))
            return [await client.generate(prompts[i], seed=100 + i)]

    async def scenario() -> tuple[FakeEdge, list[list[GenerationResult]]]:
        async with FakeEdge(tiny_family, token=TOKEN) as edge:
            results = await asyncio.gather(*(one_device(edge.url, i) for i in range(8)))
            await asyncio.sleep(0.2)
            return edge, results

    edge, results = run(scenario())
    assert edge.connections == 8 and len(edge.reports) == 9
    for i, per_client in enumerate(results):
        for result in per_client:
            ref = in_process(tiny_family, bundle, prompts[i], result)
            assert np.abs(result.latents - ref).max() <= 1e-4, (i, result.request_id)
    first, second = results[0]
    assert {first.request_id, second.request_id} == {"r1", "r2"} and {first.plan.seed, second.plan.seed} == {100, 200}


def test_edge_decoded_result_arrives_as_png(tiny_family, bundle):
    plan = RelayPlan(3, 3, "dpmpp_2m", 5.0, decode_on="edge")

    async def scenario() -> GenerationResult:
        async with FakeEdge(tiny_family) as edge, EdgeClient.connect(edge.url, bundle) as client:
            return await client.generate("a blue bag", seed=5, pinned=plan)

    result = run(scenario())
    assert result.latents is None and result.png is not None and result.decode_on == "edge"
    np.testing.assert_array_equal(result.image, np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB")))
    handoff = EdgeRelay(tiny_family).start("a blue bag", plan, 5)
    on_device = bundle.decode(handoff.latents)[0].astype(int)  # torch VAE on the edge vs ORT here: rounding apart
    assert np.abs(result.image.astype(int) - on_device).max() <= 2


# --------------------------------------------------------------------------- refusals and failures


def test_missing_or_wrong_token_and_another_family_are_refused(tiny_family, bundle):
    async def scenario() -> list[EdgeError]:
        errors = []
        async with FakeEdge(tiny_family, token=TOKEN) as edge:
            for token in (None, "wrong-token"):
                with pytest.raises(EdgeConnectionError) as info:
                    await EdgeClient.open(edge.url, bundle, token=token)
                errors.append(info.value)
        async with FakeEdge(tiny_family, family_id="another-family") as edge:
            with pytest.raises(EdgeConnectionError) as info:
                await EdgeClient.open(edge.url, bundle)
            errors.append(info.value)
        return errors

    *unauthorized, wrong_family = run(scenario())
    for error in unauthorized:
        assert error.code == "unauthorized" and "token" in str(error)
        assert isinstance(error, RiseError)
    assert wrong_family.code == "wrong_family" and "another-family" in str(wrong_family)


def test_a_server_error_fails_one_request_and_the_connection_keeps_working(tiny_family, bundle):
    retries = []

    async def scenario() -> None:
        async with FakeEdge(tiny_family, busy_first=1) as edge, EdgeClient.connect(edge.url, bundle) as client:
            with pytest.raises(EdgeError) as busy:
                await client.generate("x", seed=1)
            assert busy.value.code == "busy" and busy.value.retry_after_s == pytest.approx(0.05)
            assert busy.value.retryable and not busy.value.local

            with pytest.raises(EdgeError) as refused:  # a server-side policy: the client cannot know
                await client.generate("x", steps=1)
            assert refused.value.code == "invalid_request" and refused.value.field == "steps"
            assert not refused.value.local and not refused.value.retryable

            with pytest.raises(EdgeError) as local:  # over the welcome's max_steps: never sent
                await client.generate("x", steps=client.server_limits.max_steps + 1)
            assert local.value.code == "invalid_request" and local.value.local
            assert len(edge.served) == 0  # busy/refused before a plan, the local one never arrived

            result = await client.generate("x", steps=4, seed=2)  # same connection, still fine
            assert result.plan.plan.num_inference_steps == 4 and result.latents is not None

            edge._busy_left = 2
            result = await client.generate_with_retry(
                "x", seed=3, attempts=3, on_retry=lambda error, delay: retries.append((error.code, delay))
            )
            assert result.plan.seed == 3

    run(scenario())
    # At least the server's retry-after, then backed off (x2) with up to 50 % jitter.
    assert [code for code, _ in retries] == ["busy", "busy"]
    assert 0.05 <= retries[0][1] <= 0.075 and 0.1 <= retries[1][1] <= 0.15


def test_server_vanishing_mid_request_fails_fast_with_a_clear_error(tiny_family, bundle):
    async def scenario() -> float:
        async with FakeEdge(tiny_family, vanish_after_plan=True) as edge:
            async with EdgeClient.connect(edge.url, bundle, timeout=30.0) as client:
                started = asyncio.get_running_loop().time()
                with pytest.raises(EdgeConnectionError) as lost:
                    await client.generate("x", seed=1)
                elapsed = asyncio.get_running_loop().time() - started
                assert lost.value.code == "connection_lost" and "lost" in str(lost.value)
                assert client.closed
                with pytest.raises(EdgeConnectionError):  # later requests fail at once, too
                    await client.generate("x")
        return elapsed

    assert run(scenario(), timeout=20) < 5.0  # the loss is noticed, not waited out (timeout=30 s)


def test_a_silent_server_times_out_and_the_request_is_cancelled(tiny_family, bundle):
    async def scenario() -> FakeEdge:
        async with FakeEdge(tiny_family, stall=True) as edge:
            async with EdgeClient.connect(edge.url, bundle, timeout=0.5) as client:
                with pytest.raises(EdgeTimeout) as timed_out:
                    await client.generate("x")
                assert timed_out.value.code == "timeout" and isinstance(timed_out.value, TimeoutError)
                assert "payload" in str(timed_out.value)  # the plan came, then nothing
                await asyncio.sleep(0.2)
            return edge

    edge = run(scenario(), timeout=20)
    assert [c.request_id for c in edge.cancels] == ["r1"]


def test_a_plan_that_says_the_edge_loads_its_family_first_is_shown_and_waited_for(tiny_family, bundle):
    async def scenario() -> tuple[list[float], str, GenerationResult]:
        async with FakeEdge(tiny_family, stall=True, loading_s=0.25) as edge:
            async with EdgeClient.connect(edge.url, bundle, timeout=0.25) as client:
                told: list[float] = []
                with pytest.raises(EdgeTimeout) as timed_out:  # it stays silent: the wait is the load's longer
                    await client.generate("x", on_loading=told.append)
        async with FakeEdge(tiny_family, loading_s=3.0) as edge:
            async with EdgeClient.connect(edge.url, bundle) as client:
                result = await client.generate("x")
        return told, str(timed_out.value), result

    told, message, result = run(scenario(), timeout=30)
    assert told == [0.25]
    assert "sent nothing for 0.5 s" in message and "load the family first, ~0.25 s" in message
    assert result.plan.loading_s == 3.0 and result.image.std() > 0  # no callback: nothing else changes


def test_a_device_failure_is_raised_and_reported_to_the_edge(tiny_family, bundle, monkeypatch):
    import device_app.finish as client_module  # where the client's device half runs the steps

    calls = []

    def failing_once(*args: Any, **kwargs: Any) -> np.ndarray:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("ORT exploded")
        return finish_latents(*args, **kwargs)

    monkeypatch.setattr(client_module, "finish_latents", failing_once)

    async def scenario() -> FakeEdge:
        async with FakeEdge(tiny_family) as edge, EdgeClient.connect(edge.url, bundle) as client:
            with pytest.raises(DeviceRunError, match="ORT exploded") as failed:
                await client.generate("x", seed=1)
            assert failed.value.request_id == "r1" and isinstance(failed.value, RiseError)
            assert (await client.generate("x", seed=1)).latents is not None  # the connection carries on
            await asyncio.sleep(0.2)
            return edge

    edge = run(scenario())
    [error] = edge.client_errors
    assert (error.code, error.request_id) == ("internal", "r1") and "ORT exploded" in error.message
    assert [r.request_id for r in edge.reports] == ["r2"]


def test_connection_refused_is_a_connect_error(bundle):
    async def scenario() -> None:
        with pytest.raises(EdgeConnectionError) as info:
            await EdgeClient.open("ws://127.0.0.1:9", bundle, open_timeout=5)
        assert info.value.code == "connect_failed" and "127.0.0.1:9" in str(info.value)

    run(scenario())


# --------------------------------------------------------------------------- CLI


def write_token(path: Path, token: str, mode: int = 0o600) -> Path:
    path.write_text(f"  {token}\n")
    os.chmod(path, mode)
    return path


def test_cli_generate_writes_a_png_and_prints_the_timings(tiny_family, fp32_bundle_dir, tmp_path, capsys):
    token_file = write_token(tmp_path / "token", TOKEN)
    out = tmp_path / "img.png"

    async def scenario() -> int:
        async with FakeEdge(tiny_family, token=TOKEN, loading_s=2.5) as edge:  # its family still to load
            return await asyncio.to_thread(main, [
                "generate", "--server", edge.url, "--bundle", str(fp32_bundle_dir), "--token-file", str(token_file),
                "--prompt", "a red sneaker", "--seed", "3", "--preference", "0.8", "--out", str(out),
            ])

    assert run(scenario()) == 0
    stdout, stderr = capsys.readouterr()
    print(stdout)
    assert stderr == ""
    assert "plan: N=6 K=3" in stdout and "why: fixed policy" in stdout
    assert "edge: loading the family first (~2.5 s)" in stdout
    assert "progress: edge 3/3 | device 3/3" in stdout
    for label in ("queue (edge)", "edge compute", "transfer", "device compute", "decode (VAE)", "total latency"):
        assert label in stdout
    assert "handoff: 17," in stdout and "bytes" in stdout
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)


def test_cli_refused_token_and_bad_arguments_exit_2(tiny_family, fp32_bundle_dir, tmp_path, capsys):
    token_file = write_token(tmp_path / "token", "wrong-token", mode=0o644)
    common = ["--bundle", str(fp32_bundle_dir), "--prompt", "x", "--out", str(tmp_path / "x.png")]

    async def scenario() -> list[int]:
        async with FakeEdge(tiny_family, token=TOKEN) as edge:
            server = ["generate", "--server", edge.url, *common]
            return [
                await asyncio.to_thread(main, [*server, "--token-file", str(token_file)]),
                await asyncio.to_thread(main, server),
                await asyncio.to_thread(main, [*server, "--split", "2"]),
            ]

    codes = run(scenario())
    stderr = capsys.readouterr().err.splitlines()
    assert codes == [2, 2, 2]
    assert "readable by every user" in stderr[0]  # a world-readable token file: warned, still used
    assert stderr[1].startswith("rise-device: error: unauthorized:")
    assert stderr[2].startswith("rise-device: error: unauthorized:")
    assert stderr[3] == "rise-device: error: --split needs --steps: give both to pin a configuration"
    assert not (tmp_path / "x.png").exists()


def test_cli_bench_writes_the_figures_as_json(tiny_family, fp32_bundle_dir, tmp_path, capsys):
    target = tmp_path / "bench.json"

    async def scenario() -> int:
        async with FakeEdge(tiny_family) as edge:
            return await asyncio.to_thread(main, [
                "bench", "--server", edge.url, "--bundle", str(fp32_bundle_dir), "--clients", "2",
                "--requests", "4", "--steps", "4", "--json", str(target),
            ])

    assert run(scenario()) == 0
    stdout = capsys.readouterr().out
    print(stdout)
    assert "latency: p50" in stdout and "throughput:" in stdout
    figures = json.loads(target.read_text())
    for key in ("clients", "requests", "ok", "errors", "latency_s", "throughput_rps", "device_compute_s_mean",
                "transfer_s_mean", "handoff_overhead_s_mean", "edge_compute_s_mean", "per_request"):
        assert key in figures, key
    assert (figures["clients"], figures["requests"], figures["ok"], figures["errors"]) == (2, 4, 4, {})
    lat = figures["latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert figures["throughput_rps"] > 0 and figures["device_compute_s_mean"] > 0
    assert figures["plans"] == {"N=4,K=2,dpmpp_2m,g=5,device": 4}
    assert {r["client"] for r in figures["per_request"]} == {0, 1}


# --------------------------------------------------------------------------- telemetry (pure)


def test_ewma_and_link_estimates():
    ewma = Ewma(alpha=0.5)
    assert ewma.update(10.0) == 10.0  # the first sample sets it
    assert ewma.update(20.0) == 15.0 and ewma.update(15.0) == 15.0 and ewma.count == 3
    with pytest.raises(ValueError):
        ewma.update(float("nan"))
    with pytest.raises(ValueError):
        Ewma(alpha=0.0)

    link = LinkEstimator(alpha_rtt=0.5, alpha_bandwidth=0.5, min_transfer_s=1e-3)
    assert link.snapshot().rtt_s is None and link.bandwidth_bps is None
    link.add_rtt(0.010)
    assert link.add_rtt(0.020) == pytest.approx(0.015)
    assert link.add_transfer(1000, 1e-4) is None  # below the clock's resolution: ignored
    assert link.add_transfer(1000, 0.01) == pytest.approx(800_000)  # bits per second
    assert link.add_transfer(1000, 0.005) == pytest.approx(1_200_000)
    assert link.add_transfer(0, 1.0) == pytest.approx(1_200_000)
    assert link.snapshot().transfer_samples == 2 and link.add_rtt(1e6) < 600  # clipped to the protocol's bound


def test_busy_fraction_and_device_load():
    Times = namedtuple("Times", "user nice system idle iowait guest")
    before = Times(100.0, 0.0, 50.0, 800.0, 50.0, 10.0)
    after = Times(130.0, 0.0, 60.0, 850.0, 60.0, 20.0)  # 40 busy, 60 idle (iowait counts as idle)
    assert busy_fraction(before, after) == pytest.approx(0.4)
    assert busy_fraction(after, after) is None  # no time passed: unknown, not zero

    clock = iter([0.0, 0.01, 0.5]).__next__
    load = DeviceLoad(min_interval_s=0.1, clock=clock)
    sum(i * i for i in range(200_000))  # burn some CPU time so the counters move
    first = load.sample()
    assert first is None or 0.0 <= first <= 1.0


def test_device_client_imports_without_torch():
    script = NO_TORCH_PRELUDE + textwrap.dedent(
        """
        import device_app.cli, device_app.client, device_app.telemetry
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
