"""``python -m export``: the same as the ``rise-export`` console script."""

from __future__ import annotations

import sys

from export.cli import main

sys.exit(main())
