"""Reading the Krita document: visible layers → `collage.LayerRecord`s. Never changes the document.

- Layers are read bottom to top; groups are walked into (a hidden group hides all it holds, a
  group's opacity multiplies into its layers'); hidden layers, masks, filter (adjustment) layers
  and the "Collage results" group are left out.
- Paint layers give their own pixels (``pixelData``; with masks, their ``projectionPixelData`` so
  the masks apply); vector, file, fill and clone layers give their projection.
- Each layer is cut to the canvas and cropped to its pixels with alpha > 0, scaled to the
  generation size when that differs from the document's, and PNG-encoded by Qt (C++ speed).
- Documents that are not RGBA 8-bit are read from a converted clone (``Document.clone()``, then
  ``setColorSpace`` on the clone, which is closed afterwards): the user's document is untouched.

Krita is only needed by the functions that take a document, and Qt only to encode: without Qt
(plain Python, the tests) layers are encoded by the standard-library PNG writer of `wire`, at
document scale.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import pixels, wire
from .collage import RESULTS_GROUP_NAME, LayerRecord, NodeInfo

try:
    from . import qt
except ImportError:  # plain Python without PyQt: the tests of the reading logic
    qt = None

SRGB_PROFILE = "sRGB-elle-V2-srgbtrc.icc"

#: Node types with pixels of their own worth sending; everything else (masks, filter layers) is not.
READ_OWN_PIXELS = ("paintlayer",)
READ_PROJECTION = ("vectorlayer", "filelayer", "filllayer", "clonelayer")
#: Threads that PNG-encode layers while the next ones are read.
ENCODE_THREADS = 4
MASK_TYPES = ("transparencymask", "filtermask", "transformmask", "selectionmask", "colorizemask")


@dataclass
class ReadStats:
    """What reading cost, for the benchmark and the dock's notes."""

    layers: int = 0
    skipped: list[str] | None = None
    converted: bool = False
    read_s: float = 0.0
    encode_s: float = 0.0
    convert_s: float = 0.0


def uid_of(node) -> str:
    return node.uniqueId().toString()


def is_rgba8(doc) -> bool:
    return doc.colorModel() == "RGBA" and doc.colorDepth() == "U8"


def find_results_group(doc, uid_hint: str = ""):
    """The "Collage results" group at the top level of the document, or None."""
    by_name = None
    for node in doc.rootNode().childNodes():
        if node.type() != "grouplayer":
            continue
        if uid_hint and uid_of(node) == uid_hint:
            return node
        if by_name is None and node.name() == RESULTS_GROUP_NAME:
            by_name = node
    return by_name


def walk(doc, results_uid: str = "") -> Iterator[tuple[object, tuple[str, ...], float]]:
    """(node, group path, opacity of the groups around it) for every visible layer that may be
    read, bottom to top."""
    for node, path, factor, hidden_by in walk_listed(doc, results_uid):
        if hidden_by is None:
            yield node, path, factor


def walk_listed(doc, results_uid: str = "") -> Iterator[tuple[object, tuple[str, ...], float, str | None]]:
    """As `walk`, with the visible layers inside hidden groups too: (node, path, factor, the name
    of the outermost hidden group around it, or None). The dock lists those, marked."""
    results = find_results_group(doc, results_uid)
    skip = uid_of(results) if results is not None else None

    def visit(parent, path: tuple[str, ...], factor: float, hidden_by: str | None):
        for node in parent.childNodes():
            kind = node.type()
            if kind in MASK_TYPES:
                continue
            if kind == "grouplayer":
                if path == () and skip is not None and uid_of(node) == skip:
                    continue
                hidden = hidden_by if hidden_by is not None or node.visible() else node.name()
                yield from visit(node, (*path, node.name()), factor * node.opacity() / 255.0, hidden)
            elif not node.visible():
                continue
            elif kind in READ_OWN_PIXELS or kind in READ_PROJECTION:
                yield node, path, factor, hidden_by

    yield from visit(doc.rootNode(), (), 1.0, None)


def on_canvas(node, canvas: tuple[int, int, int, int]) -> tuple[tuple[int, int, int, int] | None, str]:
    """The part of the node's bounds on the canvas, or (None, why not: "empty", "no pixel on the
    canvas"); the same rule for reading and for the dock's marks."""
    bounds = node.bounds()
    if bounds.isEmpty():
        return None, "empty"
    rect = pixels.intersect((bounds.x(), bounds.y(), bounds.width(), bounds.height()), canvas)
    return rect, "" if rect is not None else "no pixel on the canvas"


def may_be_background(first: bool, name: str, box: tuple[int, int, int, int], canvas) -> bool:
    """Whether a layer may become the image's background: the first one with content, named
    "Background", covering the canvas (`collage.take_part` decides, with its text)."""
    return first and name.strip().lower() == "background" and tuple(box) == tuple(canvas)


def list_layers(doc, results_uid: str = "") -> list[NodeInfo]:
    """The layers the dock lists, bottom to top, without reading pixels: the visible, readable
    ones, and those hidden only by a group; each with what keeps it out (`NodeInfo.problem`)."""
    canvas = (0, 0, doc.width(), doc.height())
    listed, first = [], True
    for node, path, factor, hidden_by in walk_listed(doc, results_uid):
        rect, problem = on_canvas(node, canvas)
        if hidden_by is not None:
            problem = f"hidden by group '{hidden_by}'"
        background = problem == "" and may_be_background(first, node.name(), rect, canvas)
        first = first and problem != ""
        listed.append(
            NodeInfo(
                uid=uid_of(node),
                name=node.name(),
                kind=node.type(),
                path=path,
                depth=len(path),
                opacity=factor * node.opacity() / 255.0,
                problem=problem,
                may_be_background=background,
            )
        )
    return listed


def node_by_uid(doc, uid: str):
    """The node with this uniqueId anywhere in the document, or None."""

    def visit(parent):
        for node in parent.childNodes():
            if uid_of(node) == uid:
                return node
            found = visit(node)
            if found is not None:
                return found
        return None

    return visit(doc.rootNode())


def read_layers(
    doc, size: tuple[int, int] | None = None, results_uid: str = "", compression: int = 1
) -> tuple[list[LayerRecord], ReadStats]:
    """The document's visible layers with content, bottom to top, ready for `collage.build_request`.

    `size` is the generation size (None: the document's); layers are scaled by
    ``size / document size``. Never changes `doc`.
    """
    stats = ReadStats(skipped=[])
    source = doc
    clone = None
    if not is_rgba8(doc) or _any_node_not_rgba8(doc, results_uid):
        start = time.perf_counter()
        clone = doc.clone()
        clone.setColorSpace("RGBA", "U8", SRGB_PROFILE)
        clone.waitForDone()
        stats.convert_s = time.perf_counter() - start
        stats.converted = True
        source = clone
    try:
        records = _read(source, doc.width(), doc.height(), size, results_uid, compression, stats)
    finally:
        if clone is not None:
            clone.close()
    if stats.converted:
        note = f"converted from {doc.colorModel()}/{doc.colorDepth()} to RGBA 8-bit for sending"
        for r in records:
            r.note = f"{r.note}, {note}" if r.note else note
    return records, stats


def _any_node_not_rgba8(doc, results_uid: str) -> bool:
    return any(
        node.colorModel() != "RGBA" or node.colorDepth() != "U8"
        for node, _, _ in walk(doc, results_uid)
        if node.type() in READ_OWN_PIXELS
    )


def _read(doc, width: int, height: int, size, results_uid: str, compression: int, stats: ReadStats):
    """Pixels are read from Krita here, on the calling (main) thread; PNG encoding, the larger
    part, runs on a few worker threads (Qt's image code and zlib release Python's lock)."""
    gw, gh = size or (width, height)
    sx, sy = gw / width, gh / height
    scaled = (gw, gh) != (width, height)
    canvas = (0, 0, width, height)
    records: list[LayerRecord] = []
    jobs = []
    begin = time.perf_counter()
    workers = max(1, min(ENCODE_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="collage-encode") as pool:
        for node, path, factor in walk(doc, results_uid):
            start = time.perf_counter()
            rect, problem = on_canvas(node, canvas)
            if rect is None:
                how = "is empty" if problem == "empty" else f"has {problem}"
                stats.skipped.append(f"layer '{node.name()}' {how}; left out")
                continue
            x, y, w, h = rect
            kind = node.type()
            has_masks = any(child.type() in MASK_TYPES for child in node.childNodes())
            projection = kind not in READ_OWN_PIXELS or has_masks
            data = bytes(node.projectionPixelData(x, y, w, h) if projection else node.pixelData(x, y, w, h))
            box = pixels.alpha_box(w, h, data)
            stats.read_s += time.perf_counter() - start
            if box is None:
                stats.skipped.append(f"layer '{node.name()}' has no visible pixel; left out")
                continue
            doc_box = (x + box[0], y + box[1], box[2], box[3])
            gx, gy, tw, th = pixels.scale_box(doc_box, sx, sy) if scaled else doc_box
            # Bounded look-ahead: at most 2 layers per worker wait, holding their raw pixels.
            while sum(not j[1].done() for j in jobs) >= 2 * workers:
                next(j[1] for j in jobs if not j[1].done()).result()
            background = (None, None)
            if may_be_background(not jobs, node.name(), doc_box, canvas):
                background = background_of(data, w, h, factor * node.opacity() / 255.0, (gw, gh), compression)
            future = pool.submit(encode_bgra, data, w, h, box, (tw, th), compression)
            del data
            record = LayerRecord(
                uid=uid_of(node),
                name=node.name(),
                kind=kind,
                doc_box=doc_box,
                png=b"",
                x=gx,
                y=gy,
                opacity=factor * node.opacity() / 255.0,
                path=path,
                background_rgb=background[0],
                background_png=background[1],
            )
            jobs.append((record, future))
        for record, future in jobs:
            record.png = future.result()
            records.append(record)
    stats.layers = len(records)
    stats.encode_s = max(0.0, time.perf_counter() - begin - stats.read_s)
    return records


def background_of(
    data: bytes, width: int, height: int, opacity: float, size: tuple[int, int], compression: int = 1
) -> tuple[list[int] | None, bytes | None]:
    """A canvas-covering layer flattened over white (as the CLI's readers do): (its colour, None)
    when it is a single colour, else (None, an RGB PNG of it at `size`). (None, None) without Qt
    for a layer of several colours."""
    first = data[:4]
    if data == first * (width * height):
        b, g, r, a = first
        alpha = a / 255.0 * opacity
        return [round(c * alpha + 255 * (1.0 - alpha)) for c in (r, g, b)], None
    if qt is None:
        return None, None
    layer = qt.QImage(data, width, height, width * 4, qt.QImage.Format.Format_ARGB32)
    canvas = qt.QImage(size[0], size[1], qt.QImage.Format.Format_RGB32)
    canvas.fill(qt.QColor(255, 255, 255))
    painter = qt.QtGui.QPainter(canvas)
    painter.setRenderHint(qt.QtGui.QPainter.RenderHint.SmoothPixmapTransform)
    painter.setOpacity(opacity)
    painter.drawImage(qt.QRect(0, 0, size[0], size[1]), layer)
    painter.end()
    return None, qt.png_bytes(canvas.convertToFormat(qt.QImage.Format.Format_RGB888), compression)


def encode_bgra(
    data: bytes,
    width: int,
    height: int,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    compression: int = 1,
) -> bytes:
    """The `box` of a width×height BGRA image as an RGBA PNG of `size` (scaled when it differs).

    With Qt (in Krita): QImage crops, scales and converts to RGBA in C++; the rows are then
    deflated by zlib (which releases Python's lock, so layers encode in parallel) without a row
    filter. Qt's own PNG writer tries libpng's five filters on every row, which took 2.5× as long
    for a 4096² layer (`benchmarks/bench_krita_read.py`), for PNGs about 40 % smaller. Without
    Qt: pure Python at the box's own size (scaling needs Qt).
    """
    if qt is None:
        if size != tuple(box[2:]):
            raise RuntimeError("scaling a layer needs Qt")
        return wire.encode_png(
            box[2], box[3], pixels.bgra_to_rgba(pixels.crop(width, data, box)), level=compression
        )
    if sys.byteorder == "little":
        image = qt.QImage(data, width, height, width * 4, qt.QImage.Format.Format_ARGB32)
    else:  # pragma: no cover - Krita runs on little-endian machines
        image = qt.image_from_bgra(data, width, height)
    image = image.copy(qt.QRect(*box))  # owns its pixels from here on
    if tuple(size) != tuple(box[2:]):
        image = image.scaled(
            size[0],
            size[1],
            qt.Qt.AspectRatioMode.IgnoreAspectRatio,
            qt.Qt.TransformationMode.SmoothTransformation,
        )
    image = image.convertToFormat(qt.QImage.Format.Format_RGBA8888)  # rows of exactly w * 4 bytes
    return wire.encode_png(image.width(), image.height(), qt.image_view(image), level=compression)


def read_canvas_png(node, doc_size: tuple[int, int], size: tuple[int, int]) -> bytes:
    """A layer's pixels over the whole canvas, at `size`, as an RGB PNG (the regenerate base)."""
    w, h = doc_size
    data = bytes(node.projectionPixelData(0, 0, w, h))
    image = qt.QImage(data, w, h, w * 4, qt.QImage.Format.Format_ARGB32).convertToFormat(
        qt.QImage.Format.Format_RGB888
    )
    if (w, h) != tuple(size):
        image = image.scaled(
            size[0],
            size[1],
            qt.Qt.AspectRatioMode.IgnoreAspectRatio,
            qt.Qt.TransformationMode.SmoothTransformation,
        )
    return qt.png_bytes(image, 1)


def read_selection_png(doc, size: tuple[int, int]) -> bytes | None:
    """The document's selection as a grey PNG at `size` (the regenerate mask: > 0 selected), or
    None when nothing is selected."""
    selection = doc.selection() if hasattr(doc, "selection") else None
    if selection is None:
        return None
    w, h = doc.width(), doc.height()
    data = bytes(selection.pixelData(0, 0, w, h))  # one byte a pixel, 0 outside the selection
    if data.count(0) == len(data):
        return None
    if (w, h) == tuple(size):
        return wire.encode_png(w, h, data, channels=1, level=1)
    image = qt.QImage(data, w, h, w, qt.QImage.Format.Format_Grayscale8).scaled(
        size[0],
        size[1],
        qt.Qt.AspectRatioMode.IgnoreAspectRatio,
        qt.Qt.TransformationMode.SmoothTransformation,
    )
    return qt.png_bytes(image, 1)


def active_layer_uid(doc) -> str | None:
    node = doc.activeNode() if doc is not None else None
    return uid_of(node) if node is not None else None


# -- settings, stored as an annotation of the document ----------------------------------------------


def load_settings(doc):
    """The document's `settings.DocumentSettings`: its annotation; for a document that has none
    yet, the collage settings inside its .ora file (written by `collage generate`); else defaults."""
    from .settings import ANNOTATION_TYPE, DocumentSettings

    if ANNOTATION_TYPE not in (doc.annotationTypes() or []):
        return DocumentSettings.from_file_settings(file_settings(doc.fileName() or ""))
    return DocumentSettings.from_json(bytes(doc.annotation(ANNOTATION_TYPE)))


#: The zip entry in which `core.formats` keeps collage settings in an OpenRaster file.
ORA_SETTINGS_ENTRY = "collage.json"


def file_settings(path: str) -> dict | None:
    """The ``collage.json`` mapping inside an .ora file, or None (not an .ora, none, unreadable)."""
    import json
    import zipfile

    if not path.lower().endswith(".ora"):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(ORA_SETTINGS_ENTRY))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def save_settings(doc, settings) -> bool:
    """Store `settings` in the document; False when nothing changed (the document stays unmodified)."""
    from .settings import ANNOTATION_DESCRIPTION, ANNOTATION_TYPE

    text = settings.to_json().encode("utf-8")
    if ANNOTATION_TYPE in (doc.annotationTypes() or []) and bytes(doc.annotation(ANNOTATION_TYPE)) == text:
        return False
    doc.setAnnotation(ANNOTATION_TYPE, ANNOTATION_DESCRIPTION, qt.qbytes(text) if qt is not None else text)
    return True


def document_key(doc) -> str:
    """Identifies an open document for as long as it is open (its root node's uniqueId); "" for a
    document that has been closed (Krita then gives it no root node)."""
    root = doc.rootNode() if doc is not None else None
    return uid_of(root) if root is not None else ""
