"""Priors from the measured profile: each arm's quality (both schedulers) and reward (disjoint LinUCB).

:func:`quality_prior`: ``q_a(c) ~ a0 + a1 c + a2 c^2`` per arm, least squares over the
profile's levels (the factored scheduler's quality prior, :mod:`.factored`; its latency prior
is the arithmetic of :mod:`.latency`).

:func:`profile_prior`, for disjoint LinUCB: the reward ``w q + (1 - w)(1 - L / L_s)`` is linear in the context features
(:mod:`.context`) with coefficients the profile already knows, for one request alone on
the edge:

- quality: ``q_a(c) ~ a0 + a1 c + a2 c^2``, least squares over the profile's levels with
  ``c = level / MAX_LEVEL`` (the complexity of a demo prompt of that many items);
- ``1 - w``: ``1 - (text encoding + k edge steps + edge decode) / L_s`` (an adaptive arm's ``k``:
  the mean edge steps the profile measured for it, :meth:`~.profile.Profile.expected_edge_steps`);
- RTT: ``-1`` (one round trip); transfer: ``-payload_a / handoff_bytes`` (a PNG for
  edge-decode arms, the handoff otherwise);
- device speed ``s``: ``-(N - k device steps + device decode) / L_s`` on the reference device;
- edge queue: a request that needs the edge waits, behind ``queue`` others, about
  ``queue / B`` times a request's edge time, ``mean k * T_B`` (``B`` = the edge's batch
  capacity ``builder.active_ref``, ``mean k`` over the arms that use the edge, ``T_B`` the
  profile's batched step time for ``B`` requests, or ``B`` single steps if not measured: no
  batching gain, the pessimistic side). Normally the queue is empty and this term is never
  tested; when the edge is suddenly overloaded it keeps the scheduler from sending more
  work there while the first slow reports are still on their way;
- device load and the batch's size: 0. How load slows a device and how much a fuller
  batch slows each step are not in the profile; LinUCB learns them.

With ``LinUCB(prior_mean=...)`` the ridge shrinks towards these coefficients instead of
towards zero, so an untrained scheduler already ranks arms as the profile does (no
uniformly random start), rarely-played arms are not mistaken for fast ones when the
context moves far from what was seen (a network drop), and the data correct what the
profile does not know (queueing, load, the real link).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.prompt_features import MAX_LEVEL
from shared.relay_plan import RelayPlan

from .context import FEATURE_NAMES, ContextBuilder
from .profile import Profile


def quality_prior(profile: Profile, arms: Sequence[RelayPlan]) -> np.ndarray:
    """``(len(arms), 3)``: each arm's measured quality as ``a0 + a1 c + a2 c^2`` (fewer terms with
    fewer levels, the rest 0), ``c = level / MAX_LEVEL``."""
    c = np.clip(np.asarray(profile.levels, dtype=np.float64) / MAX_LEVEL, 0.0, 1.0)
    degree = min(2, len(c) - 1)
    design = np.stack([c**p for p in range(degree + 1)], axis=1)
    out = np.zeros((len(arms), 3))
    for i, arm in enumerate(arms):
        quality = np.asarray([profile.quality(arm, level) for level in profile.levels])
        coef, *_ = np.linalg.lstsq(design, quality, rcond=None)
        out[i, :len(coef)] = coef
    return out


def profile_prior(profile: Profile, arms: Sequence[RelayPlan], builder: ContextBuilder) -> np.ndarray:
    """``(len(arms), dim)`` prior mean of disjoint LinUCB's per-arm coefficients (see the module doc)."""
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    tm = profile.timing
    ref = builder.latency_scale_s
    quality = quality_prior(profile, arms)
    # device seconds per unit of the context's speed feature s = step_s / builder.device_step_ref_s
    per_s = builder.device_step_ref_s / tm.device_step_s
    batch = max(1, int(round(builder.active_ref)))
    measured = tm.edge_batch_step_s or {}
    step_b = measured[batch] if batch in measured else batch * tm.edge_step_s
    steps = [profile.expected_edge_steps(a) for a in arms]  # an adaptive arm: its measured mean edge steps
    edge_ks = [k for k in steps if k > 0]
    request_edge_s = (sum(edge_ks) / len(edge_ks)) * step_b if edge_ks else 0.0
    theta = np.zeros((len(arms), len(FEATURE_NAMES)))
    for i, (arm, k) in enumerate(zip(arms, steps, strict=True)):
        for p, name in enumerate(("w", "w*c", "w*c^2")):
            theta[i, col[name]] = quality[i, p]
        edge = tm.text_encode_s + k * tm.edge_step_s + (tm.edge_decode_s if arm.decode_on == "edge" else 0.0)
        device = ((arm.num_inference_steps - k) * tm.device_step_s
                  + (tm.device_decode_s if arm.decode_on == "device" else 0.0))
        payload = tm.image_bytes if arm.decode_on == "edge" else tm.handoff_bytes
        theta[i, col["1-w"]] = 1.0 - edge / ref
        theta[i, col["(1-w)*rtt"]] = -1.0
        theta[i, col["(1-w)*xfer"]] = -payload / builder.handoff_bytes
        theta[i, col["(1-w)*dev"]] = -device * per_s / ref
        if arm.split > 0:
            theta[i, col["(1-w)*queue"]] = -(builder.queue_ref / batch) * request_edge_s / ref
    return theta
