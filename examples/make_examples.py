"""Draw the example collages: ``bento/`` (folder format), ``room.ora`` and ``shapes.ora`` (OpenRaster).

Deterministic (fixed seed, fixed zip dates), so re-running it rewrites identical files:

    python examples/make_examples.py            # into examples/
    python examples/make_examples.py OUT_DIR    # somewhere else

``bento`` and ``room`` are 256×256 with a few flat-coloured objects, for real Stable Diffusion
models. ``shapes.ora`` is 64×64 and speaks the demo model's language (docs/demo_model.md): coloured
shapes on grass, one layer per shape, with masked attention, ControlNet and per-layer strength in
use (set a layer's look to "learned" in the Krita dock, or its appearance in collage.json, to try textual inversion).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Run as a script from anywhere: make the project importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.collage import Layer, LayerGroup  # noqa: E402
from core.formats import save_ora  # noqa: E402

SIZE = 256
SEED = 1234

BENTO_MANIFEST = """\
# A bento box, top view. Layers are listed bottom to top; x, y place each PNG's top-left corner.
prompt = "a bento box with rice, salmon sushi, sliced ginger and edamame, top view, food photo"
negative_prompt = "blurry, low quality"
width = 256
height = 256
seed = 7
steps = 20
guidance_scale = 7.5
strength = 0.8
background = "box.png"

[[layers]]
file = "rice.png"
text = "rice"
x = 28
y = 44

[[layers]]
file = "salmon_sushi.png"
text = "salmon sushi"
x = 36
y = 60
attention_weight = 1.5

[[layers]]
file = "sliced_ginger.png"
text = "sliced ginger"
x = 150
y = 52
strength = 0.7

[[layers]]
file = "edamame.png"
text = "edamame"
x = 140
y = 140
"""


def _canvas(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    return image, ImageDraw.Draw(image)


def bento_images(rng: random.Random) -> dict[str, Image.Image]:
    box, draw = _canvas(SIZE, SIZE)
    draw.rectangle((0, 0, SIZE, SIZE), fill=(214, 196, 170, 255))  # the table
    draw.rounded_rectangle((16, 32, 240, 224), radius=14, fill=(92, 52, 24, 255))  # the box rim
    draw.rounded_rectangle((24, 40, 232, 216), radius=10, fill=(122, 74, 38, 255))
    draw.line((132, 40, 132, 216), fill=(92, 52, 24, 255), width=6)  # divider
    draw.line((132, 132, 232, 132), fill=(92, 52, 24, 255), width=6)

    rice, draw = _canvas(100, 168)
    draw.rounded_rectangle((0, 0, 99, 167), radius=18, fill=(246, 244, 236, 255))
    for _ in range(160):  # grains
        x, y = rng.randrange(6, 92), rng.randrange(6, 160)
        draw.ellipse((x, y, x + 5, y + 3), fill=(228, 224, 212, 255))

    sushi, draw = _canvas(84, 136)
    for i in range(3):
        top = 4 + i * 44
        draw.ellipse((4, top, 80, top + 38), fill=(244, 128, 52, 255))
        for k in range(4):  # the white fat lines of salmon
            x = 16 + k * 16
            draw.line((x, top + 6, x + 10, top + 32), fill=(255, 236, 220, 255), width=3)

    ginger, draw = _canvas(76, 72)
    for _ in range(6):  # overlapping pink slices
        x, y = rng.randrange(0, 36), rng.randrange(0, 30)
        draw.ellipse((x, y, x + 38, y + 40), fill=(246, 170, 186, 255), outline=(224, 130, 154, 255))

    edamame, draw = _canvas(88, 72)
    for _ in range(5):  # pods, three beans each
        x, y = rng.randrange(0, 40), rng.randrange(0, 50)
        for bean in range(3):
            cx = x + bean * 14
            draw.ellipse((cx, y, cx + 18, y + 18), fill=(104, 168, 64, 255), outline=(64, 120, 40, 255))
    return {
        "box.png": box,
        "rice.png": rice,
        "salmon_sushi.png": sushi,
        "sliced_ginger.png": ginger,
        "edamame.png": edamame,
    }


def _layer(text: str, image: Image.Image, x: int, y: int, **kwargs) -> Layer:
    return Layer(text=text, name=text, image=np.asarray(image).copy(), offset=(x, y), **kwargs)


def room_tree(rng: random.Random) -> list[Layer | LayerGroup]:
    background, draw = _canvas(SIZE, SIZE)
    draw.rectangle((0, 0, SIZE, 170), fill=(232, 220, 196, 255))  # wall
    draw.rectangle((0, 170, SIZE, SIZE), fill=(150, 104, 64, 255))  # floor
    for y in range(178, SIZE, 14):  # floor boards
        draw.line((0, y, SIZE, y), fill=(128, 86, 50, 255), width=2)

    window, draw = _canvas(84, 92)
    draw.rectangle((0, 0, 83, 91), fill=(250, 250, 250, 255))
    draw.rectangle((6, 6, 77, 85), fill=(150, 200, 240, 255))
    draw.line((42, 6, 42, 85), fill=(250, 250, 250, 255), width=5)
    draw.line((6, 46, 77, 46), fill=(250, 250, 250, 255), width=5)

    table, draw = _canvas(100, 64)
    draw.rectangle((0, 0, 99, 12), fill=(140, 90, 45, 255))
    for x in (6, 84):
        draw.rectangle((x, 12, x + 9, 63), fill=(116, 72, 34, 255))

    armchair, draw = _canvas(80, 84)
    draw.rounded_rectangle((8, 0, 71, 50), radius=10, fill=(190, 30, 36, 255))  # back
    draw.rounded_rectangle((0, 30, 79, 70), radius=10, fill=(210, 40, 44, 255))  # seat and arms
    draw.rectangle((8, 70, 14, 83), fill=(80, 50, 30, 255))
    draw.rectangle((65, 70, 71, 83), fill=(80, 50, 30, 255))

    plant, draw = _canvas(60, 110)
    draw.polygon([(14, 70), (46, 70), (40, 109), (20, 109)], fill=(196, 98, 60, 255))  # pot
    for _ in range(9):
        x, y = rng.randrange(2, 36), rng.randrange(0, 52)
        draw.ellipse((x, y, x + 22, y + 26), fill=(58, 140, 62, 255))

    cat, draw = _canvas(50, 30)
    draw.ellipse((0, 4, 49, 29), fill=(120, 120, 120, 255))

    return [
        _layer("Background", background, 0, 0),
        _layer("a window", window, 150, 24),
        LayerGroup(
            name="furniture",
            children=[
                _layer("a wooden table", table, 100, 150),
                _layer("a red armchair", armchair, 14, 128, attention_weight=1.5),
            ],
        ),
        _layer("a potted plant", plant, 214, 96),  # reaches past the right edge
        _layer("a sleeping cat", cat, 110, 196, visible=False),  # hidden: not generated
    ]


ROOM_SETTINGS = {
    "prompt": "a cozy living room with a wooden table, a red armchair, a window and a potted plant",
    "negative_prompt": "blurry, low quality",
    "seed": 3,
    "steps": 20,
    "guidance_scale": 7.5,
    "strength": 0.8,
}


def shapes_tree() -> list[Layer]:
    """Shapes drawn exactly as the demo model's training data draws them, each cropped to a layer."""
    from training.data import ObjectSpec, background_rgb, render_object

    size = SHAPES_SIZE
    grass = background_rgb("grass", np.random.default_rng(SEED), size, size)
    layers = [
        Layer(text="", name="Background", image=np.concatenate([grass, np.full((size, size, 1), 255.0)], -1))
    ]
    for fields, text, settings in SHAPES_LAYERS:
        spec = ObjectSpec(*fields)
        rgba = render_object(spec, size, size)
        ys, xs = np.nonzero(rgba[..., 3])
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = rgba[y0:y1, x0:x1].copy()
        layers.append(Layer(text=text, name=text, image=crop, offset=(int(x0), int(y0)), **settings))
    for layer in layers:
        layer.image = np.clip(np.rint(layer.image), 0, 255).astype(np.uint8)
    return layers


SHAPES_SIZE = 64
SHAPES_LAYERS = [
    # ((shape, colour, texture, centre x, centre y, size) as the training data draws it, the
    # layer's name = text, its Collage Diffusion settings)
    (("heart", "red", "plain", 18.0, 24.0, 30.0), "red heart", {"attention_weight": 1.5}),
    (("star", "yellow", "plain", 46.0, 20.0, 26.0), "yellow star", {"control_weight": 1.0, "strength": 0.6}),
    # Kept almost as painted (low strength), while the rest is repainted around it.
    (("square", "purple", "plain", 38.0, 46.0, 24.0), "purple square", {"strength": 0.2}),
]
SHAPES_SETTINGS = {
    "prompt": "a red heart, a yellow star and a purple square on grass",
    "seed": 1,
    "steps": 25,
    "guidance_scale": 4.0,
    "strength": 0.8,
}


def main(out: Path) -> None:
    rng = random.Random(SEED)
    bento = out / "bento"
    bento.mkdir(parents=True, exist_ok=True)
    for name, image in bento_images(rng).items():
        image.save(bento / name, format="PNG")
    (bento / "collage.toml").write_text(BENTO_MANIFEST, encoding="utf-8")
    save_ora(out / "room.ora", room_tree(rng), SIZE, SIZE, settings=ROOM_SETTINGS)
    save_ora(out / "shapes.ora", shapes_tree(), SHAPES_SIZE, SHAPES_SIZE, settings=SHAPES_SETTINGS)
    print(f"wrote {bento}, {out / 'room.ora'} and {out / 'shapes.ora'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
