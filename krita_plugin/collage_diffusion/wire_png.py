"""PNG and base64 helpers, pure Python: the plugin can crop and encode without numpy or Qt if it
must. Standard library only (see `wire`)."""

from __future__ import annotations

import base64
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, or None when `data` is not a PNG."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 24 or data[:8] != PNG_SIGNATURE:
        return None
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def encode_png(width: int, height: int, pixels: bytes, channels: int = 4, level: int = 6) -> bytes:
    """An 8-bit PNG from raw rows (RGBA when `channels` is 4, RGB when 3, grey when 1)."""
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    stride = width * channels
    if len(pixels) != stride * height:
        raise ValueError(
            f"pixels: {len(pixels)} bytes, a {width}×{height}×{channels} image has {stride * height}"
        )
    # Rows are joined (each after its filter byte 0) a few MiB at a time and deflated: zlib
    # releases Python's lock while it works, so the plugin's threads encode layers in parallel,
    # and no copy of the whole image is made.
    deflate = zlib.compressobj(level)
    view = memoryview(pixels)
    rows_per_block = max(1, (4 << 20) // (stride + 1))
    parts = []
    for y0 in range(0, height, rows_per_block):
        rows = [view[y * stride : (y + 1) * stride] for y in range(y0, min(height, y0 + rows_per_block))]
        parts.append(deflate.compress(b"\x00".join([b"", *rows])))
    parts.append(deflate.flush())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def content_box(width: int, height: int, rgba: bytes) -> tuple[int, int, int, int] | None:
    """The bounding box (x, y, w, h) of the pixels with alpha > 0, or None if there are none.

    `rgba` is width*height*4 bytes, rows top to bottom (QImage.Format_RGBA8888 or ARGB32: the
    alpha byte offset is given by the byte order; here it is the 4th byte of each pixel).
    """
    alpha = rgba[3::4]
    zero_row = bytes(width)
    rows = [y for y in range(height) if alpha[y * width : (y + 1) * width] != zero_row]
    if not rows:
        return None
    x0, x1 = width, 0
    for y in rows:
        row = alpha[y * width : (y + 1) * width]
        x0 = min(x0, width - len(row.lstrip(b"\x00")))
        x1 = max(x1, len(row.rstrip(b"\x00")))
    return x0, rows[0], x1 - x0, rows[-1] + 1 - rows[0]


def crop_to_content(width: int, height: int, rgba: bytes) -> tuple[int, int, int, int, bytes] | None:
    """(x, y, w, h, cropped RGBA bytes) of the visible part of an RGBA image, or None if empty."""
    box = content_box(width, height, rgba)
    if box is None:
        return None
    x, y, w, h = box
    stride = width * 4
    cropped = b"".join(rgba[(y + r) * stride + x * 4 : (y + r) * stride + (x + w) * 4] for r in range(h))
    return x, y, w, h, cropped


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """Standard base64 (padding required); a ``data:image/png;base64,`` prefix is allowed."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    return base64.b64decode(text, validate=True)
