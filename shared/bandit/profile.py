"""Quality/timing profiles: what the scheduler knows about each arm before it serves anything.

A profile says, per relay configuration ``(N, k)``, the image quality measured by the
evaluation harness at each prompt complexity level, and the measured per-step times the
latency of a configuration is made of. The simulator replays requests against it; the
edge's planner takes quality from it (latency it measures). Quality numbers come only
from measurements (``rise-eval --json``); this module never makes any up.

File format (JSON, ``"format": "rise-profile"``, ``"version": 1``)::

    {
      "format": "rise-profile", "version": 1,
      "family": "demo-fashion" | null,
      "synthetic": false,                 # true only for made-up profiles (tests); tools say so
      "quality_metric": "adherence",      # in [0, 1], higher is better
      "levels": [1, 2, ..., 9],           # complexity levels: prompt item counts
      "ceilings": {...},                  # the harness's ceilings, kept for reference
      "timing": {
        "edge_step_s": 0.05,              # one (guided) large-UNet step, one request alone on the edge
        "device_step_s": 0.40,            # one (guided) small-UNet step on the reference device
        "edge_decode_s": 0.03,            # VAE decode on the edge
        "device_decode_s": 0.30,          # VAE decode on the reference device
        "text_encode_s": 0.01,            # edge text encoding (every arm, k = 0 included)
        "handoff_bytes": 300000,          # handoff payload (latent + text embedding + state)
        "image_bytes": 400000,            # PNG of an edge-decoded image
        "edge_batch_step_s": {"1": 0.05, "4": 0.09} | null   # batched step by requests in the batch
      },
      "arms": [{"steps": 20, "split": 10, "quality": [0.93, 0.90, ...], "frechet": 12.3 | null}, ...,
               {"steps": 20, "split": 19, "tau": 0.05, "min_split": 2,      # an adaptive arm (N, tau)
                "quality": [...], "edge_steps": [4.1, 5.0, ...], "frechet": null}],
      "sources": ["eval_n20.json", ...]
    }

``quality[i]`` is the arm's quality at ``levels[i]``. The decode site does not change
quality (same VAE), so one entry serves both decode sites of an edge-only arm. An adaptive arm
(:mod:`shared.relay_modes`: hand off once x0 settles below ``tau``, in ``[min_split, split]``)
also says ``edge_steps[i]``, the mean edge steps it measured at ``levels[i]``: the latency of an
adaptive arm is priced from them (:meth:`Profile.expected_edge_steps`).

Building one: ``python -m shared.bandit.profile --eval EVAL.json[:N] [...] --out profile.json``
reads ``rise-eval --json`` files (``{"ceilings": {...}, "rows": [{"k", "adherence",
"adherence_by_items": {items: adherence}, "frechet", "edge_s", "device_s", ...}], "meta":
{"steps", "family_id", ...}}``, one file per step count N: N from the ``:N`` suffix, else
the file's ``meta.steps`` (or a top-level or row ``steps``/``num_inference_steps``)).
Per-step times are least-squares fits over all rows: ``edge_s = text_encode_s + k * edge_step_s``
and ``device_s = device_decode_s + (N - k) * device_step_s``.
A level missing from a row's ``adherence_by_items`` takes the row's overall adherence.
``--bench FILE`` (a JSON object with any of the ``timing`` keys) overrides fitted times,
e.g. with a benchmark's step times on the real edge GPU; ``handoff_bytes`` and
``image_bytes`` come from the eval files' ``meta`` (``rise-eval --bundle`` measures both: the
largest handoff payload and the median PNG size), else from the bench file or
``--handoff-bytes``/``--image-bytes`` (``rise-relay`` prints the handoff size). Without a
measured ``edge_decode_s`` the edge decode takes the device's decode time: the harness measures
both halves on one machine. A row with ``tau`` (``rise-eval --taus``) is an adaptive arm: ``k`` is
its most edge steps, ``min_split`` its fewest, ``edge_steps_by_items`` / ``edge_steps_mean`` what it
used; the time fits use the fixed rows only. The adaptive rows may also sit in the document's
``"adaptive"`` list (``rise-eval --taus`` writes them there, beside the fixed ``"rows"``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.relay_modes import HandoffRule
from shared.relay_plan import RelayPlan
from shared.validation import (
    check_float,
    check_int,
    check_versioned,
    is_int,
    load_json,
    read_list,
    read_mapping,
    write_json_atomic,
)

from .arms import check_arms
from .errors import ProfileError

PROFILE_FORMAT = "rise-profile"
PROFILE_VERSION = 1
#: What ``rise-sim`` and the planner tell a user who has no profile yet.
PROFILE_HINT = (
    "build a profile from the evaluation harness: `rise-eval --family F --bundle B --steps N --json eval_nN.json` "
    "for each step count N, then `python -m shared.bandit.profile --eval eval_n10.json eval_n20.json ... "
    "--out profile.json` (or `make profile`, on the demo family)"
)
_TIMING_KEYS = ("edge_step_s", "device_step_s", "edge_decode_s", "device_decode_s", "text_encode_s",
                "handoff_bytes", "image_bytes", "edge_batch_step_s")


@dataclass(frozen=True)
class Timing:
    """Measured times (seconds) and payload sizes (bytes); see the module doc."""

    edge_step_s: float
    device_step_s: float
    edge_decode_s: float
    device_decode_s: float
    handoff_bytes: int
    image_bytes: int
    text_encode_s: float = 0.0
    edge_batch_step_s: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        for name in ("edge_step_s", "device_step_s"):
            check_float(f"timing.{name}", getattr(self, name), lo=1e-9, hi=3600.0, error=ProfileError)
        for name in ("edge_decode_s", "device_decode_s", "text_encode_s"):
            check_float(f"timing.{name}", getattr(self, name), lo=0.0, hi=3600.0, error=ProfileError)
        for name in ("handoff_bytes", "image_bytes"):
            check_int(f"timing.{name}", getattr(self, name), lo=1, hi=2**40, error=ProfileError)
        if self.edge_batch_step_s is not None:
            table = {}
            for key, value in dict(self.edge_batch_step_s).items():
                try:
                    size = int(key)
                except (TypeError, ValueError):
                    raise ProfileError(f"timing.edge_batch_step_s: key {key!r} is not a batch size") from None
                check_int("timing.edge_batch_step_s key", size, lo=1, hi=4096, error=ProfileError)
                table[size] = check_float(f"timing.edge_batch_step_s[{size}]", value, lo=1e-9, hi=3600.0,
                                          error=ProfileError)
            if not table:
                raise ProfileError("timing.edge_batch_step_s: empty (use null for no measurement)")
            object.__setattr__(self, "edge_batch_step_s", dict(sorted(table.items())))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _TIMING_KEYS}
        if self.edge_batch_step_s is not None:
            out["edge_batch_step_s"] = {str(k): v for k, v in self.edge_batch_step_s.items()}
        return out


ArmKey = tuple[int, int, float | None, int | None]  # (N, k, tau, first split): one measured configuration


def arm_key(plan: RelayPlan) -> ArmKey:
    """What a profile row is looked up by: ``(N, k, None, None)`` for a fixed split, else ``(N, k, tau, first)``."""
    if plan.handoff_tau is None:
        return (plan.num_inference_steps, plan.split, None, None)
    return (plan.num_inference_steps, plan.split, float(plan.handoff_tau), plan.first_split)


@dataclass(frozen=True)
class ArmQuality:
    """One configuration's measured quality per level (aligned with :attr:`Profile.levels`).

    An adaptive arm (``tau`` set) hands off in ``[min_split or 1, split]`` and measured its mean
    edge steps per level (``edge_steps``)."""

    steps: int
    split: int
    quality: tuple[float, ...]
    frechet: float | None = None
    tau: float | None = None
    min_split: int | None = None
    edge_steps: tuple[float, ...] | None = None

    def plan(self, sampler: str = "dpmpp_2m", guidance_scale: float = 7.5) -> RelayPlan:
        """The relay plan of this row (a ``ValueError`` if it is not a valid one)."""
        return RelayPlan(self.steps, self.split, sampler, guidance_scale, handoff_tau=self.tau,
                         min_split=self.min_split)

    @property
    def key(self) -> ArmKey:
        return arm_key(self.plan())

    @property
    def where(self) -> str:
        if self.tau is None:
            return f"arm N={self.steps} k={self.split}"
        return f"arm N={self.steps} k={self.min_split or 1}-{self.split} tau={self.tau:g}"


@dataclass(frozen=True)
class Profile:
    levels: tuple[int, ...]
    arms: tuple[ArmQuality, ...]
    timing: Timing
    family: str | None = None
    synthetic: bool = False
    quality_metric: str = "adherence"
    ceilings: Mapping[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        levels = tuple(self.levels)
        if not levels:
            raise ProfileError("a profile needs at least one complexity level")
        for level in levels:
            check_int("levels[]", level, lo=1, hi=10_000, error=ProfileError)
        if list(levels) != sorted(set(levels)):
            raise ProfileError(f"levels must be strictly increasing, got {list(levels)}")
        if not self.arms:
            raise ProfileError("a profile needs at least one arm")
        seen = set()
        for arm in self.arms:
            where = arm.where
            try:
                plan = arm.plan()
            except ValueError as exc:
                raise ProfileError(f"{where}: {exc}") from None
            if arm_key(plan) in seen:
                raise ProfileError(f"{where} appears twice")
            seen.add(arm_key(plan))
            if len(arm.quality) != len(levels):
                raise ProfileError(f"{where}: {len(arm.quality)} quality values for {len(levels)} levels")
            for q in arm.quality:
                check_float(f"{where} quality", q, lo=0.0, hi=1.0, error=ProfileError)
            if arm.frechet is not None:
                check_float(f"{where} frechet", arm.frechet, lo=0.0, error=ProfileError)
            if arm.edge_steps is not None:
                if arm.tau is None:
                    raise ProfileError(f"{where}: edge_steps are measured for adaptive arms (with tau) only")
                if len(arm.edge_steps) != len(levels):
                    raise ProfileError(f"{where}: {len(arm.edge_steps)} edge_steps values for {len(levels)} levels")
                for e in arm.edge_steps:
                    check_float(f"{where} edge_steps", e, lo=plan.first_split, hi=plan.split, error=ProfileError)
        object.__setattr__(self, "levels", levels)
        index = {a.key: i for i, a in enumerate(self.arms)}
        object.__setattr__(self, "_index", index)  # a cache, not a field

    @property
    def _arm_index(self) -> dict[ArmKey, int]:
        """The ``arm_key -> arms`` position cache that ``__post_init__`` set (not a field, so not declared)."""
        index: dict[ArmKey, int] = self.__dict__["_index"]
        return index

    # ------------------------------------------------------------------ lookups

    def has(self, plan: RelayPlan) -> bool:
        return arm_key(plan) in self._arm_index

    def _arm(self, plan: RelayPlan) -> ArmQuality:
        try:
            return self.arms[self._arm_index[arm_key(plan)]]
        except KeyError:
            if plan.handoff_tau is None:
                raise ProfileError(f"the profile has no N={plan.num_inference_steps} k={plan.split}") from None
            raise ProfileError(f"the profile has no adaptive N={plan.num_inference_steps} "
                               f"k={plan.first_split}-{plan.split} tau={plan.handoff_tau:g}") from None

    def expected_edge_steps(self, plan: RelayPlan, level: int | None = None) -> float:
        """The edge steps ``plan`` runs: its split, or for an adaptive plan the profile's measured mean at
        the level nearest ``level`` (``None``: the mean over levels), else its window's midpoint."""
        if plan.handoff_tau is None:
            return float(plan.split)
        measured = self._arm(plan).edge_steps if self.has(plan) else None
        if measured is None:
            rule = HandoffRule.of(plan)
            assert rule is not None
            return rule.midpoint
        return float(np.mean(measured)) if level is None else float(measured[self.level_index(level)])

    def level_index(self, level: int) -> int:
        """Index of the profiled level nearest to ``level`` (ties go to the harder level)."""
        levels = np.asarray(self.levels)
        return int(np.flatnonzero(np.abs(levels - level) == np.abs(levels - level).min())[-1])

    def quality(self, plan: RelayPlan, level: int) -> float:
        """Measured quality of ``plan`` 's ``(N, k)`` (or ``(N, tau)``) at the profiled level nearest ``level``."""
        return self._arm(plan).quality[self.level_index(level)]

    def quality_table(self, plans: Sequence[RelayPlan]) -> np.ndarray:
        """``(len(plans), len(levels))`` quality of each plan at each level."""
        return np.asarray([[self.quality(p, lv) for lv in self.levels] for p in plans], dtype=np.float64)

    def plans(self, *, sampler: str = "dpmpp_2m", guidance_scale: float = 7.5,
              edge_decode: bool = True) -> list[RelayPlan]:
        """One arm per profiled ``(N, k)`` (sorted), plus edge-decode twins of edge-only arms; then, per N,
        the adaptive arms ``(N, tau)`` the profile measured (after the fixed ones, so fixed arms keep
        their order and labels)."""
        plans = []
        fixed = [a for a in self.arms if a.tau is None]
        adaptive = [a for a in self.arms if a.tau is not None]
        for arm in sorted(fixed, key=lambda a: (a.steps, a.split)):
            plans.append(RelayPlan(arm.steps, arm.split, sampler, guidance_scale))
            if edge_decode and arm.split == arm.steps:
                plans.append(RelayPlan(arm.steps, arm.split, sampler, guidance_scale, decode_on="edge"))
        for arm in sorted(adaptive, key=lambda a: (a.steps, a.split, a.min_split or 1, a.tau or 0.0)):
            plans.append(arm.plan(sampler, guidance_scale))
        return check_arms(plans)

    def nominal_latency_s(self, plan: RelayPlan, device_slowdown: float = 1.0) -> float:
        """Compute-only latency of ``plan``: one request alone on the edge, the reference device
        slowed by ``device_slowdown``, no link cost (an adaptive plan: its mean edge steps)."""
        t = self.timing
        edge_steps = self.expected_edge_steps(plan)
        edge = t.text_encode_s + edge_steps * t.edge_step_s
        device = (plan.num_inference_steps - edge_steps) * t.device_step_s * device_slowdown
        decode = t.edge_decode_s if plan.decode_on == "edge" else t.device_decode_s * device_slowdown
        return edge + device + decode

    def latency_ref_s(self) -> float:
        """The compute-only latency of the slowest profiled arm on the reference device (device-only at
        the largest N with a slow device, edge-only with a slow edge): a figure of the profile. The
        reward's latency scale no longer comes from here; it is fixed in user terms
        (:data:`shared.bandit.reward.LATENCY_SCALE_S`)."""
        return max(self.nominal_latency_s(p) for p in self.plans(edge_decode=False))

    # ------------------------------------------------------------------ (de)serialization

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "family": self.family,
            "synthetic": self.synthetic,
            "quality_metric": self.quality_metric,
            "levels": list(self.levels),
            "ceilings": dict(self.ceilings),
            "timing": self.timing.to_dict(),
            "arms": [_arm_dict(a) for a in self.arms],
            "sources": list(self.sources),
        }

    @classmethod
    def from_dict(cls, doc: Any, where: str = "profile") -> Profile:
        """Build from a parsed profile document; any problem is a ProfileError naming ``where`` and the field."""
        check_versioned(doc, PROFILE_FORMAT, PROFILE_VERSION, where=where, what="RISE profile", error=ProfileError)
        known = {"format", "version", "family", "synthetic", "quality_metric", "levels", "ceilings", "timing",
                 "arms", "sources"}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ProfileError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            timing = read_mapping(doc, "timing", error=ProfileError)
            missing = [k for k in _TIMING_KEYS if k not in timing and k not in ("text_encode_s", "edge_batch_step_s")]
            extra = sorted(set(timing) - set(_TIMING_KEYS))
            if missing or extra:
                raise ProfileError("timing " + (f"misses {', '.join(missing)}" if missing else
                                                f"has unknown {', '.join(extra)}"))
            parsed = []
            for i, arm in enumerate(read_list(doc, "arms", error=ProfileError)):
                if not isinstance(arm, dict) or not {"steps", "split", "quality"} <= set(arm):
                    raise ProfileError(f"arms[{i}] needs steps, split and quality")
                odd = sorted(set(arm) - _ARM_KEYS)
                if odd:
                    raise ProfileError(f"arms[{i}]: unknown field(s) {', '.join(odd)}")
                quality = read_list(arm, "quality", where=f"arms[{i}]", error=ProfileError)
                edge_steps = (None if arm.get("edge_steps") is None
                              else tuple(read_list(arm, "edge_steps", where=f"arms[{i}]", error=ProfileError)))
                parsed.append(ArmQuality(arm["steps"], arm["split"], tuple(quality), arm.get("frechet"),
                                         tau=arm.get("tau"), min_split=arm.get("min_split"), edge_steps=edge_steps))
            levels = read_list(doc, "levels", error=ProfileError)
            return cls(
                levels=tuple(levels), arms=tuple(parsed), timing=Timing(**timing),
                family=doc.get("family"), synthetic=bool(doc.get("synthetic", False)),
                quality_metric=str(doc.get("quality_metric", "adherence")),
                ceilings=dict(doc.get("ceilings") or {}), sources=tuple(map(str, doc.get("sources") or ())),
            )
        except (ProfileError, TypeError) as exc:  # TypeError: Timing(**timing) with an odd key set
            raise ProfileError(f"{where}: {exc}") from None


_ARM_KEYS = {"steps", "split", "quality", "frechet", "tau", "min_split", "edge_steps"}


def _arm_dict(arm: ArmQuality) -> dict[str, Any]:
    """A profile row as the file has it; a fixed arm's has exactly the keys it had before adaptive arms."""
    out: dict[str, Any] = {"steps": arm.steps, "split": arm.split, "quality": list(arm.quality),
                           "frechet": arm.frechet}
    if arm.tau is not None:
        out.update(tau=arm.tau, min_split=arm.min_split,
                   edge_steps=None if arm.edge_steps is None else list(arm.edge_steps))
    return out


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file."""
    doc = load_json(path, what="profile", hint=PROFILE_HINT, error=ProfileError)
    return Profile.from_dict(doc, where=str(path))


def save_profile(path: str | Path, profile: Profile) -> None:
    write_json_atomic(path, profile.to_dict(), indent=1)


# ---------------------------------------------------------------------- from rise-eval output


def profile_from_eval(
    evals: Iterable[tuple[Mapping[str, Any], int | None, str]],
    *,
    bench: Mapping[str, Any] | None = None,
    family: str | None = None,
) -> Profile:
    """Build a profile from ``rise-eval --json`` documents: ``(doc, N or None, source name)`` each.

    See the module doc for how N, quality and per-step times are read.
    """
    rows: list[tuple[int, int, dict[str, Any], str]] = []  # (N, k, row, source); k: the most edge steps
    ceilings: dict[str, Any] = {}
    sources: list[str] = []
    metas: list[Mapping[str, Any]] = []
    for doc, steps, source in evals:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("rows"), list) or not doc["rows"]:
            raise ProfileError(f"{source}: not a rise-eval --json document (needs a non-empty \"rows\" list)")
        adaptive = doc.get("adaptive", [])
        if not isinstance(adaptive, list):
            raise ProfileError(f"{source}: \"adaptive\" is not a list of rows")
        raw_meta = doc.get("meta")
        meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
        metas.append(meta)
        file_steps = steps or _steps_of(doc) or _steps_of(meta)
        for i, row in enumerate([*doc["rows"], *adaptive]):
            if not isinstance(row, Mapping):
                raise ProfileError(f"{source}: rows[{i}] is not an object")
            n = file_steps or _steps_of(row)
            if n is None:
                raise ProfileError(f"{source}: which step count N? add \":N\" to the file name (e.g. {source}:20)")
            k = check_int(f"{source}: rows[{i}].k", row.get("k"), lo=0, hi=n, error=ProfileError)
            rows.append((int(n), k, dict(row), source))
        if isinstance(doc.get("ceilings"), Mapping) and not ceilings:
            ceilings = dict(doc["ceilings"])
        sources.append(source)
        named = meta.get("family_id", doc.get("family"))
        family = family or (named if isinstance(named, str) else None)

    levels = sorted({_level(key, src) for n, k, row, src in rows for key in (row.get("adherence_by_items") or {})})
    if not levels:
        raise ProfileError("no row has adherence_by_items: the profile needs quality per complexity level")
    arms = []
    for n, k, row, src in sorted(rows, key=lambda r: (r[0], r[1], r[2].get("tau") is not None)):
        overall = check_float(f"{src} N={n} k={k} adherence", row.get("adherence"), lo=0.0, hi=1.0, error=ProfileError)
        by_level = {_level(key, src): v for key, v in (row.get("adherence_by_items") or {}).items()}
        quality = tuple(check_float(f"{src} N={n} k={k} adherence_by_items[{lv}]", by_level.get(lv, overall),
                                    lo=0.0, hi=1.0, error=ProfileError) for lv in levels)
        frechet = row.get("frechet")
        frechet = None if frechet is None else check_float(f"{src} frechet", frechet, lo=0.0, error=ProfileError)
        if row.get("tau") is None:
            arms.append(ArmQuality(n, k, quality, frechet))
            continue
        where = f"{src} N={n} k={k} tau={row['tau']}"
        tau = check_float(f"{where}: tau", row["tau"], lo=0.0, hi=1.0, lo_open=True, error=ProfileError)
        min_split = row.get("min_split")
        first = 1 if min_split is None else check_int(f"{where}: min_split", min_split, lo=1, hi=k, error=ProfileError)
        mean = check_float(f"{where}: edge_steps_mean", row.get("edge_steps_mean"), lo=first, hi=k, error=ProfileError)
        by_steps = {_level(key, src): v for key, v in (row.get("edge_steps_by_items") or {}).items()}
        edge_steps = tuple(check_float(f"{where}: edge_steps_by_items[{lv}]", by_steps.get(lv, mean), lo=first, hi=k,
                                       error=ProfileError) for lv in levels)
        arms.append(ArmQuality(n, k, quality, frechet, tau=tau, min_split=min_split, edge_steps=edge_steps))

    timing = _fit_timing(rows)
    for key in ("handoff_bytes", "image_bytes"):  # rise-eval --bundle measures them (meta)
        sizes = [m[key] for m in metas if is_int(m.get(key)) and m[key] > 0]
        if sizes:
            timing[key] = max(sizes)
    timing.update({k: v for k, v in (bench or {}).items() if k in _TIMING_KEYS})
    unknown = sorted(set(bench or {}) - set(_TIMING_KEYS))
    if unknown:
        raise ProfileError(f"bench: unknown timing key(s) {', '.join(unknown)}; known: {', '.join(_TIMING_KEYS)}")
    for key in ("handoff_bytes", "image_bytes"):
        if key not in timing:
            flag = "--" + key.replace("_", "-")
            raise ProfileError(f"{key} is not in the rise-eval files (rise-eval --bundle measures it): give {flag} "
                               "(rise-relay prints the handoff size) or put it in the --bench file")
    timing.setdefault("edge_decode_s", timing["device_decode_s"])
    return Profile(levels=tuple(levels), arms=tuple(arms), timing=Timing(**timing), family=family,
                   ceilings=ceilings, sources=tuple(sources))


def _steps_of(obj: Mapping[str, Any]) -> int | None:
    for key in ("steps", "num_inference_steps", "N"):
        value = obj.get(key)
        if is_int(value) and value > 0:
            return value
    return None


def _level(key: Any, source: str) -> int:
    try:
        level = int(key)
    except (TypeError, ValueError):
        raise ProfileError(f"{source}: adherence_by_items key {key!r} is not an item count") from None
    if level < 1:
        raise ProfileError(f"{source}: adherence_by_items key {key!r} is not a positive item count")
    return level


def _fit_timing(rows: Sequence[tuple[int, int, Mapping[str, Any], str]]) -> dict[str, Any]:
    """Least-squares per-step times: edge_s = enc + k * edge_step, device_s = dec + (N - k) * device_step."""
    def fit(xs: Sequence[float], ys: Sequence[float], what: str) -> tuple[float, float]:
        if len(set(xs)) < 2:
            raise ProfileError(f"cannot fit {what}: the rows need at least two different step counts")
        design = np.stack([np.ones(len(xs)), np.asarray(xs, dtype=np.float64)], axis=1)
        (intercept, slope), *_ = np.linalg.lstsq(design, np.asarray(ys, dtype=np.float64), rcond=None)
        if not slope > 0:
            raise ProfileError(f"cannot fit {what}: time does not grow with the step count (slope {slope:.3g})")
        return max(float(intercept), 0.0), float(slope)

    ek, es, dk, ds = [], [], [], []
    for n, k, row, src in rows:
        if row.get("tau") is not None:  # adaptive rows: their timed requests used varying edge steps
            continue
        for key in ("edge_s", "device_s"):
            if key not in row:
                raise ProfileError(f"{src}: N={n} k={k} has no {key!r} (per-image seconds)")
        ek.append(k)
        es.append(check_float(f"{src} edge_s", row["edge_s"], lo=0.0, error=ProfileError))
        dk.append(n - k)
        ds.append(check_float(f"{src} device_s", row["device_s"], lo=0.0, error=ProfileError))
    text_encode_s, edge_step_s = fit(ek, es, "the edge step time (edge_s against k)")
    device_decode_s, device_step_s = fit(dk, ds, "the device step time (device_s against N - k)")
    return {"edge_step_s": edge_step_s, "device_step_s": device_step_s, "device_decode_s": device_decode_s,
            "text_encode_s": text_encode_s}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shared.bandit.profile --eval FILE[:N] ... --out profile.json``."""
    parser = argparse.ArgumentParser(prog="python -m shared.bandit.profile",
                                     description="Build a scheduler profile from rise-eval --json files.")
    parser.add_argument("--eval", nargs="+", required=True, metavar="FILE[:N]",
                        help="rise-eval --json output, one per step count N (':N' if the file does not say)")
    parser.add_argument("--bench", help="JSON object of measured timing keys overriding the fitted ones")
    parser.add_argument("--handoff-bytes", type=int)
    parser.add_argument("--image-bytes", type=int)
    parser.add_argument("--edge-decode-s", type=float)
    parser.add_argument("--family")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        evals = []
        for spec in args.eval:
            path, _, n = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
            try:
                doc = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ProfileError(f"cannot read {path}: {exc}") from exc
            evals.append((doc, int(n) if n else None, Path(path).name))
        bench: dict[str, Any] = {}
        if args.bench:
            try:
                bench = json.loads(Path(args.bench).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ProfileError(f"cannot read {args.bench}: {exc}") from exc
            if not isinstance(bench, dict):
                raise ProfileError(f"{args.bench}: expected a JSON object of timing keys")
        for key in ("handoff_bytes", "image_bytes", "edge_decode_s"):
            if getattr(args, key) is not None:
                bench[key] = getattr(args, key)
        profile = profile_from_eval(evals, bench=bench, family=args.family)
        save_profile(args.out, profile)
    except ProfileError as exc:
        print(f"profile: error: {exc}", file=sys.stderr)
        return 2
    t = profile.timing
    print(f"wrote {args.out}: {len(profile.arms)} configurations, levels {list(profile.levels)}, "
          f"edge step {t.edge_step_s * 1e3:.1f} ms, device step {t.device_step_s * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
