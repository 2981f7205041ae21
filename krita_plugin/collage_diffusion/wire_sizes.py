"""Generation sizes, one definition for the dock and the engine (standard library only).

A model draws best near the size it was trained at: SD 1.5 about 512², SD 2.x-v 768², SDXL about
one megapixel in multiples of 64. `auto_size` keeps a canvas whose area is already near the
model's native area and otherwise picks the nearest liked size with the canvas's aspect ratio;
the result is scaled back to the canvas afterwards.
"""

from __future__ import annotations

import math

#: "auto" keeps a canvas whose area is within this factor of the model's native area.
AUTO_TOLERANCE = 1.35


def round8(value: float) -> int:
    """The nearest multiple of 8 (the VAE works on 8×8 blocks), at least 64."""
    return max(64, int(round(value / 8.0)) * 8)


def nearest_size(native: int, multiple: int, width: int, height: int) -> tuple[int, int]:
    """About native² pixels, the aspect ratio of width × height, each side a multiple of `multiple`."""
    scale = math.sqrt(native * native / max(1, width * height))
    w = max(multiple, round(width * scale / multiple) * multiple)
    h = max(multiple, round(height * scale / multiple) * multiple)
    return w, h


def auto_size(native: int, multiple: int, width: int, height: int) -> tuple[int, int]:
    """The canvas (rounded to multiples of 8) when its area is near native², else `nearest_size`,
    each side kept within the engine's 64..8192 (a long thin canvas scaled to the native area,
    2000×64 for a 64² model, would otherwise get a side of 8)."""
    ratio = width * height / float(native * native)
    if 1.0 / AUTO_TOLERANCE <= ratio <= AUTO_TOLERANCE:
        return round8(width), round8(height)
    w, h = nearest_size(native, multiple, width, height)
    least, most = -(-64 // multiple) * multiple, 8192 // multiple * multiple
    return min(max(w, least), most), min(max(h, least), most)
