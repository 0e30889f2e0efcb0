"""The scheduler the edge serves: LinUCB on a reward factored into quality and latency.

The reward is a known function of two things a report tells apart (:mod:`.reward`)::

    u_a = w * q_a(c) + (1 - w) * (1 - L_a / L_s)

so :class:`FactoredLinUCB` learns the two separately and recombines them, instead of learning
``u_a`` per arm from one scalar (disjoint LinUCB, :class:`~shared.bandit.policies.LinUCB`):

- **latency**: one ridge regression ``L = beta . phi_a`` **shared by all arms** over the arms'
  latency features (:mod:`.latency`: steps x step time + transfer + waits, in seconds), from
  the profile's arithmetic (:data:`~shared.bandit.latency.LATENCY_PRIOR`) on. Every report
  teaches every arm; this is the shared part of Li et al.'s *hybrid* LinUCB (2010, Alg. 2).
- **quality**: per arm, the profile's measured quality at the prompt's complexity level (the
  context's ``quality_base``, exact: a smooth fit of the table lost ~0.014 of quality, as much as
  arms differ by) plus a correction ``theta_a . [1, c, c^2]`` (``c`` the prompt's complexity)
  that starts at 0 with the weight of ``quality_strength`` ratings and is moved only by users'
  ratings (``(rating + 1) / 2``; an unrated report says nothing the profile did not).
- **forgetting**: both are discounted least squares (D-LinUCB, Russac et al., NeurIPS 2019):
  ``A <- gamma A + x x^T + (1 - gamma) lambda I``, ``b <- gamma b + y x + (1 - gamma) lambda prior``,
  so old evidence fades (an effective window of ``1 / (1 - gamma)`` reports: 500 for latency,
  1,000 ratings per arm for quality) and the prior stays the anchor, never forgotten.
- **choice**: the arm of highest optimistic utility less its congestion price
  (:mod:`.congestion`)::

      w (q^_a + alpha s_q |z|_{A_a^-1}) + (1 - w)(1 - (L^_a - alpha s_L |phi_a|_{A^-1}) / L_s) - price k_a

  ``s_L`` is the running RMS of the latency residuals, ``s_q`` = 0.5 (a +/-1 rating's spread).

A select is two small matrix products over the arms (~30 us for 40 arms); an update one 9x9 and
one 3x3 inverse. The state is JSON (no pickle), restored exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.validation import check_float, finite_array, read_float

from .context import Context, Outcome
from .errors import BanditError, StateError
from .latency import LATENCY_PRIOR
from .policies import Policy
from .reward import LATENCY_SCALE_S

FloatArray = NDArray[np.float64]

QUALITY_DIM = 3  # [1, c, c^2]
RATING_SPREAD = 0.5  # std of a rating in {0, 1} around a quality near 0.5: its noise scale s_q


def quality_features(complexity: float) -> FloatArray:
    """``[1, c, c^2]`` of a prompt's complexity ``c`` (clipped to [0, 1])."""
    c = min(max(float(complexity), 0.0), 1.0)
    return np.array([1.0, c, c * c])


class FactoredLinUCB(Policy):
    """LinUCB on factored quality (per arm) and latency (shared) models; see the module doc."""

    kind = "linucb"

    def __init__(self, n_arms: int, latency_dim: int, *, latency_prior: np.ndarray | None = None,
                 alpha: float = 1.0, quality_strength: float = 30.0, latency_ridge: float = 1.0,
                 latency_discount: float = 0.998, quality_discount: float = 0.999,
                 latency_scale_s: float = LATENCY_SCALE_S, seed: int = 0, name: str | None = None) -> None:
        super().__init__(n_arms, latency_dim, seed=seed, name=name)
        d = latency_dim
        self.alpha = check_float("alpha", alpha, lo=0.0, error=BanditError)
        self.quality_strength = check_float("quality_strength", quality_strength, lo=1e-6, error=BanditError)
        self.latency_ridge = check_float("latency_ridge", latency_ridge, lo=1e-6, error=BanditError)
        self.latency_discount = check_float("latency_discount", latency_discount, lo=0.5, hi=1.0, error=BanditError)
        self.quality_discount = check_float("quality_discount", quality_discount, lo=0.5, hi=1.0, error=BanditError)
        self.latency_scale_s = check_float("latency_scale_s", latency_scale_s, lo=1e-6, error=BanditError)
        prior = np.asarray(LATENCY_PRIOR if latency_prior is None else latency_prior, dtype=np.float64)
        self.latency_prior = finite_array("latency_prior", prior, (d,), error=BanditError)
        # latency: A = ridge I + sum phi phi^T, b = ridge beta_0 + sum L phi (discounted)
        self.A_lat = np.eye(d) * self.latency_ridge
        self.b_lat = self.latency_ridge * self.latency_prior
        self.beta = self.latency_prior.copy()
        self.A_lat_inv: FloatArray = np.eye(d) / self.latency_ridge
        self.residual_ms = 0.25  # running mean square of latency residuals (s^2); 0.5 s to start
        # quality corrections: per arm A_a = strength I + sum z z^T, b_a = sum (y - base) z (discounted)
        eye = np.eye(QUALITY_DIM)
        self.A_q = np.repeat(eye[None] * self.quality_strength, n_arms, axis=0)
        self.b_q = np.zeros((n_arms, QUALITY_DIM))
        self.theta = np.zeros((n_arms, QUALITY_DIM))
        self.A_q_inv = np.repeat(eye[None] / self.quality_strength, n_arms, axis=0)
        self.ratings = np.zeros(n_arms, dtype=np.int64)

    # ---------------------------------------------------------------- prediction

    def predict(self, context: Context) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Per arm: estimated quality, its width, estimated latency (s), its width (s)."""
        phi, z, base = self._parts(context)
        latency = phi @ self.beta
        lat_width = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", phi, self.A_lat_inv, phi), 0.0))
        lat_width *= np.sqrt(self.residual_ms)
        quality = base + self.theta @ z
        q_width = RATING_SPREAD * np.sqrt(np.maximum((self.A_q_inv @ z) @ z, 0.0))
        return quality, q_width, latency, lat_width

    def scores(self, context: Context) -> FloatArray:
        """The optimistic utility of every arm, less its congestion price."""
        quality, q_width, latency, lat_width = self.predict(context)
        w, a = context.preference, self.alpha
        score = (w * (quality + a * q_width)
                 + (1.0 - w) * (1.0 - np.maximum(latency - a * lat_width, 0.0) / self.latency_scale_s))
        if context.penalty is not None:
            score = score - context.penalty
        return np.asarray(score, dtype=np.float64)

    def select(self, context: Context, allowed: np.ndarray | None = None) -> int:
        return self._argmax(self.scores(context), self._mask(allowed))

    def explain(self, context: Context, arm: int) -> str:
        quality, _, latency, _ = self.predict(context)
        penalty = 0.0 if context.penalty is None else float(context.penalty[arm])
        price = f", congestion {penalty:.3f}" if penalty else ""
        return f"quality {quality[arm]:.2f}, latency {latency[arm]:.2f} s{price}"

    # ---------------------------------------------------------------- learning

    def update(self, arm: int, context: Context, outcome: Outcome) -> None:
        self._check_update(arm, np.zeros(self.dim), outcome.reward)
        if not (np.isfinite(outcome.latency_s) and outcome.latency_s >= 0):
            raise BanditError(f"latency must be a non-negative number, got {outcome.latency_s!r}")
        phi_all, z, base = self._parts(context)
        phi = phi_all[arm]
        self.updates += 1
        g, lam = self.latency_discount, self.latency_ridge
        residual = outcome.latency_s - float(phi @ self.beta)
        self.residual_ms += 0.01 * (residual * residual - self.residual_ms)
        self.A_lat = g * self.A_lat + np.outer(phi, phi) + (1.0 - g) * lam * np.eye(self.dim)
        self.b_lat = g * self.b_lat + outcome.latency_s * phi + (1.0 - g) * lam * self.latency_prior
        self.A_lat_inv = np.asarray(np.linalg.inv(self.A_lat), dtype=np.float64)
        self.beta = np.asarray(self.A_lat_inv @ self.b_lat, dtype=np.float64)
        if outcome.rated_quality is not None:
            y = float(outcome.rated_quality)
            if not 0.0 <= y <= 1.0:
                raise BanditError(f"rated quality must be in [0, 1], got {y!r}")
            gq, s = self.quality_discount, self.quality_strength
            self.A_q[arm] = gq * self.A_q[arm] + np.outer(z, z) + (1.0 - gq) * s * np.eye(QUALITY_DIM)
            self.b_q[arm] = gq * self.b_q[arm] + (y - float(base[arm])) * z
            self.A_q_inv[arm] = np.linalg.inv(self.A_q[arm])
            self.theta[arm] = self.A_q_inv[arm] @ self.b_q[arm]
            self.ratings[arm] += 1

    def _parts(self, context: Context) -> tuple[FloatArray, FloatArray, FloatArray]:
        phi, z, base = context.latency_x, context.quality_x, context.quality_base
        if phi is None or z is None or base is None:
            raise BanditError("the factored scheduler needs the context's latency and quality features")
        if base.shape != (self.n_arms,):
            raise BanditError(f"quality_base must have shape ({self.n_arms},), got {base.shape}")
        if phi.shape != (self.n_arms, self.dim):
            raise BanditError(f"latency features must have shape ({self.n_arms}, {self.dim}), got {phi.shape}")
        if z.shape != (QUALITY_DIM,):
            raise BanditError(f"quality features must have shape ({QUALITY_DIM},), got {z.shape}")
        return phi, z, base

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha, "quality_strength": self.quality_strength,
                "latency_ridge": self.latency_ridge, "latency_discount": self.latency_discount,
                "quality_discount": self.quality_discount, "latency_scale_s": self.latency_scale_s,
                "A_lat": self.A_lat.tolist(), "b_lat": self.b_lat.tolist(), "residual_ms": self.residual_ms,
                "A_q": self.A_q.tolist(), "b_q": self.b_q.tolist(), "ratings": self.ratings.tolist(),
                "latency_prior": self.latency_prior.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        k, d = self.n_arms, self.dim
        for name, lo, hi in (("alpha", 0.0, None), ("quality_strength", 1e-6, None), ("latency_ridge", 1e-6, None),
                             ("latency_discount", 0.5, 1.0), ("quality_discount", 0.5, 1.0),
                             ("latency_scale_s", 1e-6, None), ("residual_ms", 0.0, None)):
            setattr(self, name, read_float(state, name, lo=lo, hi=hi, error=StateError))
        A_lat = finite_array("A_lat", state.get("A_lat"), (d, d), error=StateError)
        b_lat = finite_array("b_lat", state.get("b_lat"), (d,), error=StateError)
        A_q = finite_array("A_q", state.get("A_q"), (k, QUALITY_DIM, QUALITY_DIM), error=StateError)
        b_q = finite_array("b_q", state.get("b_q"), (k, QUALITY_DIM), error=StateError)
        ratings = finite_array("ratings", state.get("ratings"), (k,), error=StateError)
        if np.any(ratings < 0) or np.any(ratings != np.round(ratings)):
            raise StateError("ratings: expected non-negative integers")
        self.latency_prior = finite_array("latency_prior", state.get("latency_prior"), (d,), error=StateError)
        try:
            A_lat_inv, A_q_inv = np.linalg.inv(A_lat), np.linalg.inv(A_q)
        except np.linalg.LinAlgError:
            raise StateError("a matrix is singular (corrupt state)") from None
        self.A_lat, self.b_lat, self.A_lat_inv, self.beta = A_lat, b_lat, A_lat_inv, A_lat_inv @ b_lat
        self.A_q, self.b_q, self.A_q_inv = A_q, b_q, A_q_inv
        self.theta = np.einsum("kij,kj->ki", A_q_inv, b_q)
        self.ratings = ratings.astype(np.int64)
