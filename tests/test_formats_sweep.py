"""A sweep of documents as other applications make them: awkward canvas sizes (odd, prime, just
64, very long and thin) in every format the project reads, and every layer kind psd-tools can
write or these tests can build (groups, hidden, empty, default-named, off-canvas, fill layers,
16/32-bit, greyscale, CMYK, Lab, bitmap). Each one generates through the CLI at exactly its canvas
size or ends in one clear error (exit code 2, one line on stderr), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import main
from core.collage import Layer, LayerGroup
from core.compositing import composite
from core.formats import load_collage, save_ora

FORMATS = ("ora", "psd", "psb", "folder")
RED = (200, 40, 40, 255)
RED_BOX = (2, 2, 12, 10)  # x, y, w, h: strength 0, so its pixels come back unchanged


def solid(w: int, h: int, color=RED) -> np.ndarray:
    image = np.zeros((h, w, 4), np.uint8)
    image[...] = color
    return image


def scene(w: int, h: int) -> list[Layer | LayerGroup]:
    """One layer of each kind every format has, bottom to top, on a w×h canvas (w, h >= 64)."""
    x, y, bw, bh = RED_BOX
    return [
        Layer("", solid(12, 12, (40, 160, 40, 255)), offset=(-5, h - 8), name="a green leaf"),  # partly off
        LayerGroup(
            name="props",
            children=[
                Layer("", solid(10, 10, (40, 40, 200, 255)), offset=(w - 14, h - 14), name="a blue ball")
            ],
        ),
        Layer("", solid(8, 8), offset=(20, 20), name="a sleeping cat", visible=False),
        Layer("", np.zeros((8, 8, 4), np.uint8), offset=(30, 30), name="an empty layer"),
        Layer("", solid(6, 6), offset=(30, 2), name="Layer 1"),
        Layer("", solid(6, 6), offset=(w + 10, h + 10), name="a far star"),
        Layer("", solid(bw, bh), offset=(x, y), name="a red box"),
    ]


SETTINGS = {"version": 1, "layers": {"a red box": {"strength": 0.0}}}


def _leaves(tree, group: str | None = None):
    for node in tree:
        if isinstance(node, LayerGroup):
            yield from _leaves(node.children, node.name)
        else:
            yield node, group


def write_ora(path: Path, tree, w: int, h: int) -> Path:
    return save_ora(path, tree, w, h, settings=SETTINGS)


def write_psd(path: Path, tree, w: int, h: int, mode: str = "RGBA", depth: int = 8) -> Path:
    """With psd-tools' own writer; a .psb path gets version 2 (the large-document format)."""
    from psd_tools import PSDImage
    from psd_tools.api.layers import Group, PixelLayer

    psd = PSDImage.new(mode, (w, h), depth=depth)
    if path.suffix == ".psb":  # before any layer: the channel data is encoded for the version
        psd._record.header.version = 2

    def add(nodes, parent):
        for node in nodes:
            if isinstance(node, LayerGroup):
                add(node.children, Group.new(parent, name=node.name))
                continue
            image = Image.fromarray(node.image)
            layer = PixelLayer.frompil(image, parent, name=node.name, left=node.offset[0], top=node.offset[1])
            layer.visible = node.visible

    add(tree, psd)
    psd.save(path)
    path.with_name(f"{path.stem}.collage.json").write_text(json.dumps(SETTINGS))
    return path


def write_folder(path: Path, tree, w: int, h: int) -> Path:
    """PNGs and a collage.json (no groups in this format: their layers are listed flat)."""
    path.mkdir()
    entries = []
    for i, (layer, _) in enumerate(_leaves(tree)):
        file = f"{layer.name}.png" if layer.name == "Layer 1" else f"{i}.png"  # its name: a default one
        Image.fromarray(layer.image).save(path / file)
        entry = {"file": file, "x": layer.offset[0], "y": layer.offset[1], "visible": layer.visible}
        if layer.name != "Layer 1":
            entry["text"] = layer.name
        if layer.name == "a red box":
            entry["strength"] = 0.0
        entries.append(entry)
    manifest = {"width": w, "height": h, "layers": entries}
    (path / "collage.json").write_text(json.dumps(manifest))
    return path


def write(kind: str, folder: Path, w: int, h: int, tree=None) -> Path:
    tree = scene(w, h) if tree is None else tree
    if kind == "folder":
        return write_folder(folder / f"doc{w}x{h}", tree, w, h)
    path = folder / f"doc{w}x{h}.{kind}"
    return write_ora(path, tree, w, h) if kind == "ora" else write_psd(path, tree, w, h)


def generate(doc: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["generate", str(doc), "-o", str(out), "--steps", "2", "--seed", "3", *extra])
    return code, capsys.readouterr().err


def assert_generated(doc: Path, out: Path, code: int, err: str, opaque_box: bool = True) -> np.ndarray:
    """Exit 0; the PNG has the document's exact canvas size; the strength-0 red box (when it is
    opaque: only opaque pixels have strength 0) is the input's bytes."""
    assert code == 0, err
    assert "Traceback" not in err
    collage = load_collage(doc).collage
    image = np.asarray(Image.open(out))
    assert image.shape == (collage.height, collage.width, 3)
    if opaque_box:
        x, y, w, h = RED_BOX
        expected = composite(collage).image[y : y + h, x : x + w]
        assert np.array_equal(image[y : y + h, x : x + w], expected)
    return image


def assert_one_clear_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], err


# ------------------------------------------------------------------------------------------ sizes

SIZES = [(64, 64), (65, 67), (101, 67), (2000, 64), (64, 1500)]
# Every size in ORA and PSD; PSB and the folder (same code past their readers) at a few, to keep
# the sweep fast: a long canvas costs seconds on a CPU even on the demo model.
CASES = [(kind, size) for kind in ("ora", "psd") for size in SIZES] + [
    ("psb", (65, 67)),
    ("psb", (2000, 64)),
    ("folder", (101, 67)),
    ("folder", (64, 1500)),
]


@pytest.mark.parametrize("kind, size", CASES, ids=[f"{kind}-{w}x{h}" for kind, (w, h) in CASES])
def test_awkward_sizes_generate_at_the_canvas_size(demo_model_dir, tmp_path, capsys, kind, size):
    w, h = size
    doc = write(kind, tmp_path, w, h)
    assert main(["inspect", str(doc)]) == 0  # inspect refuses no canvas size either
    notes = capsys.readouterr().out
    assert (
        "'Layer 1'" in notes and "'an empty layer' is empty" in notes and "'a far star' is outside" in notes
    )
    assert "sleeping cat" not in notes  # hidden: left out quietly

    out = tmp_path / "out.png"
    code, err = generate(doc, out, capsys, "--size", "document")
    image = assert_generated(doc, out, code, err)
    x, y = w - 14, h - 14  # the blue ball (strength 1) was generated, not copied
    assert not (image[y : y + 10, x : x + 10] == (40, 40, 200)).all()


@pytest.mark.parametrize("kind", FORMATS)
def test_a_canvas_under_64_is_one_clear_error(demo_model_dir, tmp_path, capsys, kind):
    doc = write(kind, tmp_path, 97, 61, tree=[Layer("", solid(12, 10), offset=(2, 2), name="a red box")])
    code, err = generate(doc, tmp_path / "out.png", capsys, "--size", "document")
    assert_one_clear_error(code, err, "height: must be a whole number of pixels in 64..8192, got 61")
    assert not (tmp_path / "out.png").exists()


def test_auto_size_on_a_long_thin_canvas_keeps_64_a_side(demo_model_dir, tmp_path, capsys):
    """Scaled to the demo model's 64² area, 2000×64 would be 360×8, and 8000×64 at SDXL's 1 MP
    11456×64: each side stays in the engine's 64..8192."""
    from core.sizing import generation_size

    assert generation_size((2000, 64), "auto", 64) == (360, 64)
    assert generation_size((64, 1500), "auto", 512) == (104, 2480)
    assert generation_size((8000, 64), "auto", 1024, 64) == (8192, 64)
    doc = write("ora", tmp_path, 2000, 64)
    out = tmp_path / "out.png"
    assert_generated(doc, out, *generate(doc, out, capsys))


# ------------------------------------------------------------------------------------------ PSD kinds

PSD_MODES = [
    ("RGBA", 8),
    ("RGB", 8),  # alpha stored as a layer mask
    ("RGB", 16),
    ("RGBA", 16),
    ("RGBA", 32),
    ("CMYK", 8),
    ("CMYK", 16),
    ("L", 8),
    ("LA", 16),
    ("LAB", 8),
    ("1", 1),
]


@pytest.mark.parametrize("mode, depth", PSD_MODES, ids=[f"{m}{d}" for m, d in PSD_MODES])
def test_every_colour_mode_and_depth_generates(demo_model_dir, tmp_path, capsys, mode, depth):
    from psd_tools import PSDImage

    doc = tmp_path / "doc.psd"
    write_psd(doc, scene(65, 67), 65, 67, mode=mode, depth=depth)
    assert PSDImage.open(doc).depth == depth
    texts = {layer.text for layer in load_collage(doc).collage.layers}
    # psd-tools' writer takes a Lab image's "A" band (a*) for the layer's transparency: this
    # file's layers are part transparent, and "an empty layer" is not empty.
    lab = mode == "LAB"
    if lab:
        texts.discard("an empty layer")
    assert texts == {"a green leaf", "a blue ball", "a red box"}
    out = tmp_path / "out.png"
    assert_generated(doc, out, *generate(doc, out, capsys, "--size", "document"), opaque_box=not lab)


def _fill_layer(psd, name: str, tag, descriptor, **attrs):
    """A fill layer as Photoshop stores one: no pixels of its own, a descriptor psd-tools draws."""
    from psd_tools.api.layers import PixelLayer
    from psd_tools.psd.tagged_blocks import TaggedBlock

    layer = PixelLayer.frompil(Image.new("RGBA", (0, 0)), psd, name=name)
    layer._record.tagged_blocks[tag] = TaggedBlock(key=tag, data=descriptor)
    for key, value in attrs.items():
        setattr(layer, key, value)
    return layer


def _rgb(r: float, g: float, b: float):
    from psd_tools.psd.descriptor import Descriptor, Double

    return Descriptor(
        classID=b"RGBC", items=[(b"Rd  ", Double(r)), (b"Grn ", Double(g)), (b"Bl  ", Double(b))]
    )


def _gradient():
    """A linear red → blue gradient fill: psd-tools needs scipy to draw it."""
    from psd_tools.psd.descriptor import (
        Descriptor,
        DescriptorBlock,
        Double,
        Enumerated,
        Integer,
        List,
        UnitFloat,
    )
    from psd_tools.terminology import Unit

    def stop(color, at):
        items = [(b"Clr ", color), (b"Type", Enumerated(b"Clry", b"UsrS")), (b"Lctn", Integer(at))]
        return Descriptor(classID=b"Clrt", items=[*items, (b"Mdpn", Integer(50))])

    def opaque(at):
        items = [(b"Opct", UnitFloat(unit=Unit.Percent, value=100.0)), (b"Lctn", Integer(at))]
        return Descriptor(classID=b"TrnS", items=[*items, (b"Mdpn", Integer(50))])

    gradient = Descriptor(
        classID=b"Grdn",
        items=[
            (b"GrdF", Enumerated(b"GrdF", b"CstS")),
            (b"Intr", Double(4096.0)),
            (b"Clrs", List([stop(_rgb(255, 0, 0), 0), stop(_rgb(0, 0, 255), 4096)])),
            (b"Trns", List([opaque(0), opaque(4096)])),
        ],
    )
    items = [(b"Angl", UnitFloat(unit=Unit.Angle, value=90.0)), (b"Type", Enumerated(b"GrdT", b"Lnr "))]
    return DescriptorBlock(classID=b"null", items=[*items, (b"Grad", gradient)])


def kinds_psd(path: Path, w: int = 97, h: int = 67) -> Path:
    """Fill layers (solid colour, gradient), a blend mode, a clipping layer, opacity 0, and the
    usual pixel layers; a gradient sky covers the canvas at the bottom."""
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer
    from psd_tools.constants import BlendMode, Tag
    from psd_tools.psd.descriptor import DescriptorBlock

    psd = PSDImage.new("RGBA", (w, h))
    _fill_layer(psd, "a gradient sky", Tag.GRADIENT_FILL_SETTING, _gradient())
    solid_fill = DescriptorBlock(classID=b"null", items=[(b"Clr ", _rgb(20, 200, 30))])
    _fill_layer(psd, "a green field", Tag.SOLID_COLOR_SHEET_SETTING, solid_fill, opacity=128)
    shadow = PixelLayer.frompil(
        Image.fromarray(solid(20, 8, (0, 0, 0, 255))), psd, name="a shadow", left=40, top=50
    )
    shadow.blend_mode = BlendMode.MULTIPLY
    clipped = PixelLayer.frompil(Image.fromarray(solid(6, 6)), psd, name="a stripe", left=42, top=52)
    clipped.clipping = True
    PixelLayer.frompil(Image.fromarray(solid(6, 6)), psd, name="a ghost", left=60, top=10).opacity = 0
    x, y, bw, bh = RED_BOX
    PixelLayer.frompil(Image.fromarray(solid(bw, bh)), psd, name="a red box", left=x, top=y)
    psd.save(path)
    path.with_name(f"{path.stem}.collage.json").write_text(json.dumps(SETTINGS))
    return path


def test_fill_layers_blend_modes_and_clipping_read_or_are_noted(demo_model_dir, tmp_path, capsys):
    pytest.importorskip("scipy", reason="psd-tools draws gradient fills with scipy (psd-tools[composite])")
    doc = kinds_psd(tmp_path / "kinds.psd")
    loaded = load_collage(doc)
    layers = {layer.text: layer for layer in loaded.collage.layers}
    assert set(layers) == {"a gradient sky", "a green field", "a shadow", "a stripe", "a red box"}
    sky, field = layers["a gradient sky"], layers["a green field"]
    assert sky.image.shape == (67, 97, 4) and sky.offset == (0, 0)
    top, bottom = sky.image[0, 0], sky.image[-1, 0]
    assert top[2] > top[0] and bottom[0] > bottom[2]  # at 90°: red at the bottom to blue at the top
    assert tuple(field.image[5, 5]) == (20, 200, 30, 128)  # psd-tools bakes the opacity in
    warnings = " | ".join(loaded.warnings)
    assert "'a shadow' uses blend mode multiply" in warnings and "'a stripe' is a clipping mask" in warnings
    assert "'a ghost' has opacity 0" in warnings
    out = tmp_path / "out.png"
    assert_generated(doc, out, *generate(doc, out, capsys))


def test_a_layer_psd_tools_cannot_draw_is_skipped_with_a_note(demo_model_dir, tmp_path, capsys, monkeypatch):
    """Without scipy, psd-tools raises ImportError for a gradient fill: that layer is skipped with
    a note naming it and what to install; the rest of the document generates."""
    import psd_tools.composite._compat as compat

    monkeypatch.setattr(compat, "HAS_SCIPY", False)
    doc = kinds_psd(tmp_path / "kinds.psd")
    out = tmp_path / "out.png"
    code, err = generate(doc, out, capsys)
    assert_generated(doc, out, code, err)
    (note,) = [line for line in err.splitlines() if "a gradient sky" in line]
    assert note.startswith("note: layer 'a gradient sky' needs psd-tools' optional dependencies")
    assert "scipy" in note and "pip install 'psd-tools[composite]'" in note


def test_any_error_from_psd_tools_on_one_layer_is_a_note(tmp_path, monkeypatch):
    from psd_tools.api.layers import PixelLayer

    doc = write("psd", tmp_path, 64, 64)
    real = PixelLayer.topil

    def broken(self, *args, **kwargs):
        if self.name == "a blue ball":
            raise ValueError("unsupported channel layout\nmore detail")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PixelLayer, "topil", broken)
    loaded = load_collage(doc)
    assert (
        "layer 'a blue ball' cannot be read (ValueError: unsupported channel layout); skipped"
        in loaded.warnings
    )
    assert {layer.text for layer in loaded.collage.layers} == {"a green leaf", "a red box"}


def test_a_flattened_psd_reads_its_merged_image_and_says_what_is_missing(demo_model_dir, tmp_path, capsys):
    from psd_tools import PSDImage

    PSDImage.frompil(Image.fromarray(solid(70, 65, (10, 120, 200, 255))[..., :3])).save(tmp_path / "flat.psd")
    loaded = load_collage(tmp_path / "flat.psd")
    assert loaded.warnings == ["the file has no layers; its flattened image is read as the background"]
    assert loaded.collage.background == (10, 120, 200) and loaded.collage.layers == []
    code, err = generate(tmp_path / "flat.psd", tmp_path / "out.png", capsys)
    assert_one_clear_error(code, err, "layers")


@pytest.mark.parametrize(
    "name, data, expected",
    [
        ("broken.psb", b"8BPS\x00\x02" + b"\x00" * 40, "not a readable Photoshop file"),
        ("empty.psd", b"", "not a readable Photoshop file"),
    ],
)
def test_unreadable_photoshop_files_are_one_clear_error(tmp_path, capsys, name, data, expected):
    (tmp_path / name).write_bytes(data)
    code, err = generate(tmp_path / name, tmp_path / "out.png", capsys)
    assert_one_clear_error(code, err, expected)


def test_only_default_named_layers_is_one_clear_error(demo_model_dir, tmp_path, capsys):
    tree = [Layer("", solid(10, 10), offset=(4, 4), name=name) for name in ("Layer 1", "Ellipse 1", "")]
    doc = write("psd", tmp_path, 80, 72, tree=tree)
    code, err = generate(doc, tmp_path / "out.png", capsys)
    assert_one_clear_error(code, err, "layers")
    assert err.count("has no description") == 3


def test_a_psb_reads_like_a_psd(tmp_path):
    from psd_tools import PSDImage

    psb = write("psb", tmp_path, 101, 67)
    psd = write("psd", tmp_path, 101, 67)
    assert PSDImage.open(psb).version == 2 and PSDImage.open(psd).version == 1
    a, b = load_collage(psb), load_collage(psd)
    assert a.warnings == b.warnings
    assert [(x.text, x.offset, x.image.tobytes()) for x in a.collage.layers] == [
        (x.text, x.offset, x.image.tobytes()) for x in b.collage.layers
    ]


# ------------------------------------------------------------------------------------------ A4


@pytest.mark.slow
def test_an_a4_page_at_300_dpi_generates_at_its_exact_size(demo_model_dir, tmp_path, capsys):
    """2480×3508 (3508 is no multiple of 8): generated at the demo model's size (auto), scaled
    back to exactly 2480×3508; the strength-0 layer's pixels (a texture no resampling would
    keep) are the input's bytes."""
    kept = np.random.default_rng(0).integers(0, 256, (400, 600, 4), dtype=np.uint8)
    kept[..., 3] = 255
    folder = tmp_path / "a4"
    folder.mkdir()
    Image.fromarray(kept).save(folder / "kept.png")
    Image.fromarray(solid(500, 500, (40, 40, 200, 255))).save(folder / "ball.png")
    manifest = {
        "width": 2480,
        "height": 3508,
        "background": "#e0d0b0",
        "layers": [
            {"file": "ball.png", "text": "a blue ball", "x": 1500, "y": 2900},
            {"file": "kept.png", "text": "a patterned rug", "x": 17, "y": 3101, "strength": 0.0},
        ],
    }
    (folder / "collage.json").write_text(json.dumps(manifest))
    out = tmp_path / "a4.png"
    code, err = generate(folder, out, capsys, "--steps", "3")
    assert code == 0, err
    assert "generating at 64×80" in err and "scaled back to 2480×3508" in err
    image = np.asarray(Image.open(out))
    assert image.shape == (3508, 2480, 3)
    assert np.array_equal(image[3101:3501, 17:617], kept[..., :3])
    assert not (image[2900:3400, 1500:2000] == (40, 40, 200)).all()  # the ball was generated
