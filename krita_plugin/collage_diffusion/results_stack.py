"""Writing a result as a layer stack (output "layers"): a NEW group per result inside "Collage
results", holding the background, one layer per object (the input layers' names, in their
order) and, hidden on top, the flat result. Stacked with normal blending the visible layers give
the flat result (docs/api.md). Nothing here changes a layer it did not create.
"""

from __future__ import annotations

from . import qt
from .results import FLAT_NAME, add_image_layer, ensure_results_group, image_from_png


def placed_image(png: bytes, x: int, y: int, width: int, height: int):
    """The PNG's pixels put at (x, y) on a transparent width×height QImage, byte for byte (no
    painter: premultiplying would round soft edges' colours)."""
    image = image_from_png(png).convertToFormat(qt.QImage.Format.Format_ARGB32)
    lw, lh, row = image.width(), image.height(), image.bytesPerLine()
    data = qt.image_bytes(image)
    canvas = bytearray(width * height * 4)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + lw, width), min(y + lh, height)
    if x0 < x1 and y0 < y1:
        span = (x1 - x0) * 4
        for cy in range(y0, y1):
            src = (cy - y) * row + (x0 - x) * 4
            dst = (cy * width + x0) * 4
            canvas[dst : dst + span] = data[src : src + span]
    return qt.image_from_bgra(bytes(canvas), width, height)


def add_stack_group(doc, parent, png: bytes, name: str, layers: list, size: tuple[int, int], visible: bool):
    """A new group on top of `parent`: `layers` ((wire.ResultLayerInfo, png) bottom to top, placed
    on a canvas of `size`, the generation size) and the flat result `png`, hidden, on top."""
    group = doc.createGroupLayer(name)
    parent.addChildNode(group, None)
    for info, layer_png in layers:
        add_image_layer(doc, placed_image(layer_png, info.x, info.y, *size), info.name, group)
    add_image_layer(doc, image_from_png(png), FLAT_NAME, group, visible=False)
    group.setVisible(visible)
    return group


def write_stack_results(
    doc, results: list[tuple[bytes, str, list]], size: tuple[int, int], uid_hint: str = ""
) -> tuple[object, list]:
    """Each (flat png, name, stack layers) as a new group in the results group, the first one
    visible and on top. Returns (results group, groups) with groups in the order of `results`."""
    group = ensure_results_group(doc, uid_hint)
    nodes = []
    for index, (png, name, layers) in reversed(list(enumerate(results))):
        nodes.append((index, add_stack_group(doc, group, png, name, layers, size, visible=index == 0)))
    doc.refreshProjection()
    return group, [node for _, node in sorted(nodes, key=lambda item: item[0])]
