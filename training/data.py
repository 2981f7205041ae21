"""A seeded synthetic data set for the demo model: coloured shapes on a few backgrounds.

Every image is a pure function of ``(seed, index)``, so a data set of any size is reproducible
and can be made lazily. An image holds one to three objects (a shape in a colour, flat or with a
named texture) at varied positions and sizes over a background, and a caption that names them:
"a red circle and a blue striped star on grass". Each sample also carries the objects' masks
(for evaluation: where should the red circle be?).

Objects can also be drawn alone as RGBA layers (`render_object`), which is how the evaluation
builds collages from the same visual vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 40),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (140, 45, 185),
    "orange": (250, 130, 15),
}
TEXTURES = ("plain", "striped", "dotted")  # "plain" is not named in captions
BACKGROUNDS = ("white", "grass", "sky")
BACKGROUND_WORDS = {"white": "on white", "grass": "on grass", "sky": "in the sky"}

_SS = 4  # supersampling factor for anti-aliased shapes


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    texture: str = "plain"
    cx: float = 32.0  # centre, pixels
    cy: float = 32.0
    size: float = 24.0  # diameter of the bounding circle, pixels

    @property
    def text(self) -> str:
        """The object's words in a caption ("blue striped star")."""
        words = [self.colour] + ([self.texture] if self.texture != "plain" else []) + [self.shape]
        return " ".join(words)


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    objects: list[ObjectSpec]  # bottom to top
    masks: np.ndarray  # (n_objects, H, W) float32: each object's *visible* coverage
    background: str
    layers: list[np.ndarray]  # each object alone as drawn: RGBA uint8 (H, W, 4), bottom to top


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.8
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        scale = r / 16.5
        return [(cx + xi * scale, cy + (yi + 2) * scale) for xi, yi in zip(x, y, strict=True)]
    return None  # circle


def shape_alpha(shape: str, cx: float, cy: float, size: float, width: int, height: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) float32 in [0, 1] of one shape."""
    img = Image.new("L", (width * _SS, height * _SS), 0)
    draw = ImageDraw.Draw(img)
    r = size / 2 * _SS
    x, y = cx * _SS, cy * _SS
    poly = _shape_polygon(shape, x, y, r)
    if poly is None:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    img = img.resize((width, height), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def _contrast(colour: str) -> np.ndarray:
    return np.array((20, 20, 20) if colour in ("yellow", "orange") else (250, 250, 250), np.float32)


def texture_rgb(spec: ObjectSpec, width: int, height: int, phase: float = 0.0) -> np.ndarray:
    """The object's paint (H, W, 3) float32 over the whole canvas (masked later)."""
    base = np.array(COLOURS[spec.colour], np.float32)
    rgb = np.broadcast_to(base, (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if spec.texture == "striped":
        period = max(6.0, spec.size / 3.5)
        on = ((xx + yy + phase) % period) < period / 2  # diagonal stripes
        rgb[on] = _contrast(spec.colour)
    elif spec.texture == "dotted":
        period = max(6.0, spec.size / 3.5)
        gx, gy = (xx + phase) % period - period / 2, (yy + phase) % period - period / 2
        on = gx * gx + gy * gy < (period * 0.28) ** 2
        rgb[on] = _contrast(spec.colour)
    return rgb


def background_rgb(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A background (H, W, 3) float32 in 0..255."""
    if kind == "white":
        v = rng.uniform(235, 255)
        return np.full((height, width, 3), v, np.float32)
    if kind == "grass":
        base = np.array((70, 150, 50), np.float32) + rng.uniform(-15, 15, 3)
        # Blobby noise: coarse noise upsampled plus fine speckle.
        coarse = rng.normal(0, 1, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
        coarse = np.asarray(
            Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.float32
        )
        fine = rng.normal(0, 1, (height, width)).astype(np.float32)
        n = 14 * coarse + 10 * fine
        return np.clip(base + n[..., None] * np.array((0.6, 1.0, 0.5), np.float32), 0, 255)
    if kind == "sky":
        top = np.array((60, 120, 220), np.float32) + rng.uniform(-15, 15, 3)
        bottom = np.array((175, 215, 250), np.float32) + rng.uniform(-10, 5, 3)
        t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
        return np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).copy()
    raise ValueError(f"unknown background {kind!r}")


def render_object(spec: ObjectSpec, width: int, height: int) -> np.ndarray:
    """The object alone as an RGBA uint8 layer of the canvas size (straight alpha)."""
    alpha = shape_alpha(spec.shape, spec.cx, spec.cy, spec.size, width, height)
    rgb = texture_rgb(spec, width, height)
    out = np.concatenate([rgb, alpha[..., None] * 255.0], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def caption_for(objects: list[ObjectSpec] | list[str], background: str) -> str:
    """ "a red circle and a blue striped star on grass" (objects, or their words, in the order given)."""
    texts = [o if isinstance(o, str) else o.text for o in objects]
    parts = [("an " if t[0] in "aeiou" else "a ") + t for t in texts]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body} {BACKGROUND_WORDS[background]}"


def random_object(
    rng: np.random.Generator, width: int, height: int, texture_p: float = 0.3, exclude: set | None = None
) -> ObjectSpec:
    exclude = exclude or set()
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        if (shape, colour) not in exclude:
            break
    texture = "plain"
    if rng.random() < texture_p:
        texture = TEXTURES[1 + rng.integers(len(TEXTURES) - 1)]
    size = float(rng.uniform(0.28, 0.6) * min(width, height))
    margin = size * 0.35
    cx = float(rng.uniform(margin, width - margin))
    cy = float(rng.uniform(margin, height - margin))
    return ObjectSpec(shape, colour, texture, cx, cy, size)


def make_sample(seed: int, index: int, width: int = 64, height: int = 64) -> Sample:
    """Sample `index` of the data set `seed`: deterministic, independent of any other sample."""
    rng = np.random.default_rng([seed, index])
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    n = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
    objects: list[ObjectSpec] = []
    for _ in range(n):
        objects.append(random_object(rng, width, height, exclude={(o.shape, o.colour) for o in objects}))
    canvas = background_rgb(background, rng, width, height)
    alphas, layers = [], []
    for obj in objects:
        alpha = shape_alpha(obj.shape, obj.cx, obj.cy, obj.size, width, height)
        rgb = texture_rgb(obj, width, height, phase=float(rng.uniform(0, 8)))
        canvas = canvas * (1 - alpha[..., None]) + rgb * alpha[..., None]
        alphas.append(alpha)
        layers.append(np.clip(np.rint(np.concatenate([rgb, alpha[..., None] * 255.0], -1)), 0, 255))
    masks = visible_masks(np.stack(alphas))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    # Caption order is random so no word position means "bottom" or "left".
    order = rng.permutation(n)
    caption = caption_for([objects[i] for i in order], background)
    return Sample(image, caption, objects, masks, background, [la.astype(np.uint8) for la in layers])


def visible_masks(alphas: np.ndarray) -> np.ndarray:
    """m_i = a_i * prod_{j above i} (1 - a_j) for a bottom-to-top stack (n, H, W)."""
    out = alphas.copy()
    for i in range(len(alphas)):
        for j in range(i + 1, len(alphas)):
            out[i] *= 1 - alphas[j]
    return out.astype(np.float32)


def make_images(seed: int, count: int, start: int = 0, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """`count` images (N, H, W, 3) uint8 and their captions, samples start..start+count-1."""
    samples = [make_sample(seed, start + i, size, size) for i in range(count)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples]
