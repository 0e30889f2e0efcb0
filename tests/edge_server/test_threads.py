"""The starved-threads warning: judged from CPU time against wall time over the first UNet calls (clocks injected)."""

from __future__ import annotations

from edge_server.threads import CALLS, StepEfficiency


class Clocks:
    """Fake process-CPU and wall clocks: each UNet call takes ``wall`` seconds and ``cpu`` CPU-seconds."""

    def __init__(self, wall: float, cpu: float) -> None:
        self.wall_per_call, self.cpu_per_call = wall, cpu
        self.wall_now = self.cpu_now = 0.0

    def call(self, monitor: StepEfficiency) -> None:
        monitor.before()
        self.wall_now += self.wall_per_call
        self.cpu_now += self.cpu_per_call
        monitor.after()


def run(threads: int, wall: float, cpu: float, device: str = "cpu", calls: int = CALLS + 3,
        adapt: bool = False, set_to: list[int] | None = None) -> tuple[list[str], StepEfficiency]:
    clocks, warnings = Clocks(wall, cpu), []
    monitor = StepEfficiency(threads, cpu_clock=lambda: clocks.cpu_now, wall_clock=lambda: clocks.wall_now,
                             warn=warnings.append, device=device, adapt=adapt,
                             set_threads=(set_to if set_to is not None else []).append)
    for _ in range(calls):
        clocks.call(monitor)
    return warnings, monitor


def test_starved_threads_are_named_once_with_the_fix() -> None:
    warnings, monitor = run(threads=4, wall=1.0, cpu=1.2)  # 4 threads, 1.2 cores' worth of work done
    assert len(warnings) == 1 and "30%" in warnings[0] and "--threads 1" in warnings[0]
    assert monitor.efficiency is not None and abs(monitor.efficiency - 0.3) < 1e-9


def test_without_a_thread_count_from_the_operator_it_drops_to_one_thread() -> None:
    set_to: list[int] = []
    warnings, _ = run(threads=2, wall=1.0, cpu=1.0, adapt=True, set_to=set_to)  # the measured 2-core case: 50%
    assert set_to == [1] and len(warnings) == 1 and "switched to 1 thread" in warnings[0]
    set_to.clear()
    assert run(threads=2, wall=1.0, cpu=1.0, set_to=set_to)[0] and set_to == []  # --threads given: warn only


def test_busy_threads_and_single_threads_and_gpus_are_left_alone() -> None:
    assert run(threads=2, wall=1.0, cpu=1.9, adapt=True)[0] == []
    assert run(threads=1, wall=1.0, cpu=0.1)[0] == []  # one thread cannot wait for another
    assert run(threads=8, wall=1.0, cpu=0.1, device="cuda")[0] == []  # the GPU does the work


def test_nothing_is_judged_before_enough_calls() -> None:
    warnings, monitor = run(threads=4, wall=1.0, cpu=0.2, calls=CALLS)
    assert warnings == [] and monitor.efficiency is None
