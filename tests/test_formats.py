"""Reading and writing collage documents (core.formats): ORA, PSD, folder manifests, examples.

(Past ~500 lines: the formats share their document builders and expectations; the awkward sizes
and layer kinds are in test_formats_sweep.py.)
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.collage import CollageError, Layer, LayerGroup
from core.formats import (
    DocumentError,
    ResultLayer,
    collage_settings,
    is_default_name,
    load_collage,
    save_ora,
    save_png,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ---------------------------------------------------------------------------------------------- helpers


def solid(w: int, h: int, rgba=(200, 30, 30, 255)) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgba, np.uint8), (h, w, 4)).copy()


def padded(image: np.ndarray, pad: int) -> np.ndarray:
    """The image with a transparent border, which readers crop away again."""
    return np.pad(image, ((pad, pad), (pad, pad), (0, 0)))


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (PIL cannot write 16-bit RGBA), encoded by hand."""
    h, w = samples.shape[:2]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def make_ora(path: Path, w: int, h: int, stack: str, files: dict[str, bytes], settings=None) -> Path:
    """An ORA written by hand (independent of save_ora). ``stack`` lists the top layer first."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mimetype", "image/openraster", compress_type=zipfile.ZIP_STORED)
        archive.writestr(
            "stack.xml", f'<?xml version="1.0"?><image w="{w}" h="{h}"><stack>{stack}</stack></image>'
        )
        for name, data in files.items():
            archive.writestr(name, data)
        if settings is not None:
            archive.writestr("collage.json", json.dumps(settings))
    return path


def texts(doc) -> list[str]:
    return [layer.text for layer in doc.collage.layers]


def has_warning(doc, *words: str) -> bool:
    return any(all(word in warning for word in words) for warning in doc.warnings)


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


# ---------------------------------------------------------------------------------------------- PSD read


def _psd_layer(parent, name: str, image: np.ndarray, left: int, top: int, **attrs):
    from psd_tools.api.layers import PixelLayer

    layer = PixelLayer.frompil(Image.fromarray(image), parent, name=name, top=top, left=left)
    for key, value in attrs.items():
        setattr(layer, key, value)
    return layer


def test_psd_read(tmp_path: Path):
    from psd_tools import PSDImage
    from psd_tools.api.layers import Group

    psd = PSDImage.new("RGBA", (64, 72))
    _psd_layer(psd, "Background", solid(64, 72, (250, 240, 230, 255)), 0, 0)
    _psd_layer(psd, "a red ball", padded(solid(10, 10), 2), -6, 64)  # off the left and bottom edges
    props = Group.new(psd, name="props")
    props.opacity = 128
    _psd_layer(props, "a blue box", solid(8, 6, (0, 0, 255, 255)), 30, 5, opacity=255)
    _psd_layer(props, "Layer 1", solid(4, 4), 1, 1)
    hidden = Group.new(psd, name="hidden group")
    _psd_layer(hidden, "a secret", solid(4, 4), 1, 1)
    hidden.visible = False
    _psd_layer(psd, "a hat", solid(4, 4), 1, 1, visible=False)
    path = tmp_path / "scene.psd"
    psd.save(path)
    (tmp_path / "scene.collage.json").write_text(
        json.dumps({"seed": 5, "layers": {"a red ball": {"strength": 0.3}}})
    )

    doc = load_collage(path)
    c = doc.collage
    assert (c.width, c.height, c.seed) == (64, 72, 5)
    assert c.background == (250, 240, 230)
    assert texts(doc) == ["a red ball", "a blue box"]
    ball, box = c.layers
    assert ball.offset == (-4, 66) and ball.image.shape == (10, 10, 4) and ball.strength == 0.3
    assert tuple(ball.image[0, 0]) == (200, 30, 30, 255)
    assert box.offset == (30, 5) and box.opacity == pytest.approx(128 / 255)
    assert has_warning(doc, "'Layer 1'", "no description")
    assert c.prompt == "a red ball, a blue box"
    c.validate()


@pytest.mark.parametrize("mode", ["RGB", "CMYK", "L"])
def test_psd_colour_modes_convert_to_rgba(tmp_path: Path, mode: str):
    from psd_tools import PSDImage

    psd = PSDImage.new(mode, (32, 32))
    half = solid(10, 10, (255, 0, 0, 255))
    half[:, 5:, 3] = 0  # in RGB/CMYK/L documents psd-tools stores this alpha as a layer mask
    _psd_layer(psd, "a red flag", half, 3, 4)
    psd.save(tmp_path / "m.psd")
    (flag,) = load_collage(tmp_path / "m.psd").collage.layers
    assert flag.image.dtype == np.uint8 and flag.image.shape == (10, 5, 4)  # cropped: the mask cut it
    r, g, b, a = (int(v) for v in flag.image[0, 0])
    assert a == 255
    if mode == "L":
        assert r == g == b
    else:
        assert r > 200 and g < 60 and b < 60


def test_psd_bad_sidecar_names_the_sidecar(tmp_path: Path):
    from psd_tools import PSDImage

    psd = PSDImage.new("RGBA", (32, 32))
    _psd_layer(psd, "a dot", solid(4, 4), 0, 0)
    psd.save(tmp_path / "s.psd")
    (tmp_path / "s.collage.json").write_text('{"steps": 1.5}')
    with pytest.raises(DocumentError, match=r"s\.collage\.json.*steps: must be a whole number"):
        load_collage(tmp_path / "s.psd")


# ---------------------------------------------------------------------------------------------- folder


def write_folder(folder: Path, manifest: dict, *, toml: str | None = None, files=("a.png",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        save_png(folder / name, solid(8, 8))
    if toml is not None:
        (folder / "collage.toml").write_text(toml)
    else:
        (folder / "collage.json").write_text(json.dumps(manifest))
    return folder


def test_folder_json_manifest(tmp_path: Path):
    manifest = {
        "width": 64,
        "height": 64,
        "background": "#10ff80",
        "seed": 9,
        "layers": [
            {"file": "a.png", "text": "a tomato", "x": -2, "y": 60, "opacity": 0.5, "attention_weight": 2},
            {"file": "a.png", "x": 5, "y": 5, "visible": False},
            {"file": "salmon_sushi.png", "x": 30, "y": 30, "strength": 0.4, "appearance": True},
        ],
    }
    folder = write_folder(tmp_path / "c", manifest, files=("a.png", "salmon_sushi.png"))
    doc = load_collage(folder)
    c = doc.collage
    assert c.background == (0x10, 0xFF, 0x80) and c.seed == 9
    assert texts(doc) == ["a tomato", "salmon sushi"]
    tomato, sushi = c.layers
    assert (tomato.offset, tomato.opacity, tomato.attention_weight) == ((-2, 60), 0.5, 2)
    assert (sushi.strength, sushi.appearance) == (0.4, True)
    assert c.prompt == "a tomato, salmon sushi"
    assert len(doc.tree) == 3
    c.validate()
    assert load_collage(folder / "collage.json").collage.prompt == c.prompt  # the manifest path works too


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_folder_toml_manifest_with_background_image(tmp_path: Path):
    toml = 'prompt = "a plate"\nbackground = "bg.png"\n[[layers]]\nfile = "a.png"\ntext = "a pear"\nx = 3\n'
    folder = write_folder(tmp_path / "t", {}, toml=toml)
    save_png(folder / "bg.png", solid(64, 32, (1, 2, 3, 255)))
    c = load_collage(folder).collage
    assert (c.width, c.height, c.prompt) == (64, 32, "a plate")  # the size comes from the background
    assert c.background.shape == (32, 64, 3)
    assert c.layers[0].offset == (3, 0)


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        ({"width": 64, "height": 64, "sed": 1, "layers": []}, "unknown key 'sed'"),
        (
            {"width": 64, "height": 64, "layers": [{"file": "a.png", "txt": "x"}]},
            r"layers\[0\]: unknown key 'txt'",
        ),
        ({"width": 64, "height": 64, "layers": [{"file": "nope.png"}]}, "file 'nope.png' not found"),
        ({"width": 64, "height": 64, "layers": [{"file": "../a.png"}]}, "inside the collage folder"),
        ({"width": 64, "height": 64, "layers": [{"file": "/etc/passwd"}]}, "inside the collage folder"),
        ({"width": 64, "height": 64, "layers": [{"text": "x"}]}, "needs a file"),
        (
            {"width": 64, "height": 64, "layers": [{"file": "a.png", "x": "3"}]},
            r"layers\[0\]\.x: must be a whole",
        ),
        ({"width": 64, "height": 64, "background": "#12345"}, "'#rrggbb'"),
        ({"width": 64, "height": 64, "background": "#gg0000"}, "'#rrggbb'"),
        ({"width": 64, "height": 64, "background": "red"}, "colour '#rrggbb' or a PNG"),
        ({"width": 64, "height": 64, "background": "../bg.png"}, "inside the collage folder"),
        ({"height": 64, "layers": []}, "width: missing"),
        ({"width": 64, "height": 64, "layers": {"file": "a.png"}}, "layers: must be a list"),
    ],
)
def test_folder_manifest_errors(tmp_path: Path, manifest: dict, expected: str):
    folder = write_folder(tmp_path / "bad", manifest)
    with pytest.raises(DocumentError, match=expected) as error:
        load_collage(folder)
    assert "collage.json" in str(error.value)


def test_folder_reports_every_problem_at_once(tmp_path: Path):
    manifest = {
        "width": 64,
        "height": 64,
        "colour": 1,
        "layers": [{"file": "x.png"}, {"file": "a.png", "y": 0.5}],
    }
    with pytest.raises(DocumentError) as error:
        load_collage(write_folder(tmp_path / "m", manifest))
    assert len(error.value.problems) == 3


def test_folder_needs_one_manifest(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DocumentError, match="needs a collage.toml or collage.json"):
        load_collage(tmp_path / "empty")
    folder = write_folder(tmp_path / "both", {"width": 64, "height": 64})
    (folder / "collage.toml").write_text("width = 64\n")
    with pytest.raises(DocumentError, match="keep one"):
        load_collage(folder)


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
