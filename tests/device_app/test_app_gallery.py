"""The gallery folder on disk: PNGs with their parameters in text chunks, as other diffusion tools write them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from device_app.app.gallery import Gallery, GalleryError, ImageInfo, a1111_parameters, read_info

INFO = ImageInfo(prompt="a red bag, on the left", seed=42, steps=20, split=10, sampler="dpmpp_2m", guidance=7.5,
                 width=48, height=48, family="demo", family_id="demo-0123456789ab", scheduler="linucb",
                 why="balanced", preference=0.6, edge_s=0.5, device_s=0.25, total_s=0.9, created_at=1_700_000_000.0,
                 request_id="r7")


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)


def test_parameters_chunk_is_a1111s_format():
    text = a1111_parameters(INFO)
    prompt, line = text.split("\n")
    assert prompt == INFO.prompt
    fields = dict(part.split(": ", 1) for part in line.split(", "))  # how A1111's readers split it
    assert fields["Steps"] == "20" and fields["Sampler"] == "dpmpp_2m" and fields["CFG scale"] == "7.5"
    assert fields["Seed"] == "42" and fields["Size"] == "48x48" and fields["Model"] == "demo"
    assert fields["Model hash"] == "0123456789ab" and fields["RISE split"] == "10 edge + 10 device"


def test_add_writes_both_chunks_and_reads_back(tmp_path):
    gallery = Gallery(tmp_path / "g")
    entry = gallery.add(pixels(), INFO)
    with Image.open(entry.path) as image:
        assert image.format == "PNG" and set(image.text) == {"parameters", "rise"}
        assert json.loads(image.text["rise"])["split"] == 10
    assert read_info(entry.path) == INFO
    np.testing.assert_array_equal(entry.image(), pixels())
    assert [p.name for p in (tmp_path / "g").iterdir()] == [entry.path.name]  # no temporary left behind


def test_names_never_collide_and_newest_comes_first(tmp_path):
    gallery = Gallery(tmp_path)
    first = gallery.add(pixels(1), INFO)
    second = gallery.add(pixels(2), ImageInfo(**{**INFO.__dict__, "created_at": INFO.created_at}))  # same second
    third = gallery.add(pixels(3), ImageInfo(**{**INFO.__dict__, "created_at": INFO.created_at + 5, "prompt": "x"}))
    assert len({first.path, second.path, third.path}) == 3
    assert [e.path for e in gallery.entries()][0] == third.path and len(gallery.entries(limit=2)) == 2


def test_a_prompt_outside_latin1_is_kept(tmp_path):
    info = ImageInfo(**{**INFO.__dict__, "prompt": "un sac rouge — 赤いバッグ"})
    entry = Gallery(tmp_path).add(pixels(), info)
    with Image.open(entry.path) as image:
        assert image.text["parameters"].startswith("un sac rouge — 赤いバッグ\n")
    assert read_info(entry.path).prompt == info.prompt


def test_update_delete_export(tmp_path):
    gallery = Gallery(tmp_path / "g")
    entry = gallery.add(pixels(), INFO)
    rated = gallery.update(entry, rating=-1)
    assert read_info(entry.path).rating == -1 and rated.info.rating == -1
    np.testing.assert_array_equal(rated.image(), pixels())
    copy = gallery.export(rated, tmp_path / "pictures")
    again = gallery.export(rated, tmp_path / "pictures")
    assert copy != again and read_info(copy) == read_info(again) == rated.info
    gallery.delete(rated)
    assert gallery.entries() == [] and copy.exists()


def test_bad_parameters_are_refused_with_the_field(tmp_path):
    for data, field in (({"prompt": "x"}, "missing 'seed'"),
                        ({**json.loads(INFO.to_json()), "seed": "seven"}, "'seed': expected int"),
                        ({**json.loads(INFO.to_json()), "offline": 1}, "'offline': expected bool"),
                        ({**json.loads(INFO.to_json()), "rating": 3}, "'rating'")):
        with pytest.raises(GalleryError, match=field):
            ImageInfo.from_json(json.dumps(data))
    newer = {**json.loads(INFO.to_json()), "a_field_from_the_future": 1}
    assert ImageInfo.from_json(json.dumps(newer)) == INFO  # a newer app's extra fields are ignored


def test_an_unwritable_gallery_says_so(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(GalleryError, match="cannot write to the gallery"):
        Gallery(blocker / "g").add(pixels(), INFO)
