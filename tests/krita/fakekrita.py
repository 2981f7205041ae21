"""Stand-ins for Krita's Document and Node, with just what the plugin calls: for tests of the
plugin's logic outside Krita (plain pytest, and the PyQt5/PyQt6 smoke test).

Pixels are BGRA bytes, like Krita's for RGBA/U8; a node holds one rectangle of them.
"""

from __future__ import annotations

import itertools

_ids = itertools.count(1)


class Rect:
    def __init__(self, x=0, y=0, w=0, h=0):
        self._r = (x, y, w, h)

    def x(self):
        return self._r[0]

    def y(self):
        return self._r[1]

    def width(self):
        return self._r[2]

    def height(self):
        return self._r[3]

    def isEmpty(self):  # noqa: N802 - Qt's name
        return self._r[2] <= 0 or self._r[3] <= 0


class Uuid:
    def __init__(self, text):
        self.text = text

    def toString(self):  # noqa: N802
        return self.text


def fill(w: int, h: int, pixel: tuple[int, int, int, int]) -> bytes:
    return bytes(pixel) * (w * h)


class Node:
    """A layer: `box` (x, y, w, h) filled with `color` (BGRA), or pixels set by setPixelData."""

    def __init__(
        self,
        name,
        kind="paintlayer",
        box=None,
        color=(0, 0, 255, 255),
        visible=True,
        opacity=255,
        children=(),
    ):
        self._uid = f"{{{name}-{next(_ids)}}}"
        self._name, self._kind = name, kind
        self._visible, self._opacity = visible, opacity
        self._children: list[Node] = []
        self._parent: Node | None = None
        self._box, self._data = None, b""
        self.color_space = ("RGBA", "U8")
        self.reads: list[tuple] = []
        if box is not None:
            self.setPixelData(fill(box[2], box[3], color), *box)
        for child in children:
            self.addChildNode(child, None)

    # -- what the plugin reads
    def name(self):
        return self._name

    def type(self):
        return self._kind

    def visible(self):
        return self._visible

    def opacity(self):
        return self._opacity

    def childNodes(self):  # noqa: N802
        return list(self._children)

    def uniqueId(self):  # noqa: N802
        return Uuid(self._uid)

    def colorModel(self):  # noqa: N802
        return self.color_space[0]

    def colorDepth(self):  # noqa: N802
        return self.color_space[1]

    def bounds(self):
        return Rect(*self._box) if self._box else Rect()

    def pixelData(self, x, y, w, h):  # noqa: N802
        self.reads.append(("pixelData", x, y, w, h))
        return self._pixels(x, y, w, h)

    def projectionPixelData(self, x, y, w, h):  # noqa: N802
        self.reads.append(("projectionPixelData", x, y, w, h))
        return self._pixels(x, y, w, h)

    def _pixels(self, x, y, w, h):
        out = bytearray(w * h * 4)
        if self._box is None:
            return bytes(out)
        bx, by, bw, bh = self._box
        x0, y0, x1, y1 = max(x, bx), max(y, by), min(x + w, bx + bw), min(y + h, by + bh)
        for row in range(y0, y1):
            src = ((row - by) * bw + (x0 - bx)) * 4
            dst = ((row - y) * w + (x0 - x)) * 4
            out[dst : dst + (x1 - x0) * 4] = self._data[src : src + (x1 - x0) * 4]
        return bytes(out)

    # -- what the plugin writes (only on nodes it created)
    def setPixelData(self, data, x, y, w, h):  # noqa: N802
        data = bytes(data)
        assert len(data) == w * h * 4, (len(data), w, h)
        self._box, self._data = (x, y, w, h), data

    def setVisible(self, visible):  # noqa: N802
        self._visible = bool(visible)

    def setOpacity(self, opacity):  # noqa: N802
        self._opacity = opacity

    def setName(self, name):  # noqa: N802
        self._name = name

    def setColorSpace(self, model, depth, profile):  # noqa: N802
        self.color_space = (model, depth)
        return True

    def addChildNode(self, child, above):  # noqa: N802
        if child._parent is not None:
            child._parent._children.remove(child)
        index = len(self._children) if above is None else self._children.index(above) + 1
        self._children.insert(index, child)
        child._parent = self
        return True

    def remove(self):
        if self._parent is not None:
            self._parent._children.remove(self)
            self._parent = None
        return True


class Doc:
    def __init__(self, w, h, children=(), depth="U8"):
        self._w, self._h = w, h
        self._root = Node("root", "grouplayer", children=children)
        self._depth = depth
        self.annotations: dict[str, tuple[str, bytes]] = {}
        self.refreshes = 0

    def fileName(self):  # noqa: N802
        return ""  # a new, never saved document

    def width(self):
        return self._w

    def height(self):
        return self._h

    def rootNode(self):  # noqa: N802
        return self._root  # None once closed, as Krita's

    def close(self):
        self._root = None
        return True

    def colorModel(self):  # noqa: N802
        return "RGBA"

    def colorDepth(self):  # noqa: N802
        return self._depth

    def activeNode(self):  # noqa: N802
        return None

    def annotationTypes(self):  # noqa: N802
        return list(self.annotations)

    def annotation(self, kind):
        return self.annotations[kind][1]

    def setAnnotation(self, kind, description, data):  # noqa: N802
        self.annotations[kind] = (description, bytes(data.encode() if isinstance(data, str) else data))

    def createNode(self, name, kind):  # noqa: N802
        return Node(name, kind)

    def createGroupLayer(self, name):  # noqa: N802
        return Node(name, "grouplayer")

    def refreshProjection(self):  # noqa: N802
        self.refreshes += 1

    def waitForDone(self):  # noqa: N802
        pass


class Host:
    """The dock's host (`dock.CollagePanel(host)`) without Krita's window: one given document as
    the active one, settings in memory. Works with a real Krita document too."""

    def __init__(self, doc):
        self.doc = doc
        self.stored: dict[str, str] = {}

    def active_document(self):
        return self.doc

    def read_setting(self, key, default=""):
        return self.stored.get(key, default)

    def write_setting(self, key, value):
        self.stored[key] = value


def sample_stack() -> Doc:
    """A 64×64 collage of every case the reader handles (see tests/test_plugin_reading.py)."""
    return Doc(
        64,
        64,
        [
            Node("ground", box=(0, 48, 64, 16), color=(0, 200, 0, 255)),
            Node(
                "animals",
                "grouplayer",
                opacity=128,
                children=[
                    Node("cat", box=(8, 8, 16, 16), color=(30, 140, 240, 255)),
                    Node("dog", box=(30, 30, 8, 8), visible=False),
                    Node("mask", "transparencymask", box=(0, 0, 64, 64)),
                ],
            ),
            Node("ball", box=(-6, 20, 12, 10), color=(9, 9, 200, 255), opacity=51),
            Node("hidden group", "grouplayer", visible=False, children=[Node("ghost", box=(0, 0, 8, 8))]),
            Node("sign", "vectorlayer", box=(40, 4, 20, 10)),
            Node("adjust", "adjustmentlayer", box=(0, 0, 64, 64)),
            Node("empty"),
            Node("far away", box=(100, 100, 10, 10)),
            Node("Collage results", "grouplayer", children=[Node("old result", box=(0, 0, 64, 64))]),
        ],
    )
