"""Hardware profiles: the edge and device timing a simulation runs on, every figure with its source.

A quality/timing profile (:mod:`shared.bandit.profile`) is measured where the harness runs; the
shipped demo one on a CPU edge, whose large-UNet step is ten times *slower* than the device's,
the reverse of a GPU edge serving phones. A hardware profile replaces only the profile's
:class:`~shared.bandit.profile.Timing` (quality per arm stays the measured one) and adds the
device tiers a user base is made of (``rise-sim --hardware FILE``).

File format (JSON, ``"format": "rise-hardware"``, ``"version": 1``)::

    {
      "format": "rise-hardware", "version": 1,
      "name": "gpu-edge-phones",
      "description": "...",                         # optional
      "edge": {
        "max_batch": 16,                            # most requests in one batched edge step
        "batch_step_s": {"1": FIGURE, "4": FIGURE}, # one guided large-UNet step for that many requests
        "text_encode_s": FIGURE,
        "decode_s": FIGURE                          # VAE decode on the edge
      },
      "payload": {"handoff_bytes": FIGURE, "image_bytes": FIGURE},
      "tiers": [{"name": "iphone-14", "share": 0.3, "step_s": FIGURE, "decode_s": FIGURE}, ...]
    }

where a FIGURE is ``{"value": 0.0462, "source": "published", "note": "..."}``. The source kinds
(:data:`SOURCE_KINDS`):

* ``measured-here``: measured on this project's own machines (rise-eval, the benches);
* ``measured-gpu``: measured by ``bench/gpu_check.py`` on a GPU (``bench/results/gpu_check.json``);
* ``published``: a published figure; the note is the citation;
* ``derived``: arithmetic on published or measured figures; the note is the arithmetic and its citations;
* ``assumed``: no source; the note says why this value.

A published, derived or assumed figure needs a note. ``batch_step_s`` keys are requests per
batched step (a guided request is 2 UNet rows) and must include ``"1"``; between the given sizes
step times are interpolated, beyond the last one the last segment is extrapolated
(:meth:`Hardware.batch_step_times`). Tier shares are each in (0, 1] and sum to 1; the tier with
the largest share is the reference device of the timing. Step times and payload sizes are
positive; text encoding and decode times may be 0 (as in ``Timing``). Everything is checked up
front: a bad file raises :class:`HardwareError` with one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.bandit.latency import batch_step_times
from shared.bandit.profile import Profile, Timing
from shared.errors import RiseError
from shared.validation import (
    check_choice,
    check_float,
    check_identifier,
    check_int,
    check_mapping,
    check_str,
    check_versioned,
    fail,
    load_json,
    read_int,
    read_list,
    read_mapping,
    read_str,
    show,
)

__all__ = [
    "HARDWARE_FORMAT",
    "HARDWARE_VERSION",
    "SHIPPED",
    "SOURCE_KINDS",
    "DeviceTier",
    "Figure",
    "Hardware",
    "HardwareError",
    "hardware_from_profile",
    "load_hardware",
    "shipped_names",
]

HARDWARE_FORMAT = "rise-hardware"
HARDWARE_VERSION = 1
#: Where a figure comes from; see the module doc.
SOURCE_KINDS: tuple[str, ...] = ("measured-here", "measured-gpu", "published", "derived", "assumed")
#: The hardware profiles shipped with RISE, loadable by bare name (``"gpu-edge-phones"``).
SHIPPED = Path(__file__).resolve().parent / "hardware_profiles"

_NEEDS_NOTE = ("published", "derived", "assumed")
_MAX_SECONDS = 3600.0  # Timing's bound
_MAX_BYTES = float(2**40)
_MAX_BATCH = 4096
_SHARE_TOLERANCE = 1e-6
_BATCH_KEY = re.compile(r"[1-9][0-9]{0,3}", re.ASCII)
_TOP_KEYS = ("format", "version", "name", "description", "edge", "payload", "tiers")
_EDGE_KEYS = ("max_batch", "batch_step_s", "text_encode_s", "decode_s")
_PAYLOAD_KEYS = ("handoff_bytes", "image_bytes")
_TIER_KEYS = ("name", "share", "step_s", "decode_s")
_FIGURE_KEYS = ("value", "source", "note")
_PROFILE_NOTE = "the profile's timing (rise-eval on this machine)"


class HardwareError(RiseError, ValueError):
    """A hardware profile is unreadable, malformed, or not one RISE ships."""


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Figure:
    """One number (seconds or bytes) and where it comes from (:data:`SOURCE_KINDS`)."""

    value: float
    source: str
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _check_values("figure", self.value, self.source, self.note))


@dataclass(frozen=True)
class DeviceTier:
    """A class of devices: its share of the users and its small-UNet step and VAE decode times."""

    name: str
    share: float
    step_s: Figure
    decode_s: Figure

    def __post_init__(self) -> None:
        _check_tier("tier", self)


@dataclass(frozen=True)
class Hardware:
    """An edge, a payload and device tiers, every figure sourced; see the module doc."""

    name: str
    description: str
    max_batch: int
    batch_step_s: Mapping[int, Figure]
    text_encode_s: Figure
    edge_decode_s: Figure
    handoff_bytes: Figure
    image_bytes: Figure
    tiers: tuple[DeviceTier, ...]

    def __post_init__(self) -> None:
        # Field names as the file spells them, so a message from here names the file's key.
        check_str("name", self.name, min_len=1, max_len=128, printable=True, error=HardwareError)
        check_str("description", self.description, max_len=10_000, error=HardwareError)
        check_int("edge.max_batch", self.max_batch, lo=1, hi=_MAX_BATCH, error=HardwareError)
        if not isinstance(self.batch_step_s, Mapping):
            fail(HardwareError, "edge.batch_step_s", "a mapping", type(self.batch_step_s).__name__, kind="type")
        table: dict[int, Figure] = {}
        for size, figure in self.batch_step_s.items():
            check_int("edge.batch_step_s key", size, lo=1, hi=_MAX_BATCH, error=HardwareError)
            _check_figure(f"edge.batch_step_s.{size}", figure, positive=True, hi=_MAX_SECONDS)
            table[size] = figure
        if 1 not in table:
            fail(HardwareError, "edge.batch_step_s", 'a step time for batch size "1"', f"sizes {sorted(table)}")
        object.__setattr__(self, "batch_step_s", dict(sorted(table.items())))
        _check_figure("edge.text_encode_s", self.text_encode_s, hi=_MAX_SECONDS)
        _check_figure("edge.decode_s", self.edge_decode_s, hi=_MAX_SECONDS)
        _check_figure("payload.handoff_bytes", self.handoff_bytes, positive=True, hi=_MAX_BYTES)
        _check_figure("payload.image_bytes", self.image_bytes, positive=True, hi=_MAX_BYTES)
        tiers = tuple(self.tiers)
        if not tiers:
            fail(HardwareError, "tiers", "at least one device tier", "none", kind="format")
        seen: set[str] = set()
        for i, tier in enumerate(tiers):
            _check_tier(f"tiers[{i}]", tier)
            if tier.name in seen:
                fail(HardwareError, f"tiers[{i}].name", "a name no other tier has", show(tier.name), kind="format")
            seen.add(tier.name)
        total = math.fsum(t.share for t in tiers)
        if abs(total - 1.0) > _SHARE_TOLERANCE:
            fail(HardwareError, "tiers[].share", f"shares summing to 1 (within {_SHARE_TOLERANCE:g})",
                 f"a sum of {total:.9g}")
        object.__setattr__(self, "tiers", tiers)

    # ------------------------------------------------------------------ what the simulator takes

    def reference_tier(self) -> DeviceTier:
        """The tier with the largest share (the first of equals): the profile's reference device."""
        return max(self.tiers, key=lambda tier: tier.share)  # max keeps the first of equal keys

    def timing(self) -> Timing:
        """The profile timing this hardware gives: the edge's figures, the reference tier's device times.

        A table of batch size 1 alone says nothing about batching, so it becomes
        ``edge_batch_step_s=None`` (the simulator's own batch model), as in a profile without one.
        """
        ref = self.reference_tier()
        batch = {size: figure.value for size, figure in self.batch_step_s.items()}
        return Timing(
            edge_step_s=batch[1],
            device_step_s=ref.step_s.value,
            edge_decode_s=self.edge_decode_s.value,
            device_decode_s=ref.decode_s.value,
            handoff_bytes=round(self.handoff_bytes.value),
            image_bytes=round(self.image_bytes.value),
            text_encode_s=self.text_encode_s.value,
            edge_batch_step_s=batch if len(batch) > 1 else None,
        )

    def apply(self, profile: Profile) -> Profile:
        """``profile`` with its timing replaced by :meth:`timing`; quality and all else kept."""
        return dataclasses.replace(profile, timing=self.timing())

    def batch_step_times(self, max_batch: int | None = None) -> list[float]:
        """``T[b]``, one batched edge step for ``b`` requests, for b = 0..``max_batch`` (default: the edge's),
        as the simulator and the planner's latency features take it
        (:func:`shared.bandit.latency.batch_step_times` of :meth:`timing`)."""
        top = self.max_batch if max_batch is None else check_int("max_batch", max_batch, lo=1, error=HardwareError)
        timing = self.timing()
        return batch_step_times(timing.edge_step_s, timing.edge_batch_step_s, top)

    # ------------------------------------------------------------------ sources

    def figures(self) -> list[tuple[str, Figure]]:
        """Every figure with a readable label, in file order (batch sizes ascending)."""
        out: list[tuple[str, Figure]] = []
        for size, figure in self.batch_step_s.items():
            out.append((f"edge step, {size} request{'' if size == 1 else 's'}", figure))
        out += [("edge text encode", self.text_encode_s), ("edge decode", self.edge_decode_s),
                ("handoff payload", self.handoff_bytes), ("image payload", self.image_bytes)]
        for tier in self.tiers:
            out += [(f"{tier.name} step", tier.step_s), (f"{tier.name} decode", tier.decode_s)]
        return out

    def source_summary(self) -> str:
        """How many figures of each kind: ``"3 published, 9 derived, 3 assumed, 0 measured"``."""
        counts = {kind: 0 for kind in SOURCE_KINDS}
        for _, figure in self.figures():
            counts[figure.source] += 1
        measured = counts["measured-here"] + counts["measured-gpu"]
        text = f"{counts['published']} published, {counts['derived']} derived, {counts['assumed']} assumed, " \
               f"{measured} measured"
        parts = [f"{counts[k]} {k}" for k in ("measured-here", "measured-gpu") if counts[k]]
        return text + (f" ({', '.join(parts)})" if parts else "")

    def source_lines(self) -> list[str]:
        """One line per figure: ``label: value unit [source] note``."""
        lines = []
        for label, figure in self.figures():
            unit = "B" if label.endswith("payload") else "s"
            value = f"{figure.value:.0f}" if unit == "B" else f"{figure.value:.5g}"
            lines.append(f"{label}: {value} {unit} [{figure.source}] {figure.note}".rstrip())
        return lines

    # ------------------------------------------------------------------ (de)serialization

    def to_dict(self) -> dict[str, Any]:
        """The file document (:func:`load_hardware` reads it back)."""
        def fig(figure: Figure) -> dict[str, Any]:
            return {"value": figure.value, "source": figure.source, "note": figure.note}

        return {
            "format": HARDWARE_FORMAT, "version": HARDWARE_VERSION, "name": self.name,
            "description": self.description,
            "edge": {"max_batch": self.max_batch,
                     "batch_step_s": {str(size): fig(f) for size, f in self.batch_step_s.items()},
                     "text_encode_s": fig(self.text_encode_s), "decode_s": fig(self.edge_decode_s)},
            "payload": {"handoff_bytes": fig(self.handoff_bytes), "image_bytes": fig(self.image_bytes)},
            "tiers": [{"name": t.name, "share": t.share, "step_s": fig(t.step_s), "decode_s": fig(t.decode_s)}
                      for t in self.tiers],
        }

    @classmethod
    def from_dict(cls, doc: Any, where: str = "hardware") -> Hardware:
        """Build from a parsed file; any problem is a HardwareError naming ``where`` and the key."""
        check_versioned(doc, HARDWARE_FORMAT, HARDWARE_VERSION, where=where, what="hardware profile",
                        error=HardwareError)
        try:
            _known_keys(doc, _TOP_KEYS, "")
            edge = read_mapping(doc, "edge", error=HardwareError)
            _known_keys(edge, _EDGE_KEYS, "edge")
            steps = read_mapping(edge, "batch_step_s", where="edge", error=HardwareError)
            table: dict[int, Figure] = {}
            for key in steps:
                if not _BATCH_KEY.fullmatch(key):
                    fail(HardwareError, "edge.batch_step_s", f"batch sizes 1-{_MAX_BATCH} as keys",
                         f"key {show(key)}", kind="format")
                table[int(key)] = _read_figure(steps, key, "edge.batch_step_s", positive=True, hi=_MAX_SECONDS)
            payload = read_mapping(doc, "payload", error=HardwareError)
            _known_keys(payload, _PAYLOAD_KEYS, "payload")
            tiers = []
            for i, item in enumerate(read_list(doc, "tiers", min_len=1, error=HardwareError)):
                at = f"tiers[{i}]"
                check_mapping(at, item, error=HardwareError)
                _known_keys(item, _TIER_KEYS, at)
                tiers.append(DeviceTier(
                    name=check_identifier(f"{at}.name", item.get("name"), error=HardwareError),
                    share=_read_share(item, at),
                    step_s=_read_figure(item, "step_s", at, positive=True, hi=_MAX_SECONDS),
                    decode_s=_read_figure(item, "decode_s", at, hi=_MAX_SECONDS),
                ))
            return cls(
                name=read_str(doc, "name", min_len=1, max_len=128, printable=True, error=HardwareError),
                description=read_str(doc, "description", max_len=10_000, optional=True, error=HardwareError) or "",
                max_batch=read_int(edge, "max_batch", lo=1, hi=_MAX_BATCH, where="edge", error=HardwareError),
                batch_step_s=table,
                text_encode_s=_read_figure(edge, "text_encode_s", "edge", hi=_MAX_SECONDS),
                edge_decode_s=_read_figure(edge, "decode_s", "edge", hi=_MAX_SECONDS),
                handoff_bytes=_read_figure(payload, "handoff_bytes", "payload", positive=True, hi=_MAX_BYTES),
                image_bytes=_read_figure(payload, "image_bytes", "payload", positive=True, hi=_MAX_BYTES),
                tiers=tuple(tiers),
            )
        except HardwareError as exc:
            raise HardwareError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- checks


def _check_values(field: str, value: Any, source: Any, note: Any, *, positive: bool = False,
                  hi: float | None = None) -> float:
    """A figure's parts checked, each message naming ``field``; the value as a float."""
    number = check_float(f"{field}.value", value, lo=0.0, lo_open=positive, hi=hi, error=HardwareError)
    check_choice(f"{field}.source", source, SOURCE_KINDS, error=HardwareError)
    check_str(f"{field}.note", note, max_len=2000, error=HardwareError)
    if source in _NEEDS_NOTE and not note.strip():
        fail(HardwareError, f"{field}.note", f"a note (a {source} figure says where it comes from)",
             show(note), kind="format")
    return number


def _check_figure(field: str, figure: Any, *, positive: bool = False, hi: float | None = None) -> None:
    if not isinstance(figure, Figure):
        fail(HardwareError, field, "a Figure", type(figure).__name__, kind="type")
    _check_values(field, figure.value, figure.source, figure.note, positive=positive, hi=hi)


def _check_tier(field: str, tier: Any) -> None:
    if not isinstance(tier, DeviceTier):
        fail(HardwareError, field, "a DeviceTier", type(tier).__name__, kind="type")
    check_identifier(f"{field}.name", tier.name, error=HardwareError)
    check_float(f"{field}.share", tier.share, lo=0.0, hi=1.0, lo_open=True, error=HardwareError)
    _check_figure(f"{field}.step_s", tier.step_s, positive=True, hi=_MAX_SECONDS)
    _check_figure(f"{field}.decode_s", tier.decode_s, hi=_MAX_SECONDS)


def _known_keys(obj: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        fail(HardwareError, where or "document", f"only the keys {', '.join(known)}",
             f"unknown key(s) {', '.join(show(k, 40) for k in unknown)}", kind="format")


def _read_share(obj: Mapping[str, Any], where: str) -> float:
    field = f"{where}.share"
    if "share" not in obj:
        fail(HardwareError, field, "a number in (0, 1] (a required field)", "nothing", kind="type")
    return check_float(field, obj["share"], lo=0.0, hi=1.0, lo_open=True, error=HardwareError)


def _read_figure(obj: Mapping[str, Any], key: str, where: str, *, positive: bool = False,
                 hi: float | None = None) -> Figure:
    """``obj[key]``, a FIGURE object, checked with its full key in every message."""
    field = f"{where}.{key}"
    doc = read_mapping(obj, key, where=where, error=HardwareError)
    _known_keys(doc, _FIGURE_KEYS, field)
    if "value" not in doc or "source" not in doc:
        missing = [k for k in ("value", "source") if k not in doc]
        fail(HardwareError, field, '{"value": ..., "source": ..., "note": ...}', f"no {' or '.join(missing)}",
             kind="format")
    note = doc.get("note", "")
    value = _check_values(field, doc["value"], doc["source"], note, positive=positive, hi=hi)
    return Figure(value, doc["source"], note)

# --------------------------------------------------------------------------- loading


def shipped_names() -> list[str]:
    """The hardware profiles in :data:`SHIPPED`, by the bare name :func:`load_hardware` takes."""
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


def load_hardware(path_or_name: str | Path) -> Hardware:
    """Read and validate a hardware profile: a path to a JSON file, or the bare name of a shipped one.

    A :class:`~pathlib.Path`, or a string with a ``/`` or ending in ``.json``, is a path; any other
    string names a file in :data:`SHIPPED` (``"gpu-edge-phones"``).
    """
    text = str(path_or_name)
    if isinstance(path_or_name, Path) or "/" in text or text.endswith(".json"):
        path = Path(path_or_name)
    else:
        path = SHIPPED / f"{text}.json"
        if not path.is_file():
            raise HardwareError(f"no shipped hardware profile {show(text)}; shipped: "
                                f"{', '.join(shipped_names()) or 'none'} (or give a path to a .json file)")
    doc = load_json(path, what="hardware profile", error=HardwareError)
    return Hardware.from_dict(doc, where=f"hardware {path.name}")


def hardware_from_profile(profile: Profile, classes: Sequence[tuple[str, float, float]]) -> Hardware:
    """The world ``profile`` was measured in, as a hardware profile.

    The edge and payload figures are the profile's timing (``measured-here``); each of ``classes``,
    ``(name, multiplier, share)``, is a device tier whose step and decode are the profile's device
    times times ``multiplier`` (``derived``; the multiplier is an assumed speed class).
    """
    t = profile.timing
    if not classes:
        raise HardwareError("hardware_from_profile: expected at least one (name, multiplier, share) class, got none")

    def here(value: float) -> Figure:
        return Figure(float(value), "measured-here", _PROFILE_NOTE)

    measured = dict(t.edge_batch_step_s) if t.edge_batch_step_s else {}
    measured.setdefault(1, t.edge_step_s)
    tiers = []
    for i, entry in enumerate(classes):
        name, multiplier, share = entry
        x = check_float(f"classes[{i}] multiplier", multiplier, lo=0.0, lo_open=True, error=HardwareError)
        tiers.append(DeviceTier(
            name=name, share=share,
            step_s=Figure(t.device_step_s * x, "derived", f"profile device step x {x:g} (assumed speed class)"),
            decode_s=Figure(t.device_decode_s * x, "derived", f"profile device decode x {x:g} (assumed speed class)"),
        ))
    summary = ", ".join(f"{name} x {mult:g} ({share:g})" for name, mult, share in classes)
    return Hardware(
        name=f"profile-{profile.family or 'timing'}"[:128],
        description=f"the timing of profile {profile.family or '(no family)'}, measured by rise-eval on this "
                    f"machine; device speed classes (multiplier of its device times, share): {summary}",
        max_batch=8,
        batch_step_s={size: here(value) for size, value in measured.items()},
        text_encode_s=here(t.text_encode_s),
        edge_decode_s=here(t.edge_decode_s),
        handoff_bytes=here(t.handoff_bytes),
        image_bytes=here(t.image_bytes),
        tiers=tuple(tiers),
    )


def with_gpu_bench(base: Hardware, bench: Mapping[str, Any], *, name: str, where: str = "gpu bench") -> Hardware:
    """``base`` with its edge figures replaced by a GPU run's (``bench/gpu_check.py`` writes
    ``gpu_bench_<device>.json``: ``edge_batch_step_s`` by requests, ``edge_step_s``, ``text_encode_s``,
    ``edge_decode_s``, ``handoff_bytes``), each ``measured-gpu``; the device tiers stay ``base`` 's."""
    note = f"bench/gpu_check.py ({where})"

    def gpu(key: str, value: Any) -> Figure:
        return Figure(check_float(f"{where}: {key}", value, lo=0.0, error=HardwareError), "measured-gpu", note)

    table = bench.get("edge_batch_step_s")
    steps = dict(base.batch_step_s)
    if isinstance(table, Mapping) and table:
        steps = {}
        for key, value in table.items():
            size = check_int(f"{where}: edge_batch_step_s key", int(key) if str(key).isdigit() else key, lo=1,
                             hi=4096, error=HardwareError)
            steps[size] = gpu(f"edge_batch_step_s[{key}]", value)
    elif "edge_step_s" in bench:
        steps = {1: gpu("edge_step_s", bench["edge_step_s"])}
    if 1 not in steps:
        raise HardwareError(f"{where}: edge_batch_step_s has no batch of 1 request")
    return dataclasses.replace(
        base, name=name, description=f"{base.description} Edge figures measured on a GPU ({where}).",
        max_batch=max(base.max_batch, max(steps)) if isinstance(table, Mapping) and table else base.max_batch,
        batch_step_s=dict(sorted(steps.items())),
        text_encode_s=gpu("text_encode_s", bench["text_encode_s"]) if "text_encode_s" in bench else base.text_encode_s,
        edge_decode_s=gpu("edge_decode_s", bench["edge_decode_s"]) if "edge_decode_s" in bench else base.edge_decode_s,
        handoff_bytes=(gpu("handoff_bytes", bench["handoff_bytes"]) if "handoff_bytes" in bench
                       else base.handoff_bytes),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lab.hardware show NAME|FILE`` lists every figure with its source;
    ``python -m lab.hardware from-gpu-bench BENCH.json --out FILE [--base gpu-edge-phones] [--name N]``
    writes a hardware profile whose edge is the GPU run's (``rise-sim --hardware FILE``)."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m lab.hardware", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show")
    show.add_argument("hardware")
    gpu = sub.add_parser("from-gpu-bench")
    gpu.add_argument("bench")
    gpu.add_argument("--base", default="gpu-edge-phones")
    gpu.add_argument("--name")
    gpu.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            hw = load_hardware(args.hardware)
            print(f"{hw.name}: {hw.source_summary()}")
            print("\n".join(f"  {line}" for line in hw.source_lines()))
            return 0
        bench = load_json(Path(args.bench), what="gpu bench timing", error=HardwareError)
        if not isinstance(bench, Mapping):
            raise HardwareError(f"{args.bench}: expected a JSON object of timing keys")
        base = load_hardware(args.base)
        hw = with_gpu_bench(base, bench, name=args.name or f"{base.name}-measured", where=Path(args.bench).name)
        Path(args.out).write_text(json.dumps(hw.to_dict(), indent=1) + "\n")
        load_hardware(args.out)  # what we wrote reads back
        print(f"wrote {args.out}: {hw.source_summary()}")
        return 0
    except HardwareError as exc:
        print(f"python -m lab.hardware: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
