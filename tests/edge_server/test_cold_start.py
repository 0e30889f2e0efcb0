"""The one estimate of a family's load (edge_server.cold_start), shared by the local pool and the Ray router."""

from __future__ import annotations

import pytest

from edge_server.cold_start import DEFAULT_LOAD_BYTES_PER_S, estimate_load_s

MB = 1_000_000


def test_a_familys_own_loads_are_the_estimate():
    assert estimate_load_s(100 * MB, [2.0, 4.0], [(100 * MB, 2.0), (100 * MB, 4.0), (10 * MB, 0.1)]) == (3.0,
                                                                                                        "measured")


def test_before_its_own_load_the_rate_of_every_load_here_prices_its_bytes():
    # 300 MB loaded in 3 s: 100 MB/s, whichever families they were
    seconds, how = estimate_load_s(50 * MB, [], [(100 * MB, 1.0), (200 * MB, 2.0)])
    assert how == "estimated" and seconds == pytest.approx(0.5)


@pytest.mark.parametrize("measured", [[], [(0, 1.0)], [(100 * MB, 0.0)]])
def test_with_nothing_measured_the_stated_default_rate(measured):
    assert estimate_load_s(250 * MB, [], measured) == (pytest.approx(250 * MB / DEFAULT_LOAD_BYTES_PER_S), "default")
