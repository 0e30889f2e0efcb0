"""Rows per UNet call: auto by device, what fits a GPU's memory (measured with a fake allocator), and the engine
retrying a batch that ran out of memory in smaller calls, failing only a request that alone does not fit."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import pytest
import torch

import edge_server.engine as engine_module
from edge_server.engine import BatchingEngine, EdgeRequest
from edge_server.metrics import EdgeMetrics
from edge_server.relay import EdgeRelay
from edge_server.row_budget import (
    AUTO_CPU_ROWS,
    AUTO_GPU_ROWS,
    MEMORY_FRACTION,
    NoRoomOnDevice,
    RowBudget,
    RowMemory,
    ceiling_rows,
    measure_row_memory,
)
from shared.handoff import decode_handoff
from shared.relay_plan import RelayPlan

MIB = 2**20
PLAN = RelayPlan(4, 3, "dpmpp_2m", 5.0)  # guided: 2 UNet rows a request


def oom(rows: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({rows} rows)")


class FakeAllocator:
    """torch.cuda's memory counters as a device with ``free`` bytes would show them: a call of ``rows`` rows
    peaks at ``fixed + per_row * rows`` above what was allocated; more than ``capacity`` rows run out."""

    def __init__(self, *, free: int, per_row: int, fixed: int, decode: int = 0, capacity: int = 10**6) -> None:
        self.free, self.per_row, self.fixed, self.decode, self.capacity = free, per_row, fixed, decode, capacity
        self.allocated = 50 * MIB  # the weights: the probe measures above them
        self.peak = self.allocated
        self.emptied = 0

    def run(self, rows: int) -> int:
        if rows > self.capacity:
            raise oom(rows)
        self.peak = max(self.peak, self.allocated + self.fixed + self.per_row * rows)
        return rows

    def run_decode(self) -> None:
        self.peak = max(self.peak, self.allocated + self.decode)

    def synchronize(self, device: Any = None) -> None: ...
    def empty_cache(self) -> None:
        self.emptied += 1
    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self.peak = self.allocated
    def memory_allocated(self, device: Any = None) -> int:
        return self.allocated
    def max_memory_allocated(self, device: Any = None) -> int:
        return self.peak
    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return self.free, 2 * self.free


def test_auto_takes_sixteen_rows_on_a_cpu_and_up_to_sixty_four_on_a_gpu_and_a_number_is_kept():
    assert ceiling_rows(None, "cpu") == AUTO_CPU_ROWS == 16
    assert ceiling_rows(None, "cuda") == AUTO_GPU_ROWS == 64
    assert ceiling_rows(8, "cuda") == 8 and ceiling_rows(40, "cpu") == 40


def test_the_rows_that_fit_leave_the_decode_and_the_fixed_part_out_and_scale_with_latent_area():
    memory = RowMemory(per_row=50 * MIB, fixed=100 * MIB, reserve=400 * MIB, free=2000 * MIB, area=64 * 64)
    usable = 2000 * MEMORY_FRACTION - 400 - 100  # MiB
    assert memory.rows_that_fit() == int(usable // 50) == 26
    assert memory.rows_that_fit(128 * 128) == int(usable // 200) == 6  # four times the latent pixels a row
    assert memory.rows_that_fit(32 * 32) == int(usable // 12.5)
    assert RowMemory(per_row=50 * MIB, fixed=0, reserve=3000 * MIB, free=2000 * MIB, area=1).rows_that_fit() == 0


def test_a_budget_takes_the_lower_of_its_ceiling_and_the_memory_and_halves_where_a_call_ran_out():
    memory = RowMemory(per_row=50 * MIB, fixed=100 * MIB, reserve=400 * MIB, free=2000 * MIB, area=4096)
    assert RowBudget(16, memory).rows_for(4096) == 16  # the ceiling binds
    budget = RowBudget(64, memory)
    assert budget.rows_for(4096) == 26 and budget.rows_for(4 * 4096) == 6
    assert budget.after_out_of_memory(4096, 26, fewest=2) == 13  # half the rows that failed, at that size
    assert budget.rows_for(4096) == 13
    assert budget.rows_for(4096 // 4) == 52  # smaller latents: the same memory holds more rows
    assert budget.rows_for(4 * 4096) == 3
    assert budget.after_out_of_memory(4096, 2, fewest=2) is None  # one request alone: nothing left to split
    assert RowBudget(8).rows_for(10**6) == 8  # no memory measured (a CPU): the ceiling at any size
    assert RowBudget(8, RowMemory(1, 0, 0, 0, 1)).rows_for(1) == 1  # never below one row


def test_the_probe_reads_a_rows_cost_and_a_calls_fixed_part_from_two_peaks():
    fake = FakeAllocator(free=8000 * MIB, per_row=40 * MIB, fixed=300 * MIB, decode=900 * MIB)
    memory = measure_row_memory("cuda:0", lambda n: fake.run(2 * n), fake.run_decode, 4096, fake)
    assert memory == RowMemory(per_row=40 * MIB, fixed=300 * MIB, reserve=900 * MIB, free=8000 * MIB, area=4096)
    assert fake.emptied >= 1  # the probe's buffers go back before the free memory is read


def test_a_device_that_holds_one_request_but_not_four_is_priced_from_one_and_one_that_holds_none_is_refused():
    small = FakeAllocator(free=900 * MIB, per_row=40 * MIB, fixed=300 * MIB, capacity=4)
    memory = measure_row_memory("cuda:0", lambda n: small.run(2 * n), None, 4096, small)
    assert memory.per_row == (300 + 2 * 40) * MIB // 2 and memory.fixed == 0 and memory.reserve == 0
    none = FakeAllocator(free=100 * MIB, per_row=40 * MIB, fixed=300 * MIB, capacity=1)
    with pytest.raises(NoRoomOnDevice, match="one request does not fit this device's free memory"):
        measure_row_memory("cuda:0", lambda n: none.run(2 * n), None, 4096, none)
    with pytest.raises(ValueError, match="not memory"):  # any other failure is the probe's error, said as it is
        measure_row_memory("cuda:0", lambda n: (_ for _ in ()).throw(ValueError("not memory")), None, 1, none)


# ----------------------------------------------------------------------------- the engine


def request(key: str, seed: int = 0, plan: RelayPlan = PLAN, **kw: Any) -> EdgeRequest:
    return EdgeRequest(key=key, request_id=key, prompt=f"prompt {key}", plan=plan, seed=seed, **kw)


def test_the_engine_sizes_its_batches_from_the_measured_memory_and_warns_when_a_set_ceiling_does_not_fit(
        tiny_family, caplog, monkeypatch):
    h, w = tiny_family.default_latent_size, tiny_family.default_latent_size
    fake = FakeAllocator(free=1000 * MIB, per_row=100 * MIB, fixed=0, decode=0)
    real = engine_module.unet_noise

    def noise(unet: Any, jobs: list[Any]) -> torch.Tensor:  # the probe's calls, as the fake device counts them
        fake.run(sum(job.unet_rows for job in jobs))
        return real(unet, jobs)

    monkeypatch.setattr(engine_module, "unet_noise", noise)
    fit = int(1000 * MEMORY_FRACTION // 100)  # 9 rows
    with caplog.at_level(logging.INFO, logger="rise.engine"):
        engine = BatchingEngine(tiny_family, max_batch_rows=16, memory_stats=fake)
        engine.close()
        auto = BatchingEngine(tiny_family, max_batch_rows=None, memory_stats=fake)
        auto.close()
    assert engine.max_batch_rows == auto.max_batch_rows == fit
    assert engine.row_budget.rows_for(h * w) == fit
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--max-batch-rows 16 does not fit" in m and f"at most {fit} rows" in m for m in warned), warned
    said = [r.getMessage() for r in caplog.records if "rows per UNet call" in r.getMessage()]
    assert any(f"{fit} rows per UNet call" in m and "auto" in m for m in said), said
    assert BatchingEngine(tiny_family, max_batch_rows=None).max_batch_rows == AUTO_CPU_ROWS  # a CPU: not measured
    fake.capacity = 1  # not even one guided request: refused at start, naming the family
    with pytest.raises(NoRoomOnDevice, match=f"family {tiny_family.name} .* one request does not fit"):
        BatchingEngine(tiny_family, max_batch_rows=None, memory_stats=fake)


class GpuOfRows:
    """The engine's UNet calls on a device that holds ``limit`` rows: more raise torch's OutOfMemoryError before
    anything has run, as a CUDA allocation does. ``calls`` records each call's rows; a call waits for ``gate``."""

    def __init__(self) -> None:
        self.limit = 10**6
        self.calls: list[int] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()


@pytest.fixture
def gpu(monkeypatch) -> GpuOfRows:
    device = GpuOfRows()
    real = engine_module.unet_noise

    def noise(unet: Any, jobs: list[Any]) -> torch.Tensor:
        rows = sum(job.unet_rows for job in jobs)
        device.calls.append(rows)
        device.entered.set()
        assert device.gate.wait(60)
        if rows > device.limit:
            raise oom(rows)
        return real(unet, jobs)

    monkeypatch.setattr(engine_module, "unet_noise", noise)
    return device


def test_a_batch_that_runs_out_of_memory_is_retried_in_halves_and_every_request_gets_its_exact_result(
        tiny_family, gpu, caplog):
    gpu.limit = 4  # two guided requests
    gpu.gate.clear()
    metrics = EdgeMetrics()
    engine = BatchingEngine(tiny_family, max_batch_rows=8, on_row_limit=metrics.observe_row_limit)
    labels = {"family": tiny_family.family_id}
    assert metrics.registry.get_sample_value("rise_edge_max_batch_rows", labels) == 8
    try:
        with caplog.at_level(logging.WARNING, logger="rise.engine"):
            futures = [engine.submit(request("r0", 0))]
            assert gpu.entered.wait(60)  # r0's first step is in the UNet: the next three are admitted together
            futures += [engine.submit(request(f"r{i}", i)) for i in range(1, 4)]
            gpu.gate.set()
            outcomes = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    for i, outcome in enumerate(outcomes):
        expected = EdgeRelay(tiny_family).start(f"prompt r{i}", PLAN, i)
        got = decode_handoff(outcome.handoff)
        assert got.split == PLAN.split
        assert np.abs(got.latents - expected.latents).max() <= 1e-5 * max(1, np.abs(expected.latents).max())
    assert gpu.calls[:2] == [2, 8]  # r0 alone, then all four: out of memory
    assert all(rows <= 4 for rows in gpu.calls[2:])  # then calls of at most two requests, none lost
    assert engine.row_budget.rows_for(tiny_family.default_latent_size ** 2) == 4
    assert metrics.registry.get_sample_value("rise_edge_max_batch_rows", labels) == 4  # what an operator sees
    assert metrics.registry.get_sample_value("rise_edge_out_of_memory_total", labels) == 1
    warned = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert len(warned) == 1 and "8 rows" in warned[0] and "at most 4" in warned[0], warned


def test_a_request_that_alone_does_not_fit_fails_with_a_clear_error_and_the_next_one_is_served(tiny_family, gpu):
    gpu.limit = 1  # not even one guided request (2 rows)
    metrics = EdgeMetrics()
    engine = BatchingEngine(tiny_family, max_batch_rows=8, on_row_limit=metrics.observe_row_limit)
    labels = {"family": tiny_family.family_id}
    try:
        with pytest.raises(NoRoomOnDevice, match=r"does not fit .*free memory.*smaller"):
            engine.submit(request("big")).result(timeout=120)
        assert metrics.registry.get_sample_value("rise_edge_out_of_memory_total", labels) == 1
        assert metrics.registry.get_sample_value("rise_edge_max_batch_rows", labels) == 8  # nothing to lower
        gpu.limit = 10**6
        assert engine.submit(request("next", 1)).result(timeout=120).kind == "handoff"
    finally:
        engine.close()


def test_the_daemon_reports_each_familys_rows_per_call_in_its_metrics(tiny_family):
    from edge_server.daemon import EdgeConfig, EdgeServer

    metrics = EdgeMetrics()
    server = EdgeServer.with_batching_engine(tiny_family, EdgeConfig(port=0), metrics=metrics)  # auto, on a CPU
    try:
        assert metrics.registry.get_sample_value("rise_edge_max_batch_rows",
                                                 {"family": tiny_family.family_id}) == AUTO_CPU_ROWS
    finally:
        server.engine.close()
