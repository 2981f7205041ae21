"""What every reader shares: the loaded-document type, its error, and the tree → collage rules.

A reader turns its file into a layer tree (8-bit RGBA images, names, offsets, visibility, opacity,
groups) and hands it to `build_document`, which applies the rules described in
`core.formats`'s docstring and keeps a warning for everything it skips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The layer-naming rule is shared with the Krita dock (stdlib-only module, no Krita import).
from krita_plugin.collage_diffusion.wire import is_default_name

from ..collage import RGB, Collage, CollageError, Layer, LayerGroup, flatten_layers
from .images import canvas_region, content_box, crop_to_content, flatten_on, shows_on_canvas
from .settings import SETTINGS_ENTRY, DocumentSettings, parse_settings


class DocumentError(CollageError):
    """A document that cannot be read at all (missing, corrupt, an unknown key in a manifest, ...)."""

    def __init__(self, path: str | Path, problems: list[str]):
        super().__init__(problems)
        self.path = Path(path)
        ValueError.__init__(self, f"{self.path}: {'; '.join(self.problems)}")


@dataclass
class ResultLayer(Layer):
    """A layer holding a generated image (listed under "results" in collage.json).

    It is kept in the tree, so writing the document back keeps it, but never becomes a collage layer.
    """


@dataclass
class ResultGroup(LayerGroup):
    """A group holding one generated result as a layer stack (the group's name is listed under
    "results"; its layers carry the input layers' names, so they are not listed themselves).
    Kept in the tree, never generated from."""


@dataclass
class LoadedDocument:
    """A document read from disk: the collage to generate and the layer tree to write back."""

    collage: Collage
    tree: list[Layer | LayerGroup]  # bottom to top, as the document has it (hidden layers included)
    warnings: list[str] = field(default_factory=list)  # what was skipped, in plain words
    source: Path | None = None


def decode_settings(source: Path, data: bytes, where: str) -> DocumentSettings:
    """Parse collage.json bytes; `DocumentError` naming `source` and `where` if they are not valid."""
    try:
        decoded = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DocumentError(source, [f"{where} is not valid JSON: {error}"]) from None
    settings, problems = parse_settings(decoded)
    if problems:
        raise DocumentError(source, [f"{where}: {p}" for p in problems])
    return settings


def sidecar_path(path: Path) -> Path:
    """Where a document's settings file lives beside it: scene.psd → scene.collage.json.

    scene.psd.collage.json is accepted too (when the first does not exist).
    """
    short = path.with_name(f"{path.stem}.{SETTINGS_ENTRY}")
    long = path.with_name(f"{path.name}.{SETTINGS_ENTRY}")
    return long if long.is_file() and not short.is_file() else short


def sidecar_settings(path: Path) -> DocumentSettings | None:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    return decode_settings(sidecar, sidecar.read_bytes(), sidecar.name)


def label(layer: Layer) -> str:
    return f"layer {layer.name.strip()!r}" if layer.name.strip() else "an unnamed layer"


def build_document(
    source: Path,
    tree: list[Layer | LayerGroup],
    width: int,
    height: int,
    settings: DocumentSettings | None,
    warnings: list[str],
    background: RGB | np.ndarray | None = None,
) -> LoadedDocument:
    """Crop, name and filter the reader's tree into a collage (see the package docstring for the rules)."""
    settings = settings or DocumentSettings()
    results = set(settings.results)
    used_settings: set[str] = set()
    tree = _prepare(tree, settings, results, used_settings)

    layers: list[Layer] = []
    for layer in flatten_layers(_without_result_groups(tree, warnings)):
        what = label(layer)
        if layer.name in results:
            warnings.append(f"{what} holds an earlier result; skipped")
        elif layer.opacity <= 0:
            warnings.append(f"{what} has opacity 0; skipped")
        elif content_box(layer.image) is None:
            warnings.append(f"{what} is empty (every pixel is transparent); skipped")
        elif not shows_on_canvas(layer.image, layer.offset, width, height):
            warnings.append(f"{what} is outside the canvas; skipped")
        elif not layers and background is None and _is_background(layer, width, height):
            background = _background_from(layer, width, height)
        elif not layer.text.strip():
            warnings.append(
                f"{what} has no description (its name is empty or one an editor made up);"
                " name it after what it shows, e.g. 'a red armchair'; skipped"
            )
        else:
            layers.append(layer)

    for name in settings.layers:
        if name not in used_settings:
            warnings.append(f"collage.json has settings for layer {name!r}, but no layer has that name")

    texts = list(dict.fromkeys(layer.text for layer in layers))  # unique, in stack order
    collage = Collage(
        prompt=", ".join(texts),
        layers=layers,
        width=width,
        height=height,
        background=(255, 255, 255) if background is None else background,
    )
    settings.apply_to_collage(collage)
    return LoadedDocument(collage=collage, tree=tree, warnings=warnings, source=source)


def _prepare(
    nodes: list[Layer | LayerGroup],
    settings: DocumentSettings,
    results: set[str],
    used_settings: set[str],
) -> list[Layer | LayerGroup]:
    """Crop every layer to its pixels, give it its text and settings, and mark result layers."""
    out: list[Layer | LayerGroup] = []
    for node in nodes:
        if isinstance(node, LayerGroup) and node.name in results:
            out.append(_result_group(node))
            continue
        if isinstance(node, LayerGroup):
            node.children = _prepare(node.children, settings, results, used_settings)
            out.append(node)
            continue
        cropped = crop_to_content(node.image, node.offset)
        if cropped is None:  # keep a 1×1 transparent stand-in so the tree can still be written back
            node.image = np.zeros((1, 1, 4), np.uint8)
        else:
            node.image, node.offset = cropped
        if not node.text.strip():
            node.text = "" if is_default_name(node.name) else node.name.strip()
        if settings.apply_to_layer(node):
            used_settings.add(node.name if node.name in settings.layers else node.name.strip())
        if node.name in results and not isinstance(node, ResultLayer):
            node = ResultLayer(**node.__dict__)
        out.append(node)
    return out


def _result_group(group: LayerGroup) -> ResultGroup:
    """A group listed under "results", its layers marked as results (none becomes a collage layer)."""
    children: list[Layer | LayerGroup] = [
        _result_group(c)
        if isinstance(c, LayerGroup)
        else c
        if isinstance(c, ResultLayer)
        else ResultLayer(**c.__dict__)
        for c in group.children
    ]
    return ResultGroup(children=children, name=group.name, visible=group.visible, opacity=group.opacity)


def _without_result_groups(nodes: list[Layer | LayerGroup], warnings: list[str]) -> list[Layer | LayerGroup]:
    """The tree without result groups (shallow copies of the groups on the way: the tree stays)."""
    out: list[Layer | LayerGroup] = []
    for node in nodes:
        if isinstance(node, ResultGroup):
            if node.visible:
                warnings.append(f"group {node.name!r} holds an earlier result; skipped")
        elif isinstance(node, LayerGroup):
            out.append(
                LayerGroup(
                    _without_result_groups(node.children, warnings), node.name, node.visible, node.opacity
                )
            )
        else:
            out.append(node)
    return out


def _is_background(layer: Layer, width: int, height: int) -> bool:
    """Named "Background" (and given no text by settings), and its pixels span the whole canvas."""
    x, y = layer.offset
    h, w = layer.image.shape[:2]
    covers = x <= 0 and y <= 0 and x + w >= width and y + h >= height
    return covers and layer.name.strip().lower() == "background" and not layer.text.strip()


def _background_from(layer: Layer, width: int, height: int) -> RGB | np.ndarray:
    """The layer as an RGB canvas image (transparent parts show white), or one colour if it is uniform."""
    region = canvas_region(layer.image, layer.offset, width, height)
    rgb = flatten_on(region, layer.opacity, (255, 255, 255))
    first = rgb[0, 0]
    if (rgb == first).all():
        return (int(first[0]), int(first[1]), int(first[2]))
    return rgb
