"""Choosing the relay configuration for a request: the scheduler interface and its simplest policy.

The daemon asks a :class:`Planner` at every ``generate`` and feeds it every device report.
The contextual bandit (LinUCB) and its baselines implement this interface; until they land,
:class:`FixedPlanner` serves one configuration (the user may pin another).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared.protocol import Generate, Report
from shared.relay_plan import RelayPlan


@dataclass(frozen=True)
class PlanContext:
    """What the edge knows when it plans (the bandit's context comes from here)."""

    queue_depth: int
    active: int
    device_load: float | None = None
    rtt_s: float | None = None
    bandwidth_bps: float | None = None
    device_step_s: float | None = None  # the device's small-model step time, from its hello
    edge_running: tuple[int, ...] | None = None  # remaining edge steps of each request in the batch
    edge_queued: tuple[int, ...] | None = None  # edge steps of each request waiting for a slot (FIFO)


class Planner(Protocol):
    name: str

    def choose(self, request: Generate, context: PlanContext) -> tuple[RelayPlan, str]:
        """The configuration for this request and a short why."""
        ...

    def feedback(self, plan: RelayPlan, request: Generate, report: Report) -> None:
        """The device's measured outcome of a configuration."""
        ...

    def save(self) -> None:
        """Persist learned state (atomically); a no-op for stateless planners."""
        ...


@dataclass
class FixedPlanner:
    """One configuration for every request: N steps, the edge runs ``split_fraction`` of them."""

    steps: int = 20
    split_fraction: float = 0.5
    sampler: str = "dpmpp_2m"
    guidance_scale: float = 7.5
    name: str = "fixed"

    def choose(self, request: Generate, context: PlanContext) -> tuple[RelayPlan, str]:
        if request.pinned is not None:
            return request.pinned, "pinned by the client"
        steps = request.steps or self.steps
        split = round(steps * self.split_fraction)
        plan = RelayPlan(steps, split, self.sampler, self.guidance_scale)
        return plan, f"fixed policy: edge runs {split} of {steps} steps"

    def feedback(self, plan: RelayPlan, request: Generate, report: Report) -> None:
        return None

    def save(self) -> None:
        return None
