"""Writing results into the document: each one a NEW paint layer in the "Collage results" group.

The group sits at the top of the layer stack (it is created there, and moved back there when the
user's layers have grown above it). Nothing here changes a layer it did not create.
"""

from __future__ import annotations

import sys

from . import qt
from .collage import RESULTS_GROUP_NAME
from .document import MASK_TYPES, SRGB_PROFILE, find_results_group, is_rgba8, uid_of


def ensure_results_group(doc, uid_hint: str = ""):
    """The "Collage results" group, created at the top of the stack if missing, moved there if not."""
    root = doc.rootNode()
    group = find_results_group(doc, uid_hint)
    if group is None:
        group = doc.createGroupLayer(RESULTS_GROUP_NAME)
        root.addChildNode(group, None)  # None: on top
    else:
        # Krita's global selection is a mask node at the very top: it is not above the group.
        children = [node for node in root.childNodes() if node.type() not in MASK_TYPES]
        if children and uid_of(children[-1]) != uid_of(group):
            # Only our own group moves; Krita keeps its children with it.
            group.remove()
            root.addChildNode(group, None)
            group = find_results_group(doc, uid_of(group)) or group
    return group


def image_from_png(png: bytes):
    image = qt.QImage.fromData(png, "PNG")
    if image.isNull():
        raise ValueError("the bridge's result is not a readable PNG image")
    return image


def add_result_layer(doc, png: bytes, name: str, group, visible: bool = True):
    """A new paint layer on top of `group` holding the result `png`, scaled to the document."""
    return add_image_layer(doc, image_from_png(png), name, group, visible)


def add_image_layer(doc, image, name: str, group, visible: bool = True):
    """A new paint layer on top of `group` holding the QImage `image`, scaled to the document."""
    w, h = doc.width(), doc.height()
    if (image.width(), image.height()) != (w, h):
        image = image.scaled(
            w, h, qt.Qt.AspectRatioMode.IgnoreAspectRatio, qt.Qt.TransformationMode.SmoothTransformation
        )
    image = image.convertToFormat(qt.QImage.Format.Format_ARGB32)
    data = qt.image_bytes(image)
    if image.bytesPerLine() != w * 4:  # pragma: no cover - ARGB32 rows have no padding
        data = b"".join(data[y * image.bytesPerLine() : y * image.bytesPerLine() + w * 4] for y in range(h))
    if sys.byteorder != "little":  # pragma: no cover
        from .pixels import rgba_to_bgra

        data = rgba_to_bgra(qt.image_bytes(image.convertToFormat(qt.QImage.Format.Format_RGBA8888)))
    node = doc.createNode(name, "paintlayer")
    group.addChildNode(node, None)
    if not is_rgba8(doc):
        # The layer holds 8-bit sRGB like the result; Krita converts when it composites.
        node.setColorSpace("RGBA", "U8", SRGB_PROFILE)
    node.setPixelData(data, 0, 0, w, h)
    node.setVisible(visible)
    return node


def write_results(doc, results: list[tuple[bytes, str]], uid_hint: str = "") -> tuple[object, list]:
    """Each (png, name) as a new layer in the results group, the first one visible and on top.

    Returns (group, nodes) with nodes in the order of `results`.
    """
    group = ensure_results_group(doc, uid_hint)
    nodes = []
    for index, (png, name) in reversed(list(enumerate(results))):
        nodes.append((index, add_result_layer(doc, png, name, group, visible=index == 0)))
    doc.refreshProjection()
    return group, [node for _, node in sorted(nodes, key=lambda item: item[0])]


def show_only(group, node_uid: str, among: list[str]) -> None:
    """Make one result layer visible and the others of `among` (its job's variants) hidden."""
    for node in group.childNodes():
        uid = uid_of(node)
        if uid == node_uid:
            node.setVisible(True)
        elif uid in among:
            node.setVisible(False)


#: The name of a layer stack's hidden layer holding the flat result (`results_stack.py`; as
#: `core.layer_stack.FLAT_NAME`).
FLAT_NAME = "flat result"


def flat_layer(group):
    """The hidden flat result of a layer-stack group, or None (a group of another kind)."""
    for node in group.childNodes():
        if node.type() == "paintlayer" and node.name() == FLAT_NAME:
            return node
    return None


def top_visible_result(doc, uid_hint: str = ""):
    """The topmost visible layer of the results group (the base for regenerate), or None."""
    group = find_results_group(doc, uid_hint)
    if group is None:
        return None
    for node in reversed(group.childNodes()):
        if node.visible() and node.type() == "paintlayer":
            return node
        if node.visible() and node.type() == "grouplayer":  # a layer stack: its flat result
            flat = flat_layer(node)
            if flat is not None:
                return flat
    return None
