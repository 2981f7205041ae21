"""In-Krita checks of generating on a bridge: new layers, sizes, SDXL, regenerating, layer stacks
(the dock's model, LoRA, look and ControlNet choices are in checks_dock_choices.py)."""

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
    decode_bgra,
    fingerprint,
    make_model,
    outside_box,
    reopen,
    result_layers,
    save_as,
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
        save_as(doc, path)
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
    doc = reopen(path)
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
