"""The lab: everything that composes the edge and the device for research or demonstration.

Demo-family training, scorer and evaluation (``rise-eval``), the scheduler simulator (``rise-sim``),
the one-process relay (``rise-relay``), the loopback demo and the tiny-family builder. It sits above
``shared``, ``device_app``, ``edge_server`` and ``export`` and may import all of them; none of them
imports it (``tests/test_import_rules.py``).
"""

import edge_server  # noqa: F401  # first: keeps diffusers' duplicate-optimum notice out (edge_server/logs.py)
