"""OpenRaster (.ora): a zip holding ``stack.xml`` and one PNG per layer; Krita reads and writes it.

In ``stack.xml`` the first child of a ``<stack>`` is the *topmost*; our trees are bottom to top.
Our settings travel as an extra zip entry, ``collage.json`` (see `core.formats.settings`). Krita
keeps the layers but drops unknown entries when it re-saves a file, so a sidecar beside the file
(``scene.collage.json``, as for PSD) is read when the zip has no collage.json.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from ..collage import Collage, Layer, LayerGroup, flatten_layers
from .document import (
    DocumentError,
    LoadedDocument,
    ResultGroup,
    ResultLayer,
    build_document,
    decode_settings,
    sidecar_path,
    sidecar_settings,
)
from .images import as_uint8_image, composite, encode_png, read_png, to_rgba8
from .settings import (
    SETTINGS_ENTRY,
    SETTINGS_VERSION,
    collage_settings,
    dumps,
    layer_settings,
    parse_settings,
)

MIMETYPE = b"image/openraster"
_NORMAL_OPS = ("", "svg:src-over")
_THUMBNAIL_SIZE = 256
# Fixed entry dates so that writing the same document twice gives the same bytes.
_ZIP_DATE = (2000, 1, 1, 0, 0, 0)


def read_ora(path: Path) -> LoadedDocument:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DocumentError(path, [f"not an OpenRaster file (not a readable zip: {error})"]) from None
    with archive:
        names = set(archive.namelist())
        if "stack.xml" not in names:
            raise DocumentError(path, ["not an OpenRaster file (no stack.xml inside)"])
        try:
            root = ElementTree.fromstring(archive.read("stack.xml"))
        except ElementTree.ParseError as error:
            raise DocumentError(path, [f"stack.xml is not valid XML: {error}"]) from None
        width, height = _canvas_size(path, root)
        stack = root.find("stack")
        if root.tag != "image" or stack is None:
            raise DocumentError(path, ["stack.xml has no <image><stack> root"])

        warnings: list[str] = []
        # Embedded settings first; a sidecar (scene.collage.json) survives Krita re-saving the file.
        if SETTINGS_ENTRY in names:
            if sidecar_path(path).is_file():
                warnings.append(f"{sidecar_path(path).name} ignored: the file has its own {SETTINGS_ENTRY}")
            settings = decode_settings(path, archive.read(SETTINGS_ENTRY), SETTINGS_ENTRY)
        else:
            settings = sidecar_settings(path)
        tree = _read_stack(archive, names, stack, (0, 0), warnings)
    return build_document(path, tree, width, height, settings, warnings)


def _canvas_size(path: Path, root: ElementTree.Element) -> tuple[int, int]:
    try:
        width, height = int(root.get("w", "")), int(root.get("h", ""))
    except ValueError:
        raise DocumentError(path, ["stack.xml: <image> needs whole-number w and h attributes"]) from None
    if width <= 0 or height <= 0:
        raise DocumentError(path, [f"stack.xml: the canvas is {width}×{height}"])
    return width, height


def _read_stack(
    archive: zipfile.ZipFile,
    names: set[str],
    stack: ElementTree.Element,
    origin: tuple[int, int],
    warnings: list[str],
) -> list[Layer | LayerGroup]:
    # Old versions of the spec let a <stack> carry x/y for its children; Krita writes 0.
    origin = (origin[0] + _int(stack.get("x")), origin[1] + _int(stack.get("y")))
    nodes: list[Layer | LayerGroup] = []
    for element in reversed(list(stack)):  # stack.xml lists top first
        name = element.get("name", "")
        what = f"{element.tag} {name!r}" if name else f"an unnamed {element.tag}"
        op = element.get("composite-op", "")
        if op not in _NORMAL_OPS:
            warnings.append(f"{what} uses blend mode {op!r}; treated as normal")
        common = {
            "name": name,
            "visible": element.get("visibility", "visible") != "hidden",
            "opacity": _opacity(element.get("opacity")),
        }
        if element.tag == "stack":
            nodes.append(
                LayerGroup(children=_read_stack(archive, names, element, origin, warnings), **common)
            )
        elif element.tag == "layer":
            src = element.get("src", "")
            if src not in names:
                warnings.append(f"{what} points at {src!r}, which is not in the file; skipped")
                continue
            try:
                image = read_png(archive.read(src))
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                warnings.append(f"{what}: cannot decode {src!r} ({error}); skipped")
                continue
            offset = (origin[0] + _int(element.get("x")), origin[1] + _int(element.get("y")))
            nodes.append(Layer(text="", image=image, offset=offset, **common))
        else:
            warnings.append(f"{what}: <{element.tag}> elements are not supported; skipped")
    return nodes


def _int(value: str | None) -> int:
    try:
        return round(float(value)) if value else 0
    except ValueError:
        return 0


def _opacity(value: str | None) -> float:
    try:
        return min(max(float(value), 0.0), 1.0) if value else 1.0
    except ValueError:
        return 1.0


# ---------------------------------------------------------------------------------------------- writer


def save_ora(
    path: str | Path,
    tree_or_layers: Sequence[Layer | LayerGroup],
    width: int,
    height: int,
    result: np.ndarray | None = None,
    result_name: str = "collage result",
    settings: dict[str, Any] | None = None,
    *,
    results: Sequence[tuple[str, np.ndarray]] = (),
    result_groups: Sequence[LayerGroup] = (),
    collage: Collage | None = None,
) -> Path:
    """Write an OpenRaster file: the layers (bottom to top, groups kept), then the results on top.

    ``result`` (with ``result_name``) and ``results`` (name, image) pairs are canvas-sized RGB or
    RGBA uint8 images, added as top layers and listed under "results" in collage.json so reading
    the file back skips them. ``result_groups`` (results as layer stacks) are added above those,
    each listed under "results" by the group's name. ``settings`` is a collage.json mapping; with ``collage`` given, its
    settings are stored too (``settings`` wins where both say something). Per-layer settings are
    taken from the layers themselves. Returns the path written.
    """
    path = Path(path)
    added = list(results) + ([(result_name, result)] if result is not None else [])
    result_layers = []
    for name, image in added:
        image = as_uint8_image(image)
        if image.shape[:2] != (height, width):
            raise ValueError(
                f"result {name!r} is {image.shape[1]}×{image.shape[0]}, the canvas is {width}×{height}"
            )
        rgba = to_rgba8(Image.fromarray(image))
        result_layers.append(ResultLayer(text="", image=rgba, name=name))
    groups = [ResultGroup(g.children, g.name, g.visible, g.opacity) for g in result_groups]
    tree: list[Layer | LayerGroup] = [*tree_or_layers, *result_layers, *groups]

    data = _settings_for(tree, settings, collage)
    pngs: dict[str, bytes] = {}
    stack = ElementTree.Element("stack")
    _write_stack(stack, tree, pngs)
    image_el = ElementTree.Element("image", {"version": "0.0.5", "w": str(width), "h": str(height)})
    image_el.append(stack)
    ElementTree.indent(image_el)
    xml = b"<?xml version='1.0' encoding='UTF-8'?>\n" + ElementTree.tostring(image_el, encoding="utf-8")

    merged = composite(flatten_layers(tree), width, height)
    thumbnail = Image.fromarray(merged)
    thumbnail.thumbnail((_THUMBNAIL_SIZE, _THUMBNAIL_SIZE), Image.Resampling.LANCZOS)

    with zipfile.ZipFile(path, "w") as archive:
        # The spec: "mimetype" first, stored, so that `file` and friends can sniff the type.
        _write(archive, "mimetype", MIMETYPE, zipfile.ZIP_STORED)
        _write(archive, "stack.xml", xml)
        for name, png in pngs.items():
            _write(archive, name, png, zipfile.ZIP_STORED)  # already deflated
        _write(archive, "mergedimage.png", encode_png(merged), zipfile.ZIP_STORED)
        _write(archive, "Thumbnails/thumbnail.png", encode_png(np.asarray(thumbnail)), zipfile.ZIP_STORED)
        _write(archive, SETTINGS_ENTRY, dumps(data).encode("utf-8"))
    return path


def _write(archive: zipfile.ZipFile, name: str, data: bytes, compression: int = zipfile.ZIP_DEFLATED) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = compression
    archive.writestr(info, data)


def _write_stack(
    parent: ElementTree.Element, nodes: Sequence[Layer | LayerGroup], pngs: dict[str, bytes]
) -> None:
    for node in reversed(nodes):  # stack.xml lists top first
        attrs = {
            "name": node.name or (node.text if isinstance(node, Layer) else ""),
            "visibility": "visible" if node.visible else "hidden",
            "opacity": f"{float(node.opacity):.6g}",
            "composite-op": "svg:src-over",
        }
        if isinstance(node, LayerGroup):
            element = ElementTree.SubElement(parent, "stack", {**attrs, "isolation": "auto"})
            _write_stack(element, node.children, pngs)
        else:
            src = f"data/layer{len(pngs)}.png"
            try:
                pngs[src] = encode_png(node.image)
            except ValueError as error:
                raise ValueError(f"layer {attrs['name']!r}: {error}") from None
            x, y = (int(v) for v in node.offset)
            ElementTree.SubElement(parent, "layer", {**attrs, "src": src, "x": str(x), "y": str(y)})


def _settings_for(
    tree: Sequence[Layer | LayerGroup], settings: dict[str, Any] | None, collage: Collage | None
) -> dict[str, Any]:
    """collage.json for the file: collage settings, layer settings from the tree, the result names."""
    data: dict[str, Any] = collage_settings(collage) if collage is not None else {"version": SETTINGS_VERSION}
    layers: dict[str, dict[str, Any]] = dict(data.pop("layers", {}))
    results: list[str] = []
    for layer in _all_layers(tree):
        name = layer.name or layer.text
        if isinstance(layer, ResultGroup):
            results.append(layer.name)
        elif isinstance(layer, ResultLayer):
            results.append(name)
        elif name not in layers and (values := layer_settings(layer)):
            layers[name] = values
    explicit = dict(settings or {})
    layers.update(explicit.pop("layers", {}) or {})
    results += [r for r in explicit.pop("results", []) or [] if r not in results]
    data.update(explicit)
    data["version"] = SETTINGS_VERSION
    if layers:
        data["layers"] = layers
    if results:
        data["results"] = list(dict.fromkeys(results))
    _, problems = parse_settings(data)  # never write a file this module could not read back
    if problems:
        raise ValueError(f"settings for the OpenRaster file: {'; '.join(problems)}")
    return data


def _all_layers(nodes: Sequence[Layer | LayerGroup]) -> list[Layer | ResultGroup]:
    """Every layer of the tree; a result group stands for its layers (named by the group alone)."""
    out: list[Layer | ResultGroup] = []
    for node in nodes:
        if isinstance(node, ResultGroup):
            out.append(node)
        else:
            out.extend(_all_layers(node.children) if isinstance(node, LayerGroup) else [node])
    return out
