"""The plugin inside real Krita: run by ``kritarunner -s krita_suite`` (tests/test_plugin_krita.py).

(One module past ~500 lines on purpose: kritarunner runs one module per Krita start, and Krita
starts in seconds, so every in-Krita check lives here and runs in one start.)

Environment:
    COLLAGE_TEST_REPORT   where to write the JSON report (required)
    COLLAGE_TEST_BRIDGE   the bridge's URL (a bridge on the demo model); checks that need it
                          are reported as skipped without it
    COLLAGE_TEST_DIR      a scratch folder (documents saved as .kra, the SVG of the vector layer)
    COLLAGE_TEST_ONLY     comma-separated check names to run (default: all)
    COLLAGE_BRIDGE_CONFIG a local-bridge config (bridge_process.py) for the "local bridge" check

The report: ``{"checks": {name: {"ok": bool, "skipped": str, "detail": str, "seconds": float}},
"krita": version}``. Each check builds what it needs; a failing check does not stop the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from harness import Skip, run_check  # beside this module

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


def result_layers(doc):
    from collage_diffusion import document

    group = document.find_results_group(doc)
    return [] if group is None else group.childNodes()


# -- checks --------------------------------------------------------------------------------------------


@check()
def read_collage(report):
    """The built document reads into the expected collage: order, boxes, opacity, groups,
    hidden layers and groups skipped, the vector layer through its projection, pixels exact."""
    from collage_diffusion import document, wire

    doc = build_document()
    try:
        records, stats = document.read_layers(doc)
        got = [(r.name, r.kind, r.doc_box, round(r.opacity, 4), r.path) for r in records]
        want = [(n, k, b, round(o, 4), p) for n, k, b, o, p in EXPECTED]
        assert_eq(got, want, "layers read")
        assert_eq(
            any("empty" in s for s in stats.skipped), True, f"empty layer reported as skipped {stats.skipped}"
        )
        by_name = {n.name(): n for n in user_nodes(doc)}
        for r in records:
            assert_eq((r.x, r.y), r.doc_box[:2], f"{r.name} position at document scale")
            w, h, data = decode_bgra(r.png)
            assert_eq((w, h), r.doc_box[2:], f"{r.name} PNG size")
            node = by_name[r.name]
            source = (
                node.projectionPixelData(*r.doc_box)
                if r.kind == "vectorlayer"
                else node.pixelData(*r.doc_box)
            )
            if data != bytes(source):
                raise AssertionError(f"{r.name}: the PNG's pixels differ from the layer's")
            assert_eq(wire.png_size(r.png), (w, h), f"{r.name} PNG header")
        # The vector layer's projection really holds the red rect.
        _, _, sign = decode_bgra(records[0].png)
        assert_eq(tuple(sign[:4]), (0x20, 0x20, 0xD0, 255), "vector layer pixel (BGRA)")
        # A smaller generation size scales positions and pixels.
        small, _ = document.read_layers(doc, (64, 64))
        assert_eq(
            [(r.name, r.x, r.y) for r in small][:3],
            [("sign", 44, 4), ("ground", 0, 48), ("cat", 8, 20)],
            "scaled",
        )
        assert_eq(wire.png_size(small[2].png), (16, 16), "scaled cat PNG")
        report["detail"] = f"{len(records)} layers; skipped: {stats.skipped}"
    finally:
        doc.close()


@check()
def background_layer_becomes_the_background(report):
    """A new document's white "Background" is the image's background, not an object; painted
    on, it travels as a canvas image flattened over white (the CLI's rule for .ora files)."""
    from collage_diffusion import collage, document, settings

    doc = krita().createDocument(128, 128, "bg", "RGBA", "U8", "", 300.0)
    doc.setBatchmode(True)
    try:
        root = doc.rootNode()
        paint(doc, root, "cat", (30, 140, 240, 255), (16, 16, 32, 32))
        paint(doc, root, "Paint Layer 3", (0, 0, 0, 255), (80, 80, 16, 16))
        settle(doc, 50)
        records, _ = document.read_layers(doc)
        assert_eq([r.name for r in records], ["Background", "cat", "Paint Layer 3"], "records")
        assert_eq(records[0].background_rgb, [255, 255, 255], "white background")
        s = settings.DocumentSettings()
        plan, problems = collage.build_request(records, s, {}, (128, 128), (128, 128))
        assert_eq(problems, [], "problems")
        assert_eq(
            ([lay.name for lay in plan.request.layers], plan.request.background),
            (["cat"], [255, 255, 255]),
            "request",
        )
        # Paint a stripe on the background: it becomes a canvas image.
        background = root.childNodes()[0]
        background.setPixelData(solid((0, 0, 200, 255), 128, 8), 0, 60, 128, 8)
        settle(doc, 50)
        records, _ = document.read_layers(doc, (64, 64))
        assert_eq(records[0].background_rgb, None, "no single colour")
        w, h, data = decode_bgra(records[0].background_png)
        assert_eq((w, h), (64, 64), "background image at generation size")
        assert_eq(
            (tuple(data[:4]), tuple(data[(32 * 64) * 4 : (32 * 64) * 4 + 4])),
            ((255, 255, 255, 255), (0, 0, 200, 255)),
            "pixels",
        )
        plan, problems = collage.build_request(records, s, {}, (64, 64), (128, 128))
        assert_eq(problems, [], "problems with a background image")
        assert_eq(plan.request.background_png is not None, True, "background_png sent")
        report["detail"] = "; ".join(plan.notes)
    finally:
        doc.close()


@check()
def reading_never_changes_the_document(report):
    """Reading (also at another size, also a 16-bit document through a converted clone) leaves
    every layer and the document as they were."""
    from collage_diffusion import document

    doc = build_document()
    try:
        before = fingerprint(doc)
        document.read_layers(doc)
        document.read_layers(doc, (64, 64))
        assert_eq(fingerprint(doc), before, "fingerprint after reading")
    finally:
        doc.close()
    doc = krita().createDocument(64, 64, "deep", "RGBA", "U16", "", 300.0)
    doc.setBatchmode(True)
    try:
        node = doc.createNode("red", "paintlayer")
        doc.rootNode().addChildNode(node, None)
        # U16 BGRA: B=0, G=0, R=65535, A=65535 (little-endian 16-bit channels)
        node.setPixelData(bytes([0, 0, 0, 0, 255, 255, 255, 255]) * (8 * 8), 8, 8, 8, 8)
        settle(doc, 50)
        before = fingerprint(doc)
        records, stats = document.read_layers(doc)
        assert_eq(stats.converted, True, "16-bit document converted for sending")
        assert_eq(fingerprint(doc), before, "16-bit document unchanged")
        assert_eq((doc.colorDepth(), node.colorDepth()), ("U16", "U16"), "colour depth kept")
        red = [r for r in records if r.name == "red"][0]
        assert_eq(red.doc_box, (8, 8, 8, 8), "16-bit layer box")
        _, _, data = decode_bgra(red.png)
        assert_eq(tuple(data[:4]), (0, 0, 255, 255), "16-bit red as 8-bit BGRA")
        # Results go into a 16-bit document as new 8-bit layers; user layers untouched.
        from collage_diffusion import qt, results

        png = qt.png_bytes(qt.QImage(64, 64, qt.QImage.Format.Format_RGB888))
        group, nodes = results.write_results(doc, [(png, "result")])
        assert_eq(fingerprint(doc), before, "16-bit document after writing a result")
        assert_eq((nodes[0].colorDepth(), group.name()), ("U8", "Collage results"), "result layer")
        report["detail"] = f"16-bit read in {stats.convert_s:.3f} s of conversion"
    finally:
        doc.close()


@check()
def settings_survive_save_and_reopen(report):
    from collage_diffusion import document

    doc = build_document()
    path = scratch() / "settings.kra"
    try:
        settings = document.load_settings(doc)
        settings.prompt = "a cat and a ball on grass"
        settings.negative_prompt = "blurry"
        settings.seed, settings.steps, settings.variants, settings.size_policy = 1234, 12, 3, "512"
        listed = document.list_layers(doc)
        resolved = settings.resolve([(n.uid, n.name) for n in listed])
        cat = next(n.uid for n in listed if n.name == "cat")
        ball = next(n.uid for n in listed if n.name == "ball")
        resolved[cat].text, resolved[cat].attention_weight, resolved[cat].appearance = (
            "a ginger cat",
            2.5,
            "reference",
        )
        resolved[ball].enabled, resolved[ball].strength, resolved[ball].control_weight = False, 0.3, 0.8
        settings.update_layers(resolved)
        document.save_settings(doc, settings)
        saved = settings.to_dict()
        if not doc.saveAs(str(path)):
            raise AssertionError(f"saving {path} failed")
    finally:
        doc.close()
    doc = krita().openDocument(str(path))
    try:
        again = document.load_settings(doc)
        assert_eq(again.to_dict(), saved, "settings after reopening")
        listed = document.list_layers(doc)
        resolved = again.resolve([(n.uid, n.name) for n in listed])
        cat = next(n.uid for n in listed if n.name == "cat")
        assert_eq(
            (resolved[cat].text, resolved[cat].appearance),
            ("a ginger cat", "reference"),
            "cat's settings by uid",
        )
        report["detail"] = f"{len(again.layers)} layer entries survived in {path.name}"
    finally:
        doc.close()


@check()
def ora_settings_come_with_the_file(report):
    """examples/shapes.ora opens ready to generate: its collage.json fills the dock's settings."""
    from collage_diffusion import document

    path = Path(__file__).resolve().parents[2] / "examples" / "shapes.ora"
    doc = krita().openDocument(str(path))
    try:
        settings = document.load_settings(doc)
        assert_eq(settings.prompt, "a red heart, a yellow star and a purple square on grass", "prompt")
        assert_eq((settings.seed, settings.steps, settings.strength), (1, 25, 0.8), "seed, steps, strength")
        listed = document.list_layers(doc, settings.results_group)
        resolved = settings.resolve([(n.uid, n.name) for n in listed])
        by_name = {n.name: resolved[n.uid] for n in listed}
        assert_eq(by_name["red heart"].attention_weight, 1.5, "red heart's attention weight")
        assert_eq(
            (by_name["yellow star"].strength, by_name["yellow star"].control_weight),
            (0.6, 1.0),
            "yellow star",
        )
        assert_eq((by_name["purple square"].strength, by_name["red heart"].strength), (0.2, 0.8), "others")
        report["detail"] = f"{len(listed)} layers, prompt and per-layer settings from {path.name}"
    finally:
        doc.close()


@check(needs_bridge=True)
def generate_writes_new_layers(report):
    """Generate, then Variants: results are new layers in "Collage results" on top, named with
    prompt and seed; no user layer changes."""
    from collage_diffusion import collage, document

    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball on green ground", seed=5, cat="cat", ball="red ball")
        before = fingerprint(doc)
        model = make_model()
        t = time.monotonic()
        if not model.generate(doc, "generate"):
            raise AssertionError(f"generate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "generate error")
        seconds = time.monotonic() - t
        top = doc.rootNode().childNodes()[-1]
        assert_eq(
            (top.name(), top.type()), (collage.RESULTS_GROUP_NAME, "grouplayer"), "results group on top"
        )
        layers = result_layers(doc)
        want = collage.result_layer_name("a red sign, a cat and a ball on green ground", 5)
        assert_eq([n.name() for n in layers], [want], "result layer")
        assert_eq(fingerprint(doc), before, "user layers after generate")
        # The layer holds the bridge's image exactly.
        last = model.results_for(doc)
        w, h, data = decode_bgra(last.entries[0].png)
        assert_eq(bytes(layers[0].pixelData(0, 0, w, h)), data, "result layer pixels")
        # Variants: two more layers, the first visible, and picking switches.
        settings = document.load_settings(doc)
        settings.variants = 2
        document.save_settings(doc, settings)
        if not model.generate(doc, "variants"):
            raise AssertionError(f"variants did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "variants error")
        layers = result_layers(doc)
        assert_eq(len(layers), 3, "result layers after variants")
        last = model.results_for(doc)
        assert_eq(len(last.entries), 2, "variants fetched")
        new = {document.uid_of(n): n for n in layers}
        first, second = (new[e.node_uid] for e in last.entries)
        assert_eq((first.visible(), second.visible()), (True, False), "variant visibility")
        assert_eq(document.uid_of(layers[-1]), last.entries[0].node_uid, "first variant on top")
        seed = model.pick(doc, 1)
        assert_eq((seed, first.visible(), second.visible()), (last.entries[1].seed, False, True), "pick")
        assert_eq(fingerprint(doc), before, "user layers after variants")
        report["detail"] = f"generate took {seconds:.1f} s; layers: {[n.name() for n in layers]}"
        # Settings stored the results group; the group is not read as a collage layer.
        records, _ = document.read_layers(doc)
        assert_eq(
            [r.name for r in records], [e[0] for e in EXPECTED], "results group left out of the collage"
        )
        path = scratch() / "generated.kra"
        if not doc.saveAs(str(path)):
            raise AssertionError("saving after generate failed")
    finally:
        doc.close()


@check(needs_bridge=True)
def auto_size_follows_the_model(report):
    """ "Model's size (auto)": the 128×128 document is generated at the demo model's 64×64 (the
    bridge's /info says its native size) and the result layer is scaled back to the document."""
    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball", size_policy="auto", cat="cat", ball="red ball")
        model = make_model()
        details = model.info.details()
        assert_eq((details.family, details.native_size), ("sd1", 64), "demo model details from /info")
        if not model.generate(doc, "generate"):
            raise AssertionError(f"generate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "generate error")
        w, h, _data = decode_bgra(model.results_for(doc).entries[0].png)
        assert_eq((w, h), (64, 64), "generated at the model's size")
        bounds = result_layers(doc)[0].bounds()
        assert_eq((bounds.width(), bounds.height()), (doc.width(), doc.height()), "result layer size")
        report["detail"] = f"document {doc.width()}×{doc.height()}, generated {w}×{h}"
    finally:
        doc.close()


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


@check(needs_bridge=True)
def dock_model_and_loras_saved_and_sent(report):
    """The dock's model picker and LoRA list on a bridge with a model folder (COLLAGE_TEST_MODELS_DIR):
    they show the bridge's models and LoRAs, the LoRAs offered follow the chosen model's family,
    the choice goes into the job (the bridge runs the chosen model; its LoRA changes the picture),
    and saving the document as .kra and reopening it shows the same choice."""
    import fakekrita
    from collage_diffusion import dock, document

    if not os.environ.get("COLLAGE_TEST_MODELS_DIR"):
        raise Skip("the test bridge has no model folder (COLLAGE_TEST_MODELS_DIR)")
    path = scratch() / "model-choice.kra"
    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball", size_policy="auto", cat="cat", ball="red ball")
        panel = dock.CollagePanel(fakekrita.Host(doc), make_model())
        panel.refresh()
        m = panel.model_section
        assert_eq(
            combo_items(m.model),
            [
                ("default (demo) · Stable Diffusion 1.x", ""),
                ("demo-copy · Stable Diffusion 1.x", "demo-copy"),
                ("tiny-xl · Stable Diffusion XL", "tiny-xl"),
            ],
            "the bridge's models in the picker",
        )
        assert_eq([d for _, d in combo_items(m.add_combo)], ["ink.safetensors"], "LoRAs offered for SD 1.x")
        assert_eq(m.choose_model("tiny-xl"), True, "tiny-xl chosen")
        offered = [d for _, d in combo_items(m.add_combo)]
        assert_eq(offered, ["ink.safetensors", "xl/detail.safetensors"], "LoRAs offered for SDXL")
        assert_eq(m.choose_model("demo-copy"), True, "demo-copy chosen")
        assert_eq(m.add_lora("ink.safetensors", 0.8), True, "LoRA added")
        with_lora = generate_in_panel(panel)
        job = job_on_bridge(panel.model)
        assert_eq((job.model, job.width, job.height), ("demo-copy", 64, 64), "the bridge's job")
        sent = panel.model._plan.request.loras
        assert_eq(sent, [{"name": "ink.safetensors", "weight": 0.8}], "LoRAs in the request")
        panel.shutdown()
        if not doc.saveAs(str(path)):
            raise AssertionError(f"saving {path} failed")
    finally:
        doc.close()
    doc = krita().openDocument(str(path))
    try:
        stored = document.load_settings(doc)
        assert_eq(
            (stored.model, [(lora.name, lora.weight) for lora in stored.loras]),
            ("demo-copy", [("ink.safetensors", 0.8)]),
            "settings in the reopened document",
        )
        panel = dock.CollagePanel(fakekrita.Host(doc), make_model())
        panel.refresh()
        m = panel.model_section
        assert_eq(m.model.currentText(), "demo-copy · Stable Diffusion 1.x", "picker after reopening")
        assert_eq(
            [(r.name, r.weight.value()) for r in m.rows],
            [("ink.safetensors", 0.8)],
            "LoRA list after reopening",
        )
        m.rows[0].remove.click()  # the same job without the LoRA: another picture
        without = generate_in_panel(panel)
        assert_eq(job_on_bridge(panel.model).model, "demo-copy", "model of the job without LoRA")
        if without == with_lora:
            raise AssertionError("the LoRA chosen in the dock did not change the picture")
        m.add_lora("ink.safetensors", 0.8)  # and with it again: the first picture, byte for byte
        assert_eq(generate_in_panel(panel) == with_lora, True, "the LoRA's picture again")
        panel.shutdown()
        report["detail"] = f"model demo-copy + ink.safetensors 0.8, saved in {path.name} and restored"
    finally:
        doc.close()


@check(needs_bridge=True)
def generate_on_sdxl(report):
    """The dock on a bridge whose model is an SDXL (the tiny one): /info says so, the auto size is
    the family's (multiples of 64 near its native size), the result arrives as a new layer."""
    url = os.environ.get("COLLAGE_TEST_SDXL_BRIDGE")
    if not url:
        raise Skip("no SDXL bridge (COLLAGE_TEST_SDXL_BRIDGE)")
    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball", size_policy="auto", cat="cat", ball="red ball")
        before = fingerprint(doc)
        model = make_model(url)
        details = model.info.details()
        assert_eq((details.family, details.native_size, details.size_multiple), ("sdxl", 256, 64), "details")
        if not model.generate(doc, "generate"):
            raise AssertionError(f"generate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "generate error")
        w, h, _data = decode_bgra(model.results_for(doc).entries[0].png)
        assert_eq((w, h), (256, 256), "generated at the SDXL model's size")
        layers = result_layers(doc)
        assert_eq(len(layers), 1, "result layers")
        bounds = layers[0].bounds()
        assert_eq((bounds.width(), bounds.height()), (doc.width(), doc.height()), "result layer size")
        assert_eq(fingerprint(doc), before, "user layers after generate")
        report["detail"] = (
            f"document {doc.width()}×{doc.height()}, generated {w}×{h} on {details.family_label}"
        )
    finally:
        doc.close()


@check(needs_bridge=True)
def regenerate_changes_only_that_layer(report):
    from collage_diffusion import document, pixels

    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball on green ground", seed=9)
        model = make_model()
        model.generate(doc, "generate")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "generate error")
        cat = next(n for n in user_nodes(doc) if n.name() == "cat")
        # Nothing selected (headless Krita has no active layer): a plain error, no change.
        before = fingerprint(doc)
        assert_eq(model.generate(doc, "regenerate"), False, "regenerate without a selected layer")
        if "Select the layer" not in model.last_error:
            raise AssertionError(f"unclear error: {model.last_error!r}")
        if not model.generate(doc, "regenerate", active_uid=document.uid_of(cat)):
            raise AssertionError(f"regenerate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "regenerate error")
        assert_eq(fingerprint(doc), before, "user layers after regenerate")
        layers = result_layers(doc)
        assert_eq(len(layers), 2, "regenerate wrote a new layer")
        if "regenerated cat" not in layers[-1].name():
            raise AssertionError(f"regenerate layer name: {layers[-1].name()!r}")
        changed = changed_pixels(layers[0], layers[1])
        if not changed:
            raise AssertionError("the regenerated result is identical to the base")
        x0, y0, w, h = pixels.dilate_box((16, 40, 32, 32), 8, SIZE, SIZE)
        outside = [
            (p % SIZE, p // SIZE)
            for p in changed
            if not (x0 <= p % SIZE < x0 + w and y0 <= p // SIZE < y0 + h)
        ]
        if outside:
            raise AssertionError(
                f"{len(outside)} pixels changed outside the cat's region, e.g. {outside[:5]}"
            )
        report["detail"] = f"{len(changed)} pixels changed, all inside {x0},{y0} {w}×{h}"
    finally:
        doc.close()


@check(needs_bridge=True)
def regenerate_a_selection_changes_nothing_outside_it(report):
    """With a selection, Regenerate redoes only the selected area (grown by the dilation, 8 px)
    of the last result, whichever layer is active; every other pixel keeps its bytes."""
    from collage_diffusion import pixels
    from krita import Selection

    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball on green ground", seed=9)
        model = make_model()
        model.generate(doc, "generate")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "generate error")
        selection = Selection()
        selection.select(56, 64, 40, 24, 255)  # across the moon, the background and the ground
        doc.setSelection(selection)
        settle(doc)
        before = fingerprint(doc)  # with Krita's own selection node, made by setSelection
        if not model.generate(doc, "regenerate"):
            raise AssertionError(f"regenerate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "regenerate error")
        assert_eq(fingerprint(doc), before, "user layers after regenerate")
        layers = result_layers(doc)
        assert_eq(len(layers), 2, "regenerate wrote a new layer, the first result kept")
        if "regenerated selection" not in layers[-1].name():
            raise AssertionError(f"regenerate layer name: {layers[-1].name()!r}")
        changed = changed_pixels(layers[0], layers[1])
        inside = [p for p in changed if 56 <= p % SIZE < 96 and 64 <= p // SIZE < 88]
        if not inside:
            raise AssertionError("nothing changed inside the selection")
        x0, y0, w, h = pixels.dilate_box((56, 64, 40, 24), 8, SIZE, SIZE)
        outside = [
            (p % SIZE, p // SIZE)
            for p in changed
            if not (x0 <= p % SIZE < x0 + w and y0 <= p // SIZE < y0 + h)
        ]
        if outside:
            raise AssertionError(
                f"{len(outside)} pixels changed outside the grown selection, e.g. {outside[:5]}"
            )
        report["detail"] = (
            f"{len(changed)} pixels changed ({len(inside)} selected), all inside {x0},{y0} {w}×{h}"
        )
    finally:
        doc.close()


@check(needs_bridge=True)
def regenerate_after_reopen_uses_the_result_layer(report):
    """After reopening a .kra (no result in memory), regenerate starts from the topmost visible
    result layer of the document."""
    from collage_diffusion import document
    from collage_diffusion.model import CollageModel

    path = scratch() / "generated.kra"
    if not path.exists():
        raise Skip("needs generate_writes_new_layers' document")
    doc = krita().openDocument(str(path))
    doc.setBatchmode(True)
    try:
        model = CollageModel(os.environ["COLLAGE_TEST_BRIDGE"])
        ball = next(n for n in user_nodes(doc) if n.name() == "ball")
        before = len(result_layers(doc))
        if not model.generate(doc, "regenerate", active_uid=document.uid_of(ball)):
            raise AssertionError(f"regenerate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "regenerate error")
        assert_eq(len(result_layers(doc)), before + 1, "a new result layer")
    finally:
        doc.close()


@check(needs_bridge=True)
def layer_stack_result_is_a_group(report):
    """ "Result as: layer stack": each result is a new group in "Collage results" holding the
    background, the collage's layers by name in their order and the flat result (hidden); the
    group composites to the flat result within 1/255; regenerate and variants add groups; no user
    layer changes."""
    from collage_diffusion import collage, document

    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball on green ground", seed=6, cat="cat")
        settings = document.load_settings(doc)
        settings.output = "layers"
        document.save_settings(doc, settings)
        before = fingerprint(doc)
        model = make_model()
        if not model.generate(doc, "generate"):
            raise AssertionError(f"generate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "generate error")
        assert_eq(fingerprint(doc), before, "user layers after a stack result")
        groups = result_layers(doc)
        want = collage.result_layer_name("a red sign, a cat and a ball on green ground", 6)
        assert_eq([(g.name(), g.type()) for g in groups], [(want, "grouplayer")], "one group per result")
        children = groups[0].childNodes()
        names = ["background", *(e[0] for e in EXPECTED), "flat result"]
        assert_eq([c.name() for c in children], names, "stack layers, bottom to top")
        assert_eq([c.visible() for c in children], [True] * (len(names) - 1) + [False], "visibility")
        w, h, flat = decode_bgra(model.results_for(doc).entries[0].png)
        assert_eq(bytes(children[-1].pixelData(0, 0, w, h)), flat, "the hidden flat result")
        doc.refreshProjection()
        doc.waitForDone()
        stacked = bytes(groups[0].projectionPixelData(0, 0, w, h))
        worst = max(abs(a - b) for a, b in zip(stacked, flat, strict=True))
        if worst > 1:
            raise AssertionError(f"the group composites to within {worst}/255 of the flat result, not 1/255")
        # Regenerate and variants in stack mode: one more group each.
        cat = next(n for n in user_nodes(doc) if n.name() == "cat")
        if not model.generate(doc, "regenerate", active_uid=document.uid_of(cat)):
            raise AssertionError(f"regenerate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "regenerate error")
        settings = document.load_settings(doc)
        settings.variants = 2
        document.save_settings(doc, settings)
        if not model.generate(doc, "variants"):
            raise AssertionError(f"variants did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "variants error")
        groups = result_layers(doc)
        assert_eq([g.type() for g in groups], ["grouplayer"] * 4, "groups after regenerate and variants")
        if "regenerated cat" not in groups[1].name():
            raise AssertionError(f"regenerate group name: {groups[1].name()!r}")
        assert_eq([g.visible() for g in groups[2:]], [False, True], "variant groups: the first on top, shown")
        assert_eq([c.name() for c in groups[3].childNodes()], names, "variant stack layers")
        assert_eq(fingerprint(doc), before, "user layers after regenerate and variants")
        report["detail"] = f"group within {worst}/255 of the flat result; {len(groups)} groups"
    finally:
        doc.close()


@check(needs_bridge=True)
def cancel_stops_and_writes_nothing(report):
    from collage_diffusion import document

    doc = build_document()
    try:
        set_prompt(doc, "a slow one", steps=400)
        before = fingerprint(doc)
        model = make_model()
        seen = []
        model.progress.connect(lambda text, fraction: seen.append(text))
        model.generate(doc, "generate")
        from collage_diffusion import qt

        qt.spin(lambda: any(t.startswith("sampling") for t in seen) or not model.busy, 60000)
        model.cancel()
        model.wait_idle(60)
        assert_eq(model.last_error, "", "cancel is not an error")
        assert_eq(result_layers(doc), [], "no result layer after cancel")
        assert_eq(fingerprint(doc), before, "user layers after cancel")
        sampling = [t for t in seen if t.startswith("sampling")]
        if not sampling or "/400" not in sampling[0]:
            raise AssertionError(f"progress texts: {seen}")
        report["detail"] = f"progress seen: {seen[:2]} … {seen[-2:]}"
        document.find_results_group(doc)
    finally:
        doc.close()


@check(needs_bridge=True)
def preview_layer_during_a_job(report):
    """While a job runs its preview is a temporary layer on top of "Collage results" at the
    document's size; after the job it is gone with the result in its place, and after a cancel it
    is gone with nothing written (not even the results group it made)."""
    from collage_diffusion import collage, document, qt
    from collage_diffusion.preview_layer import PREVIEW_NAME

    doc = build_document()
    try:
        set_prompt(doc, "a slow one", steps=400)
        before = fingerprint(doc)
        model = make_model()
        seen = []  # the results group's layer names at each preview

        def at_preview(_png):
            seen.append([n.name() for n in result_layers(doc)])

        model.preview.connect(at_preview)

        def preview_node():
            layers = result_layers(doc)
            return layers[-1] if layers and layers[-1].name() == PREVIEW_NAME else None

        # Cancelled: the preview shows, then goes with the group it made.
        if not model.generate(doc, "generate"):
            raise AssertionError(f"generate did not start: {model.last_error}")
        qt.spin(lambda: preview_node() is not None or not model.busy, 60000)
        node = preview_node()
        if node is None:
            raise AssertionError(f"no preview layer during the job (previews seen: {seen})")
        bounds = node.bounds()
        assert_eq((bounds.width(), bounds.height()), (SIZE, SIZE), "preview layer scaled to the document")
        assert_eq(node.visible(), True, "preview layer visible")
        model.cancel()
        model.wait_idle(60)
        assert_eq(model.last_error, "", "cancel is not an error")
        assert_eq(document.find_results_group(doc), None, "no results group after a cancelled first job")
        assert_eq(fingerprint(doc), before, "user layers after cancel")
        # Finished: the result in its place.
        set_prompt(doc, "a red sign, a cat and a ball", steps=30, seed=3)
        seen.clear()
        if not model.generate(doc, "generate"):
            raise AssertionError(f"generate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "generate error")
        if not seen or PREVIEW_NAME not in seen[-1]:
            raise AssertionError(f"the preview layer was not in the results group during the job: {seen}")
        want = collage.result_layer_name("a red sign, a cat and a ball", 3)
        assert_eq([n.name() for n in result_layers(doc)], [want], "the result in the preview's place")
        assert_eq(fingerprint(doc), before, "user layers after generate")
        report["detail"] = f"{len(seen)} previews shown during the finished job"
    finally:
        doc.close()


@check(needs_bridge=True)
def results_history_and_discard(report):
    """The dock's thumbnails cover the document's recent jobs (newest first); clicking an older
    one shows its layer and hides the other results; Discard removes only the plugin's layer:
    a user layer moved into "Collage results" is refused and stays, as do all user layers."""
    import fakekrita
    from collage_diffusion import dock, document, qt

    doc = build_document()
    try:
        set_prompt(doc, "a red sign and a cat", steps=4, seed=5)
        settings = document.load_settings(doc)
        settings.variants = 2
        document.save_settings(doc, settings)
        panel = dock.CollagePanel(fakekrita.Host(doc), make_model())
        panel.model.show_preview_layer = False
        generate_in_panel(panel)
        panel.actions_section.variants_button.click()
        panel.model.wait_idle(180)
        assert_eq(panel.model.last_error, "", "variants error")
        jobs = panel.model.jobs_for(doc)
        assert_eq([len(j.entries) for j in jobs], [1, 2], "two jobs in the history")
        thumbs = panel.results_section.thumbs
        seeds = [thumbs.item(r).text() for r in range(thumbs.count())]
        want = [f"seed {e.seed}" for e in jobs[1].entries] + [f"seed {jobs[0].entries[0].seed}"]
        assert_eq(seeds, want, "thumbnails: the variants, then the first job's result")
        # Click the first job's thumbnail: its layer shows, the variants hide.
        panel._on_pick(thumbs.item(2))
        by_uid = {document.uid_of(n): n for n in result_layers(doc)}
        first = jobs[0].entries[0].node_uid
        shown = {uid: node.visible() for uid, node in by_uid.items()}
        assert_eq(shown, {uid: uid == first for uid in by_uid}, "only the clicked result shown")
        assert_eq(panel.options_section.seed.value(), jobs[0].entries[0].seed, "its seed in Seed")
        # A user layer put into the results group is not the plugin's: refused, kept.
        before = fingerprint(doc)
        group = document.find_results_group(doc)
        mine = paint(doc, group, "my sketch", (0, 0, 255, 255), (0, 0, 8, 8))
        if panel.model.discard(doc, document.uid_of(mine)):
            raise AssertionError("discard removed a user layer")
        if document.node_by_uid(doc, document.uid_of(mine)) is None:
            raise AssertionError("the user layer is gone after a refused discard")
        refused = panel.model.last_error
        # Discard the selected (first job's) result through the dock: only that layer goes.
        assert_eq(panel.results_section.selected(), (0, 0), "the clicked thumbnail is selected")
        panel.discard_selected()
        qt.spin(lambda: False, 100)
        left = {document.uid_of(n) for n in result_layers(doc)}
        assert_eq(
            left,
            {e.node_uid for e in jobs[1].entries} | {document.uid_of(mine)},
            "result layers after discard",
        )
        assert_eq(thumbs.count(), 2, "thumbnails after discard")
        assert_eq([len(j.entries) for j in panel.model.jobs_for(doc)], [2], "history after discard")
        assert_eq(fingerprint(doc), before, "user layers after discard")
        # A variant discarded by its uid: the other variant stays.
        second = jobs[1].entries[1].node_uid
        if not panel.model.discard(doc, second):
            raise AssertionError(f"discard of a variant failed: {panel.model.last_error}")
        left = {document.uid_of(n) for n in result_layers(doc)}
        assert_eq(left, {jobs[1].entries[0].node_uid, document.uid_of(mine)}, "after discarding a variant")
        report["detail"] = f"refused: {refused!r}"
        panel.shutdown()
    finally:
        doc.close()


@check()
def bridge_down_gives_a_clear_error(report):
    from collage_diffusion.model import DISCONNECTED, CollageModel

    doc = build_document()
    try:
        set_prompt(doc, "anything")
        before = fingerprint(doc)
        tree = [n.name() for n in doc.rootNode().childNodes()]
        model = CollageModel("http://127.0.0.1:9")  # nothing listens on the discard port
        model.check_connection().wait(10)
        assert_eq(model.state, DISCONNECTED, "state")
        started = model.generate(doc, "generate")
        model.wait_idle(30)
        error = model.last_error
        if "Cannot reach the bridge at http://127.0.0.1:9" not in error or "Start the bridge" not in error:
            raise AssertionError(f"unclear error: {error!r} (started: {started})")
        assert_eq(fingerprint(doc), before, "user layers")
        assert_eq([n.name() for n in doc.rootNode().childNodes()], tree, "layer tree")
        report["detail"] = error
    finally:
        doc.close()


@check(needs_bridge=True)
def bridge_errors_in_plain_words(report):
    """A request the bridge refuses (422) and a wrong token (401) come back as sentences."""
    from collage_diffusion import client, wire

    c = client.BridgeClient(os.environ["COLLAGE_TEST_BRIDGE"])
    layer = wire.LayerSpec(text="x", png=wire.encode_png(8, 8, bytes(8 * 8 * 4)), x=0, y=0, name="ghost")
    call = c.submit(wire.JobRequest(prompt="p", layers=[layer], width=64, height=64, steps=2)).wait(30)
    assert_eq(call.status, 422, "status of a collage with an invisible layer")
    if "cannot run this collage" not in call.error or "no visible pixels" not in call.error:
        raise AssertionError(f"422 text: {call.error!r}")
    info = c.info().wait(10)
    assert_eq(info.ok, True, "info")
    report["detail"] = call.error.replace("\n", " | ")


@check()
def local_bridge_starts_and_stops(report):
    """The dock's "Start local bridge": the environment recorded by install_krita.py."""
    from collage_diffusion import bridge_process, client, qt

    env = bridge_process.load_config()
    if env is None:
        raise Skip("no COLLAGE_BRIDGE_CONFIG")
    port = int(os.environ.get("COLLAGE_TEST_LOCAL_PORT", "0")) or 17870
    bridge = bridge_process.make_local_bridge()
    ready, stopped = [], []
    bridge.ready.connect(ready.append)
    bridge.stopped.connect(stopped.append)
    problem = bridge.start(port, model="demo", env=env)
    assert_eq(problem, "", "start problem")
    qt.spin(lambda: ready or stopped, 90000)
    if not ready:
        raise AssertionError(f"the local bridge did not come up: {stopped} {bridge.lines[-5:]}")
    health = client.BridgeClient(ready[0]).health().wait(10)
    assert_eq(health.ok, True, f"health of {ready[0]}")
    bridge.stop()
    qt.spin(lambda: stopped, 10000)
    assert_eq(stopped, ["The local bridge was stopped."], "stopped")
    report["detail"] = f"up at {ready[0]}"


@check()
def layer_list_marks_left_out_layers(report):
    """The dock's layer list marks what the request will leave out, and why, before Generate:
    the empty layer, a layer entirely off the canvas, one hidden by its group, one whose name
    says nothing; unticked and greyed in effect; a mark goes when its cause does."""
    import fakekrita  # its Host: the dock's host without Krita's window
    from collage_diffusion import dock, document

    doc = build_document()
    try:
        bird = paint(doc, doc.rootNode(), "off canvas bird", (20, 20, 200, 255), (200, 200, 16, 16))
        paint(doc, doc.rootNode(), "Paint Layer 3", (20, 200, 20, 255), (4, 4, 8, 8))
        settle(doc)
        set_prompt(doc, "a red sign, a cat and a ball on green ground")
        panel = dock.CollagePanel(fakekrita.Host(doc))
        panel.refresh()
        marks = {row.info.name: row.mark.text() for row in panel.rows.values() if row.reason}
        assert_eq(
            marks,
            {
                "empty": "left out: empty",
                "off canvas bird": "left out: no pixel on the canvas",
                "ghost": "left out: hidden by group 'hidden group'",
                "Paint Layer 3": "left out: not described",
            },
            "marks",
        )
        rows = {row.info.name: row for row in panel.rows.values()}
        assert_eq(
            (rows["empty"].enabled.isChecked(), rows["empty"].enabled.isEnabled()),
            (False, False),
            "a marked layer: unticked, greyed",
        )
        assert_eq(rows["cat"].enabled.isChecked(), True, "an unmarked layer")
        # The request leaves out exactly those (the same rules): one note each, none sent.
        _records, stats = document.read_layers(doc)
        assert_eq(
            sorted(s.split("'")[1] for s in stats.skipped), ["empty", "off canvas bird"], "skipped when read"
        )
        bird.move(-150, -150)  # now on the canvas
        settle(doc)
        rows["Paint Layer 3"].text.setText("a green leaf")
        rows["Paint Layer 3"].text.textEdited.emit("a green leaf")
        panel.refresh()
        marks = {row.info.name: row.reason for row in panel.rows.values() if row.reason}
        assert_eq(sorted(marks), ["empty", "ghost"], "marks after moving the bird and describing the leaf")
        assert_eq(rows["off canvas bird"].enabled.isChecked(), True, "the bird ticked again")
        panel.shutdown()
        panel.deleteLater()
        report["detail"] = f"marked: {marks}"
    finally:
        doc.close()


@check()
def dock_panel_builds(report):
    """The dock's widget with a document: one row per listed layer, settings shown; saved as PNG
    (``dock-offscreen.png`` in the scratch folder) for a look."""
    import fakekrita  # its Host: the dock's host without Krita's window
    from collage_diffusion import dock, document, qt

    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball on green ground", cat="a ginger cat")
        panel = dock.CollagePanel(fakekrita.Host(doc))
        panel.resize(360, 1100)
        panel.refresh()
        names = [row.info.name for row in panel.rows.values()]
        # Every visible layer is listed, the empty one too (it may be painted on next), and the
        # one only its hidden group hides (marked, see layer_list_marks_left_out_layers).
        assert_eq(sorted(names), sorted([e[0] for e in EXPECTED] + ["empty", "ghost"]), "rows")
        cat = next(r for r in panel.rows.values() if r.info.name == "cat")
        assert_eq(cat.text.text(), "a ginger cat", "cat's text field")
        assert_eq(panel.prompt.toPlainText(), "a red sign, a cat and a ball on green ground", "prompt field")
        cat.enabled.setChecked(False)  # an edit in the dock reaches the document
        panel.save_settings()
        uid = next(u for u, r in panel.rows.items() if r.info.name == "cat")
        assert_eq(document.load_settings(doc).layers[uid].enabled, False, "stored after an edit")
        panel.show()
        qt.spin(lambda: False, 100)
        panel.grab().save(str(scratch() / "dock-offscreen.png"))
        panel.shutdown()
        panel.hide()
        panel.deleteLater()
        report["detail"] = f"{len(names)} rows"
    finally:
        doc.close()


# -- running ---------------------------------------------------------------------------------------------


def _without_bridge(report):
    raise Skip("no COLLAGE_TEST_BRIDGE")


def run_all() -> dict:
    only = {s for s in os.environ.get("COLLAGE_TEST_ONLY", "").split(",") if s}
    bridge = os.environ.get("COLLAGE_TEST_BRIDGE")
    krita().setBatchmode(True)
    checks = {}
    for name, fn, needs_bridge in CHECKS:
        if only and name not in only:
            continue
        entry = run_check(fn if bridge or not needs_bridge else _without_bridge)
        checks[name] = entry
        print(
            f"[krita_suite] {name}: {'ok' if entry['ok'] else entry['skipped'] or 'FAILED'} ({entry['seconds']} s)"
        )
        if not entry["ok"] and not entry["skipped"]:
            print(entry["detail"])
        sys.stdout.flush()
    from collage_diffusion import qt

    return {"checks": checks, "krita": krita().version(), "qt": qt.QT_BINDING}


def __main__(args):  # kritarunner's entry point
    report_path = os.environ.get("COLLAGE_TEST_REPORT")
    try:
        report = run_all()
    except Exception:
        report = {"checks": {}, "error": traceback.format_exc()}
        print(report["error"])
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2), encoding="utf-8")
