"""In-Krita checks of reading a document: layers, the background, settings, marks, the dock panel."""

from __future__ import annotations

from pathlib import Path

from suite_common import (
    EXPECTED,
    assert_eq,
    build_document,
    check,
    decode_bgra,
    fingerprint,
    krita,
    paint,
    reopen,
    save_as,
    scratch,
    set_prompt,
    settle,
    solid,
    user_nodes,
)


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
        save_as(doc, path)
    finally:
        doc.close()
    doc = reopen(path)
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
