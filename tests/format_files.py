"""Collage documents written by hand for the format tests (test_formats*.py): images, PNGs
(16-bit too, which PIL cannot write) and ORA archives independent of `save_ora`."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def solid(w: int, h: int, rgba=(200, 30, 30, 255)) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgba, np.uint8), (h, w, 4)).copy()


def padded(image: np.ndarray, pad: int) -> np.ndarray:
    """The image with a transparent border, which readers crop away again."""
    return np.pad(image, ((pad, pad), (pad, pad), (0, 0)))


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (PIL cannot write 16-bit RGBA), encoded by hand."""
    h, w = samples.shape[:2]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def make_ora(path: Path, w: int, h: int, stack: str, files: dict[str, bytes], settings=None) -> Path:
    """An ORA written by hand (independent of save_ora). ``stack`` lists the top layer first."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mimetype", "image/openraster", compress_type=zipfile.ZIP_STORED)
        archive.writestr(
            "stack.xml", f'<?xml version="1.0"?><image w="{w}" h="{h}"><stack>{stack}</stack></image>'
        )
        for name, data in files.items():
            archive.writestr(name, data)
        if settings is not None:
            archive.writestr("collage.json", json.dumps(settings))
    return path


def texts(doc) -> list[str]:
    return [layer.text for layer in doc.collage.layers]


def has_warning(doc, *words: str) -> bool:
    return any(all(word in warning for word in words) for warning in doc.warnings)
