"""Shared fixtures: one tiny family and its fp32 / fp16 / int8 device bundles per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

# Two cores are shared by torch and onnxruntime in these tests (and by make test's two pytest-xdist
# workers); one thread each is fastest overall and keeps float results independent of scheduling.
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lab.tiny_family import build_tiny_family

    return build_tiny_family(tmp_path_factory.mktemp("family") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_family(tiny_family_dir: Path):
    from edge_server.family import load_family

    return load_family(tiny_family_dir)


@pytest.fixture(scope="session")
def fp32_bundle_dir(tiny_family_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import main

    out = tmp_path_factory.mktemp("bundle") / "fp32"
    assert main(["--family", str(tiny_family_dir), "--out", str(out)]) == 0
    return out


def _export(family, family_dir: Path, out: Path, **options):
    from export.onnx_export import ExportOptions, export_bundle

    return export_bundle(ExportOptions(family=family_dir, out=out, **options), family=family)


@pytest.fixture(scope="session")
def fp16_bundle(tiny_family, tiny_family_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return _export(tiny_family, tiny_family_dir, tmp_path_factory.mktemp("bundle") / "fp16", dtype="fp16")


@pytest.fixture(scope="session")
def int8_bundle(tiny_family, tiny_family_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return _export(tiny_family, tiny_family_dir, tmp_path_factory.mktemp("bundle") / "int8", quantize="int8")
