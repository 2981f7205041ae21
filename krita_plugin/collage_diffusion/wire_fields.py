"""Reading and checking fields, shared by the request and the responses: dataclasses to JSON,
known fields, and the per-field checks that name what is wrong. Standard library only."""

from __future__ import annotations

import binascii
import math
from dataclasses import fields

from .wire_png import b64decode, b64encode, png_size


def _encode(obj: object) -> object:
    """Dataclasses to dicts, bytes to base64, recursively."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _encode(getattr(obj, f.name)) for f in fields(obj)}  # type: ignore[arg-type]
    if isinstance(obj, (bytes, bytearray)):
        return b64encode(bytes(obj))
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    return obj


def _known(cls, data: dict):
    """`cls` from the fields of `data` it knows: a newer bridge may send more (responses only)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _read_fields(
    cls: type,
    data: dict,
    prefix: str,
    problems: list[str],
    binary: tuple[str, ...],
    skip: tuple[str, ...] = (),
) -> dict:
    """The known fields of `data` for `cls` (values as given; base64 decoded for `binary`; those in
    `skip` left for the caller to read)."""
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            problems.append(f"{prefix}{key}: unknown field")
        elif key in skip:
            continue
        elif key in binary and value is not None:
            if not isinstance(value, str):
                problems.append(f"{prefix}{key}: must be a base64-encoded PNG, got {_json_type(value)}")
                continue
            try:
                kwargs[key] = b64decode(value)
            except (binascii.Error, ValueError):
                problems.append(f"{prefix}{key}: not valid base64")
        else:
            kwargs[key] = value
    return kwargs


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(p: list[str], name: str, value: object, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        shown = "2^63-1" if high == 2**63 - 1 else str(high)
        p.append(f"{name}: must be a whole number in {low}..{shown}, got {value!r}")


def _check_number(p: list[str], name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        p.append(f"{name}: must be a number in {low:g}..{high:g}, got {value!r}")
    elif math.isnan(value) or not low <= value <= high:
        p.append(f"{name}: must be in {low:g}..{high:g}, got {value!r}")


def _check_text(p: list[str], name: str, value: object, max_chars: int, allow_empty: bool) -> None:
    if not isinstance(value, str):
        p.append(f"{name}: must be text, got {_json_type(value)}")
    elif not allow_empty and not value.strip():
        p.append(f"{name}: must not be empty")
    elif len(value) > max_chars:
        p.append(f"{name}: {len(value)} characters, more than the limit of {max_chars}")


def _check_png(
    p: list[str], name: str, data: object, max_pixels: int, canvas: tuple[int, int] | None
) -> tuple[int, int] | None:
    size = png_size(data)  # type: ignore[arg-type]
    if size is None:
        p.append(f"{name}: not a PNG image")
        return None
    w, h = size
    if w == 0 or h == 0:
        p.append(f"{name}: the image is empty ({w}×{h})")
        return None
    if w * h > max_pixels:
        p.append(f"{name}: {w}×{h} is {w * h} pixels, more than this bridge's limit of {max_pixels}")
        return None
    if canvas is not None and (w, h) != canvas:
        p.append(f"{name}: is {w}×{h}, must be the canvas size {canvas[0]}×{canvas[1]}")
    return size
