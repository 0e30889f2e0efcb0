"""The arms of the scheduler: relay configurations, a grid builder and stable labels.

An arm is a :class:`~shared.relay_plan.RelayPlan` (total steps ``N``, split ``k``, sampler,
guidance, decode site): the plan the device receives is the arm itself. The label
(``"N20k10"``, ``"N20k20e"`` for edge-only with the VAE decode on the edge) names an arm in
persisted state and in the simulator's output, independently of its index.

An adaptive arm ``(N, tau)`` hands off once the edge's predicted x0 settles
(:mod:`shared.relay_modes`): ``"N20t0.05"`` for the widest window (any step in ``[1, N - 1]``),
``"N20k4-12t0.05"`` for the window ``[4, 12]``. Fixed arms keep their labels, so state saved
for them still loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shared.relay_plan import RelayPlan

from .errors import BanditError

#: Default split fractions of N: device-only, quarters, edge-only.
DEFAULT_SPLITS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def arm_label(plan: RelayPlan) -> str:
    """``N<steps>k<split>``, plus ``e`` when the VAE decode runs on the edge (sampler/guidance not shown);
    an adaptive arm ``N<steps>t<tau>`` (window ``[1, N - 1]``) or ``N<steps>k<first>-<split>t<tau>``."""
    n = plan.num_inference_steps
    if plan.handoff_tau is not None:
        tau = f"t{plan.handoff_tau:g}"
        if plan.first_split == 1 and plan.split == n - 1:
            return f"N{n}{tau}"
        return f"N{n}k{plan.first_split}-{plan.split}{tau}"
    return f"N{n}k{plan.split}" + ("e" if plan.decode_on == "edge" else "")


def arm_grid(
    steps: Iterable[int],
    splits: Sequence[float] = DEFAULT_SPLITS,
    *,
    edge_decode: bool = True,
    sampler: str = "dpmpp_2m",
    guidance_scale: float = 7.5,
    taus: Sequence[float] = (),
    window: tuple[float, float] = (0.0, 1.0),
) -> list[RelayPlan]:
    """Every ``(N, round(f * N))`` for N in ``steps`` and f in ``splits`` (duplicates dropped), in order.

    With ``edge_decode`` each N also gets the edge-only arm whose VAE decode runs on the
    edge (the device receives a PNG instead of a latent). Splits are fractions in [0, 1].
    Each ``tau`` in ``taus`` adds, per N, the adaptive arm ``(N, tau)`` whose handoff window is
    ``window`` as fractions of N (clamped to ``[1, N - 1]``; the default is the widest); an N
    below 2 has no room for one and gets none.
    """
    arms: list[RelayPlan] = []
    for f in splits:
        if not 0.0 <= f <= 1.0:
            raise BanditError(f"split fractions must be in [0, 1], got {f!r}")
    lo, hi = window
    if not 0.0 <= lo <= hi <= 1.0:
        raise BanditError(f"the handoff window is two fractions 0 <= lo <= hi <= 1, got {window!r}")
    for tau in taus:
        if not 0.0 < tau <= 1.0:
            raise BanditError(f"handoff taus must be in (0, 1], got {tau!r}")
    for n in steps:
        ks = sorted({round(f * n) for f in splits})
        arms += [RelayPlan(n, k, sampler, guidance_scale) for k in ks]
        if edge_decode:
            arms.append(RelayPlan(n, n, sampler, guidance_scale, decode_on="edge"))
        if n >= 2:
            last = min(max(round(hi * n), 1), n - 1)
            first = min(max(round(lo * n), 1), last)
            arms += [RelayPlan(n, last, sampler, guidance_scale, handoff_tau=float(tau),
                               min_split=None if first == 1 else first) for tau in sorted(set(taus))]
    return check_arms(arms)


def check_arms(arms: Sequence[RelayPlan]) -> list[RelayPlan]:
    """The arms as a list, after checking there is at least one and labels are unique."""
    arms = list(arms)
    if not arms:
        raise BanditError("a scheduler needs at least one arm")
    for arm in arms:
        if not isinstance(arm, RelayPlan):
            raise BanditError(f"an arm is a RelayPlan, got {type(arm).__name__}")
        if arm.decode_on == "edge" and arm.split != arm.num_inference_steps:
            raise BanditError(f"{arm_label(arm)}: the decode runs on the edge only for edge-only arms (k = N)")
    labels = [arm_label(a) for a in arms]
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise BanditError(f"duplicate arms: {', '.join(dupes)}")
    return arms
