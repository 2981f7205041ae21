"""A folder of PNGs plus a manifest, ``collage.toml`` or ``collage.json`` (docs/formats.md).

The manifest is written by hand, so it is read strictly: every problem (an unknown key, a wrong
type, a missing or escaping file, a bad colour) is collected and raised together.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..collage import RGB, Layer
from .document import DocumentError, LoadedDocument, build_document
from .images import read_png
from .settings import COLLAGE_KEYS, LAYER_KEYS, NULLABLE_KEYS, DocumentSettings, check_value, describe

MANIFESTS = ("collage.toml", "collage.json")
_WHOLE, _NUMBER, _TEXT, _BOOL = "a whole number", "a number", "text", "true or false"

TOP_KEYS: dict[str, str] = {**COLLAGE_KEYS, "width": _WHOLE, "height": _WHOLE, "background": _TEXT}
ENTRY_KEYS: dict[str, str] = {
    "file": _TEXT,
    **LAYER_KEYS,
    "x": _WHOLE,
    "y": _WHOLE,
    "visible": _BOOL,
    "opacity": _NUMBER,
}
_COLOUR = re.compile(r"^#([0-9a-fA-F]{6})$")


def find_manifest(folder: Path) -> Path:
    found = [folder / name for name in MANIFESTS if (folder / name).is_file()]
    if not found:
        raise DocumentError(
            folder, [f"a collage folder needs a {' or '.join(MANIFESTS)} manifest; none found"]
        )
    if len(found) > 1:
        raise DocumentError(folder, [f"has both {' and '.join(MANIFESTS)}; keep one"])
    return found[0]


def read_folder(folder: Path) -> LoadedDocument:
    manifest = find_manifest(folder)
    data = _decode(manifest)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise DocumentError(manifest, [f"must hold a table/object at the top, got {type(data).__name__}"])

    top: dict[str, Any] = {}
    for key, value in data.items():
        if key == "layers":
            continue
        if key not in TOP_KEYS:
            problems.append(f"unknown key {key!r} (known: {', '.join([*TOP_KEYS, 'layers'])})")
        elif not check_value(value, TOP_KEYS[key], nullable=key in NULLABLE_KEYS):
            problems.append(f"{key}: must be {describe(TOP_KEYS[key])}, got {value!r}")
        else:
            top[key] = value

    background = _background(folder, top.pop("background", None), problems)
    if isinstance(background, np.ndarray):
        top.setdefault("width", background.shape[1])
        top.setdefault("height", background.shape[0])
    for key in ("width", "height"):
        if key not in top and not any(p.startswith(f"{key}:") for p in problems):
            problems.append(f"{key}: missing (give the canvas size, or a background image of that size)")

    entries = data.get("layers", [])
    if not isinstance(entries, list):
        problems.append(f"layers: must be a list of layer tables ([[layers]]), got {type(entries).__name__}")
        entries = []
    tree = [layer for i, e in enumerate(entries) if (layer := _layer(folder, e, f"layers[{i}]", problems))]

    width, height = top.pop("width", 0), top.pop("height", 0)
    if isinstance(background, np.ndarray) and background.shape[:2] != (height, width) and width and height:
        problems.append(
            f"background: the image is {background.shape[1]}×{background.shape[0]},"
            f" the canvas is {width}×{height}"
        )
    if problems:
        raise DocumentError(manifest, problems)
    settings = DocumentSettings(collage=top)
    return build_document(manifest, tree, width, height, settings, [], background=background)


def _decode(manifest: Path) -> object:
    text = manifest.read_bytes()
    if manifest.suffix == ".json":
        try:
            return json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DocumentError(manifest, [f"not valid JSON: {error}"]) from None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise DocumentError(
                manifest,
                ["reading collage.toml needs Python 3.11+ (or the tomli package); use collage.json instead"],
            ) from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise DocumentError(manifest, [f"not valid TOML: {error}"]) from None


def _inside(folder: Path, name: str, where: str, problems: list[str]) -> Path | None:
    """The file `name` inside `folder`; None (with a problem noted) if it escapes or is missing."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or not name.strip():
        problems.append(f"{where}: {name!r} must be a file name inside the collage folder")
        return None
    path = folder / candidate
    if not path.resolve().is_relative_to(folder.resolve()):  # a symlink pointing out
        problems.append(f"{where}: {name!r} leads outside the collage folder")
        return None
    if not path.is_file():
        problems.append(f"{where}: file {name!r} not found in {folder}")
        return None
    return path


def _read_image(path: Path, where: str, problems: list[str]) -> np.ndarray | None:
    try:
        return read_png(path)
    except (OSError, ValueError) as error:
        problems.append(f"{where}: cannot read {path.name!r} as an image ({error})")
        return None


def _background(folder: Path, value: str | None, problems: list[str]) -> RGB | np.ndarray | None:
    if value is None:
        return None
    if value.startswith("#"):
        match = _COLOUR.match(value)
        if not match:
            problems.append(f"background: colour must look like '#rrggbb', got {value!r}")
            return None
        digits = match.group(1)
        return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))
    if not value.lower().endswith(".png"):
        problems.append(f"background: must be a colour '#rrggbb' or a PNG file name, got {value!r}")
        return None
    path = _inside(folder, value, "background", problems)
    image = _read_image(path, "background", problems) if path else None
    # Transparent parts of a background image show white (the collage background is opaque).
    if image is not None:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = (image[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return image


def _layer(folder: Path, entry: object, where: str, problems: list[str]) -> Layer | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a table with at least a file, got {entry!r}")
        return None
    count = len(problems)
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key not in ENTRY_KEYS:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(ENTRY_KEYS)})")
        elif not check_value(value, ENTRY_KEYS[key], nullable=key == "strength"):
            problems.append(f"{where}.{key}: must be {describe(ENTRY_KEYS[key])}, got {value!r}")
        else:
            values[key] = value
    if "file" not in entry:
        problems.append(f"{where}: needs a file (the layer's PNG)")
    if len(problems) > count or "file" not in values:
        return None
    path = _inside(folder, values.pop("file"), f"{where}.file", problems)
    image = _read_image(path, f"{where}.file", problems) if path else None
    if image is None:
        return None
    text = values.pop("text", "").strip()
    # Without a text the file name says what the layer shows: salmon_sushi.png → "salmon sushi".
    name = text or path.stem.replace("_", " ").replace("-", " ")
    offset = (values.pop("x", 0), values.pop("y", 0))
    return Layer(text=text, image=image, offset=offset, name=name, **values)
