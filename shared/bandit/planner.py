"""The contextual-bandit planner: the edge daemon's :class:`~shared.planning.Planner` that learns.

At every ``generate`` (:meth:`BanditPlanner.choose`):

1. a pinned configuration (``Generate.pinned``) is served as is;
2. otherwise the context is built from the request (prompt complexity from the text,
   preference, the device's RTT, bandwidth and load) and the edge (queue depth, running
   requests, and the device's speed if the :class:`PlanContext` carries ``device_step_s``):
   the feature vector (:mod:`.context`), every arm's latency features (:mod:`.latency`), and
   the congestion price each arm pays, updated from the queue (:mod:`.congestion`);
3. the policy picks an arm among those allowed (``Generate.steps`` restricts the arms to
   that N; if no arm has it, the chosen arm's split fraction is applied to the requested
   N and that request is not learned from);
4. the plan goes out with a one-line ``why``, e.g.
   ``linucb: N20k10 (edge 10/20 steps, decode on device); quality 0.93, latency 2.10 s, best of 24 arms;
   preference 0.80, rtt 40 ms``.

The served scheduler (``linucb``) is :class:`~shared.bandit.factored.FactoredLinUCB`: quality per
arm from the profile and users' ratings, latency from one model shared by the arms, both with
forgetting. ``linucb_disjoint`` is the paper's disjoint LinUCB over the feature vector.

At every report (:meth:`BanditPlanner.feedback`) the reward ``w * q + (1 - w) * (1 - L / L_s)``
(:mod:`shared.bandit.reward`) is computed from the report's ``total_latency_s`` and the
profile's quality for that arm at the prompt's complexity level, moved halfway towards the
user's rating when the report has one (``rating_weight``); the policy learns it (and the
latency and the rating apart) with the context it was chosen in. Reports of **pinned** plans are
learned from too when the pinned
plan is one of the arms: the outcome of an arm in a context is unbiased evidence for that
arm's model whoever chose it (disjoint LinUCB keeps one regression per arm); a pinned plan
that is not an arm is not learned from.

The same path serves and simulates: :meth:`choose` and :meth:`feedback` are thin wrappers
around :meth:`context` (request and :class:`PlanContext` -> :class:`Observation` ->
:class:`~shared.bandit.context.Context`, the congestion price updated), :meth:`select`
(context -> arm) and :meth:`learn` (outcome -> reward -> policy update). The simulator
(``rise-sim``) has no prompts or wire messages, only their features, so it calls those three
directly: what it judges is the policy the daemon runs.

Speculative relay (``speculative_ratio``, off by default): a chosen plan that can be speculative
(``k >= 1``, decode on the device) goes out with ``RelayPlan.speculative`` set when the edge's
forecast of its handoff (:meth:`BanditPlanner.predicted_handoff_s`: text encoding, the queue and
its ``k`` batched steps projected from the engine's batch, one round trip, the transfer) is long
against the device doing those steps itself (:func:`shared.planning.speculative_wanted`). The
arm learnt is the plain one: only a report of a relay that won comes back (a device that finished
alone cancels, and the edge learns nothing from that request: its relay was never delivered).

Persistence: :meth:`save` writes the policy's state atomically (:mod:`shared.bandit.persistence`);
it is also called every ``save_every`` updates, so a ``kill -9`` loses at most that many.
A state saved for other arms or features is refused with :class:`~shared.bandit.StateError`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.bandit import (
    DEFAULT_RATING_WEIGHT,
    BanditError,
    Context,
    ContextBuilder,
    FixedArm,
    Observation,
    Outcome,
    Policy,
    Profile,
    arm_label,
    check_arms,
    describe,
    load_state,
    make_policy,
    profile_prior,
    rated_quality,
    rating_quality,
    reward,
    save_state,
)
from shared.bandit.congestion import CongestionPrice
from shared.bandit.factored import FactoredLinUCB, quality_features
from shared.bandit.latency import LATENCY_PRIOR, LatencyFeatures
from shared.bandit.reward import LATENCY_SCALE_S
from shared.planning import PlanContext, speculative_wanted
from shared.prompt_features import prompt_features
from shared.protocol import Generate, Report
from shared.relay_plan import RelayPlan

log = logging.getLogger("rise.planner")

#: Quality assumed for an arm the planner has no profile entry for (and no rating): neutral.
UNPROFILED_QUALITY = 0.5
#: LinUCB's exploration weight with the profile's prior, both kinds (factored: in units of its models'
#: uncertainty). rise-sim on the demo profile, 10,000 requests, quality shift 0.3 with ratings: 0.1
#: came within 0.005 of the priced oracle, 0.3 within 0.007, 1.0 within 0.011; without ratings 0.1 to 2
#: did the same within 0.0005 at rho 1.0 and 1.3 (gpu-edge-phones).
DEFAULT_ALPHA = 0.1
#: The policies that pay the congestion price when they choose (the baselines do not learn or adapt).
PRICED_KINDS = ("linucb", "linucb_disjoint")
_MAX_PENDING = 4096  # requests planned and not yet reported; the oldest are forgotten
#: Latencies are learned up to 6 x the reward's 10 s scale: by then an image has long lost all its speed
#: value, and one report's reward stays within [-5, 1] whatever it claims (the edge also clips what a
#: report may claim to what it observed: edge_server.service.RequestService.report, SECURITY.md).
MAX_LEARNED_LATENCY_S = 6 * LATENCY_SCALE_S

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


class BanditPlanner:
    """A :class:`~shared.planning.Planner` driven by a :class:`~shared.bandit.Policy`.

    ``profile`` is a :class:`~shared.bandit.Profile` (quality per arm and level, and the timing
    the latency features are built from), or ``None`` for a feature-vector policy without one:
    quality then comes from ratings only (an unrated report counts as quality 0.5) and the
    context scales from ``handoff_bytes`` / ``device_step_ref_s``. ``congestion`` (a
    :class:`~shared.bandit.congestion.CongestionPrice`, or True: one over the profile's batched step
    times) prices each arm's edge steps when given.
    ``state_path`` (optional) is loaded if it exists and written by :meth:`save`.
    ``speculative_ratio`` (``None``: never) marks a chosen plan speculative when its predicted
    handoff is at least that share of the device's time for its edge steps (see the module doc).
    """

    def __init__(
        self,
        arms: Sequence[RelayPlan],
        policy: Policy,
        profile: Profile | None,
        state_path: str | Path | None = None,
        *,
        context_builder: ContextBuilder | None = None,
        congestion: CongestionPrice | bool = False,
        rating_weight: float = DEFAULT_RATING_WEIGHT,
        save_every: int = 50,
        edge_capacity: int = 8,
        handoff_bytes: int = 2**20,
        device_step_ref_s: float = 1.0,
        speculative_ratio: float | None = None,
    ) -> None:
        self.arms = check_arms(arms)
        if speculative_ratio is not None and not (0 < speculative_ratio < float("inf")):
            raise BanditError(f"speculative_ratio must be a number > 0 (or None: never), got {speculative_ratio!r}")
        if speculative_ratio is not None and profile is None:
            raise BanditError("a speculative relay needs a profile (its timing forecasts the handoff)")
        self.speculative_ratio = speculative_ratio
        if policy.n_arms != len(self.arms):
            raise BanditError(f"the policy has {policy.n_arms} arms, the planner {len(self.arms)}")
        self.policy = policy
        # The wire's scheduler identifiers allow [A-Za-z0-9._:-] (no underscore): "epsilon-greedy".
        self.name = policy.name.replace("_", "-")
        if profile is not None and not isinstance(profile, Profile):
            raise BanditError(f"profile must be a Profile or None (no profile), got {type(profile).__name__}")
        self.profile = profile
        self.latency_scale_s = LATENCY_SCALE_S
        self.edge_capacity = int(edge_capacity)
        if profile is not None:
            builder = context_builder or ContextBuilder.from_profile(profile, active_ref=float(edge_capacity))
            self.latency_features: LatencyFeatures | None = LatencyFeatures(self.arms, profile.timing,
                                                                            self.edge_capacity, profile=profile)
        else:
            builder = context_builder or ContextBuilder(handoff_bytes, device_step_ref_s,
                                                        active_ref=float(edge_capacity))
            self.latency_features = None
        if isinstance(policy, FactoredLinUCB):
            if self.latency_features is None:
                raise BanditError("the factored scheduler needs a profile (its timing and quality)")
            if policy.dim != self.latency_features.dim:
                raise BanditError(f"the policy has {policy.dim} latency features, the planner "
                                  f"{self.latency_features.dim}")
        elif policy.dim != builder.dim:
            raise BanditError(f"the policy has {policy.dim} features, the context {builder.dim}")
        self.builder = builder
        if congestion is True:
            if self.latency_features is None:
                raise BanditError("a congestion price needs a profile (the edge's batched step times)")
            congestion = CongestionPrice(self.latency_features.T)
        self.congestion: CongestionPrice | None = congestion or None
        self.labels = [arm_label(a) for a in self.arms]
        self._index = {arm: i for i, arm in enumerate(self.arms)}
        self._steps = np.asarray([a.num_inference_steps for a in self.arms])
        self._edge_steps = (self.latency_features.k if self.latency_features is not None  # adaptive: expected
                            else np.asarray([a.split for a in self.arms], dtype=np.float64))
        self.rating_weight = rating_weight
        self._quality: dict[tuple[int, int], float] = {}  # (arm, level) -> the profile's quality (immutable)
        self._quality_rows: dict[int, FloatArray] = {}  # level -> every arm's, for the factored scheduler
        self.save_every = save_every
        self.state_path = Path(state_path) if state_path is not None else None
        self._pending: collections.OrderedDict[int, tuple[Generate, int | None, Context, int]] = (
            collections.OrderedDict())
        self._unsaved = 0
        self.decision_s: collections.deque[float] = collections.deque(maxlen=10_000)
        self.learned = 0
        if self.state_path is not None and self.state_path.exists():
            meta = load_state(self.state_path, policy, self.labels, self.feature_spec())
            log.info("scheduler state loaded from %s (%s updates)", self.state_path, policy.updates)
            self.learned = int(meta.get("learned", 0)) if isinstance(meta.get("learned", 0), int) else 0
            price = meta.get("price")
            if self.congestion is not None and isinstance(price, (int, float)) and 0 <= price <= 1:
                self.congestion.price = float(price)

    @classmethod
    def from_profile(
        cls,
        profile: Profile,
        policy: str = "linucb",
        state_path: str | Path | None = None,
        *,
        arms: Sequence[RelayPlan] | None = None,
        sampler: str = "dpmpp_2m",
        guidance_scale: float = 7.5,
        edge_decode: bool = True,
        edge_capacity: int = 8,
        save_every: int = 50,
        rating_weight: float = DEFAULT_RATING_WEIGHT,
        alpha: float | None = None,
        congestion: bool | CongestionPrice = True,
        seed: int = 0,
        speculative_ratio: float | None = None,
        **policy_options: Any,
    ) -> BanditPlanner:
        """The arms of ``profile`` and a policy by name: ``linucb`` (the factored scheduler,
        :mod:`shared.bandit.factored`; ``alpha`` = 0.1; options ``quality_strength``,
        ``latency_discount``, ``quality_discount``, ``learn_quality`` = True), ``linucb_disjoint``
        (``alpha`` = 0.1; options ``ridge``, ``prior`` = True: start from the profile's prediction,
        :mod:`shared.bandit.prior`), ``random``, ``epsilon_greedy`` (``epsilon``), ``edge_only`` (VAE
        decode on the edge too), ``device_only`` (both at the largest N), or a fixed arm by label,
        ``N20k10`` / ``N20k20e``. ``alpha`` is ignored by the baselines; ``edge_capacity`` is the
        edge's batch in requests (``max_batch_rows // 2`` with guidance). The two LinUCBs pay the
        congestion price (``congestion``: True = the default :class:`CongestionPrice`, False = none).
        ``arms`` replaces the profile's plans (``sampler``, ``guidance_scale`` and ``edge_decode`` then
        play no part), e.g. a subset of them. ``speculative_ratio`` turns the speculative relay on
        (:data:`~shared.planning.DEFAULT_SPECULATIVE_RATIO` is the usual value; ``None``: off)."""
        if arms is None:
            arms = profile.plans(sampler=sampler, guidance_scale=guidance_scale, edge_decode=edge_decode)
        else:
            arms = check_arms(arms)
            edge_decode = any(a.decode_on == "edge" for a in arms)
        labels = [arm_label(a) for a in arms]
        builder = ContextBuilder.from_profile(profile, active_ref=float(edge_capacity))
        dim = builder.dim
        top = max(a.num_inference_steps for a in arms)
        edge_only = f"N{top}k{top}e" if edge_decode else f"N{top}k{top}"
        fixed = {"edge_only": edge_only, "device_only": f"N{top}k0"}.get(policy, policy)
        if fixed in labels:
            name = policy if policy in ("edge_only", "device_only") else f"fixed-{policy}"
            chosen: Policy = FixedArm(len(arms), dim, labels.index(fixed), seed=seed, name=name)
        elif policy == "linucb":
            if not policy_options.pop("learn_quality", True):
                policy_options["quality_strength"] = 1e12  # the profile's quality, never moved by ratings
            chosen = FactoredLinUCB(len(arms), len(LatencyFeatures.names),
                                    alpha=DEFAULT_ALPHA if alpha is None else alpha, seed=seed, **policy_options)
        else:
            if policy.startswith("N") and policy[1:2].isdigit():
                raise BanditError(f"no arm {policy!r} in the profile; arms: {', '.join(labels)}")
            if policy == "linucb_disjoint":
                policy_options["alpha"] = DEFAULT_ALPHA if alpha is None else alpha
                if policy_options.pop("prior", True):
                    policy_options.setdefault("prior_mean", profile_prior(profile, arms, builder))
            chosen = make_policy(policy, len(arms), dim, seed=seed, **policy_options)
        price = congestion if chosen.kind in PRICED_KINDS else False
        return cls(arms, chosen, profile, state_path, context_builder=builder, congestion=price,
                   edge_capacity=edge_capacity, save_every=save_every, rating_weight=rating_weight,
                   speculative_ratio=speculative_ratio)

    # ------------------------------------------------------------------ Planner

    def choose(self, request: Generate, context: PlanContext) -> tuple[RelayPlan, str]:
        features = prompt_features(request.prompt)
        obs, ctx = self.context(features.complexity, request.preference, context, level=features.level)
        if request.pinned is not None:
            arm = self._index.get(_plain(request.pinned))
            self._remember(request, arm, ctx, features.level)
            what = arm_label(request.pinned) + ("" if arm is not None else ", not one of the scheduler's arms")
            return request.pinned, f"pinned by the client ({what})"
        mask, rescale = None, False
        if request.steps is not None:
            mask = self._steps == request.steps
            if not mask.any():
                mask, rescale = None, True
        arm = self.select(ctx, mask)
        plan = self.arms[arm]
        if plan.adaptive and not context.relay_modes:
            # A device without relay modes (protocol version 1): the adaptive arm's fixed split, the most
            # edge steps it would have run (that arm's, when it is one; then it is what is learned).
            fixed = dataclasses.replace(plan, handoff_tau=None, min_split=None)
            head = f"{self.name}: {self.labels[arm]} as {arm_label(fixed)} (the device has no adaptive handoff)"
            plan, arm = fixed, self._index.get(fixed, arm)
        else:
            head = f"{self.name}: {self.labels[arm]}"
        allowed = len(self.arms) if mask is None else int(mask.sum())
        score = self.policy.explain(ctx, arm)
        if rescale and request.steps is not None:
            plan = _rescaled(plan, request.steps)
            head += f" scaled to {arm_label(plan)} (no arm has {request.steps} steps; not learned from)"
        where = "edge" if plan.decode_on == "edge" else "device"
        spec = ""
        if self.speculative_ratio is not None and context.relay_modes:
            forecast = self.predicted_handoff_s(ctx, arm)
            step_s = self.device_step_s(obs)
            if not rescale and speculative_wanted(plan, forecast, step_s, ratio=self.speculative_ratio):
                plan = dataclasses.replace(plan, speculative=True)
                spec = (f", speculative: handoff in ~{forecast:.2f} s vs {plan.split} device steps "
                        f"{plan.split * step_s:.2f} s")
        why = (f"{head} (edge {plan.split}/{plan.num_inference_steps} steps, decode on {where}{spec})"
               f"{'; ' + score if score else ''}, best of {allowed} arms; {describe(obs)}")
        self._remember(request, None if rescale else arm, ctx, features.level)
        return plan, why[:512]

    def feedback(self, plan: RelayPlan, request: Generate, report: Report) -> None:
        entry = self._pending.pop(id(request), None)
        if entry is not None and entry[0] is request:
            _, arm, ctx, level = entry
            if arm is not None and self.arms[arm] != _plain(plan):  # the daemon served another plan: learn that
                arm = self._index.get(_plain(plan))
        else:  # planned before a restart (or forgotten): rebuild the context from the report
            features = prompt_features(request.prompt)
            seen = PlanContext(queue_depth=0, active=0, device_load=report.device_load, rtt_s=report.rtt_s,
                               bandwidth_bps=report.bandwidth_bps)
            _, ctx = self.context(features.complexity, request.preference, seen, level=features.level, price=False)
            arm, level = self._index.get(_plain(plan)), features.level
        if arm is None:
            return
        self.learn(arm, ctx, level, request.preference, report.total_latency_s, report.rating)

    def predicted_handoff_s(self, context: Context, arm: int) -> float:
        """The edge's forecast, from planning, of ``arm`` 's handoff reaching the device: the latency
        features' edge and link terms (text encoding, queue wait, its batched steps, RTT, transfer)
        at their arithmetic weights (``inf`` without a profile's features)."""
        phi = context.latency_x
        if phi is None:
            return float("inf")
        return float(phi[arm, :6] @ np.asarray(LATENCY_PRIOR[:6]))

    def device_step_s(self, obs: Observation) -> float:
        """The device's step time: from its hello, else the profile's reference device's."""
        if obs.device_step_s is not None and obs.device_step_s > 0:
            return float(obs.device_step_s)
        return self.profile.timing.device_step_s if self.profile is not None else 0.0

    def feature_spec(self) -> list[str]:
        """What a saved state is valid for: the context's features and scales, and the latency features."""
        spec = self.builder.feature_spec()
        if self.latency_features is not None:
            spec += [*self.latency_features.spec(), "quality:1,c,c^2"]
        return spec

    def save(self) -> None:
        if self.state_path is None:
            return
        meta: dict[str, Any] = {"learned": self.learned, "policy": self.name}
        if self.congestion is not None:
            meta["price"] = self.congestion.price
        save_state(self.state_path, self.policy, self.labels, self.feature_spec(), meta=meta)
        self._unsaved = 0

    # ------------------------------------------------------------------ the steps (the simulator's entry)

    def context(self, complexity: float, preference: float, context: PlanContext, *, level: int,
                price: bool = True) -> tuple[Observation, Context]:
        """A request's :class:`Observation` and :class:`Context`: its prompt's ``complexity`` and
        complexity ``level`` (:func:`~shared.prompt_features.prompt_features`), the user's
        ``preference`` and what the edge knows (``context``). With ``price`` (a plan, not a rebuilt
        report) the congestion price first takes in the edge's batch and queue."""
        obs = Observation(
            complexity=complexity, preference=preference, rtt_s=context.rtt_s,
            bandwidth_bps=context.bandwidth_bps, device_load=context.device_load,
            device_step_s=context.device_step_s,
            queue_depth=context.queue_depth, active=context.active,
            edge_running=context.edge_running, edge_queued=context.edge_queued,
            edge_cold_start_s=context.edge_cold_start_s,
        )
        x = self.builder.build(obs)
        latency_x = self.latency_features.build(obs) if self.latency_features is not None else None
        penalty = None
        if self.congestion is not None:
            if price:
                self.congestion.observe(context.queue_depth, context.active, preference)
            if self.congestion.price > 0:
                penalty = self.congestion.price * self._edge_steps
        return obs, Context(x, preference, quality_features(complexity), self.quality_row(level), latency_x, penalty)

    def select(self, context: Context, mask: BoolArray | None = None) -> int:
        """The policy's arm (an index into :attr:`arms`) for ``context``, among ``mask`` if given;
        the time it took goes to :attr:`decision_s`."""
        started = time.perf_counter()
        arm = self.policy.select(context, mask)
        self.decision_s.append(time.perf_counter() - started)
        return arm

    def learn(self, arm: int, context: Context, level: int, preference: float, latency_s: float,
              rating: int | None = None) -> float:
        """Learn one outcome of ``arm`` chosen in ``context``: the reward of the profile's quality at
        the prompt's complexity ``level`` (moved towards ``rating``, if any) and the measured
        end-to-end ``latency_s`` (at most :data:`MAX_LEARNED_LATENCY_S`); returns that reward. Saves every
        :attr:`save_every` updates."""
        profiled = self._quality.get((arm, level))
        if profiled is None:
            profiled = self._quality[arm, level] = self.quality(self.arms[arm], level)
        quality = rated_quality(profiled, rating, self.rating_weight)
        latency_s = min(float(latency_s), MAX_LEARNED_LATENCY_S)
        r = reward(preference, quality, latency_s, self.latency_scale_s)
        rated = None if rating is None else rating_quality(rating)
        self.policy.update(arm, context, Outcome(r, latency_s, quality, rated))
        self.learned += 1
        self._unsaved += 1
        if self.state_path is not None and self._unsaved >= self.save_every:
            self.save()
        return r

    # ------------------------------------------------------------------ helpers

    def quality_row(self, level: int) -> FloatArray:
        """Every arm's profile quality at complexity ``level`` (cached per level)."""
        row = self._quality_rows.get(level)
        if row is None:
            row = self._quality_rows[level] = np.asarray([self.quality(a, level) for a in self.arms])
        return row

    def quality(self, plan: RelayPlan, level: int) -> float:
        """The profile's quality of ``plan`` at complexity ``level`` (neutral 0.5 if unprofiled)."""
        if self.profile is None or not self.profile.has(plan):
            return UNPROFILED_QUALITY
        return self.profile.quality(plan, level)

    def decision_time_ms(self, q: float = 99.0) -> float | None:
        """The ``q``-th percentile of the policy's selection time over recent requests, in ms."""
        if not self.decision_s:
            return None
        return float(np.percentile(np.asarray(self.decision_s), q) * 1e3)

    def _remember(self, request: Generate, arm: int | None, context: Context, level: int) -> None:
        # Keyed by identity: request ids are unique per connection only, and the daemon hands
        # feedback the very Generate it planned (the entry keeps it alive, so ids are not reused).
        self._pending[id(request)] = (request, arm, context, level)
        while len(self._pending) > _MAX_PENDING:
            self._pending.popitem(last=False)


def _plain(plan: RelayPlan) -> RelayPlan:
    """The arm a served plan is: the speculative flag is how it was run, not which configuration."""
    return dataclasses.replace(plan, speculative=False) if plan.speculative else plan


def _rescaled(plan: RelayPlan, steps: int) -> RelayPlan:
    """``plan`` 's split fraction applied to ``steps`` total steps (decode on the edge only if still edge-only)."""
    split = round(plan.split * steps / plan.num_inference_steps)
    decode = plan.decode_on if split == steps else "device"
    return RelayPlan(steps, split, plan.sampler, plan.guidance_scale, decode_on=decode)
