"""The Krita plugin reads a document: the walk, layer marks and encoding on stand-in Krita nodes
(tests/krita/fakekrita.py; no Krita, no Qt)."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest

from krita_plugin.collage_diffusion import collage, document, settings, wire
from krita_plugin.collage_diffusion.settings import DocumentSettings

sys.path.insert(0, str(Path(__file__).resolve().parent / "krita"))
import fakekrita  # noqa: E402 - stand-ins for Krita's Document and Node

# -- pure helpers for the tests ---------------------------------------------------------------------------


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(w, h, RGBA) of an 8-bit RGBA PNG written by wire.encode_png (filter 0 rows)."""
    w, h = wire.png_size(data)
    pos, idat = 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = w * 4
    rows = [raw[y * (stride + 1) : (y + 1) * (stride + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, b"".join(r[1:] for r in rows)


# -- reading a document (stand-in Krita nodes; Qt-less encoding) ---------------------------------------------


def stack():
    return fakekrita.sample_stack()


def test_walk_lists_visible_layers_bottom_to_top():
    doc = stack()
    listed = document.list_layers(doc)
    assert [(n.name, n.kind, n.path, n.problem) for n in listed] == [
        ("ground", "paintlayer", (), ""),
        ("cat", "paintlayer", ("animals",), ""),
        ("ball", "paintlayer", (), ""),
        ("ghost", "paintlayer", ("hidden group",), "hidden by group 'hidden group'"),
        ("sign", "vectorlayer", (), ""),
        ("empty", "paintlayer", (), "empty"),
        ("far away", "paintlayer", (), "no pixel on the canvas"),
    ]
    assert [n.name for n in listed if not n.problem.startswith("hidden")] == [
        node.name() for node, _, _ in document.walk(doc)
    ]


def test_layer_marks_say_why_a_layer_will_not_take_part():
    """The marks come from the rules `build_request` applies (collage.take_part)."""
    doc = stack()
    root = doc.rootNode()
    ground, ball, sign = (root.childNodes()[i] for i in (0, 2, 4))
    ground.setName("Background")
    ground.setPixelData(fakekrita.fill(64, 64, (255, 255, 255, 255)), 0, 0, 64, 64)  # covers the canvas
    ball.setOpacity(0)
    sign.setName("Layer 3")  # a made-up name says nothing
    listed = document.list_layers(doc)
    layers = DocumentSettings().resolve([(n.uid, n.name) for n in listed])
    cat = next(n.uid for n in listed if n.name == "cat")
    layers[cat].enabled = False  # ticked off: shown by its tick, not marked
    marks = collage.layer_marks(listed, layers)
    assert {n.name: marks[n.uid] for n in listed if n.uid in marks} == {
        "Background": "the background",
        "ball": "at opacity 0",
        "ghost": "hidden by group 'hidden group'",
        "Layer 3": "not described",
        "empty": "empty",
        "far away": "no pixel on the canvas",
    }
    sign = next(n.uid for n in listed if n.name == "Layer 3")
    layers[sign].text = "a red sign"  # described in the dock: the mark goes
    assert sign not in collage.layer_marks(listed, layers)


def test_read_layers_at_document_scale_without_qt(monkeypatch):
    monkeypatch.setattr(document, "qt", None)  # the pure-Python encoder, whatever is installed
    doc = stack()
    records, stats = document.read_layers(doc)
    assert [(r.name, r.doc_box, (r.x, r.y), round(r.opacity, 3), r.path) for r in records] == [
        ("ground", (0, 48, 64, 16), (0, 48), 1.0, ()),
        ("cat", (8, 8, 16, 16), (8, 8), 0.502, ("animals",)),
        ("ball", (0, 20, 6, 10), (0, 20), 0.2, ()),
        ("sign", (40, 4, 20, 10), (40, 4), 1.0, ()),
    ]
    assert stats.skipped == [
        "layer 'empty' is empty; left out",
        "layer 'far away' has no pixel on the canvas; left out",
    ]
    w, h, rgba = decode_png(records[1].png)
    assert (w, h) == (16, 16) and rgba[:4] == bytes((240, 140, 30, 255))  # BGRA in, RGBA out
    assert records[3].kind == "vectorlayer" and records[3].note == ""
    sign = doc.rootNode().childNodes()[4]
    assert sign.reads == [("projectionPixelData", 40, 4, 20, 10)]
    ball = doc.rootNode().childNodes()[2]
    assert ball.reads == [("pixelData", 0, 20, 6, 10)]  # only the part on the canvas is read
    with pytest.raises(RuntimeError, match="needs Qt"):
        document.read_layers(doc, (32, 32))


def test_settings_in_the_document_annotation():
    doc = stack()
    assert document.load_settings(doc) == DocumentSettings()
    s = DocumentSettings(prompt="a cat")
    assert document.save_settings(doc, s) is True
    assert document.save_settings(doc, s) is False  # unchanged: the document is not touched again
    assert list(doc.annotations) == [settings.ANNOTATION_TYPE]
    assert document.load_settings(doc).prompt == "a cat"


def test_results_group_found_by_uid_or_name():
    doc = stack()
    group = doc.rootNode().childNodes()[-1]
    assert document.find_results_group(doc) is group
    assert document.find_results_group(doc, document.uid_of(group)) is group
    assert (
        document.node_by_uid(doc, document.uid_of(doc.rootNode().childNodes()[1].childNodes()[0])).name()
        == "cat"
    )
    assert document.node_by_uid(doc, "{nope}") is None
