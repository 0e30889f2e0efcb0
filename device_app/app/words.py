"""What the app says to its user, in plain words, and the technical line behind "Details".

Pure functions of the gallery's :class:`~device_app.app.gallery.ImageInfo` and the link's
:class:`~device_app.app.backends.LinkStatus`; no Kivy. The main line never says ``N``, ``K`` or a
scheduler's name: "10 steps on the server, 10 on this device — chosen for quality 0.6".
"""

from __future__ import annotations

from device_app.app.backends import LinkStatus
from device_app.app.gallery import ImageInfo

__all__ = ["chosen_by", "describe_split", "details_text", "link_label", "link_help", "loading_text", "plain_summary",
           "timing_line"]

#: How a configuration came to be, by the scheduler that named it (anything else learned: "chosen for quality q").
_CHOSEN = {
    "pinned": "as you fixed it",
    "fixed": "the server's fixed split",
    "edge_only": "the server's edge-only setting",
    "device_only": "the server's device-only setting",
}


def _steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def describe_split(steps: int, split: int) -> str:
    """``"10 steps on the server, 10 on this device"`` (or all on one side)."""
    if split <= 0:
        return f"all {_steps(steps)} on this device"
    if split >= steps:
        return f"all {_steps(steps)} on the server"
    return f"{_steps(split)} on the server, {steps - split} on this device"


def chosen_by(info: ImageInfo) -> str:
    """Why this configuration, in words: a learned choice is "chosen for quality 0.6"."""
    if info.offline:
        return info.why or "no server used"
    return _CHOSEN.get(info.scheduler, f"chosen for quality {info.preference:.1f}")


def loading_text(seconds: float) -> str:
    """The status while the server loads the model first: "The server is loading its model (about 8 s)"."""
    about = f"{max(1, round(seconds))} s" if seconds < 90 else f"{round(seconds / 60)} min"
    return f"The server is loading its model first (about {about})"


def timing_line(info: ImageInfo) -> str:
    if info.offline or info.edge_s is None:
        return f"Made in {info.total_s:.2f} s on this device"
    return f"Made in {info.total_s:.2f} s (server {info.edge_s:.2f} s, this device {info.device_s:.2f} s)"


def plain_summary(info: ImageInfo) -> str:
    """Two lines for the result panel and the gallery: where the steps ran and why; where the time went."""
    return f"{describe_split(info.steps, info.split)} — {chosen_by(info)}\n{timing_line(info)}"


def details_text(info: ImageInfo, link: LinkStatus | None = None, device_load: float | None = None) -> str:
    """The technical lines behind "Details": the relay configuration, who chose it and why, the family, the link."""
    lines = [
        f"N={info.steps} K={info.split} (edge {info.split} · device {info.device_steps} steps) · {info.sampler} · "
        f"guidance {info.guidance:g} · seed {info.seed} · {info.width}×{info.height}",
        f"scheduler {info.scheduler or '-'}: {info.why or '-'}",
    ]
    if info.family or info.family_id:
        family = f"family {info.family} ({info.family_id})" if info.family_id else f"family {info.family}"
        lines.append(family + (f" · personalized: {info.personalization_label}" if info.personalization_label else ""))
    extra = []
    if link is not None and link.rtt_s is not None:
        extra.append(f"rtt {link.rtt_s * 1000:.1f} ms")
    if link is not None and link.bandwidth_bps:
        extra.append(f"bandwidth {link.bandwidth_bps / 1e6:.1f} Mbit/s")
    if device_load is not None:
        extra.append(f"device load {100 * device_load:.0f}%")
    if info.request_id:
        extra.append(f"request {info.request_id}")
    if extra:
        lines.append(" · ".join(extra))
    return "\n".join(lines)


_LINK_LABELS = {
    "device_only": "device only",
    "disconnected": "not connected",
    "connecting": "connecting…",
    "connected": "connected",
    "offline": "offline",
    "unauthorized": "unauthorized",
    "refused": "refused",
}


def link_label(link: LinkStatus) -> str:
    """The indicator's few words."""
    return _LINK_LABELS.get(link.state, link.state)


def link_help(link: LinkStatus) -> str:
    """One sentence on what the state means for the user (empty when there is nothing to do)."""
    if link.state == "unauthorized":
        return "The server refused the access token: check it in Settings."
    if link.state == "offline":
        return "The server cannot be reached: images are made on this device alone."
    if link.state == "refused":
        return f"The server refused this device: {link.detail}" if link.detail else "The server refused this device."
    if link.state == "device_only":
        return "No server set: images are made on this device alone."
    return ""
