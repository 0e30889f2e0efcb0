"""The congestion price: what one edge step costs the other requests, estimated from the edge's batch and queue.

A request's own reward counts its own wait, not the delay its edge steps cause everyone else.
Under load that makes a myopic scheduler (and a myopic oracle) send too much work to the
edge: each choice is best for its request and together they overload it (rise-sim at
``--edge-load 1.3`` saw the myopic oracle fall below a fixed split). So the planner charges
each arm ``price * k`` in utility (``k`` = the arm's edge steps) when it chooses, and the price
is the marginal delay one more edge step causes the others (a Pigouvian price), valued at the
users' mean speed weight::

    delay_s = b * (T[b + 1] - T[b])       # b requests in the batch: each of its steps gets longer
            + q * T[B] / B                # q queued: a batch slot is taken for one step more
    price  <- price + smoothing * (mean(1 - w) * delay_s / L_s - price)      at every plan

``T[b]`` is the edge's batched step time for ``b`` requests (the profile's, as the latency
features take it), ``B`` its batch capacity, ``L_s`` the reward's latency scale. An idle edge
costs nothing and the scheduler is myopic; as the batch fills past the point where batching
stops paying (an A100 at SD1.5 size: 4 requests) every edge step slows the others and the
price rises until the requests that gain least from the edge move their steps to the devices.
``smoothing`` (0.05 per plan: ~20 plans) keeps one burst from swinging it. Every user pays the
same price: one who weighs quality highly still buys edge steps. Only the price is kept, with
the planner's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.validation import check_float

from .errors import BanditError
from .reward import LATENCY_SCALE_S

DEFAULT_SMOOTHING = 0.05
SPEED_WEIGHT_SMOOTHING = 0.01  # the users' mean (1 - w), over ~100 plans


@dataclass
class CongestionPrice:
    """Price per edge step (utility units) from the edge's batch and queue (see the module doc)."""

    step_times: Sequence[float]  # T[b] for b = 0..B (T[0] = 0)
    smoothing: float = DEFAULT_SMOOTHING
    latency_scale_s: float = LATENCY_SCALE_S
    price: float = 0.0
    speed_weight: float = 0.5  # running mean of (1 - w)
    _T: list[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._T = [float(t) for t in self.step_times]
        if len(self._T) < 2 or any(not t >= 0 for t in self._T):
            raise BanditError("congestion: step_times must be T[0..B] with B >= 1, non-negative")
        check_float("congestion smoothing", self.smoothing, lo=0.0, hi=1.0, error=BanditError)
        check_float("congestion latency_scale_s", self.latency_scale_s, lo=1e-6, error=BanditError)
        check_float("congestion price", self.price, lo=0.0, hi=1.0, error=BanditError)

    @property
    def capacity(self) -> int:
        return len(self._T) - 1

    def delay_s(self, queue_depth: int, active: int) -> float:
        """Seconds of delay one more edge step causes the others, with ``active`` in the batch and
        ``queue_depth`` waiting."""
        T, B = self._T, self.capacity
        b = min(max(int(active), 0), B)
        batch = b * (T[b + 1] - T[b]) if b < B else 0.0
        return max(batch, 0.0) + max(int(queue_depth), 0) * T[B] / B

    def observe(self, queue_depth: int, active: int, preference: float) -> float:
        """One plan's view of the edge (and its user's preference); the new price."""
        self.speed_weight += SPEED_WEIGHT_SMOOTHING * ((1.0 - preference) - self.speed_weight)
        instant = self.speed_weight * self.delay_s(queue_depth, active) / self.latency_scale_s
        self.price = min(max(self.price + self.smoothing * (instant - self.price), 0.0), 1.0)
        return self.price
