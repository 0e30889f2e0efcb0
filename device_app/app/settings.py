"""The app's persisted settings: one JSON file, written atomically with mode 0600.

The file holds the edge's access token, so it is created readable by its owner only
(and tightened to 0600 if an older copy was more open). A missing file means the
defaults; an unreadable or malformed one raises :class:`~shared.errors.ConfigError`
naming the file and the field.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.validation import check_float, check_int, check_str, loads_strict, write_json_atomic

__all__ = ["SETTINGS_FILE", "Settings", "SettingsStore"]

SETTINGS_FILE = "settings.json"
_MODE = 0o600


@dataclass(frozen=True)
class Settings:
    """What the user sets once and the app remembers.

    ``server_url`` empty = no edge (every image is made on the device). ``preference``:
    0 = fastest .. 1 = best quality, sent with every request and used for the offline
    step count (``offline_min_steps`` .. ``offline_max_steps``). ``bundle``: the device
    bundle folder in use. ``bundles_dir``: a folder of bundles (one per subfolder,
    :mod:`device_app.bundle_library`) that Settings lists to choose from; the one chosen is
    ``bundle`` (empty: no list, ``bundle`` is typed). ``save_dir``: where "Save" puts a copy of an image
    (empty: ``~/Pictures/rise``).
    ``gallery_dir``: the gallery's folder, kept across restarts (empty: ``gallery/`` in the app's user data folder).
    """

    server_url: str = ""
    token: str = ""
    preference: float = 0.5
    bundle: str = ""
    bundles_dir: str = ""
    save_dir: str = ""
    gallery_dir: str = ""
    offline_min_steps: int = 8
    offline_max_steps: int = 25

    def __post_init__(self) -> None:
        url = self.server_url
        if not isinstance(url, str) or (url and not url.startswith(("ws://", "wss://"))):
            raise ConfigError(f"server_url must be empty or start with ws:// or wss://, got {url!r}")
        if not isinstance(self.token, str) or any(c.isspace() for c in self.token):
            raise ConfigError("token must be a string without whitespace")  # never echo a token
        object.__setattr__(self, "preference", check_float("preference", self.preference, lo=0.0, hi=1.0,
                                                           error=ConfigError))
        for name in ("bundle", "bundles_dir", "save_dir", "gallery_dir"):
            check_str(name, getattr(self, name), error=ConfigError)
        lo = check_int("offline_min_steps", self.offline_min_steps, lo=1, hi=1000, error=ConfigError)
        hi = check_int("offline_max_steps", self.offline_max_steps, lo=1, hi=1000, error=ConfigError)
        if lo > hi:
            raise ConfigError(f"offline steps must be integers with 1 <= min <= max <= 1000, got {lo!r} and {hi!r}")

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (checked like a new one)."""
        if "server_url" in changes:
            changes["server_url"] = str(changes["server_url"]).strip()
        for name in ("token", "bundle", "bundles_dir", "save_dir", "gallery_dir"):
            if name in changes:
                changes[name] = str(changes[name]).strip()
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "settings") -> Settings:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


class SettingsStore:
    """Load and save :class:`Settings` at ``path`` (a JSON file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> Settings:
        """The saved settings, or the defaults if there is no file yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Settings()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read settings {self.path}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            data = loads_strict(text)
        except ValueError as exc:
            raise ConfigError(f"settings {self.path} is not valid JSON: {exc}") from None
        settings = Settings.from_dict(data, str(self.path))
        with contextlib.suppress(OSError):
            if self.path.stat().st_mode & 0o077:  # it holds a token: owner only
                os.chmod(self.path, _MODE)
        return settings

    def save(self, settings: Settings) -> None:
        """Write atomically (a temporary file in the same folder, fsynced, then a rename), mode 0600."""
        try:
            write_json_atomic(self.path, settings.to_dict(), indent=2, sort_keys=True, mode=_MODE)
        except OSError as exc:
            raise ConfigError(f"cannot save settings to {self.path}: {exc.strerror or exc}") from None
