"""Fuzz the protocol decoder, the connection state machines and the handoff codec at scale.

Runs the property-based tests of ``tests/shared/test_fuzz.py`` with more examples (the
normal suite runs ~10,500) and prints the outcome counts per error code, the slowest
single decode and the time taken::

    python bench/fuzz.py --examples 200000          # ~13 minutes on one core
    python bench/fuzz.py --examples 20000 --only handoff

Any property violation (an exception other than the documented errors, a decode slower
than the budget, an accepted input that breaks an invariant) fails with hypothesis'
minimal example and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200_000, help="cases in all (default 200000)")
    parser.add_argument("--only", choices=("text", "handoff", "server", "client"), action="append",
                        help="run only these fuzzers (repeatable)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    # Scale every fuzzer's example count before the test module builds its settings.
    from tests.shared import test_fuzz as probe

    base = sum(probe.EXAMPLES.values())
    os.environ["RISE_FUZZ_SCALE"] = str(args.examples / base)
    import importlib

    fuzz = importlib.reload(probe)
    runs = {
        "text": (fuzz.test_protocol_decoder_gives_a_protocol_error_or_a_message_for_any_frame, fuzz.TEXT_COUNTS),
        "handoff": (fuzz.test_handoff_decoder_gives_a_handoff_error_or_a_valid_handoff_for_any_bytes,
                    fuzz.HANDOFF_COUNTS),
        "server": (fuzz.test_server_connection_survives_any_conversation, fuzz.SERVER_COUNTS),
        "client": (fuzz.test_client_connection_survives_any_server, fuzz.CLIENT_COUNTS),
    }
    total_cases, started_all, failed = 0, time.perf_counter(), False
    for name, (test, counts) in runs.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        try:
            test()
        except Exception as exc:
            failed = True
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - started
        cases = counts.pop("cases", 0)
        total_cases += cases
        shown = ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        slowest = fuzz.SLOWEST.get(name, 0.0)
        print(f"{name:8s} {cases:7d} cases in {seconds:6.1f} s ({cases / max(seconds, 1e-9):6.0f}/s), "
              f"slowest single decode {1e3 * slowest:.1f} ms")
        print(f"         outcomes: {shown}")
    elapsed = time.perf_counter() - started_all
    verdict = "FAILED" if failed else "no crash, no hang, only documented errors"
    print(f"total    {total_cases:7d} cases in {elapsed:.1f} s: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
