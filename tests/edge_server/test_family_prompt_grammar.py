"""How a family and its bundle say they speak the demo grammar: ``training.json`` and the manifest's ``prompt_grammar``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edge_server.family import detect_prompt_grammar
from lab.demo import DEMO_FAMILY_DIR
from shared.errors import BundleError, FamilyError
from shared.manifest import BundleManifest, load_manifest
from tests.export.test_manifest import make_bundle


def test_a_family_folder_declares_its_grammar_in_training_json(tmp_path: Path) -> None:
    assert detect_prompt_grammar(tmp_path) is None  # no metadata file: free text
    info = tmp_path / "training.json"
    info.write_text(json.dumps({"prompt_grammar": "demo"}))
    assert detect_prompt_grammar(tmp_path) == "demo"
    info.write_text(json.dumps({"command": "python -m lab.demo_family.train --out x"}))  # written before the key
    assert detect_prompt_grammar(tmp_path) == "demo"
    info.write_text(json.dumps({"command": "something else"}))
    assert detect_prompt_grammar(tmp_path) is None
    info.write_text(json.dumps({"prompt_grammar": 3}))
    with pytest.raises(FamilyError, match="prompt_grammar"):
        detect_prompt_grammar(tmp_path)


@pytest.mark.skipif(not (DEMO_FAMILY_DIR / "training.json").is_file(), reason="the demo family is not committed")
def test_the_committed_demo_family_speaks_the_demo_grammar() -> None:
    assert detect_prompt_grammar(DEMO_FAMILY_DIR) == "demo"


def test_the_manifest_carries_the_grammar_and_older_bundles_read_as_free_text(tmp_path: Path) -> None:
    manifest = make_bundle(tmp_path)
    assert manifest.prompt_grammar is None  # a bundle written before the key
    data = manifest.to_dict()
    data.pop("prompt_grammar")
    assert BundleManifest.from_dict(data).prompt_grammar is None
    (tmp_path / "manifest.json").write_text(dataclasses.replace(manifest, prompt_grammar="demo").to_json())
    assert load_manifest(tmp_path).prompt_grammar == "demo"
    with pytest.raises(BundleError, match="prompt_grammar"):
        BundleManifest.from_dict({**data, "prompt_grammar": "Demo Grammar!"})
