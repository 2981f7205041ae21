"""What the in-Krita checks share (krita_suite.py runs them): the check registry, the test
document, and small helpers over Krita's API and the bridge."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHECKS = []


def check(needs_bridge: bool = False):
    def wrap(fn):
        CHECKS.append((fn.__name__, fn, needs_bridge))
        return fn

    return wrap


# -- building the test document ------------------------------------------------------------------------

SIZE = 128
SVG = (
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{SIZE}" height="{SIZE}" viewBox="0 0 {SIZE} {SIZE}">'
    '<rect x="88" y="8" width="32" height="24" fill="#d02020"/></svg>'
)


def solid(color_bgra: tuple[int, int, int, int], w: int, h: int) -> bytes:
    return bytes(color_bgra) * (w * h)


def krita():
    from krita import Krita

    return Krita.instance()


def scratch() -> Path:
    path = Path(os.environ.get("COLLAGE_TEST_DIR") or "/tmp/collage-krita-test")
    path.mkdir(parents=True, exist_ok=True)
    return path


def settle(doc, ms: int = 300) -> None:
    """Let Krita finish async work (vector layers rasterize from the event loop)."""
    from collage_diffusion import qt

    qt.spin(lambda: False, ms)
    doc.refreshProjection()
    doc.waitForDone()


def paint(doc, parent, name: str, color, box, opacity: int = 255, visible: bool = True):
    x, y, w, h = box
    node = doc.createNode(name, "paintlayer")
    parent.addChildNode(node, None)
    node.setPixelData(solid(color, w, h), x, y, w, h)
    node.setOpacity(opacity)
    node.setVisible(visible)
    return node


def build_document():
    """The test collage. Bottom to top:

    vector layer (from an SVG: a red rect at 88,8 32×24)
    ground         paint, 0,96 128×32, green
    animals        group, opacity 50 %:
        cat        paint, 16,40 32×32, orange
        dog        paint, HIDDEN
    ball           paint, 20×20 written at -10,10: partly outside the canvas
    hidden thing   paint, HIDDEN
    hidden group   group, HIDDEN: ghost (visible paint)
    moon           paint, 72,48 24×24, semi-transparent pixels, layer opacity 128
    empty          paint, nothing painted
    """
    svg = scratch() / "vector.svg"
    svg.write_text(SVG, encoding="utf-8")
    doc = krita().openDocument(str(svg))
    doc.setBatchmode(True)
    settle(doc)
    root = doc.rootNode()
    vector = root.childNodes()[0]
    vector.setName("sign")
    paint(doc, root, "ground", (40, 160, 40, 255), (0, 96, 128, 32))
    group = doc.createGroupLayer("animals")
    root.addChildNode(group, None)
    group.setOpacity(128)
    paint(doc, group, "cat", (30, 140, 240, 255), (16, 40, 32, 32))
    paint(doc, group, "dog", (90, 90, 90, 255), (60, 60, 16, 16), visible=False)
    paint(doc, root, "ball", (200, 60, 60, 255), (-10, 10, 20, 20))
    paint(doc, root, "hidden thing", (0, 0, 0, 255), (0, 0, 50, 50), visible=False)
    hidden = doc.createGroupLayer("hidden group")
    root.addChildNode(hidden, None)
    paint(doc, hidden, "ghost", (255, 255, 255, 255), (0, 0, 64, 64))
    hidden.setVisible(False)
    paint(doc, root, "moon", (220, 220, 250, 128), (72, 48, 24, 24), opacity=128)
    empty = doc.createNode("empty", "paintlayer")
    root.addChildNode(empty, None)
    settle(doc)
    return doc


EXPECTED = [
    # name, kind, doc_box, opacity, path
    ("sign", "vectorlayer", (88, 8, 32, 24), 1.0, ()),
    ("ground", "paintlayer", (0, 96, 128, 32), 1.0, ()),
    ("cat", "paintlayer", (16, 40, 32, 32), 128 / 255, ("animals",)),
    ("ball", "paintlayer", (0, 10, 10, 20), 1.0, ()),
    ("moon", "paintlayer", (72, 48, 24, 24), 128 / 255, ()),
]


def save_as(doc, path: Path) -> None:
    if not doc.saveAs(str(path)):
        raise AssertionError(f"saving {path} failed")


def reopen(path: Path):
    """A saved document opened again and settled: its vector layer rasterizes from the event
    loop, and read at once it may come back empty."""
    doc = krita().openDocument(str(path))
    settle(doc)
    return doc


def user_nodes(doc):
    """Every node of the document outside the results group, depth first."""
    from collage_diffusion import document

    results = document.find_results_group(doc)
    skip = document.uid_of(results) if results is not None else None

    def visit(parent, depth):
        for node in parent.childNodes():
            if depth == 0 and document.uid_of(node) == skip:
                continue
            yield node
            yield from visit(node, depth + 1)

    return list(visit(doc.rootNode(), 0))


def fingerprint(doc) -> dict:
    """uid → hash of everything a user layer is: name, kind, visibility, opacity, colour space,
    bounds and pixels (own and projection)."""
    from collage_diffusion import document

    out = {}
    for node in user_nodes(doc):
        b = node.bounds()
        h = hashlib.sha256()
        h.update(repr((node.name(), node.type(), node.visible(), node.opacity(), node.colorModel())).encode())
        h.update(repr((node.colorDepth(), b.x(), b.y(), b.width(), b.height(), node.blendingMode())).encode())
        if b.width() and b.height():
            if node.type() != "grouplayer":
                h.update(bytes(node.pixelData(b.x(), b.y(), b.width(), b.height())))
            h.update(bytes(node.projectionPixelData(b.x(), b.y(), b.width(), b.height())))
        out[document.uid_of(node)] = h.hexdigest()
    out["document"] = repr((doc.width(), doc.height(), doc.colorModel(), doc.colorDepth(), doc.resolution()))
    return out


def decode_bgra(png: bytes):
    """(width, height, BGRA bytes) of a PNG, through Qt."""
    from collage_diffusion import qt

    image = qt.QImage.fromData(png, "PNG").convertToFormat(qt.QImage.Format.Format_ARGB32)
    return image.width(), image.height(), qt.image_bytes(image)


def node_bgra(node, box) -> bytes:
    return bytes(node.pixelData(*box))


def assert_eq(actual, expected, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {actual!r}")


def make_model(url: str | None = None):
    from collage_diffusion.model import CONNECTED, CollageModel

    model = CollageModel(url or os.environ["COLLAGE_TEST_BRIDGE"])
    model.check_connection().wait(15)
    if model.state != CONNECTED:
        raise AssertionError(f"cannot connect to the test bridge: {model.state_text}")
    return model


def set_prompt(
    doc, prompt: str, steps: int = 4, seed: int = 5, size_policy: str = "document", **layer_texts
) -> None:
    """The document's prompt and settings; "document" size, so results can be compared pixel for
    pixel with the layers (the auto policy has its own check)."""
    from collage_diffusion import document

    settings = document.load_settings(doc)
    settings.prompt = prompt
    settings.steps = steps
    settings.seed = seed
    settings.size_policy = size_policy
    settings.strength = 1.0
    listed = document.list_layers(doc, settings.results_group)
    resolved = settings.resolve([(n.uid, n.name) for n in listed])
    for node in listed:
        if node.name in layer_texts:
            resolved[node.uid].text = layer_texts[node.name]
        resolved[node.uid].strength = 1.0
    settings.update_layers(resolved)
    document.save_settings(doc, settings)


def changed_pixels(old_layer, new_layer) -> list[int]:
    """Indices (y * SIZE + x) of the pixels whose BGRA bytes differ between two canvas-size layers."""
    old = bytes(old_layer.pixelData(0, 0, SIZE, SIZE))
    new = bytes(new_layer.pixelData(0, 0, SIZE, SIZE))
    return [i // 4 for i in range(0, len(old), 4) if old[i : i + 4] != new[i : i + 4]]


def outside_box(changed: list[int], box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """The (x, y) of the `changed` pixel indices (`changed_pixels`) that lie outside `box`."""
    x0, y0, w, h = box
    return [
        (p % SIZE, p // SIZE) for p in changed if not (x0 <= p % SIZE < x0 + w and y0 <= p // SIZE < y0 + h)
    ]


def result_layers(doc):
    from collage_diffusion import document

    group = document.find_results_group(doc)
    return [] if group is None else group.childNodes()


def combo_items(combo) -> list:
    return [(combo.itemText(i), combo.itemData(i)) for i in range(combo.count())]


def generate_in_panel(panel) -> bytes:
    """Press Generate as the painter would; the result's PNG."""
    panel.actions_section.generate_button.click()
    panel.model.wait_idle(180)
    assert_eq(panel.model.last_error, "", "generate error")
    return panel.model.results_for(panel.doc).entries[0].png


def job_on_bridge(model):
    """The bridge's record of the model's last job (`wire.JobStatus`)."""
    from collage_diffusion import client, wire

    call = client.BridgeClient(os.environ["COLLAGE_TEST_BRIDGE"]).job(model.job_id).wait(15)
    assert_eq(call.ok, True, f"GET job {model.job_id}")
    return wire.JobStatus.from_dict(call.json())
