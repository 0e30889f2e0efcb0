"""``python -m device_app``: the same as the ``rise-device`` command."""

from __future__ import annotations

import sys

from device_app.cli import main

if __name__ == "__main__":
    sys.exit(main())
