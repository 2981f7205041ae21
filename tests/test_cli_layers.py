"""`collage generate --layers`: the result as a layer stack in an .ora, recomposing to the flat result."""

from pathlib import Path

import numpy as np
from PIL import Image

from core.cli import main
from core.collage import flatten_layers
from core.formats import ResultGroup, load_collage
from core.formats.images import composite

ROOM = Path(__file__).resolve().parent.parent / "examples" / "room.ora"


def test_layers_ora_group_recomposes_to_the_flat_png(demo_model_dir, tmp_path, capsys):
    flat_path, ora_path = tmp_path / "flat.png", tmp_path / "stack.ora"
    common = ["--steps", "3", "--seed", "4"]
    assert main(["generate", str(ROOM), "-o", str(flat_path), *common]) == 0
    assert main(["generate", str(ROOM), "-o", str(ora_path), "--layers", *common]) == 0
    err = capsys.readouterr().err
    assert "background fill" in err and "generated in" in err
    flat = np.asarray(Image.open(flat_path))

    before, after = load_collage(ROOM), load_collage(ora_path)
    # The input layers are untouched and still the collage; the group is not read as layers.
    assert [layer.text for layer in after.collage.layers] == [layer.text for layer in before.collage.layers]
    for a, b in zip(before.collage.layers, after.collage.layers, strict=True):
        assert np.array_equal(a.image, b.image) and a.offset == b.offset
    groups = [node for node in after.tree if isinstance(node, ResultGroup)]
    assert [g.name for g in groups] == ["collage result (seed 4)"]
    assert len(after.tree) == len(before.tree) + 1

    children = groups[0].children
    names = [c.name for c in children]
    objects = [layer.name or layer.text for layer in before.collage.layers]
    assert names == ["background", *objects, "flat result"]  # bottom to top
    assert [c.visible for c in children] == [True] * (len(names) - 1) + [False]
    assert np.array_equal(children[-1].image[..., :3], flat)  # the flat result, hidden

    h, w = flat.shape[:2]
    stacked = composite(flatten_layers(children), w, h)
    assert (stacked[..., 3] == 255).all()
    diff = np.abs(stacked[..., :3].astype(int) - flat.astype(int))
    assert diff.max() <= 1
    opaque = np.zeros((h, w), bool)
    for c in children[1:-1]:
        x, y = c.offset
        ch, cw = c.image.shape[:2]
        opaque[y : y + ch, x : x + cw] |= c.image[..., 3] == 255
    assert opaque.any() and (diff[opaque] == 0).all()
    # The background was filled where objects are opaque.
    background = children[0].image[..., :3]
    assert not np.array_equal(background[opaque], flat[opaque])


def test_layers_needs_an_ora_output(tmp_path, capsys):
    assert main(["generate", str(ROOM), "-o", str(tmp_path / "x.png"), "--layers"]) == 2
    assert "--layers" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
