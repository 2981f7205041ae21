"""The held-out collages of benchmarks/eval_pieces.py and its measures: built from the demo
model's synthetic vocabulary (`training.data`) with a seed training never used, so every object
has a known colour, shape, texture and mask; plus the figure of the first few (`Gallery`).

Also used by the tests that keep a fixed slice of the evaluation (tests/test_demo_pieces.py,
tests/test_layer_stack.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from core.collage import Collage, Layer
from training.data import (
    BACKGROUNDS,
    COLOURS,
    ObjectSpec,
    background_rgb,
    caption_for,
    random_object,
    render_object,
    shape_alpha,
)

SIZE = 64
HELD_OUT_SEED = 987654321  # training uses its own seed (20240521); these collages are never seen
SPATIAL_EXTRA_SEEDS = (4242, 777)  # the spatial measure also draws these (issue 18: one draw misleads)


@dataclass
class Case:
    collage: Collage
    objects: list[ObjectSpec]
    alphas: np.ndarray  # (n, H, W) each object's own coverage (not the layer's patch)
    visible: np.ndarray  # (n, H, W) visible object coverage after occlusion
    patches: np.ndarray | None = None  # (n, H, W) bool: the layer's whole patch (harmonization)
    textured: int | None = None  # index of the layer whose look (pattern or colour) no text names


def _words(o: ObjectSpec, kind: str, first: bool) -> str:
    """An object's words in the collage: never its pattern; for "colour" cases, the first
    object's colour neither."""
    if kind == "colour" and first:
        return o.shape
    return replace(o, texture="plain").text


def _objects(rng, n: int, background: str, texture: bool) -> list[ObjectSpec]:
    objs: list[ObjectSpec] = []
    while len(objs) < n:
        o = random_object(rng, SIZE, SIZE, texture_p=0.0)
        # Colour detection needs the object's colour to differ from the background's.
        if (o.colour == "green" and background == "grass") or (o.colour == "blue" and background == "sky"):
            continue
        if any(p.colour == o.colour for p in objs):
            continue
        if any(np.hypot(p.cx - o.cx, p.cy - o.cy) < (p.size + o.size) * 0.45 for p in objs):
            continue  # keep objects mostly apart: each needs a visible region to be found in
        objs.append(o)
    if texture:
        objs[0] = replace(
            objs[0], texture=("striped", "dotted")[int(rng.integers(2))], size=max(objs[0].size, 26)
        )
    return objs


def make_cases(n: int, seed: int, kind: str) -> list[Case]:
    """`n` held-out collages; `kind` is "layout", "appearance" (the first object's pattern is
    named nowhere), "colour" (its colour is named nowhere) or "seams"."""
    cases = []
    for k in range(n):
        rng = np.random.default_rng([seed, {"layout": 0, "appearance": 1, "seams": 2, "colour": 3}[kind], k])
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        bg = np.clip(np.rint(background_rgb(background, rng, SIZE, SIZE)), 0, 255).astype(np.uint8)
        objs = _objects(rng, 2, background, texture=kind == "appearance")
        layers, alphas, patches = [], [], []
        for o in objs:
            rgba = render_object(o, SIZE, SIZE)
            alpha = shape_alpha(o.shape, o.cx, o.cy, o.size, SIZE, SIZE)
            if kind == "seams":
                # A cut-out with its own, different background around the object: a hard seam.
                other = [b for b in BACKGROUNDS if b != background][int(rng.integers(2))]
                patch_bg = background_rgb(other, rng, SIZE, SIZE)
                half = o.size * 0.75
                y0, y1 = int(max(0, o.cy - half)), int(min(SIZE, o.cy + half))
                x0, x1 = int(max(0, o.cx - half)), int(min(SIZE, o.cx + half))
                patch = np.zeros((SIZE, SIZE), bool)
                patch[y0:y1, x0:x1] = True
                rgb = patch_bg * (1 - alpha[..., None]) + rgba[..., :3] * alpha[..., None]
                rgba = np.concatenate([rgb, patch[..., None] * 255.0], -1)
                rgba = np.clip(np.rint(rgba), 0, 255).astype(np.uint8)
                patches.append(patch)
            layers.append(Layer(text=_words(o, kind, first=not layers), image=rgba))
            alphas.append(alpha)
        alphas = np.stack(alphas)
        visible = alphas.copy()
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                cover = patches[j] if patches else alphas[j]
                visible[i] *= 1 - cover
        prompt = caption_for([_words(o, kind, first=i == 0) for i, o in enumerate(objs)], background)
        collage = Collage(prompt=prompt, layers=layers, width=SIZE, height=SIZE, background=bg, seed=k)
        cases.append(
            Case(
                collage,
                objs,
                alphas,
                visible,
                np.stack(patches) if patches else None,
                0 if kind in ("appearance", "colour") else None,
            )
        )
    return cases


# ---------------------------------------------------------------------------------------------
# Measures


def colour_pixels(image: np.ndarray, colour: str, threshold: float = 80.0) -> np.ndarray:
    """Pixels whose nearest palette colour is `colour`, within `threshold` (RGB distance)."""
    img = image.astype(np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)
    d = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)
    idx = list(COLOURS).index(colour)
    return (d.argmin(-1) == idx) & (d[..., idx] < threshold)


def placed(image: np.ndarray, obj: ObjectSpec, mask: np.ndarray) -> bool:
    hits = colour_pixels(image, obj.colour)
    m = mask > 0.5
    if m.sum() == 0:
        return True
    inside = (hits & m).sum()
    return inside >= 0.3 * m.sum() and inside >= 0.5 * max(1, hits.sum())


def inside_distance(image: np.ndarray, layer_rgb: np.ndarray, mask: np.ndarray) -> float:
    m = cv2.erode((mask > 0.99).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    if not m.any():
        m = mask > 0.5
    diff = np.abs(image.astype(np.float32) - layer_rgb.astype(np.float32)).mean(-1)
    return float(diff[m].mean())


def colour_w1(image: np.ndarray, layer_rgb: np.ndarray, mask: np.ndarray) -> float:
    """Wasserstein-1 distance of the colour distributions inside the object (per channel, 0..255).

    Unlike the pixel distance it does not care where the stripes are, only whether the object
    has them (a plain red circle and a red-and-white striped one differ; two stripe phases do not).
    """
    m = cv2.erode((mask > 0.99).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    if not m.any():
        m = mask > 0.5
    a = np.sort(image[m].astype(np.float32), axis=0)
    b = np.sort(layer_rgb[m].astype(np.float32), axis=0)
    return float(np.abs(a - b).mean())


def edge_recall(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Share of the reference's edges inside the mask found again in the image (±1 px)."""
    ref = cv2.Canny(cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY), 100, 200) > 0
    got = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 100, 200)
    got = cv2.dilate(got, np.ones((3, 3), np.uint8)) > 0
    m = cv2.dilate((mask > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    ref &= m
    return float((ref & got).sum() / max(1, ref.sum()))


def seam_energy(image: np.ndarray, patch: np.ndarray, alpha: np.ndarray, elsewhere: np.ndarray) -> float:
    """Mean gradient magnitude on the patch border, away from the object itself and from
    `elsewhere` (other layers' patches, whose own borders are not this layer's seam)."""
    gray = image.astype(np.float32).mean(-1)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    p = patch.astype(np.uint8)
    ring = (cv2.dilate(p, np.ones((3, 3), np.uint8)) - cv2.erode(p, np.ones((3, 3), np.uint8))) > 0
    ring &= cv2.dilate((alpha > 0.05).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    ring &= cv2.dilate(elsewhere.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    # The canvas border is not a seam.
    ring[:1], ring[-1:], ring[:, :1], ring[:, -1:] = False, False, False, False
    return float(mag[ring].mean()) if ring.any() else 0.0


def harmonization_scores(image: np.ndarray, case: Case) -> tuple[float, float]:
    """(seam of the second layer's patch, distance to the first layer inside its object)."""
    seam = seam_energy(image, case.patches[1], case.alphas[1], elsewhere=case.patches[0])
    return seam, inside_distance(image, case.collage.layers[0].image[..., :3], case.visible[0])


# ---------------------------------------------------------------------------------------------


class Gallery:
    """The first few held-out collages of each measure, as generated under each setting."""

    def __init__(self, per_section: int):
        self.per_section = per_section
        self.sections: dict[str, dict[str, dict[int, np.ndarray]]] = {}

    def add(self, section: str, label: str, index: int, image: np.ndarray) -> None:
        if index < self.per_section:
            self.sections.setdefault(section, {}).setdefault(label, {})[index] = image

    def save(self, path: str, scale: int = 3) -> None:
        """One block per measure: a title line, the settings' names, then a row per collage."""
        from PIL import Image, ImageDraw

        tile, pad, line = SIZE * scale, 4, 13
        columns = max(len(labels) for labels in self.sections.values())
        blocks = [(name, labels, len(next(iter(labels.values())))) for name, labels in self.sections.items()]
        height = pad + sum(2 * line + n * (tile + pad) + pad for _, _, n in blocks)
        sheet = Image.new("RGB", (pad + columns * (tile + pad), height), "white")
        draw = ImageDraw.Draw(sheet)
        y = pad
        for name, labels, n in blocks:
            draw.text((pad, y), name, fill="black")
            for c, label in enumerate(labels):
                draw.text((pad + c * (tile + pad), y + line), label, fill=(70, 70, 70))
            y += 2 * line
            for r in range(n):
                for c, images in enumerate(labels.values()):
                    im = Image.fromarray(images[r]).resize((tile, tile), Image.NEAREST)
                    sheet.paste(im, (pad + c * (tile + pad), y))
                y += tile + pad
            y += pad
        sheet.save(path)


def composite_of(case: Case) -> np.ndarray:
    from core.compositing import composite

    return composite(case.collage).image


def placed_alpha(layer) -> np.ndarray:
    alpha = np.zeros((SIZE, SIZE), np.uint8)
    (x, y), (h, w) = layer.offset, layer.image.shape[:2]
    alpha[y : y + h, x : x + w] = layer.image[..., 3]
    return alpha
