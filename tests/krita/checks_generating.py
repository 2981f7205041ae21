"""In-Krita checks of generating on a bridge: new layers, model and LoRA choices, SDXL, regenerating, layer stacks."""

from __future__ import annotations

import os
import time

from harness import Skip  # beside this module
from suite_common import (
    EXPECTED,
    SIZE,
    assert_eq,
    build_document,
    changed_pixels,
    check,
    combo_items,
    decode_bgra,
    fingerprint,
    generate_in_panel,
    job_on_bridge,
    krita,
    make_model,
    outside_box,
    result_layers,
    scratch,
    set_prompt,
    settle,
    user_nodes,
)


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
def dock_ip_adapter_look_reaches_its_layer(report):
    """A layer's look set to "ip-adapter" in the dock, on a bridge whose model folder has an
    IP-Adapter and image encoder for the demo model (tiny, random): offered, sent, run by the
    bridge, and it changes the picture more inside that layer than elsewhere."""
    import fakekrita
    from collage_diffusion import dock
    from collage_diffusion.dock_widgets import LOOKS

    if not os.environ.get("COLLAGE_TEST_MODELS_DIR"):
        raise Skip("the test bridge has no model folder (COLLAGE_TEST_MODELS_DIR)")
    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball", cat="cat", ball="red ball")
        panel = dock.CollagePanel(fakekrita.Host(doc), make_model())
        panel.refresh()
        cat = next(r for r in panel.rows.values() if r.info.name == "cat")
        item = cat.appearance.model().item(LOOKS.index("ip-adapter"))
        assert_eq((item.isEnabled(), item.text()), (True, "ip-adapter"), "the look offered")
        plain = generate_in_panel(panel)
        cat.appearance.setCurrentIndex(LOOKS.index("ip-adapter"))
        cat.appearance_weight.setValue(2.0)
        with_ip = generate_in_panel(panel)
        sent = {
            layer.name: (layer.appearance, layer.appearance_weight)
            for layer in panel.model._plan.request.layers
        }
        assert_eq(sent["cat"], ("ip-adapter", 2.0), "the look in the request")
        assert_eq(job_on_bridge(panel.model).state, "done", "the bridge ran the job")
        panel.shutdown()
    finally:
        doc.close()
    w, h, a = decode_bgra(plain)
    _, _, b = decode_bgra(with_ip)
    x0, y0, bw, bh = 16, 40, 32, 32  # the cat's box
    inside, outside = [], []
    for y in range(h):
        for x in range(w):
            i = 4 * (y * w + x)
            d = sum(abs(a[i + c] - b[i + c]) for c in range(3)) / 3
            (inside if x0 <= x < x0 + bw and y0 <= y < y0 + bh else outside).append(d)
    mean_in, mean_out = sum(inside) / len(inside), sum(outside) / len(outside)
    if not mean_in > 0:
        raise AssertionError("the ip-adapter look did not change the picture")
    if not mean_in > 2 * mean_out:
        raise AssertionError(
            f"the change is not concentrated on the layer: inside {mean_in:.2f}, outside {mean_out:.2f}"
        )
    report["detail"] = f"mean change inside the cat {mean_in:.1f}, outside {mean_out:.1f} (0..255)"


@check(needs_bridge=True)
def dock_clip_skip_and_controlnet_saved_and_sent(report):
    """The dock's clip skip and ControlNet picker on the demo model (its model folder has its own
    ControlNet as demo-edges and a random one as random-edges): clip skip 2 and the random
    ControlNet go into the job and each changes the picture; saved as .kra and reopened, the
    dock shows both and the job gives the same picture again, byte for byte."""
    import fakekrita
    from collage_diffusion import dock, document

    if not os.environ.get("COLLAGE_TEST_MODELS_DIR"):
        raise Skip("the test bridge has no model folder (COLLAGE_TEST_MODELS_DIR)")
    path = scratch() / "clip-skip-controlnet.kra"
    doc = build_document()
    try:
        set_prompt(doc, "a red sign, a cat and a ball", size_policy="auto", cat="cat", ball="red ball")
        settings = document.load_settings(doc)
        layers = settings.resolve(
            [(n.uid, n.name) for n in document.list_layers(doc, settings.results_group)]
        )
        next(s for s in layers.values() if s.name == "cat").control_weight = 1.0  # the ControlNet counts
        settings.update_layers(layers)
        document.save_settings(doc, settings)
        panel = dock.CollagePanel(fakekrita.Host(doc), make_model())
        panel.refresh()
        m = panel.model_section
        offered = sorted(d for _, d in combo_items(m.controlnet))
        assert_eq(offered, ["", "demo-edges", "random-edges"], "the bridge's ControlNets")
        base = generate_in_panel(panel)
        sent = panel.model._plan.request
        assert_eq((sent.clip_skip, sent.controlnet), (None, None), "auto and the bridge's own sent as null")
        assert_eq(m.choose_clip_skip(2), True, "clip skip 2 chosen")
        skip2 = generate_in_panel(panel)
        assert_eq(panel.model._plan.request.clip_skip, 2, "clip skip in the request")
        if skip2 == base:
            raise AssertionError("clip skip 2 chosen in the dock did not change the picture")
        assert_eq(m.choose_controlnet("random-edges"), True, "random-edges chosen")
        with_net = generate_in_panel(panel)
        assert_eq(panel.model._plan.request.controlnet, "random-edges", "ControlNet in the request")
        assert_eq(job_on_bridge(panel.model).state, "done", "the bridge ran the job")
        if with_net == skip2:
            raise AssertionError("the ControlNet chosen in the dock did not change the picture")
        panel.shutdown()
        if not doc.saveAs(str(path)):
            raise AssertionError(f"saving {path} failed")
    finally:
        doc.close()
    doc = krita().openDocument(str(path))
    try:
        stored = document.load_settings(doc)
        assert_eq(
            (stored.clip_skip, stored.controlnet), (2, "random-edges"), "settings in the reopened document"
        )
        panel = dock.CollagePanel(fakekrita.Host(doc), make_model())
        panel.refresh()
        m = panel.model_section
        assert_eq(
            (m.clip_skip.currentText(), m.controlnet.currentData()),
            ("2", "random-edges"),
            "dock after reopening",
        )
        assert_eq(generate_in_panel(panel) == with_net, True, "the same picture after reopening")
        panel.shutdown()
        report["detail"] = f"clip skip 2 + random-edges, saved in {path.name} and restored"
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
        outside = outside_box(changed, (x0, y0, w, h))
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
        outside = outside_box(changed, (x0, y0, w, h))
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
