"""Reading collage documents (core.formats): ORA as Krita and others write it, settings, names.

PSD and folder manifests are in test_formats_psd_folder.py, writing and the examples in
test_formats_write.py, awkward sizes and layer kinds in test_formats_sweep.py.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.collage import CollageError, LayerGroup
from core.formats import (
    DocumentError,
    is_default_name,
    load_collage,
)
from tests.format_files import has_warning, make_ora, padded, png, png16, solid, texts

# ---------------------------------------------------------------------------------------------- ORA read


@pytest.fixture
def messy_ora(tmp_path: Path) -> Path:
    wide = np.zeros((4, 6, 4), np.uint16)
    wide[..., 0], wide[..., 1], wide[..., 3] = 65535, 0x8000, 65535
    stack = """
      <layer name=" a cat " src="data/cat.png" x="-5" y="-3"/>
      <stack name="hidden stuff" visibility="hidden"><layer name="a dog" src="data/red.png" x="1" y="1"/></stack>
      <stack name="outer" opacity="0.5">
        <layer name="a rug" src="data/red.png" x="2" y="50"/>
        <stack name="inner" opacity="0.5"><layer name="a lamp" src="data/red.png" x="40" y="2" opacity="0.8"/></stack>
      </stack>
      <layer name="far away" src="data/red.png" x="300" y="10"/>
      <layer name="a ghost" src="data/empty.png" x="0" y="0"/>
      <layer name="a hat" src="data/red.png" x="0" y="0" visibility="hidden"/>
      <layer name="Layer 3" src="data/red.png" x="10" y="10"/>
      <layer name="a vase" src="data/wide.png" x="20" y="30" composite-op="svg:multiply"/>
      <layer name="Background" src="data/bg.png" x="0" y="0"/>
    """
    files = {
        "data/cat.png": png(padded(solid(10, 8), 3)),
        "data/red.png": png(solid(8, 8)),
        "data/empty.png": png(np.zeros((64, 64, 4), np.uint8)),
        "data/wide.png": png16(wide, 6),
        "data/bg.png": png(solid(64, 64, (10, 20, 30, 255))),
    }
    return make_ora(tmp_path / "messy.ora", 64, 64, stack, files)


def test_ora_reads_offsets_groups_visibility_and_order(messy_ora: Path):
    doc = load_collage(messy_ora)
    c = doc.collage
    assert (c.width, c.height) == (64, 64)
    # bottom to top; groups flattened in place; hidden layer, hidden group, off-canvas, empty and
    # default-named layers left out; the bottom "Background" became the background colour.
    assert texts(doc) == ["a vase", "a lamp", "a rug", "a cat"]
    assert c.background == (10, 20, 30)
    assert c.prompt == "a vase, a lamp, a rug, a cat"
    by_text = {layer.text: layer for layer in c.layers}
    cat = by_text["a cat"]
    assert cat.offset == (-5 + 3, -3 + 3)  # cropped to its pixels: the 3 px border is gone
    assert cat.image.shape == (8, 10, 4)
    assert cat.name == " a cat "
    assert by_text["a lamp"].opacity == pytest.approx(0.5 * 0.5 * 0.8)
    assert by_text["a rug"].opacity == pytest.approx(0.5)
    c.validate()


def test_ora_warnings_say_what_was_skipped(messy_ora: Path):
    doc = load_collage(messy_ora)
    assert has_warning(doc, "'a ghost'", "empty", "skipped")
    assert has_warning(doc, "'far away'", "outside the canvas", "skipped")
    assert has_warning(doc, "'Layer 3'", "no description", "skipped")
    assert has_warning(doc, "'a vase'", "multiply", "normal")
    assert not has_warning(doc, "a hat")  # hidden on purpose: no noise about it
    assert len(doc.warnings) == 4


def test_ora_16bit_png_is_converted_to_8bit(messy_ora: Path):
    vase = next(layer for layer in load_collage(messy_ora).collage.layers if layer.text == "a vase")
    assert vase.image.dtype == np.uint8
    assert vase.image.shape == (4, 6, 4)
    assert tuple(vase.image[0, 0]) == (255, 128, 0, 255)


def test_ora_tree_keeps_everything_for_writing_back(messy_ora: Path):
    tree = load_collage(messy_ora).tree
    assert [node.name for node in tree][-1] == " a cat "
    hidden = next(node for node in tree if node.name == "hidden stuff")
    assert isinstance(hidden, LayerGroup) and not hidden.visible and hidden.children[0].name == "a dog"
    assert tree[0].name == "Background"


def test_ora_as_krita_writes_it(tmp_path: Path):
    """stack.xml exactly as Krita 5.1 exported it headless (root <stack> with x/y, isolation, 0.0.1)."""
    stack_xml = """<?xml version="1.0" encoding="UTF-8"?>
<image h="128" version="0.0.1" w="128" yres="300" xres="300">
 <stack y="0" name="root" opacity="1" x="0" visibility="visible" composite-op="svg:src-over" isolation="isolate">
  <layer y="60" name="Paint Layer 3" opacity="1" x="60" visibility="visible" composite-op="svg:src-over" src="data/layer4.png"/>
  <layer y="1" name="a hat" opacity="1" x="1" visibility="hidden" composite-op="svg:src-over" src="data/layer3.png"/>
  <stack y="0" name="props" opacity="0.501961" x="0" visibility="visible" composite-op="svg:src-over" isolation="isolate">
   <layer y="40" name="a blue box" opacity="1" x="30" visibility="visible" composite-op="svg:src-over" src="data/layer2.png"/>
  </stack>
  <layer y="110" name="a red ball" opacity="1" x="-8" visibility="visible" composite-op="svg:src-over" src="data/layer1.png"/>
  <layer y="0" name="Background" opacity="1" x="0" visibility="visible" composite-op="svg:src-over" src="data/layer0.png"/>
 </stack>
</image>
"""
    pngs = [solid(128, 128, (255, 255, 255, 255)), solid(20, 20), solid(10, 6, (0, 0, 255, 255))]
    pngs += [solid(5, 5, (0, 255, 0, 255))] * 2
    path = tmp_path / "krita.ora"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mimetype", "image/openraster")
        archive.writestr("stack.xml", stack_xml)
        for i, image in enumerate(pngs):
            archive.writestr(f"data/layer{i}.png", png(image))
    doc = load_collage(path)
    c = doc.collage
    assert texts(doc) == ["a red ball", "a blue box"] and c.background == (255, 255, 255)
    assert c.layers[0].offset == (-8, 110)
    assert c.layers[1].opacity == pytest.approx(0.501961)
    assert doc.warnings == [
        "layer 'Paint Layer 3' has no description (its name is empty or one an editor made up);"
        " name it after what it shows, e.g. 'a red armchair'; skipped"
    ]
    c.validate()


def test_ora_grey_and_palette_pngs_convert(tmp_path: Path):
    grey = Image.new("L", (6, 6), 100)
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    files = {}
    for name, image in {"grey": grey, "pal": palette}.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files[f"{name}.png"] = buffer.getvalue()
    stack = (
        '<layer name="a pebble" src="grey.png" x="1" y="1"/><layer name="a leaf" src="pal.png" x="9" y="9"/>'
    )
    doc = load_collage(make_ora(tmp_path / "c.ora", 64, 64, stack, files))
    leaf, pebble = doc.collage.layers
    assert tuple(pebble.image[0, 0]) == (100, 100, 100, 255)
    assert tuple(leaf.image[0, 0]) == (0, 200, 0, 255)


def test_ora_settings_entry(tmp_path: Path):
    settings = {
        "prompt": "a tidy desk",
        "seed": 42,
        "steps": 12,
        "scheduler": "ddim",
        "layers": {
            "Layer 3": {"text": "a green mug", "attention_weight": 2.0, "appearance": True},
            "a book": {
                "strength": 0.4,
                "control_weight": 0.5,
                "appearance": "reference",
                "appearance_weight": 3,
            },
            "gone": {"strength": 0.1},
        },
    }
    stack = '<layer name="Layer 3" src="r.png" x="1" y="1"/><layer name="a book" src="r.png" x="20" y="20"/>'
    doc = load_collage(make_ora(tmp_path / "d.ora", 64, 64, stack, {"r.png": png(solid(8, 8))}, settings))
    c = doc.collage
    assert (c.prompt, c.seed, c.steps, c.scheduler) == ("a tidy desk", 42, 12, "ddim")
    book, mug = c.layers
    assert (mug.text, mug.name, mug.attention_weight, mug.appearance) == ("a green mug", "Layer 3", 2.0, True)
    assert (book.strength, book.control_weight) == (0.4, 0.5)
    assert (book.appearance, book.appearance_weight) == ("reference", 3)
    assert c.layer_strength(mug) == c.strength
    assert has_warning(doc, "'gone'", "no layer has that name")
    c.validate()


def test_ora_sidecar_settings(tmp_path: Path):
    """Krita drops collage.json when it re-saves an ORA: a sidecar beside the file stands in."""
    stack = '<layer name="Layer 1" src="r.png" x="1" y="1"/>'
    path = make_ora(tmp_path / "k.ora", 64, 64, stack, {"r.png": png(solid(8, 8))})
    (tmp_path / "k.ora.collage.json").write_text(
        json.dumps({"seed": 8, "layers": {"Layer 1": {"text": "a fig"}}})
    )
    doc = load_collage(path)
    assert (doc.collage.seed, texts(doc)) == (8, ["a fig"]) and not doc.warnings
    (tmp_path / "k.collage.json").write_text(json.dumps({"seed": 9}))  # the short name wins
    assert load_collage(path).collage.seed == 9
    embedded = make_ora(tmp_path / "k.ora", 64, 64, stack, {"r.png": png(solid(8, 8))}, {"seed": 10})
    doc = load_collage(embedded)
    assert doc.collage.seed == 10 and has_warning(doc, "k.collage.json ignored")


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"guidence_scale": 7}, "unknown key 'guidence_scale'"),
        ({"seed": "7"}, "seed: must be a whole number"),
        ({"layers": {"a": {"strenght": 0.5}}}, "unknown key 'strenght'"),
        (
            {"layers": {"a": {"appearance": 1}}},
            'appearance: must be true, false, "off", "learned" or "reference"',
        ),
        ({"layers": {"a": {"appearance_weight": "x"}}}, "appearance_weight: must be a number"),
        ({"version": 99}, "version"),
    ],
)
def test_ora_bad_settings_are_errors(tmp_path: Path, settings, expected):
    stack = '<layer name="a" src="r.png"/>'
    path = make_ora(tmp_path / "e.ora", 64, 64, stack, {"r.png": png(solid(8, 8))}, settings)
    with pytest.raises(DocumentError, match=expected) as error:
        load_collage(path)
    assert "e.ora" in str(error.value) and "collage.json" in str(error.value)


def test_unreadable_documents_are_clear_errors(tmp_path: Path):
    (tmp_path / "junk.ora").write_bytes(b"not a zip")
    with pytest.raises(DocumentError, match=r"junk\.ora.*not a readable zip"):
        load_collage(tmp_path / "junk.ora")
    with zipfile.ZipFile(tmp_path / "nostack.ora", "w") as archive:
        archive.writestr("mimetype", "image/openraster")
    with pytest.raises(DocumentError, match="no stack.xml"):
        load_collage(tmp_path / "nostack.ora")
    with pytest.raises(DocumentError, match=r"missing\.ora.*no such file"):
        load_collage(tmp_path / "missing.ora")
    (tmp_path / "art.kra").write_bytes(b"")
    with pytest.raises(DocumentError, match="OpenRaster"):
        load_collage(tmp_path / "art.kra")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CollageError, match=r"notes\.txt.*cannot read \.txt"):
        load_collage(tmp_path / "notes.txt")


def test_default_names():
    for name in (
        "",
        "  ",
        "Layer 3",
        "layer",
        "Paint Layer 2",
        "Background",
        "Group 1",
        "Layer 3 copy 2",
        "7",
    ):
        assert is_default_name(name), name
    for name in ("salmon sushi", "a layered cake", "background trees", "Layer cake"):
        assert not is_default_name(name), name


def test_background_only_when_it_covers_the_canvas_and_is_at_the_bottom(tmp_path: Path):
    stack = (
        '<layer name="a ball" src="r.png" x="5" y="5"/>'
        '<layer name="background" src="half.png" x="0" y="0"/>'  # half the canvas: not a background
    )
    files = {"r.png": png(solid(8, 8)), "half.png": png(solid(64, 32))}
    doc = load_collage(make_ora(tmp_path / "f.ora", 64, 64, stack, files))
    assert texts(doc) == ["a ball"] and doc.collage.background == (255, 255, 255)
    assert has_warning(doc, "'background'", "no description")

    # A painted (non-uniform), partly transparent background becomes an RGB image over white.
    bg = solid(64, 64, (0, 0, 255, 255))
    bg[8:56, 8:32] = (0, 0, 0, 0)  # a hole: its painted pixels still reach every edge
    files["bg.png"] = png(bg)
    stack = '<layer name="a ball" src="r.png" x="5" y="5"/><layer name="BACKGROUND" src="bg.png"/>'
    c = load_collage(make_ora(tmp_path / "g.ora", 64, 64, stack, files)).collage
    assert c.background.shape == (64, 64, 3)
    assert tuple(c.background[10, 10]) == (255, 255, 255) and tuple(c.background[0, 0]) == (0, 0, 255)
    c.validate()
