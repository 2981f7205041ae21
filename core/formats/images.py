"""Pixel helpers shared by the readers and the writer: conversion to 8-bit RGBA, cropping, compositing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..collage import Layer

# PIL modes whose samples are wider than 8 bits; PIL's own convert() clips them instead of scaling.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgba8(image: Image.Image) -> np.ndarray:
    """Any PIL image (16-bit, grey, palette, CMYK, ...) as an 8-bit straight-alpha RGBA array."""
    if image.mode in _WIDE_MODES:
        # 16-bit grey: keep the high byte, as PIL itself does for 16-bit RGB(A) PNGs.
        grey = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(grey, "L")
    elif image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        scale = 255.0 if grey.size and grey.max() <= 1.0 else 1.0  # float images come as 0..1 or 0..255
        image = Image.fromarray((grey * scale).round().clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "LAB":
        image = image.convert("RGB")  # PIL's LAB → RGBA leaves alpha 0
    if image.mode != "RGBA":
        # Palette transparency (tRNS), "LA"/"PA" alpha and CMYK all map through convert("RGBA").
        image = image.convert("RGBA")
    return np.array(image, dtype=np.uint8)  # a writable copy


def read_png(data: bytes | Path) -> np.ndarray:
    """Decode an image file (PNG in practice) from bytes or a path to 8-bit RGBA."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as image:
        image.load()
        return to_rgba8(image)


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(as_uint8_image(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def as_uint8_image(image: np.ndarray) -> np.ndarray:
    """Check an array is an 8-bit grey, RGB or RGBA image; raise ValueError saying what it is otherwise."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an 8-bit image array, got {desc}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) or 0 in image.shape[:2]:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    return np.ascontiguousarray(image)


def content_box(image: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels with alpha > 0, or None if there are none."""
    alpha = image[..., 3]
    cols = np.flatnonzero(alpha.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(alpha.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_to_content(image: np.ndarray, offset: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Crop to the non-transparent pixels, moving the offset to match; None when all are transparent.

    Big canvases holding small objects stay cheap to mask and attend over.
    """
    box = content_box(image)
    if box is None:
        return None
    left, top, right, bottom = box
    if (left, top, right, bottom) == (0, 0, image.shape[1], image.shape[0]):
        return image, offset
    return image[top:bottom, left:right].copy(), (offset[0] + left, offset[1] + top)


def shows_on_canvas(image: np.ndarray, offset: tuple[int, int], width: int, height: int) -> bool:
    """Whether any pixel with alpha > 0 lands on the width × height canvas."""
    x, y = offset
    h, w = image.shape[:2]
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return False
    return bool(image[max(0, -y) : height - y, max(0, -x) : width - x, 3].any())


def canvas_region(image: np.ndarray, offset: tuple[int, int], width: int, height: int) -> np.ndarray:
    """The layer placed on a transparent width × height canvas (RGBA uint8)."""
    out = np.zeros((height, width, 4), np.uint8)
    x, y = offset
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x0 < x1 and y0 < y1:
        out[y0:y1, x0:x1] = image[y0 - y : y1 - y, x0 - x : x1 - x]
    return out


def composite(layers: list[Layer], width: int, height: int) -> np.ndarray:
    """Straight-alpha "source over" of the layers (bottom to top, opacity applied) on a transparent canvas."""
    color = np.zeros((height, width, 3), np.float32)  # premultiplied while compositing
    alpha = np.zeros((height, width, 1), np.float32)
    for layer in layers:
        placed = canvas_region(layer.image, layer.offset, width, height).astype(np.float32) / 255.0
        a = placed[..., 3:] * float(layer.opacity)
        color = placed[..., :3] * a + color * (1.0 - a)
        alpha = a + alpha * (1.0 - a)
    straight = np.divide(color, alpha, out=np.zeros_like(color), where=alpha > 0)
    out = np.concatenate([straight, alpha], axis=2)
    return (out * 255.0).round().clip(0, 255).astype(np.uint8)


def flatten_on(image: np.ndarray, opacity: float, rgb: tuple[int, int, int]) -> np.ndarray:
    """An RGBA canvas-sized image with `opacity` composited over a solid colour, as RGB uint8."""
    a = image[..., 3:].astype(np.float32) / 255.0 * float(opacity)
    out = image[..., :3].astype(np.float32) * a + np.asarray(rgb, np.float32) * (1.0 - a)
    return out.round().clip(0, 255).astype(np.uint8)
