"""Writing collage documents (ORA, PNG, settings) and the shipped examples (core.formats)."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.collage import Layer, LayerGroup
from core.formats import (
    ResultLayer,
    collage_settings,
    load_collage,
    save_ora,
    save_png,
)
from tests.format_files import EXAMPLES, has_warning, solid, texts

# ---------------------------------------------------------------------------------------------- writing


def sample_tree() -> list[Layer | LayerGroup]:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (12, 9, 4), dtype=np.uint8)
    noisy[..., 3] = np.maximum(noisy[..., 3], 1)  # no fully transparent rows: nothing to crop
    return [
        Layer("a plate", solid(40, 30, (240, 240, 240, 255)), offset=(10, 20), name="a plate"),
        LayerGroup(
            name="food",
            opacity=0.75,
            children=[
                Layer("a bun", noisy, offset=(-4, -3), name="a bun", strength=0.5),
                # a default name with its text from the settings
                Layer(
                    "a pickle", solid(6, 6, (0, 160, 0, 128)), offset=(60, 60), name="Layer 2", opacity=0.5
                ),
            ],
        ),
        Layer("a fly", solid(3, 3), offset=(1, 1), name="a fly", visible=False),
    ]


def test_ora_write_read_round_trip(tmp_path: Path):
    tree = sample_tree()
    result = np.full((64, 64, 3), 77, np.uint8)
    path = save_ora(
        tmp_path / "out.ora", tree, 64, 64, result, "collage result (seed 1)", {"prompt": "lunch"}
    )
    doc = load_collage(path)
    c = doc.collage
    assert c.prompt == "lunch"
    expected = [tree[0], *tree[1].children]
    assert [(layer.name, layer.text) for layer in c.layers] == [(e.name, e.text) for e in expected]
    for got, want in zip(c.layers, expected, strict=True):
        assert got.offset == want.offset
        np.testing.assert_array_equal(got.image, want.image)
    assert c.layers[1].strength == 0.5
    assert c.layers[2].opacity == pytest.approx(0.75 * 0.5)
    assert has_warning(doc, "'collage result (seed 1)'", "earlier result")
    # the tree keeps the hidden layer, the group and the result (marked as a result)
    assert isinstance(doc.tree[1], LayerGroup) and doc.tree[1].name == "food"
    assert doc.tree[2].name == "a fly" and not doc.tree[2].visible
    assert isinstance(doc.tree[-1], ResultLayer)
    c.validate()


def test_ora_file_follows_the_spec(tmp_path: Path):
    path = save_ora(tmp_path / "spec.ora", sample_tree(), 640, 320, np.zeros((320, 640, 4), np.uint8), "r")
    with zipfile.ZipFile(path) as archive:
        first = archive.infolist()[0]
        assert (first.filename, first.compress_type) == ("mimetype", zipfile.ZIP_STORED)
        assert archive.read("mimetype") == b"image/openraster"
        merged = Image.open(io.BytesIO(archive.read("mergedimage.png")))
        thumb = Image.open(io.BytesIO(archive.read("Thumbnails/thumbnail.png")))
        assert merged.size == (640, 320)
        assert max(thumb.size) <= 256 and thumb.size == (256, 128)
        settings = json.loads(archive.read("collage.json"))
    assert settings["results"] == ["r"]
    assert settings["layers"] == {"a bun": {"strength": 0.5}, "Layer 2": {"text": "a pickle"}}


def test_rewriting_a_loaded_document_keeps_old_results_out(tmp_path: Path):
    first = save_ora(tmp_path / "1.ora", sample_tree(), 64, 64, np.zeros((64, 64, 3), np.uint8), "first")
    doc = load_collage(first)
    # the CLI's call: several results at once, settings from the (possibly overridden) collage
    doc.collage.seed = 11
    results = [("second", np.zeros((64, 64, 3), np.uint8)), ("third", np.zeros((64, 64, 4), np.uint8))]
    second = save_ora(tmp_path / "2.ora", doc.tree, 64, 64, results=results, collage=doc.collage)
    again = load_collage(second)
    assert texts(again) == texts(doc)
    assert again.collage.seed == 11
    assert sum("earlier result" in w for w in again.warnings) == 3


def test_ora_writer_rejects_bad_input(tmp_path: Path):
    with pytest.raises(ValueError, match="the canvas is 64×64"):
        save_ora(tmp_path / "x.ora", sample_tree(), 64, 64, np.zeros((32, 32, 3), np.uint8), "r")
    with pytest.raises(ValueError, match="unknown key 'sed'"):
        save_ora(tmp_path / "x.ora", sample_tree(), 64, 64, settings={"sed": 1})


def test_collage_settings_round_trip(tmp_path: Path):
    c = load_collage(save_ora(tmp_path / "a.ora", sample_tree(), 64, 64)).collage
    c.prompt, c.seed, c.guidance_scale = "x", np.int64(4), 3.0
    data = collage_settings(c)
    json.dumps(data)  # numpy scalars became plain numbers
    assert data["seed"] == 4 and data["layers"]["a bun"] == {"strength": 0.5}


def test_clip_skip_setting(tmp_path: Path):
    c = load_collage(save_ora(tmp_path / "a.ora", sample_tree(), 64, 64, settings={"clip_skip": 2})).collage
    assert c.clip_skip == 2 and collage_settings(c)["clip_skip"] == 2
    assert load_collage(save_ora(tmp_path / "b.ora", sample_tree(), 64, 64)).collage.clip_skip is None
    with pytest.raises(ValueError, match="clip_skip: must be a whole number or null"):
        save_ora(tmp_path / "c.ora", sample_tree(), 64, 64, settings={"clip_skip": "2"})


def test_save_png(tmp_path: Path):
    for shape in [(5, 7, 3), (5, 7, 4), (5, 7)]:
        image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        path = save_png(tmp_path / f"{len(shape)}-{shape[-1]}.png", image)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    with pytest.raises(ValueError, match="8-bit"):
        save_png(tmp_path / "f.png", np.zeros((4, 4, 3), np.float32))


# ---------------------------------------------------------------------------------------------- examples


def test_bento_example():
    doc = load_collage(EXAMPLES / "bento")
    c = doc.collage
    c.validate()
    assert (c.width, c.height) == (256, 256)
    assert texts(doc) == ["rice", "salmon sushi", "sliced ginger", "edamame"]
    assert isinstance(c.background, np.ndarray) and not doc.warnings


def test_room_example():
    doc = load_collage(EXAMPLES / "room.ora")
    c = doc.collage
    c.validate()
    assert (c.width, c.height) == (256, 256)
    assert texts(doc) == ["a window", "a wooden table", "a red armchair", "a potted plant"]
    assert isinstance(c.background, np.ndarray)  # the "Background" layer
    assert any(isinstance(node, LayerGroup) for node in doc.tree)
    assert any(isinstance(node, Layer) and not node.visible for node in doc.tree)  # the hidden cat
    assert c.layers[2].attention_weight == 1.5
    assert c.layers[3].offset[0] + c.layers[3].width > 256  # the plant reaches past the edge


def test_shapes_example_speaks_the_demo_models_language():
    doc = load_collage(EXAMPLES / "shapes.ora")
    c = doc.collage
    c.validate()
    assert (c.width, c.height) == (64, 64) and isinstance(c.background, np.ndarray)
    assert texts(doc) == ["red heart", "yellow star", "purple square"]
    # The pieces in use: attention 1.5, ControlNet edges, per-layer strengths.
    assert [la.attention_weight for la in c.layers] == [1.5, 1.0, 1.0]
    assert [la.control_weight for la in c.layers] == [0.0, 1.0, 0.0]
    assert [c.layer_strength(la) for la in c.layers] == [0.8, 0.6, 0.2]


def test_make_examples_is_deterministic(tmp_path: Path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import make_examples
    finally:
        sys.path.remove(str(EXAMPLES))
    make_examples.main(tmp_path)
    for name in ("bento", "room.ora", "shapes.ora"):
        fresh, committed = load_collage(tmp_path / name).collage, load_collage(EXAMPLES / name).collage
        assert fresh.prompt == committed.prompt
        for a, b in zip(fresh.layers, committed.layers, strict=True):
            assert (a.text, a.offset) == (b.text, b.offset)
            np.testing.assert_array_equal(a.image, b.image)
