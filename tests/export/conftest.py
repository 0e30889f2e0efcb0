"""Export fixtures: a plain optimum export folder, made once per session.

The tiny family and the fp32 / fp16 / int8 bundles come from ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def optimum_small_dir(tiny_family_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user gets from optimum alone for the small pipeline (no RISE code involved)."""
    import warnings

    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from optimum.exporters.onnx import onnx_export_from_model

    pipe = StableDiffusionPipeline.from_pretrained(tiny_family_dir, safety_checker=None, requires_safety_checker=False)
    pipe.unet = UNet2DConditionModel.from_pretrained(tiny_family_dir / "unet_small")
    out = tmp_path_factory.mktemp("optimum") / "small-onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        onnx_export_from_model(pipe, out, task="text-to-image")
    return out
