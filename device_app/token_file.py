"""The device's bearer token, read from a file the user keeps private."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from shared.validation import read_token_file

PROG = "rise-device"


def read_token(path: str | Path, warn: TextIO | None = None) -> str:
    """The token in ``path``, stripped of surrounding whitespace; warns if other users can read the file."""
    token, world_readable = read_token_file(path)
    if world_readable:
        print(f"{PROG}: warning: token file {path} is readable by every user (chmod 600 {path})",
              file=warn or sys.stderr)
    return token
