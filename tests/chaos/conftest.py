"""Fixtures of the chaos suite: a device bundle per test session; the family comes from tests/conftest.py."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def device_bundle(fp32_bundle_dir):
    from device_app.runtime import DeviceBundle

    return DeviceBundle(fp32_bundle_dir, threads=1)
