"""Choosing the relay configuration for a request: the scheduler interface and its simplest policy.

The daemon asks a :class:`Planner` at every ``generate`` and feeds it every device report.
The contextual bandit (LinUCB) and its baselines implement this interface; until they land,
:class:`FixedPlanner` serves one configuration (the user may pin another).

The speculative relay's two rules live here too, pure, so the device client, the edge's planner and
``rise-sim`` apply the same ones: :func:`speculative_switch` (the device, when the handoff arrives:
continue from it or finish its own run) and :func:`speculative_wanted` (the planner: does this plan
go out speculative).
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
    edge_cold_start_s: float = 0.0  # seconds the edge needs before it can start: its family's load (0: loaded)
    relay_modes: bool = True  # the device runs adaptive and speculative plans (False: its protocol version lacks them)


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


# --------------------------------------------------------------------------- speculative relay
#
# The two rules of a speculative relay (RelayPlan.speculative), pure so that the device client,
# the edge's planner and rise-sim apply the same ones.


def speculative_switch(own_total: int, own_done: int, relay_total: int, handoff_split: int,
                       *, slack_steps: float = 0.0) -> bool:
    """On the handoff's arrival: continue from the edge's latent (True) or finish the device's own run (False).

    The device has run ``own_done`` of the ``own_total`` steps of its own device-only run; the
    handoff carries ``handoff_split`` of ``relay_total`` steps done by the edge. Both remaining
    runs go at the same device step time and end in the same VAE decode, and the handoff is
    already here (its transfer and parsing are paid), so which finishes first is a count of
    steps: **switch iff** ``relay_total - handoff_split <= own_total - own_done + slack_steps``.
    Ties switch: the relay's image is the large model's layout, at no extra time. For one N
    (the speculative run uses the plan's) the rule reads "switch while the device has done at
    most ``k`` of its own steps". ``slack_steps`` > 0 trades that many steps of latency for the
    relay's quality (0: never slower than finishing alone).
    """
    for name, value, lo in (("own_total", own_total, 1), ("relay_total", relay_total, 1)):
        if value < lo:
            raise ValueError(f"{name} must be at least {lo}, got {value}")
    if not 0 <= own_done <= own_total:
        raise ValueError(f"own_done must be in [0, own_total={own_total}], got {own_done}")
    if not 0 <= handoff_split <= relay_total:
        raise ValueError(f"handoff_split must be in [0, relay_total={relay_total}], got {handoff_split}")
    if not (slack_steps >= 0 and slack_steps < float("inf")):
        raise ValueError(f"slack_steps must be a finite number >= 0, got {slack_steps}")
    return relay_total - handoff_split <= own_total - own_done + slack_steps


#: A plan goes out speculative when the edge's predicted time to its handoff is at least this
#: share of the time the device needs for those edge steps itself (see :func:`speculative_wanted`).
#: A quarter: the forecast is the edge's schedule as it stands, and requests planned after this one
#: join its batch and slow each of its steps (a full batch of 16 steps 7x slower than one request on
#: the A100 profile), so under a burst the forecast is short by up to that factor; a lone request
#: (light load) is still well below it and goes out as a plain relay.
DEFAULT_SPECULATIVE_RATIO = 0.25


def speculative_wanted(plan: RelayPlan, predicted_handoff_s: float, device_step_s: float,
                       *, ratio: float = DEFAULT_SPECULATIVE_RATIO) -> bool:
    """The planner's rule: should ``plan`` go out speculative?

    ``predicted_handoff_s`` is the edge's forecast from now to the handoff reaching the device
    (queue wait, its ``k`` batched steps, the transfer); ``device_step_s`` the device's step time
    (its hello). The relay beats the device's own run only if the handoff arrives before the
    device could have run those ``k`` steps itself (``k * device_step_s``); speculating costs the
    edge nothing (a cancelled request frees its slot) and the device only the steps it discards.
    So: speculative when the handoff is predicted late enough to be in doubt,
    ``predicted_handoff_s >= ratio * k * device_step_s`` (``ratio`` < 1: the forecast is
    optimistic, later arrivals join the batch and slow its steps; see
    :data:`DEFAULT_SPECULATIVE_RATIO`), and only for plans that can
    be (``k >= 1``, the decode on the device). At light load the forecast is short and plans go
    out as plain relays, so the image is the plain relay's.
    """
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    if plan.split == 0 or plan.decode_on != "device":
        return False
    if not (predicted_handoff_s >= 0 and device_step_s > 0):
        return False  # nothing known to judge by: a plain relay
    return predicted_handoff_s >= ratio * plan.split * device_step_s
