"""Run the fault and load checks with real processes and print their figures.

One entry point for ``tests/chaos`` (the checks marked ``chaos``): device disconnects
(a storm, with RSS bounds), the edge killed mid-request and restarted, restarts keeping
the scheduler's state (also after ``kill -9``), SIGTERM with requests in flight, a slow
link (delay + bandwidth cap through a local proxy), a dead link tripping the timeouts
and the keepalive, 64 devices for 2 minutes against one edge, and floods
(``tests/chaos/test_floods.py``): refused generates from a peer that does not read and from
one that does, a ping flood, connections that never say hello, each for ``--flood-duration``
seconds with the daemon's RSS, a legitimate device's latency before/during/after, how long
each flooding connection lived and SIGTERM under the flood; and the descriptor limit::

    python bench/chaos.py                          # everything, ~12 minutes on 2 cores
    python bench/chaos.py --duration 600 --devices 128 -k load
    python bench/chaos.py -k flood --flood-duration 60   # the floods only, ~7 minutes
    python bench/chaos.py --with-ci                # also the fast fault/security checks of the normal suite

Equivalent to ``pytest -m chaos -s tests/chaos``; the figures are the ``[chaos]`` lines,
repeated in a summary at the end. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="load test length in seconds (default 120)")
    parser.add_argument("--devices", type=int, default=64, help="simulated devices in the load test (default 64)")
    parser.add_argument("--rounds", type=int, default=20, help="disconnect-storm rounds of 4 devices (default 20)")
    parser.add_argument("--flood-duration", type=float, default=60.0,
                        help="seconds each flood runs in tests/chaos/test_floods.py (default 60)")
    parser.add_argument("-k", dest="select", help="pytest -k expression (e.g. load, sigterm, link, flood, descriptor)")
    parser.add_argument("--with-ci", action="store_true", help="also run the fast checks of the normal suite")
    args = parser.parse_args(argv)

    env = {**os.environ, "RISE_CHAOS_LOAD_S": str(args.duration), "RISE_CHAOS_DEVICES": str(args.devices),
           "RISE_CHAOS_ROUNDS": str(args.rounds), "RISE_CHAOS_FLOOD_S": str(args.flood_duration),
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "tests/chaos", "-s", "-q", "-p", "no:cacheprovider"]
    if not args.with_ci:
        cmd += ["-m", "chaos"]
    if args.select:
        cmd += ["-k", args.select]
    figures: list[str] = []
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if line.startswith(("[chaos]", "[security]")):
                figures.append(line.rstrip())
    print("\n==== figures ====")
    print("\n".join(figures) if figures else "(none: no check ran)")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
