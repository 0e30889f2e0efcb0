"""Personalized and broken bundles for the bundle library's tests, made from the session's tiny fp32 bundle.

A personalized bundle is the base bundle with its manifest's ``personalization`` (and
``small_model_sha256``) filled in, as ``rise-export`` writes one for a LoRA or a fine-tune; with
``unet_seed`` its small UNet's weights are changed too (every float initializer scaled by a seeded
factor in [0.5, 1.5], the file re-hashed into the manifest), so pictures made with it differ from the base's.
Files left unchanged are hard-linked (or copied); a file that changes is written anew, never
through a link to the session's bundle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from shared.manifest import MANIFEST_NAME, file_entry

UNET = "unet/model.onnx"


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_bundle(base: Path, out: Path) -> dict[str, Any]:
    """``base`` copied to ``out`` (files linked) except its manifest, which is returned as a dict to edit."""
    shutil.copytree(base, out, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(MANIFEST_NAME))
    manifest: dict[str, Any] = json.loads((base / MANIFEST_NAME).read_text())
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return folder


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # it may be a hard link to the session's bundle: a new file, not a write through the link
    path.write_bytes(data)


def change_unet_weights(folder: Path, manifest: dict[str, Any], seed: int) -> None:
    """Scale every float initializer of ``folder``'s small UNet by a seeded factor in [0.5, 1.5]; re-hash it."""
    import onnx
    from onnx import numpy_helper

    path = folder / UNET
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32 and weights.size > 1:
            scaled = (weights * rng.uniform(0.5, 1.5, weights.shape)).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(scaled, init.name))
    _rewrite(path, model.SerializeToString())
    entry = file_entry(path)
    manifest["files"][UNET] = {"sha256": entry.sha256, "size": entry.size}
    manifest["small_model_sha256"] = entry.sha256  # a record of which weights these are (any 64-hex digest)


def personalize(base: Path, out: Path, *, label: str, kind: str = "lora", scale: float = 0.8,
                unet_seed: int | None = None) -> Path:
    """A personalized copy of ``base`` at ``out``: a fused LoRA (``scale``) or a fine-tune, labelled ``label``."""
    manifest = copy_bundle(base, out)
    base_sha = manifest.get("small_model_sha256") or "0" * 64
    manifest["small_model_sha256"] = base_sha
    if unet_seed is not None:
        change_unet_weights(out, manifest, unet_seed)
    personalization: dict[str, Any] = {"kind": kind, "label": label, "base_small_model": manifest["small_model"],
                                       "base_small_sha256": base_sha}
    if kind == "lora":
        personalization.update(adapter_file=f"{label.lower().replace(' ', '-')}.safetensors",
                               adapter_sha256="ab" * 32, adapter_scale=scale, adapter_format="peft")
    manifest["personalization"] = personalization
    return write_manifest(out, manifest)


def tamper_unet(base: Path, out: Path, *, label: str) -> Path:
    """A copy of ``base`` whose UNet file has the size the manifest says but other bytes (fails only the sha256)."""
    manifest = copy_bundle(base, out)
    data = bytearray((base / UNET).read_bytes())
    data[-1] ^= 0xFF
    _rewrite(out / UNET, bytes(data))
    manifest["personalization"] = {"kind": "fine_tune", "label": label, "base_small_model": manifest["small_model"],
                                   "base_small_sha256": "0" * 64}
    manifest["small_model_sha256"] = "1" * 64
    return write_manifest(out, manifest)


def other_family(base: Path, out: Path, family_id: str) -> Path:
    """A copy of ``base`` claiming another family (an edge serving ``base``'s family refuses its hello)."""
    manifest = copy_bundle(base, out)
    manifest["family_id"] = family_id
    return write_manifest(out, manifest)
