"""The speculative relay end to end: the device client against the fake edge on 127.0.0.1.

No test waits on time: the edge holds its handoff on events (the device's cancel, or a step of the
device's own run), and the device's own run is held at a chosen step by the emulated device's
injected sleeper until the client has decided (a spy on the decision).
"""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_app.app.offline import device_only_handoff
from device_app.client import EdgeClient
from device_app.finish import finish_handoff, finish_latents
from device_app.runtime import DeviceBundle
from device_app.speculative import EmulatedDevice, OwnRun
from shared.relay_plan import RelayPlan
from tests.device_app.fake_edge import FakeEdge
from tests.device_app.test_client import run

PROMPT = "a red sneaker"


@pytest.fixture(scope="module")
def bundle(fp32_bundle_dir: Path) -> DeviceBundle:
    return DeviceBundle(fp32_bundle_dir, threads=1)


class HeldRun:
    """An emulated device whose own run blocks at step ``hold_at`` until the client has decided on the handoff."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold_at: int) -> None:
        self.hold_at = hold_at
        self.reached = threading.Event()  # the own run is at hold_at
        self.decided = threading.Event()
        self.decisions: list[tuple[int, bool]] = []
        self.calls = 0
        decide = OwnRun.decide

        def spy(run: OwnRun, *args: object, **kwargs: object) -> bool:
            switched = decide(run, *args, **kwargs)  # type: ignore[arg-type]
            self.decisions.append((run.steps_done, switched))
            self.decided.set()
            return switched

        monkeypatch.setattr(OwnRun, "decide", spy)
        # A fixed clock: every step "took" no time, so each asks the sleeper for the tier's full step.
        self.device = EmulatedDevice(step_s=1.0, sleep=self.sleep, clock=lambda: 0.0)

    def sleep(self, seconds: float) -> None:
        self.calls += 1
        if self.calls == self.hold_at:
            self.reached.set()
            assert self.decided.wait(60), "the client never decided"

    async def edge_waits_for_the_hold(self) -> None:
        await asyncio.to_thread(self.reached.wait, 60)


def device_only_image(bundle: DeviceBundle, plan: RelayPlan, seed: int, side: int) -> np.ndarray:
    own = RelayPlan(plan.num_inference_steps, 0, plan.sampler, plan.guidance_scale, "device")
    finished = finish_handoff(bundle, device_only_handoff(bundle, PROMPT, own, seed, height=side, width=side))
    assert finished.image is not None
    return finished.image


def test_a_late_edge_loses_the_device_finishes_alone_and_cancels(tiny_family, bundle):
    async def scenario():
        async with FakeEdge(tiny_family, speculative=True) as edge:
            async def until_cancelled() -> None:
                await edge.cancelled.wait()

            edge.hold_handoff = until_cancelled  # the handoff never comes before the device is done
            async with EdgeClient.connect(edge.url, bundle) as client:
                result = await client.generate(PROMPT, seed=5)
                after = await client.generate(PROMPT, seed=6, pinned=RelayPlan(4, 2, "dpmpp_2m", 5.0))
                await asyncio.sleep(0)  # let the last report reach the edge's reader
                while not edge.reports:
                    await asyncio.sleep(0.01)
            return edge, result, after

    edge, result, after = run(scenario())
    assert result.path == "device" and result.report is None
    assert [c.request_id for c in edge.cancels] == [result.request_id]  # the edge saw the cancel
    assert edge.client_errors == []  # a cancel, not an error, and the edge's "cancelled" raised nothing here
    plan = edge.served[result.request_id].plan
    assert plan.speculative and result.plan.plan.split == 0  # the result names what ran: device-only
    assert result.timings.speculative_steps == plan.num_inference_steps
    assert result.timings.plan_s is not None and 0 < result.timings.plan_s < result.timings.total_latency_s
    np.testing.assert_array_equal(result.image, device_only_image(bundle, plan, 5, edge.size[0]))
    assert after.path == "relay" and [r.request_id for r in edge.reports] == [after.request_id]


def test_an_early_handoff_wins_and_equals_finishing_it_directly(tiny_family, bundle, monkeypatch):
    held = HeldRun(monkeypatch, hold_at=1)  # the own run waits at its first step: the handoff comes first

    async def scenario():
        async with FakeEdge(tiny_family, speculative=True) as edge:
            async with EdgeClient.connect(edge.url, bundle, emulate=held.device) as client:
                result = await client.generate(PROMPT, seed=7)
                while not edge.reports:
                    await asyncio.sleep(0.01)
            return edge, result

    edge, result = run(scenario())
    served = edge.served[result.request_id]
    assert served.plan.speculative and served.handoff is not None
    assert held.decisions[0] == (1, True)  # one own step done, three of the edge's: switch
    assert result.path == "relay" and result.plan.plan == served.plan
    reference = finish_latents(bundle, served.handoff)
    np.testing.assert_array_equal(result.latents, reference)
    np.testing.assert_array_equal(result.image, bundle.decode(reference)[0])
    assert 1 <= result.timings.speculative_steps <= 2  # discarded: the step held, and at most the one running
    [report] = edge.reports
    assert report == result.report and edge.cancels == [] and edge.client_errors == []


def test_a_handoff_that_no_longer_pays_is_declined_and_the_edge_told(tiny_family, bundle, monkeypatch):
    held = HeldRun(monkeypatch, hold_at=5)  # the handoff arrives once the device did 5 of 6 own steps

    async def scenario():
        async with FakeEdge(tiny_family, speculative=True, hold_handoff=held.edge_waits_for_the_hold) as edge:
            async with EdgeClient.connect(edge.url, bundle, emulate=held.device) as client:
                result = await client.generate(PROMPT, seed=8)
                while not edge.client_errors:
                    await asyncio.sleep(0.01)
            return edge, result

    edge, result = run(scenario())
    assert held.decisions == [(5, False)]  # 3 relay steps left vs 1 own: finish alone
    assert result.path == "device" and result.report is None and edge.reports == []
    [told] = edge.client_errors
    assert (told.request_id, told.code) == (result.request_id, "cancelled")  # no report is awaited
    plan = edge.served[result.request_id].plan
    np.testing.assert_array_equal(result.image, device_only_image(bundle, plan, 8, edge.size[0]))


def test_a_plain_plan_is_not_speculated_and_a_client_may_decline_speculation(tiny_family, bundle):
    async def scenario():
        async with FakeEdge(tiny_family) as edge, EdgeClient.connect(edge.url, bundle) as client:
            plain = await client.generate(PROMPT, seed=1)
        async with FakeEdge(tiny_family, speculative=True) as edge:
            async with EdgeClient.connect(edge.url, bundle, speculative=False) as client:
                declined = await client.generate(PROMPT, seed=1)
        return plain, declined

    plain, declined = run(scenario())
    for result in (plain, declined):
        assert result.path == "relay" and result.timings.speculative_steps == 0 and result.report is not None
    assert declined.plan.plan.speculative
    np.testing.assert_array_equal(plain.image, declined.image)


def test_previews_reach_the_callback_after_their_progress(tiny_family, bundle):
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    events: list[tuple[str, str, int]] = []

    async def scenario():
        async with FakeEdge(tiny_family, preview_png=png) as edge, EdgeClient.connect(edge.url, bundle) as client:
            asked = await client.generate(
                PROMPT, seed=2, preview_every=1,
                on_progress=lambda stage, step, total: events.append(("progress", stage, step)),
                on_preview=lambda stage, step, data: events.append(("preview", stage, step)) if data == png else None,
            )
            quiet = await client.generate(PROMPT, seed=2, on_preview=lambda *a: events.append(("unasked", "", 0)))
            return edge, asked, quiet

    edge, asked, quiet = run(scenario())
    assert edge.served[asked.request_id].request.preview_every == 1
    assert edge.served[quiet.request_id].request.preview_every is None
    split = asked.plan.plan.split
    edge_events = [e for e in events if e[1] == "edge"]
    assert edge_events == [e for s in range(1, split + 1) for e in (("progress", "edge", s), ("preview", "edge", s))]
    assert ("unasked", "", 0) not in events
