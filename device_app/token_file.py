"""The device's bearer token, read from a file the user keeps private."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import TextIO

from shared.errors import ConfigError

PROG = "rise-device"


def read_token(path: str | Path, warn: TextIO | None = None) -> str:
    """The token in ``path``, stripped of surrounding whitespace; warns if other users can read the file."""
    path = Path(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ConfigError(f"token file {path} is empty")
    if mode & stat.S_IROTH:
        print(f"{PROG}: warning: token file {path} is readable by every user (chmod 600 {path})",
              file=warn or sys.stderr)
    return token
