"""The arms of the scheduler: relay configurations, a grid builder and stable labels.

An arm is a :class:`~shared.relay_plan.RelayPlan` (total steps ``N``, split ``k``, sampler,
guidance, decode site): the plan the device receives is the arm itself. The label
(``"N20k10"``, ``"N20k20e"`` for edge-only with the VAE decode on the edge) names an arm in
persisted state and in the simulator's output, independently of its index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shared.relay_plan import RelayPlan

from .errors import BanditError

#: Default split fractions of N: device-only, quarters, edge-only.
DEFAULT_SPLITS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def arm_label(plan: RelayPlan) -> str:
    """``N<steps>k<split>``, plus ``e`` when the VAE decode runs on the edge (sampler/guidance not shown)."""
    return f"N{plan.num_inference_steps}k{plan.split}" + ("e" if plan.decode_on == "edge" else "")


def arm_grid(
    steps: Iterable[int],
    splits: Sequence[float] = DEFAULT_SPLITS,
    *,
    edge_decode: bool = True,
    sampler: str = "dpmpp_2m",
    guidance_scale: float = 7.5,
) -> list[RelayPlan]:
    """Every ``(N, round(f * N))`` for N in ``steps`` and f in ``splits`` (duplicates dropped), in order.

    With ``edge_decode`` each N also gets the edge-only arm whose VAE decode runs on the
    edge (the device receives a PNG instead of a latent). Splits are fractions in [0, 1].
    """
    arms: list[RelayPlan] = []
    for f in splits:
        if not 0.0 <= f <= 1.0:
            raise BanditError(f"split fractions must be in [0, 1], got {f!r}")
    for n in steps:
        ks = sorted({round(f * n) for f in splits})
        arms += [RelayPlan(n, k, sampler, guidance_scale) for k in ks]
        if edge_decode:
            arms.append(RelayPlan(n, n, sampler, guidance_scale, decode_on="edge"))
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
