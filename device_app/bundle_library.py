"""The device's bundle library: every bundle in one folder, listed for a picker, the chosen one checked in full.

A library folder holds one bundle per subfolder (each a ``rise-export`` folder with its
``manifest.json``). A bundle may be personalized: its small UNet is the user's own, a LoRA fused
in or a full fine-tune (the manifest's ``personalization``), while its ``family_id`` stays the
family's, so any edge serving the family serves it.

:func:`scan_library` lists the folder quickly, without hashing: each bundle's manifest is read
and checked, and every file it lists is looked at for its size (:func:`quick_check_bundle`, the
check the app also runs on a bundle typed in Settings). A folder that fails is skipped with a
one-line reason, never an exception: a bundle folder is untrusted input. The full sha256 check
(:func:`shared.manifest.verify_bundle_files`) runs on the one bundle chosen, when it is loaded
(:class:`device_app.runtime.DeviceBundle`).

:meth:`BundleLibrary.find` picks a bundle by its folder name or its label. No Kivy, no onnxruntime:
the app, its settings screen and ``rise-device bundles`` share this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.errors import BundleError, RiseError
from shared.manifest import (
    MANIFEST_NAME,
    PERSONALIZATION_KINDS,
    BundleManifest,
    Personalization,
    load_manifest,
    resolve_bundle_path,
)

__all__ = [
    "BASE",
    "BUNDLE_KINDS",
    "BundleLibrary",
    "LibraryBundle",
    "SkippedFolder",
    "kind_text",
    "quick_check_bundle",
    "scan_library",
]

BASE = "base"
#: What a bundle's small UNet is: the family's own (``base``), a LoRA fused into it, or a full fine-tune.
BUNDLE_KINDS = (BASE, *PERSONALIZATION_KINDS)


def quick_check_bundle(folder: str | Path) -> BundleManifest:
    """The quick check (no hashing, no ONNX session): the folder, its manifest, every listed file at its size.

    Raises :class:`~shared.errors.BundleError` saying what is wrong; the full sha256 check runs when the
    bundle is loaded (:class:`~device_app.runtime.DeviceBundle`).
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    for rel, entry in sorted(manifest.files.items()):
        path = resolve_bundle_path(folder, rel)
        if not path.is_file():
            raise BundleError(f"bundle {folder}: file {rel} is missing")
        if path.stat().st_size != entry.size:
            raise BundleError(f"bundle {folder}: file {rel} has {path.stat().st_size} bytes, the manifest says "
                              f"{entry.size}")
    return manifest


def kind_text(kind: str, adapter_scale: float | None = None) -> str:
    """The picker's word for a bundle's kind: ``"LoRA x0.8"``, ``"fine-tune"`` or ``"base"``."""
    if kind == "lora":
        return "LoRA" if adapter_scale is None else f"LoRA x{adapter_scale:g}"
    return "fine-tune" if kind == "fine_tune" else kind


def _size_text(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # the loop returns at GB


@dataclass(frozen=True)
class LibraryBundle:
    """One usable bundle of a library: its folder (``name`` is the folder's name) and its manifest.

    ``size_bytes`` counts the manifest and every file it lists. Checked quickly (:func:`quick_check_bundle`):
    its files' sha256 are verified when it is loaded.
    """

    name: str
    folder: Path
    manifest: BundleManifest
    size_bytes: int

    @property
    def personalization(self) -> Personalization | None:
        return self.manifest.personalization

    @property
    def kind(self) -> str:
        """``"base"``, ``"lora"`` or ``"fine_tune"`` (:data:`BUNDLE_KINDS`)."""
        p = self.manifest.personalization
        return BASE if p is None else p.kind

    @property
    def label(self) -> str:
        """The personalization's label, else the family's name and its small model."""
        p = self.manifest.personalization
        return p.label if p is not None else f"{self.manifest.family_name} · {self.manifest.small_model}"

    @property
    def adapter_scale(self) -> float | None:
        p = self.manifest.personalization
        return None if p is None else p.adapter_scale

    @property
    def family_name(self) -> str:
        return self.manifest.family_name

    @property
    def family_id(self) -> str:
        return self.manifest.family_id

    @property
    def precision(self) -> str:
        """``"fp32"``, ``"fp16"``, ``"fp32 int8"``...: the weights' dtype and quantization."""
        m = self.manifest
        return m.dtype if m.quantization is None else f"{m.dtype} {m.quantization}"

    @property
    def kind_text(self) -> str:
        return kind_text(self.kind, self.adapter_scale)

    @property
    def details(self) -> str:
        """``"tiny-sd (tiny-sd-1a2b3c) · LoRA x0.8 · fp32 · 1.2 MB"``: the picker's second line."""
        return (f"{self.family_name} ({self.family_id}) · {self.kind_text} · {self.precision} · "
                f"{_size_text(self.size_bytes)}")

    def line(self) -> str:
        """One line for a listing: folder name, label, then :attr:`details`."""
        return f"{self.name}: {self.label} — {self.details}"


@dataclass(frozen=True)
class SkippedFolder:
    """A subfolder of a library that is not a usable bundle, and why (one line)."""

    name: str
    folder: Path
    reason: str

    def line(self) -> str:
        return f"{self.name}: skipped: {self.reason}"


@dataclass(frozen=True)
class BundleLibrary:
    """The bundles of one library folder (sorted by folder name) and the subfolders skipped."""

    folder: Path
    bundles: tuple[LibraryBundle, ...]
    skipped: tuple[SkippedFolder, ...]

    def __iter__(self) -> Iterator[LibraryBundle]:
        return iter(self.bundles)

    def __len__(self) -> int:
        return len(self.bundles)

    def find(self, key: str) -> LibraryBundle:
        """The bundle whose folder name is ``key``, else the one labelled ``key`` (exactly, then ignoring case).

        Raises :class:`~shared.errors.BundleError`: a skipped folder (with its reason), a label several bundles
        share, or no such bundle (naming the ones there are).
        """
        key = key.strip()
        for bundle in self.bundles:
            if bundle.name == key:
                return bundle
        for skipped in self.skipped:
            if skipped.name == key:
                raise BundleError(f"bundle {key!r} in {self.folder} is not usable: {skipped.reason}")
        matches = ([b for b in self.bundles if b.label == key]
                   or [b for b in self.bundles if b.label.casefold() == key.casefold()])
        if len(matches) > 1:
            names = ", ".join(b.name for b in matches)
            raise BundleError(f"{len(matches)} bundles in {self.folder} are labelled {key!r} ({names}): "
                              "pick one by its folder name")
        if not matches:
            there = ", ".join(b.name for b in self.bundles) or "none usable"
            raise BundleError(f"no bundle named or labelled {key!r} in {self.folder} (there are: {there})")
        return matches[0]

    def holding(self, bundle_folder: str | Path | None) -> LibraryBundle | None:
        """The library's bundle in ``bundle_folder`` (a path; ``None`` if it is not one of this library's)."""
        if not bundle_folder:
            return None
        try:
            target = Path(bundle_folder).resolve()
        except OSError:
            return None
        for bundle in self.bundles:
            if bundle.folder.resolve() == target:
                return bundle
        return None

    def lines(self) -> list[str]:
        """One line per bundle, then one per skipped folder."""
        return [b.line() for b in self.bundles] + [s.line() for s in self.skipped]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, RiseError) else f"{type(exc).__name__}: {text}"


def read_library_bundle(folder: Path) -> LibraryBundle:
    """One subfolder as a :class:`LibraryBundle` (quick check); :class:`~shared.errors.BundleError` if it is not one."""
    if not (folder / MANIFEST_NAME).is_file():
        raise BundleError(f"no {MANIFEST_NAME} (not a bundle folder)")
    manifest = quick_check_bundle(folder)
    size = (folder / MANIFEST_NAME).stat().st_size + sum(entry.size for entry in manifest.files.values())
    return LibraryBundle(folder.name, folder, manifest, size)


def scan_library(folder: str | Path) -> BundleLibrary:
    """Every subfolder of ``folder`` that holds a usable bundle, and a reason for each one that does not.

    Hidden entries (a leading dot) and plain files are passed over. Raises
    :class:`~shared.errors.BundleError` only when ``folder`` itself cannot be listed.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BundleError(f"bundle library {root} is not a folder")
    try:
        children = sorted((c for c in root.iterdir() if not c.name.startswith(".")), key=lambda c: c.name)
    except OSError as exc:
        raise BundleError(f"cannot list bundle library {root}: {exc.strerror or exc}") from None
    bundles: list[LibraryBundle] = []
    skipped: list[SkippedFolder] = []
    for child in children:
        try:
            if not child.is_dir():
                continue
            bundles.append(read_library_bundle(child))
        except Exception as exc:  # a bundle folder is untrusted: whatever is wrong with one, list the others
            skipped.append(SkippedFolder(child.name, child, _one_line(exc)))
    return BundleLibrary(root, tuple(bundles), tuple(skipped))
