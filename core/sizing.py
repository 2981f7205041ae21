"""Generation sizes: the size a model family likes for a canvas, and generating a canvas there.

SD 1.5 draws well at about 0.25 MP, SDXL at about 1 MP; far from that, objects repeat or dissolve.
A canvas of another size is generated at the family's nearest liked size (same aspect ratio) and
the result is scaled back to the canvas. The guarantees hold at the canvas's own size: strength-0
pixels, and everything outside a regenerated layer's region, are the input's bytes exactly.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image

from krita_plugin.collage_diffusion import wire_sizes

from .collage import Collage, CollageError, Layer
from .compositing import composite
from .generate import GeneratedImage, GenerationResult, Regenerate, generate, start_and_strength
from .strength import feather_weights, paste_back

SIZE_POLICIES = ("auto", "document")
_WXH = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$", re.IGNORECASE)


def parse_size(text: str) -> str | tuple[int, int]:
    """'auto', 'document' or 'WxH' (multiples of 8) → the policy or the size; ValueError otherwise."""
    value = text.strip().lower()
    if value in SIZE_POLICIES:
        return value
    match = _WXH.match(value)
    if not match:
        raise ValueError(f"size must be auto, document or WIDTHxHEIGHT (e.g. 1024x768), got {text!r}")
    w, h = int(match[1]), int(match[2])
    if w % 8 or h % 8 or min(w, h) < 64:
        raise ValueError(f"size {w}x{h}: each side must be a multiple of 8 and at least 64")
    return w, h


def generation_size(
    canvas: tuple[int, int], policy: str | tuple[int, int], native_size: int, size_multiple: int = 8
) -> tuple[int, int]:
    """The (width, height) to generate a canvas of size `canvas` at, under `policy`:
    "document" = the canvas (rounded to multiples of 8); "auto" = the canvas when its area is
    near the model's native area, else the nearest size the model likes (`wire_sizes.auto_size`,
    the rule the dock uses too); or an explicit size."""
    if isinstance(policy, tuple):
        return policy
    width, height = canvas
    if policy == "document":
        return wire_sizes.round8(width), wire_sizes.round8(height)
    if policy != "auto":
        raise ValueError(f"unknown size policy {policy!r} (use {', '.join(SIZE_POLICIES)} or WxH)")
    return wire_sizes.auto_size(native_size, size_multiple, width, height)


def validate_any_size(collage: Collage) -> None:
    """`Collage.validate` for a canvas of any size from 64 to 8192 a side: one that is not a
    multiple of 8 is generated at one that is and scaled back, so it is checked on that copy.
    Raises `CollageError`; a canvas out of range is reported as such."""
    width, height = collage.width, collage.height
    in_range = all(
        isinstance(v, int) and not isinstance(v, bool) and 64 <= v <= 8192 for v in (width, height)
    )
    if in_range and (width % 8 or height % 8):
        scaled_collage(collage, wire_sizes.round8(width), wire_sizes.round8(height)).validate()
    elif in_range:
        collage.validate()
    else:
        try:
            collage.validate()
        except CollageError as error:  # out of range: "multiple of 8" would only add noise
            problems = [p for p in error.problems if "must be a multiple of 8" not in p]
            raise CollageError(problems) from None


def model_generation_size(model, canvas: tuple[int, int], policy: str | tuple[int, int]) -> tuple[int, int]:
    """`generation_size` for a loaded model (`core.models.LoadedModel`)."""
    return generation_size(canvas, policy, model.native_size, model.family.size_multiple)


def _resize_rgba(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize with premultiplied alpha, so transparent pixels' colours do not bleed into edges."""
    mode = "RGBA" if image.shape[2] == 4 else "RGB"
    pil = Image.fromarray(np.ascontiguousarray(image), mode)
    if mode == "RGBA":
        pil = pil.convert("RGBa")
    out = pil.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(out.convert(mode) if mode == "RGBA" else out)


def _resize_mask(mask: np.ndarray | None, width: int, height: int) -> np.ndarray | None:
    """A regenerate mask at another size: any pixel the canvas mask touches stays selected (the
    full-size paste-back uses the canvas mask itself)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        return mask  # generate reports it
    selected = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), "L")
    return np.asarray(selected.resize((width, height), Image.Resampling.BOX)) > 0


def scaled_collage(collage: Collage, width: int, height: int) -> Collage:
    """The collage on a canvas of another size: layers resized and moved in proportion."""
    sx, sy = width / collage.width, height / collage.height

    def scale(layer: Layer) -> Layer:
        h, w = layer.image.shape[:2]
        x, y = layer.offset
        x0, y0 = round(x * sx), round(y * sy)
        new_w = max(1, round((x + w) * sx) - x0)
        new_h = max(1, round((y + h) * sy) - y0)
        image = _resize_rgba(layer.image, new_w, new_h) if (new_w, new_h) != (w, h) else layer.image
        return dataclasses.replace(layer, image=image, offset=(x0, y0))

    background = collage.background
    if isinstance(background, np.ndarray):
        background = _resize_rgba(background, width, height)
    return dataclasses.replace(
        collage,
        layers=[scale(layer) for layer in collage.layers],
        width=width,
        height=height,
        background=background,
    )


def generate_at_size(
    model, collage: Collage, size: tuple[int, int], *, regenerate: Regenerate | None = None, **kwargs
) -> GenerationResult:
    """`generate` at `size`, with the images scaled back to the collage's canvas and pasted back
    there (strength-0 pixels and everything outside a regenerated region are the input's bytes).
    Other keyword arguments go to `generate` unchanged."""
    width, height = size
    if (width, height) == (collage.width, collage.height):
        return generate(model, collage, regenerate=regenerate, **kwargs)
    small = scaled_collage(collage, width, height)
    small_regenerate = None
    if regenerate is not None:
        base = regenerate.base_image
        if not isinstance(base, np.ndarray) or base.shape[:2] != (collage.height, collage.width):
            raise CollageError(
                [
                    f"regenerate.base_image: must be an image of the canvas size {collage.width}×{collage.height}"
                ]
            )
        mask = regenerate.mask
        if isinstance(mask, np.ndarray) and mask.shape != (collage.height, collage.width):
            raise CollageError(
                [f"regenerate.mask: must be an image of the canvas size {collage.width}×{collage.height}"]
            )
        small_regenerate = dataclasses.replace(
            regenerate,
            base_image=_resize_rgba(base, width, height),
            dilation_px=max(0, round(regenerate.dilation_px * width / collage.width)),
            mask=_resize_mask(regenerate.mask, width, height),
        )
    result = generate(model, small, regenerate=small_regenerate, **kwargs)
    start, strength = start_and_strength(collage, composite(collage), regenerate)
    weights = feather_weights(strength > 0, collage.feather_px)
    images = [
        GeneratedImage(
            paste_back(_resize_rgba(img.image, collage.width, collage.height), start, weights), img.seed
        )
        for img in result.images
    ]
    return dataclasses.replace(result, images=images, composite=start)
