"""Fixtures of the lab's tests: the Fashion-MNIST data (skip without it) and one untrained demo-shaped family."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fashion_mnist() -> None:
    """Skips the test where Debian's dataset-fashion-mnist is not installed (``make data``)."""
    from lab.demo_family.data import find_fashion_mnist

    try:
        find_fashion_mnist()
    except Exception as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def untrained_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A family folder of the demo family's shape with untrained weights (rise-eval reads it, nothing writes it)."""
    from lab.demo_family.train import build_untrained_family

    return build_untrained_family(tmp_path_factory.mktemp("fam") / "untrained")
