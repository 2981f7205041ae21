"""Raw pixel helpers, standard library only (no Qt, no numpy): byte order, cropping, scaling maths.

Krita hands RGBA/U8 pixels over as B, G, R, A bytes. Everything here works on whole byte strings
with slicing and `bytes` methods, never a Python loop per pixel: a 4096² layer is 64 MiB, and a
per-pixel loop would take minutes on Krita's Python.
"""

from __future__ import annotations

import math


def bgra_to_rgba(data: bytes) -> bytes:
    """Swap the blue and red bytes of every 4-byte pixel (the same function goes both ways)."""
    out = bytearray(data)
    out[0::4] = data[2::4]
    out[2::4] = data[0::4]
    return bytes(out)


rgba_to_bgra = bgra_to_rgba


def alpha_box(
    width: int, height: int, pixels: bytes, alpha_offset: int = 3
) -> tuple[int, int, int, int] | None:
    """The box (x, y, w, h) of the pixels whose alpha is not 0, or None when there is none.

    `pixels` holds `height` rows of `width` 4-byte pixels; the alpha byte is at `alpha_offset`
    (3 for both RGBA and BGRA). Rows are found with `bytes.lstrip`/`rstrip` over the alpha plane
    (one C-speed pass), columns from the rows that have content.
    """
    if width <= 0 or height <= 0:
        return None
    alpha = pixels[alpha_offset::4]
    if len(alpha) != width * height:
        raise ValueError(
            f"pixels: {len(pixels)} bytes, a {width}×{height} RGBA image has {width * height * 4}"
        )
    lead = len(alpha) - len(alpha.lstrip(b"\x00"))
    if lead == len(alpha):
        return None
    trail = len(alpha) - len(alpha.rstrip(b"\x00"))
    y0 = lead // width
    y1 = (len(alpha) - trail - 1) // width
    x0, x1 = width, 0
    for y in range(y0, y1 + 1):
        row = alpha[y * width : (y + 1) * width]
        stripped = row.lstrip(b"\x00")
        if not stripped:
            continue
        x0 = min(x0, width - len(stripped))
        x1 = max(x1, len(row.rstrip(b"\x00")))
        if x0 == 0 and x1 == width:
            break  # already the full width: the remaining rows cannot widen it
    return x0, y0, x1 - x0, y1 + 1 - y0


def crop(width: int, pixels: bytes, box: tuple[int, int, int, int]) -> bytes:
    """The 4-byte pixels of `box` (x, y, w, h) out of an image `width` pixels wide."""
    x, y, w, h = box
    stride = width * 4
    if x == 0 and w == width:
        return bytes(pixels[y * stride : (y + h) * stride])
    return b"".join(pixels[(y + r) * stride + x * 4 : (y + r) * stride + (x + w) * 4] for r in range(h))


def intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """The overlap of two (x, y, w, h) boxes, or None when they do not overlap."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def scale_box(box: tuple[int, int, int, int], sx: float, sy: float) -> tuple[int, int, int, int]:
    """A document-space box in generation space: edges scaled and rounded outward (never empty)."""
    x, y, w, h = box
    left, top = math.floor(x * sx), math.floor(y * sy)
    right, bottom = math.ceil((x + w) * sx), math.ceil((y + h) * sy)
    return left, top, max(1, right - left), max(1, bottom - top)


def dilate_box(box: tuple[int, int, int, int], by: int, width: int, height: int) -> tuple[int, int, int, int]:
    """`box` grown by `by` pixels on every side, clipped to a width×height canvas."""
    x, y, w, h = box
    x0, y0 = max(0, x - by), max(0, y - by)
    x1, y1 = min(width, x + w + by), min(height, y + h + by)
    return x0, y0, x1 - x0, y1 - y0
