"""PNG encoding of result images and progress previews, off the event loop."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    """A PNG of an (H, W, 3|4) uint8 image, fast: OpenCV's libpng with one fixed row filter and
    run-length deflate; Pillow if cv2 is absent. On a 2048² picture: level 0 (stored, no filter)
    ~20 ms and 12 MiB, level 1 (the "sub" filter) ~120 ms and 7.8 MiB, where libpng's adaptive
    filter choice takes ~240 ms for 7.5 MiB (docs/performance.md)."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None and image.ndim == 3 and image.shape[2] in (3, 4):
        order = cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        params = [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
        if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11
            # Stored data gains nothing from a filter; compressed data gains most from "sub".
            row_filter = cv2.IMWRITE_PNG_FILTER_NONE if level == 0 else cv2.IMWRITE_PNG_FILTER_SUB
            params += [cv2.IMWRITE_PNG_FILTER, row_filter]
        ok, data = cv2.imencode(".png", cv2.cvtColor(image, order), params)
        if ok:
            return data.tobytes()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def preview_png(render: Callable[[], np.ndarray], size: int) -> bytes | None:
    """A small PNG (at most `size` pixels a side) of the image `render` draws; None if that fails."""
    try:
        img = Image.fromarray(np.ascontiguousarray(render()))
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        return buf.getvalue()
    except Exception:  # a preview is a nicety; never fail the job for it
        log.debug("preview failed", exc_info=True)
        return None
