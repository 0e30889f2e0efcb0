"""The gallery on disk: one PNG per image, its generation parameters in the PNG's text chunks.

Each image is written as other diffusion tools write theirs, so any PNG-info reader (A1111's
"PNG Info" tab, ComfyUI, ``exiftool``) shows how it was made:

* ``parameters`` (tEXt, or iTXt when the prompt is not Latin-1): A1111's format, the prompt on
  the first line, then ``Steps: 20, Sampler: dpmpp_2m, CFG scale: 7.5, Seed: 42, Size: 48x48,
  Model: ..., ...``;
* ``rise`` (iTXt): the same as JSON (:class:`ImageInfo`), for machines; the app reads this one back.

No Kivy here. Files are written atomically (a temporary file in the same folder, then a rename), so an
app killed mid-write leaves no half PNG; a PNG in the folder that is not ours, or whose chunks are
unreadable, is skipped (and logged), never a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import RiseError

__all__ = ["GALLERY_DIR", "Gallery", "GalleryEntry", "GalleryError", "ImageInfo", "a1111_parameters"]

log = logging.getLogger("rise.device.app.gallery")

GALLERY_DIR = "gallery"  # under the app's user data folder, unless the settings say otherwise
JSON_KEY = "rise"
PARAMETERS_KEY = "parameters"
INFO_VERSION = 1
#: The largest image the gallery will decode (sides): what an edge could send is bounded by the protocol anyway.
MAX_SIDE = 4096

ImageArray = npt.NDArray[np.uint8]


class GalleryError(RiseError):
    """The gallery folder cannot be read or written (the message names the file and why)."""


@dataclass(frozen=True)
class ImageInfo:
    """How one image was made: what the gallery stores beside its pixels.

    ``steps``/``split``: the relay's ``N``/``k`` (``split`` steps on the edge); ``scheduler`` who chose
    (``"offline"`` on the device alone), ``why`` its reason; ``preference`` the quality/speed slider;
    ``edge_s``/``device_s``/``total_s`` the timings in seconds (``edge_s`` ``None`` offline);
    ``created_at`` Unix seconds; ``rating`` the user's -1/+1 (``None``: not rated);
    ``personalization_label`` the label of the personalized bundle that made it (empty: the family's own small model).
    """

    prompt: str
    seed: int
    steps: int
    split: int
    sampler: str
    guidance: float
    width: int
    height: int
    family: str = ""
    family_id: str = ""
    scheduler: str = ""
    why: str = ""
    preference: float = 0.5
    offline: bool = False
    edge_s: float | None = None
    device_s: float = 0.0
    total_s: float = 0.0
    created_at: float = 0.0
    request_id: str = ""
    rating: int | None = None
    notice: str | None = None
    personalization_label: str = ""

    @property
    def device_steps(self) -> int:
        return self.steps - self.split

    def to_json(self) -> str:
        return json.dumps({"version": INFO_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageInfo:
        """Parse the ``rise`` chunk; :class:`GalleryError` naming the field that is wrong."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise GalleryError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise GalleryError(f"expected a JSON object, got {type(data).__name__}")
        data.pop("version", None)
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name in known:  # fields a newer app added are ignored, not refused
                values[name] = value
        for name in ("prompt", "seed", "steps", "split", "sampler", "guidance", "width", "height"):
            if name not in values:
                raise GalleryError(f"missing {name!r}")
        checks: dict[str, tuple[type, ...]] = {
            "prompt": (str,), "seed": (int,), "steps": (int,), "split": (int,), "sampler": (str,),
            "guidance": (int, float), "width": (int,), "height": (int,), "family": (str,), "family_id": (str,),
            "scheduler": (str,), "why": (str,), "preference": (int, float), "offline": (bool,),
            "device_s": (int, float), "total_s": (int, float), "created_at": (int, float), "request_id": (str,),
            "personalization_label": (str,),
        }
        optional: dict[str, tuple[type, ...]] = {"edge_s": (int, float), "rating": (int,), "notice": (str,)}
        for name, value in values.items():
            allowed = checks.get(name) or optional[name]
            if value is None and name in optional:
                continue
            if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
                raise GalleryError(f"{name!r}: expected {' or '.join(t.__name__ for t in allowed)}, "
                                   f"got {type(value).__name__}")
        if values.get("rating") not in (None, -1, 1):
            raise GalleryError(f"'rating': expected -1, +1 or null, got {values['rating']!r}")
        return cls(**values)


def a1111_parameters(info: ImageInfo) -> str:
    """The ``parameters`` text A1111 writes (and its readers parse): prompt, then ``Key: value, ...``."""
    parts = [
        ("Steps", str(info.steps)), ("Sampler", info.sampler), ("CFG scale", f"{info.guidance:g}"),
        ("Seed", str(info.seed)), ("Size", f"{info.width}x{info.height}"),
    ]
    if info.family:
        parts.append(("Model", info.family))
    if info.family_id:
        parts.append(("Model hash", info.family_id.rsplit("-", 1)[-1]))
    if info.personalization_label:
        parts.append(("RISE personalization", info.personalization_label))
    parts += [("RISE split", f"{info.split} edge + {info.device_steps} device"),
              ("RISE scheduler", info.scheduler or "-")]
    # A1111's format separates with ", " and ": ": keep values free of both.
    line = ", ".join(f"{key}: {value.replace(',', ';').replace(': ', ' ')}" for key, value in parts)
    return f"{info.prompt}\n{line}"


@dataclass(frozen=True)
class GalleryEntry:
    """One image in the gallery folder: its file and how it was made (the pixels are read on demand)."""

    path: Path
    info: ImageInfo

    def image(self) -> ImageArray:
        return read_image(self.path)


def read_image(path: Path) -> ImageArray:
    """The RGB pixels of a PNG (uint8 (H, W, 3)); :class:`GalleryError` if it cannot be read."""
    from PIL import Image  # the device extra ships pillow

    try:
        with Image.open(path) as image:
            if max(image.size) > MAX_SIDE:
                raise GalleryError(f"{path.name}: {image.size[0]}x{image.size[1]} is larger than {MAX_SIDE} a side")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise GalleryError(f"cannot read {path}: {exc}") from None


def read_info(path: Path) -> ImageInfo:
    """The :class:`ImageInfo` in a PNG's ``rise`` chunk; :class:`GalleryError` if there is none or it is bad."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise GalleryError(f"{path.name} is not a PNG")
            text = getattr(image, "text", {}).get(JSON_KEY)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise GalleryError(f"cannot read {path}: {exc}") from None
    if text is None:
        raise GalleryError(f"{path.name} has no {JSON_KEY!r} chunk (not made by RISE)")
    try:
        return ImageInfo.from_json(text)
    except GalleryError as exc:
        raise GalleryError(f"{path.name}: {exc}") from None


def write_png(path: Path, image: ImageArray, info: ImageInfo) -> None:
    """Write ``image`` with ``info`` in its text chunks, atomically (temporary file, then rename)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    chunks.add_text(PARAMETERS_KEY, a1111_parameters(info))  # tEXt; Pillow writes iTXt when not Latin-1
    chunks.add_itxt(JSON_KEY, info.to_json())
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(np.ascontiguousarray(image[..., :3])).save(fh, format="PNG", pnginfo=chunks)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "image"


class Gallery:
    """The gallery folder: :meth:`add`, :meth:`entries` (newest first), :meth:`update`, :meth:`delete`,
    :meth:`export`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def entries(self, limit: int | None = None) -> list[GalleryEntry]:
        """The images in the folder, newest first (by ``created_at``); unreadable or foreign PNGs are skipped."""
        if not self.folder.is_dir():
            return []
        try:
            paths = [p for p in self.folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")]
        except OSError as exc:
            raise GalleryError(f"cannot list the gallery {self.folder}: {exc.strerror or exc}") from None
        found: list[GalleryEntry] = []
        for path in paths:
            try:
                found.append(GalleryEntry(path, read_info(path)))
            except GalleryError as exc:
                log.info("gallery: skipped %s", exc)
        found.sort(key=lambda e: (e.info.created_at, e.path.name), reverse=True)
        return found if limit is None else found[:limit]

    def add(self, image: ImageArray, info: ImageInfo) -> GalleryEntry:
        """Write a new image (named by its time and prompt, never over an existing file)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(info.created_at or time.time()))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            base = f"rise-{stamp}-{_slug(info.prompt)}"
            path = self.folder / f"{base}.png"
            n = 1
            while path.exists():
                n += 1
                path = self.folder / f"{base}-{n}.png"
            write_png(path, image, info)
        except OSError as exc:
            raise GalleryError(f"cannot write to the gallery {self.folder}: {exc.strerror or exc}") from None
        return GalleryEntry(path, info)

    def update(self, entry: GalleryEntry, **changes: Any) -> GalleryEntry:
        """Rewrite ``entry``'s parameters (e.g. its ``rating``), pixels unchanged."""
        info = replace(entry.info, **changes)
        try:
            write_png(entry.path, entry.image(), info)
        except OSError as exc:
            raise GalleryError(f"cannot update {entry.path}: {exc.strerror or exc}") from None
        return GalleryEntry(entry.path, info)

    def delete(self, entry: GalleryEntry) -> None:
        try:
            entry.path.unlink(missing_ok=True)
        except OSError as exc:
            raise GalleryError(f"cannot delete {entry.path}: {exc.strerror or exc}") from None

    def export(self, entry: GalleryEntry, folder: str | Path) -> Path:
        """Copy ``entry`` (pixels and parameters) into ``folder``, keeping its name (a number added if taken)."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / entry.path.name
            n = 1
            while target.exists():
                n += 1
                target = folder / f"{entry.path.stem}-{n}{entry.path.suffix}"
            shutil.copyfile(entry.path, target)
        except OSError as exc:
            raise GalleryError(f"cannot save to {folder}: {exc.strerror or exc}") from None
        return target
