"""Results as a layer stack: one layer per object and a background with the objects' places filled.

For a flat result R and the collage that made it, `split_result` gives, bottom to top:

* a background layer: R everywhere except where some object layer is fully opaque; there, pixels
  from a fill (`fill_background`: an inpainting pass of the same model at the job's seed);
* one layer per visible object (in the collage's order, named after the input layer): R's pixels
  over the object's visible region (what shows, not what an object above hides), grown by
  `grow_px` into the background and fading out over `soft_px` more, so edges and contact shadows
  the model drew come along;
* the flat result itself, hidden, for comparison.

Why stacking them gives R back (normal "over", bottom to top): every object layer carries R's own
pixels, so at a pixel p the stack is R(p) * (1 - T) + B(p) * T with T = prod_i (1 - alpha_i(p)).
Where B(p) = R(p) that is R(p) for any alphas; B differs from R only where some alpha_i is 255,
and there T = 0. So the stack is R exactly, up to the compositor's own rounding (at most 1/255
where alphas are soft, none where one is 255).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from .collage import Collage, Layer, LayerGroup
from .compositing import CompositeResult, composite
from .generate import GenerationResult
from .progress import FILL_PHASE, CancelFlag, Progress, ProgressCallback, check_cancel

OUTPUTS = ("image", "layers")  # `output` of a request: one flat image, or a layer stack
BACKGROUND_NAME = "background"
FLAT_NAME = "flat result"


@dataclass
class StackLayer:
    """One layer of a stack: straight-alpha RGBA pixels placed with their top-left at `offset`."""

    name: str
    kind: str  # "background", "object" or "flat"
    image: np.ndarray  # (h, w, 4) uint8
    offset: tuple[int, int] = (0, 0)  # (x, y) on the canvas
    visible: bool = True


@dataclass
class LayerStack:
    """The layers of one result, bottom to top, and how long its background fill took."""

    layers: list[StackLayer]
    seed: int
    fill_seconds: float = 0.0

    def visible(self) -> list[StackLayer]:
        return [layer for layer in self.layers if layer.visible]


@dataclass
class StackedResult(GenerationResult):
    """A `GenerationResult` with one `LayerStack` per image (same order) and the fill's time."""

    stacks: list[LayerStack] = field(default_factory=list)
    fill_seconds: float = 0.0  # all background fills together


def edge_sizes(width: int, height: int) -> tuple[int, int]:
    """(grow_px, soft_px) for a canvas: about 1/128 of its short side each, at least 2 px."""
    side = max(2, round(min(width, height) / 128))
    return side, side


def object_alphas(flat: CompositeResult, grow_px: int, soft_px: int) -> list[np.ndarray]:
    """Per visible layer (bottom to top), its stack layer's alpha (uint8, canvas size): 255 where
    the layer shows at all, and out to `grow_px` around it where the background shows; then
    fading to 0 over `soft_px` more. Growth goes only into the background, never over another
    object, so no layer takes pixels of an object it does not hold."""
    background = flat.masks.background
    out = []
    for mask in flat.masks.layers:
        shows = mask > 0
        if shows.any():
            distance = cv2.distanceTransform((~shows).astype(np.uint8), cv2.DIST_L2, 5)
            ramp = np.clip((grow_px + soft_px + 1 - distance) / (soft_px + 1), 0.0, 1.0)
        else:
            ramp = np.zeros(mask.shape, np.float32)
        alpha = np.where(shows, 1.0, ramp * background)
        out.append(np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8))
    return out


def opaque_region(alphas: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Where some object layer is fully opaque (boolean): the only place the background may differ
    from the flat result."""
    region = np.zeros(shape, bool)
    for alpha in alphas:
        region |= alpha == 255
    return region


def _cropped(rgb: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """RGBA of `rgb` under `alpha`, cropped to alpha > 0 (a 1×1 transparent pixel when empty)."""
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return np.zeros((1, 1, 4), np.uint8), (0, 0)
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    rgba = np.concatenate([rgb[y0:y1, x0:x1], alpha[y0:y1, x0:x1, None]], axis=2)
    rgba[rgba[..., 3] == 0] = 0  # no colour under transparent pixels: smaller files, no leaks
    return np.ascontiguousarray(rgba), (int(x0), int(y0))


def split_result(
    collage: Collage,
    image: np.ndarray,
    fill: np.ndarray | None,
    seed: int,
    *,
    flat: CompositeResult | None = None,
    grow_px: int | None = None,
    soft_px: int | None = None,
) -> LayerStack:
    """The stack of one flat result `image` ((H, W, 3) uint8) of `collage`. `fill` is the
    background to show where objects are opaque (canvas-size RGB; None keeps the result there)."""
    flat = flat or composite(collage)
    h, w = image.shape[:2]
    default_grow, default_soft = edge_sizes(w, h)
    alphas = object_alphas(
        flat, default_grow if grow_px is None else grow_px, default_soft if soft_px is None else soft_px
    )
    rgb = np.ascontiguousarray(image[..., :3])
    background = rgb.copy()
    if fill is not None:
        region = opaque_region(alphas, (h, w))
        background[region] = fill[..., :3][region]
    opaque = np.full((h, w, 1), 255, np.uint8)
    layers = [StackLayer(BACKGROUND_NAME, "background", np.concatenate([background, opaque], axis=2))]
    for layer, alpha in zip(flat.layers, alphas, strict=True):
        pixels, offset = _cropped(rgb, alpha)
        layers.append(StackLayer(layer.name or layer.text, "object", pixels, offset))
    layers.append(StackLayer(FLAT_NAME, "flat", np.concatenate([rgb, opaque], axis=2), visible=False))
    return LayerStack(layers, seed)


def composite_stack(layers: list[StackLayer], width: int, height: int) -> np.ndarray:
    """Straight-alpha "over" of the visible layers, bottom to top, on nothing: RGBA uint8."""
    color = np.zeros((height, width, 3), np.float64)  # premultiplied
    alpha = np.zeros((height, width, 1), np.float64)
    for layer in layers:
        if not layer.visible:
            continue
        x, y = layer.offset
        lh, lw = layer.image.shape[:2]
        src = layer.image.astype(np.float64) / 255.0
        a = src[..., 3:]
        region = (slice(y, y + lh), slice(x, x + lw))
        color[region] = src[..., :3] * a + color[region] * (1.0 - a)
        alpha[region] = a + alpha[region] * (1.0 - a)
    straight = np.divide(color, alpha, out=np.zeros_like(color), where=alpha > 0)
    return np.clip(np.rint(np.concatenate([straight, alpha], axis=2) * 255.0), 0, 255).astype(np.uint8)


def as_layer_group(stack: LayerStack, name: str) -> LayerGroup:
    """The stack as a document group (for `core.formats.save_ora`'s `result_groups`)."""
    children: list[Layer | LayerGroup] = [
        Layer(text="", image=s.image, offset=s.offset, name=s.name, visible=s.visible) for s in stack.layers
    ]
    return LayerGroup(children=children, name=name)


# ------------------------------------------------------------------------------- background fill


def background_prompt(prompt: str, texts: list[str]) -> str:
    """The prompt with the objects' texts taken out: "a cup, an apple on a wooden table" with
    texts "a cup", "an apple" → "on a wooden table". "background" when nothing is left."""
    rest = prompt
    for text in sorted({t.strip() for t in texts if t.strip()}, key=len, reverse=True):
        rest = re.sub(re.escape(text), ",", rest, flags=re.IGNORECASE)
    parts = []
    for part in re.split(r"[,;]", rest):
        part = re.sub(r"^\s*(and|with|&)\b|\b(and|with|&)\s*$", "", part.strip(), flags=re.IGNORECASE)
        part = part.strip(" .")
        if part:
            parts.append(part)
    return ", ".join(parts) or "background"


def fill_collage(collage: Collage, image: np.ndarray, region: np.ndarray, seed: int) -> Collage:
    """The collage of the inpainting pass: the result as the start image, `region` pre-filled from
    its surroundings (so little of the objects' colour is left under the noise) at strength 1,
    everything else at strength 0; the background's words as the prompt, the objects' words in
    the negative prompt."""
    texts = [layer.text for layer in collage.visible_layers()]
    rgb = np.ascontiguousarray(image[..., :3])
    prefilled = cv2.inpaint(rgb, region.astype(np.uint8), 5, cv2.INPAINT_TELEA)
    prefilled[~region] = rgb[~region]
    alpha = region.astype(np.uint8)[..., None] * 255
    text = background_prompt(collage.prompt, texts)
    negative = ", ".join(t for t in [collage.negative_prompt.strip(), *texts] if t)
    hole = Layer(text=text, image=np.concatenate([prefilled, alpha], axis=2), name="fill", strength=1.0)
    return dataclasses.replace(
        collage,
        prompt=text,
        negative_prompt=negative,
        layers=[hole],
        background=prefilled,
        strength=0.0,
        seed=seed,
    )


def fill_background(
    model,
    collage: Collage,
    image: np.ndarray,
    region: np.ndarray,
    seed: int,
    size: tuple[int, int],
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    embeddings=None,
) -> np.ndarray:
    """One inpainting pass of `model` over `region` of the result `image` at `seed`, generated at
    `size` like the result was (`core.sizing.generate_at_size`). Outside `region` the returned
    image is `image` exactly."""
    from .sizing import generate_at_size  # sizing imports generate; keep this module light

    if not region.any():
        return np.ascontiguousarray(image[..., :3]).copy()
    report = progress or (lambda p: None)

    def relabel(p: Progress) -> None:  # the client shows this pass as a phase of its own
        report(dataclasses.replace(p, phase=FILL_PHASE if p.phase == "sampling" else p.phase))

    result = generate_at_size(
        model,
        fill_collage(collage, image, region, seed),
        size,
        seeds=[seed],
        progress=relabel,
        cancel=cancel,
        embeddings=embeddings,  # the texts may name the painter's embeddings, as the job's did
    )
    out = np.ascontiguousarray(image[..., :3]).copy()
    out[region] = result.images[0].image[region]
    return out


def stack_results(
    model,
    collage: Collage,
    result: GenerationResult,
    size: tuple[int, int],
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    embeddings=None,
) -> StackedResult:
    """`result` (of `collage`, generated at `size`) with a layer stack per image: one background
    fill per image at that image's seed."""
    flat = composite(collage)
    stacks, total = [], 0.0
    for image in result.images:
        check_cancel(cancel)
        t0 = time.perf_counter()
        stack = split_result(collage, image.image, None, image.seed, flat=flat)
        objects = [layer for layer in stack.layers if layer.kind == "object"]
        h, w = image.image.shape[:2]
        alphas = [_uncropped_alpha(layer, w, h) for layer in objects]
        region = opaque_region(alphas, (h, w))
        fill = fill_background(
            model,
            collage,
            image.image,
            region,
            image.seed,
            size,
            progress=progress,
            cancel=cancel,
            embeddings=embeddings,
        )
        stack.layers[0].image[..., :3] = fill
        stack.fill_seconds = time.perf_counter() - t0
        total += stack.fill_seconds
        stacks.append(stack)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(GenerationResult)}
    return StackedResult(**fields, stacks=stacks, fill_seconds=total)


def _uncropped_alpha(layer: StackLayer, width: int, height: int) -> np.ndarray:
    alpha = np.zeros((height, width), np.uint8)
    x, y = layer.offset
    h, w = layer.image.shape[:2]
    alpha[y : y + h, x : x + w] = layer.image[..., 3]
    return alpha
