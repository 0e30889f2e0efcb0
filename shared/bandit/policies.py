"""Bandit policies behind one interface: disjoint LinUCB and the baselines (fixed arm, random, epsilon-greedy).

A :class:`Policy` picks an arm index for a :class:`~shared.bandit.context.Context` and learns
from an :class:`~shared.bandit.context.Outcome`::

    arm = policy.select(context, allowed)   # allowed: optional bool mask over the arms
    policy.update(arm, context, outcome)
    state = policy.state_dict()             # JSON-able; policy.load_state_dict(state) restores it

The policies here use the context's feature vector ``context.x`` and the outcome's reward; the
factored scheduler the edge serves by default (:class:`~shared.bandit.factored.FactoredLinUCB`)
uses the rest. A context's ``penalty`` (the congestion price each arm pays) is subtracted
from the learning policies' scores; the fixed and random baselines ignore it.

:class:`LinUCB` is the paper's choice: *disjoint* LinUCB (Li et al., 2010, Algorithm 1),
one ridge regression per arm, ``A_a = ridge * I + sum x x^T``, ``b_a = sum r x``,
``theta_a = A_a^-1 b_a``, and the arm maximizing ``theta_a . x + alpha * sqrt(x^T A_a^-1 x)``.
An optional prior mean ``theta_0`` (e.g. from the measured profile, :func:`shared.bandit.prior.profile_prior`)
starts ``b_a`` at ``ridge * theta_0``: the ridge then shrinks towards the prior instead of
towards 0 (Bayesian linear regression with prior ``N(theta_0, I / ridge)``).
``A_a^-1`` is kept up to date with the Sherman-Morrison rank-one formula (O(d^2) per
update instead of an O(d^3) inverse) and recomputed from ``A_a`` every ``refresh_every``
updates of that arm, so round-off cannot drift. Selection is one batched matrix-vector
product over all arms: ~20-40 us for 40 arms and 11 features in numpy.

Why not MABWiser (checked, v2.7.4, numpy 2.4): it runs on numpy 2, but its ``predict``
took 0.33 ms median and 4.7-8.6 ms at the 99th percentile for 36 arms x 11 features on
this machine, and its ``partial_fit`` re-inverts ``A`` with ``np.linalg.inv`` on every
update (2.7-6 ms median); it has no per-request arm mask (a request may fix ``N``), it
persists by pickling (this project never unpickles), and it brings pandas, scikit-learn,
scipy and seaborn onto the edge. This file is ~200 lines of numpy with Sherman-Morrison.

Ties are broken uniformly at random (so an untrained LinUCB does not always pick arm 0).
Every policy carries its own seeded ``numpy.random.Generator``, saved with its state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from shared.validation import check_float, check_int, finite_array, read_float, read_int

from .context import Context, Outcome
from .errors import BanditError, StateError


class Policy(ABC):
    """Chooses one of ``n_arms`` arms for a context vector of ``dim`` features."""

    kind: ClassVar[str] = "policy"

    def __init__(self, n_arms: int, dim: int, *, seed: int = 0, name: str | None = None) -> None:
        self.n_arms = check_int("n_arms", n_arms, lo=1, error=BanditError)
        self.dim = check_int("dim", dim, lo=1, error=BanditError)
        self.name = name or self.kind
        self.rng = np.random.default_rng(seed)
        self.updates = 0

    @abstractmethod
    def select(self, context: Context, allowed: np.ndarray | None = None) -> int:
        """The arm to play for ``context``, among ``allowed`` (bool ``(n_arms,)``) if given."""

    def update(self, arm: int, context: Context, outcome: Outcome) -> None:
        """Learn that ``arm`` brought ``outcome`` in ``context`` (stateless policies ignore it)."""
        self._check_update(arm, context.x, outcome.reward)
        self.updates += 1

    def explain(self, context: Context, arm: int) -> str:
        """A few words on why ``arm`` scores as it does for ``context`` (for the plan's ``why``)."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_arms": self.n_arms, "dim": self.dim, "updates": self.updates,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise StateError("policy state must be a JSON object")
        if state.get("kind") != self.kind:
            raise StateError(f"policy state is for {state.get('kind')!r}, this policy is {self.kind!r}")
        for key, want in (("n_arms", self.n_arms), ("dim", self.dim)):
            if state.get(key) != want:
                raise StateError(f"policy state has {key}={state.get(key)!r}, this policy has {want}")
        self.updates = read_int(state, "updates", lo=0, hi=2**62, error=StateError)
        rng_state: Any = state.get("rng")  # unchecked JSON: PCG64's state setter validates it (caught below)
        try:
            bit_generator = np.random.PCG64()
            bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError) as exc:
            raise StateError(f"policy state: bad rng state ({exc})") from None
        self.rng = np.random.Generator(bit_generator)

    # ------------------------------------------------------------------ helpers

    def _mask(self, allowed: np.ndarray | None) -> np.ndarray | None:
        if allowed is None:
            return None
        mask = np.asarray(allowed, dtype=bool)
        if mask.shape != (self.n_arms,):
            raise BanditError(f"allowed must be a bool mask of shape ({self.n_arms},), got {mask.shape}")
        if not mask.any():
            raise BanditError("no arm is allowed")
        return mask

    def _context(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,):
            raise BanditError(f"context must have shape ({self.dim},), got {x.shape}")
        return x

    def _check_update(self, arm: int, x: np.ndarray, reward: float) -> np.ndarray:
        # numpy ints are fine here (an argmax), but never a bool.
        check_int("arm", int(arm) if isinstance(arm, np.integer) else arm, lo=0, hi=self.n_arms - 1, error=BanditError)
        if not np.isfinite(reward):
            raise BanditError(f"reward must be finite, got {reward!r}")
        x = self._context(x)
        if not np.all(np.isfinite(x)):
            raise BanditError("context holds non-finite values")
        return x

    def _argmax(self, scores: np.ndarray, mask: np.ndarray | None) -> int:
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        best = scores.max()
        if np.isfinite(best):
            ties = np.flatnonzero(scores >= best - 1e-12 * max(1.0, abs(best)))
        else:  # +inf: untried arms of epsilon-greedy
            ties = np.flatnonzero(scores == best)
        return int(ties[0] if len(ties) == 1 else ties[self.rng.integers(len(ties))])

    def _random_allowed(self, mask: np.ndarray | None) -> int:
        if mask is None:
            return int(self.rng.integers(self.n_arms))
        choices = np.flatnonzero(mask)
        return int(choices[self.rng.integers(len(choices))])


class LinUCB(Policy):
    """Disjoint LinUCB with Sherman-Morrison inverse updates (see the module doc): ``rise-sim`` 's
    ``linucb_disjoint``, the scheduler before the factored one (:mod:`.factored`)."""

    kind = "linucb_disjoint"

    def __init__(self, n_arms: int, dim: int, *, alpha: float = 1.0, ridge: float = 1.0,
                 prior_mean: np.ndarray | None = None, refresh_every: int = 1000, seed: int = 0,
                 name: str | None = None) -> None:
        super().__init__(n_arms, dim, seed=seed, name=name)
        self.alpha = check_float("alpha", alpha, lo=0.0, error=BanditError)
        self.ridge = check_float("ridge", ridge, lo=1e-9, error=BanditError)
        self.refresh_every = check_int("refresh_every", refresh_every, lo=1, hi=2**31, error=BanditError)
        eye = np.eye(dim)
        self.A = np.repeat(eye[None] * self.ridge, n_arms, axis=0)
        self.A_inv = np.repeat(eye[None] / self.ridge, n_arms, axis=0)
        # A prior mean theta_0 makes the ridge pull towards it instead of 0: b_0 = ridge * theta_0.
        prior = (np.zeros((n_arms, dim)) if prior_mean is None
                 else finite_array("prior_mean", prior_mean, (n_arms, dim), error=BanditError))
        self.b = self.ridge * prior
        self.theta = prior.copy()
        self.counts = np.zeros(n_arms, dtype=np.int64)

    def ucb(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-arm estimated reward ``theta_a . x`` and uncertainty ``sqrt(x^T A_a^-1 x)``."""
        x = self._context(x)
        mean = self.theta @ x
        var = (self.A_inv @ x) @ x
        return mean, np.sqrt(np.maximum(var, 0.0))

    def select(self, context: Context, allowed: np.ndarray | None = None) -> int:
        mean, width = self.ucb(context.x)
        score = mean + self.alpha * width
        if context.penalty is not None:
            score = score - context.penalty
        return self._argmax(score, self._mask(allowed))

    def update(self, arm: int, context: Context, outcome: Outcome) -> None:
        reward = outcome.reward
        x = self._check_update(arm, context.x, reward)
        self.updates += 1
        self.A[arm] += np.outer(x, x)
        self.b[arm] += reward * x
        self.counts[arm] += 1
        if self.counts[arm] % self.refresh_every == 0:
            self.A_inv[arm] = np.linalg.inv(self.A[arm])
        else:  # Sherman-Morrison: (A + x x^T)^-1 = A^-1 - (A^-1 x)(A^-1 x)^T / (1 + x^T A^-1 x)
            Ax = self.A_inv[arm] @ x
            self.A_inv[arm] -= np.outer(Ax, Ax) / (1.0 + x @ Ax)
        self.theta[arm] = self.A_inv[arm] @ self.b[arm]

    def explain(self, context: Context, arm: int) -> str:
        mean, width = self.ucb(context.x)
        score = mean[arm] + self.alpha * width[arm]
        return f"ucb {score:.2f} (est {mean[arm]:.2f} + {self.alpha:g} x {width[arm]:.2f})"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha, "ridge": self.ridge,
                "refresh_every": self.refresh_every, "A": self.A.tolist(), "b": self.b.tolist(),
                "counts": self.counts.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        k, d = self.n_arms, self.dim
        self.alpha = read_float(state, "alpha", lo=0.0, error=StateError)
        self.ridge = read_float(state, "ridge", lo=1e-9, error=StateError)
        self.refresh_every = read_int(state, "refresh_every", lo=1, hi=2**31, error=StateError)
        A = finite_array("A", state.get("A"), (k, d, d), error=StateError)
        b = finite_array("b", state.get("b"), (k, d), error=StateError)
        counts = finite_array("counts", state.get("counts"), (k,), error=StateError)
        if np.any(counts < 0) or np.any(counts != np.round(counts)):
            raise StateError("counts: expected non-negative integers")
        try:
            A_inv = np.linalg.inv(A)  # exact again after a restart
        except np.linalg.LinAlgError:
            raise StateError("A: a matrix is singular (corrupt state)") from None
        self.A, self.A_inv, self.b, self.counts = A, A_inv, b, counts.astype(np.int64)
        self.theta = np.einsum("kij,kj->ki", A_inv, b)


class FixedArm(Policy):
    """Always the same arm (edge-only, device-only and fixed-split baselines).

    If a request's mask excludes it, the allowed arm nearest in index (arm grids list
    neighbouring splits next to each other).
    """

    kind = "fixed"

    def __init__(self, n_arms: int, dim: int, arm: int, *, seed: int = 0, name: str | None = None) -> None:
        super().__init__(n_arms, dim, seed=seed, name=name)
        self.arm = check_int("arm", arm, lo=0, hi=n_arms - 1, error=BanditError)

    def select(self, context: Context, allowed: np.ndarray | None = None) -> int:
        mask = self._mask(allowed)
        if mask is None or mask[self.arm]:
            return self.arm
        choices = np.flatnonzero(mask)
        return int(choices[np.argmin(np.abs(choices - self.arm))])

    def explain(self, context: Context, arm: int) -> str:
        return "fixed configuration"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "arm": self.arm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("arm") != self.arm:
            raise StateError(f"fixed policy state is for arm {state.get('arm')!r}, this one serves arm {self.arm}")


class RandomPolicy(Policy):
    """A uniformly random allowed arm."""

    kind = "random"

    def select(self, context: Context, allowed: np.ndarray | None = None) -> int:
        return self._random_allowed(self._mask(allowed))

    def explain(self, context: Context, arm: int) -> str:
        return "uniformly random"


class EpsilonGreedy(Policy):
    """Context-free epsilon-greedy: the best running-mean arm, a random one with probability epsilon.

    Untried arms go first. It ignores the context on purpose: it is the "learning without
    context" baseline between the fixed arms and LinUCB.
    """

    kind = "epsilon_greedy"

    def __init__(self, n_arms: int, dim: int, *, epsilon: float = 0.1, seed: int = 0, name: str | None = None) -> None:
        super().__init__(n_arms, dim, seed=seed, name=name)
        self.epsilon = check_float("epsilon", epsilon, lo=0.0, hi=1.0, error=BanditError)
        self.counts = np.zeros(n_arms, dtype=np.int64)
        self.sums = np.zeros(n_arms)

    def means(self) -> np.ndarray:
        return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.inf)

    def select(self, context: Context, allowed: np.ndarray | None = None) -> int:
        mask = self._mask(allowed)
        if self.rng.random() < self.epsilon:
            return self._random_allowed(mask)
        return self._argmax(self.means(), mask)

    def update(self, arm: int, context: Context, outcome: Outcome) -> None:
        self._check_update(arm, context.x, outcome.reward)
        self.updates += 1
        self.counts[arm] += 1
        self.sums[arm] += outcome.reward

    def explain(self, context: Context, arm: int) -> str:
        n = int(self.counts[arm])
        return f"mean reward {self.sums[arm] / n:.2f} over {n}" if n else "not tried yet"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epsilon": self.epsilon, "counts": self.counts.tolist(),
                "sums": self.sums.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epsilon = read_float(state, "epsilon", lo=0.0, hi=1.0, error=StateError)
        counts = finite_array("counts", state.get("counts"), (self.n_arms,), error=StateError)
        if np.any(counts < 0) or np.any(counts != np.round(counts)):
            raise StateError("counts: expected non-negative integers")
        self.counts = counts.astype(np.int64)
        self.sums = finite_array("sums", state.get("sums"), (self.n_arms,), error=StateError)


POLICY_KINDS: dict[str, type[Policy]] = {
    cls.kind: cls for cls in (LinUCB, FixedArm, RandomPolicy, EpsilonGreedy)
}


def make_policy(kind: str, n_arms: int, dim: int, **options: Any) -> Policy:
    """A feature-vector policy by kind name (``linucb_disjoint``, ``fixed``, ``random``, ``epsilon_greedy``)
    with its options (the factored ``linucb`` needs the profile: :meth:`BanditPlanner.from_profile`)."""
    try:
        cls = POLICY_KINDS[kind]
    except KeyError:
        raise BanditError(f"unknown policy {kind!r}; choose one of {', '.join(POLICY_KINDS)}") from None
    try:
        return cls(n_arms, dim, **options)
    except TypeError as exc:
        raise BanditError(f"policy {kind!r}: {exc}") from None
