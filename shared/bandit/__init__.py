"""The scheduler's pure core: arms, context, reward, policies, profiles and persisted state.

No torch and no I/O except the explicit persistence functions (:func:`save_state`,
:func:`load_state`, :func:`load_profile`, :func:`save_profile`). The edge's
:class:`shared.bandit.planner.BanditPlanner` and the simulator (``rise-sim``) are built
on it.

- :mod:`.arms`: arms are :class:`~shared.relay_plan.RelayPlan` s; grid builder, labels.
- :mod:`.context`: :class:`Observation` -> :class:`Context` (feature vector, scales, defaults); :class:`Outcome`.
- :mod:`.reward`: ``w * q + (1 - w) * (1 - L / L_s)``, ``L_s`` = 10 s (:func:`utility`, the one copy),
  and how a rating enters.
- :mod:`.latency`: every arm's latency features (steps x step time + transfer + waits).
- :mod:`.congestion`: the price per edge step, adapted from the edge's queue.
- :mod:`.factored`: :class:`FactoredLinUCB`, the served scheduler (quality per arm, latency shared).
- :mod:`.policies`: disjoint :class:`LinUCB` (Sherman-Morrison) and the baselines; why not MABWiser.
- :mod:`.prior`: the priors from the profile (what the schedulers predict before any data).
- :mod:`.profile`: the measured quality/timing profile format and its builder from rise-eval.
- :mod:`.persistence`: versioned JSON state, written atomically.
"""

from .arms import DEFAULT_SPLITS, arm_grid, arm_label, check_arms
from .context import FEATURE_NAMES, Context, ContextBuilder, Observation, Outcome, describe
from .errors import BanditError, ProfileError, StateError
from .persistence import STATE_VERSION, atomic_write_text, load_state, read_state, save_state
from .policies import POLICY_KINDS, EpsilonGreedy, FixedArm, LinUCB, Policy, RandomPolicy, make_policy
from .prior import profile_prior
from .profile import (
    PROFILE_HINT,
    PROFILE_VERSION,
    ArmQuality,
    Profile,
    Timing,
    load_profile,
    profile_from_eval,
    save_profile,
)
from .reward import DEFAULT_RATING_WEIGHT, LATENCY_SCALE_S, rated_quality, rating_quality, reward, rewards, utility

__all__ = [
    "DEFAULT_RATING_WEIGHT", "DEFAULT_SPLITS", "FEATURE_NAMES", "LATENCY_SCALE_S", "POLICY_KINDS", "PROFILE_HINT",
    "PROFILE_VERSION", "STATE_VERSION", "ArmQuality", "BanditError", "Context", "ContextBuilder", "EpsilonGreedy",
    "FixedArm", "LinUCB", "Observation", "Outcome", "Policy", "Profile", "ProfileError", "RandomPolicy",
    "StateError", "Timing", "arm_grid", "arm_label", "atomic_write_text", "check_arms", "describe", "load_profile",
    "load_state", "make_policy", "profile_from_eval", "profile_prior", "rated_quality", "rating_quality",
    "read_state", "reward", "rewards", "save_profile", "save_state", "utility",
]
