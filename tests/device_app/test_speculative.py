"""The speculative relay's device-side state and the emulated slow device (pure: no sockets, no ORT)."""

from __future__ import annotations

import threading

import pytest

from device_app.speculative import EmulatedDevice, OwnRun, RunStopped


class FakeTime:
    """A clock that moves only when someone sleeps, and a record of the sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def work(self, seconds: float) -> None:  # the real step's compute
        self.now += seconds


def test_emulated_steps_are_padded_to_the_tier_with_the_injected_sleeper():
    t = FakeTime()
    device = EmulatedDevice(step_s=0.25, decode_s=0.5, sleep=t.sleep, clock=t.clock)
    device.start()
    for compute in (0.05, 0.25, 0.4):  # faster than the tier, as fast, slower
        t.work(compute)
        device.step()
    assert t.sleeps == pytest.approx([0.2])  # only the fast step is padded, to exactly the tier's time
    assert t.now == pytest.approx(0.25 + 0.25 + 0.4)
    assert device.decode(0.1) == pytest.approx(0.5) and t.sleeps[-1] == pytest.approx(0.4)
    assert device.decode(0.7) == 0.7 and len(t.sleeps) == 2  # a slower decode is not padded


def test_chained_pacing_reports_progress_after_each_padded_step():
    t = FakeTime()
    seen: list[tuple[int, int, float]] = []
    device = EmulatedDevice(step_s=1.0, sleep=t.sleep, clock=t.clock)
    on_step = device.chain(lambda step, total: seen.append((step, total, t.now)))
    device.start()
    for step in (1, 2, 3):
        on_step(step, 3)
    assert seen == [(1, 3, 1.0), (2, 3, 2.0), (3, 3, 3.0)]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.2"])
def test_emulated_device_refuses_nonsense_times(bad):
    with pytest.raises(ValueError, match="step_s"):
        EmulatedDevice(step_s=bad)


def test_own_run_switches_by_the_rule_and_then_stops_at_its_next_step():
    run = OwnRun(total=6)
    run.on_step(1, 6)
    run.on_step(2, 6)
    assert run.decide(6, 3) is True  # 3 relay steps left vs 4 own steps left
    with pytest.raises(RunStopped):
        run.on_step(3, 6)
    assert run.steps_done == 3


def test_own_run_past_the_edges_split_finishes_alone():
    progress: list[int] = []
    run = OwnRun(total=6, then=lambda step, total: progress.append(step))
    for step in range(1, 5):
        run.on_step(step, 6)
    assert run.decide(6, 3) is False  # 3 relay steps left vs 2 own: finishing alone is sooner
    run.on_step(5, 6)
    run.on_step(6, 6)
    assert progress == [1, 2, 3, 4, 5, 6]
    assert OwnRun(total=6).decide(6, 3, finished=True) is False  # a finished run never switches


def test_own_run_counts_steps_from_another_thread():
    run = OwnRun(total=200)
    worker = threading.Thread(target=lambda: [run.on_step(i, 200) for i in range(1, 201)])
    worker.start()
    worker.join()
    assert run.steps_done == 200 and run.decide(200, 100) is False
