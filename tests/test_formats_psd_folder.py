"""Reading PSD files and folder manifests (core.formats)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.formats import (
    DocumentError,
    load_collage,
    save_png,
)
from tests.format_files import has_warning, padded, solid, texts

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
