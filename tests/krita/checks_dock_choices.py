"""In-Krita checks of the dock's choices from the bridge's /info on a bridge with a model folder:
model and LoRAs, the ip-adapter look, clip skip and ControlNet, each sent and run, saved and reopened."""

from __future__ import annotations

import os

from harness import Skip  # beside this module
from suite_common import (
    assert_eq,
    build_document,
    check,
    combo_items,
    decode_bgra,
    generate_in_panel,
    job_on_bridge,
    make_model,
    reopen,
    save_as,
    scratch,
    set_prompt,
)


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
        save_as(doc, path)
    finally:
        doc.close()
    doc = reopen(path)
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
        sent_before = panel.model._plan.request.to_json()
        assert_eq(panel.model._plan.request.controlnet, "random-edges", "ControlNet in the request")
        assert_eq(job_on_bridge(panel.model).state, "done", "the bridge ran the job")
        if with_net == skip2:
            raise AssertionError("the ControlNet chosen in the dock did not change the picture")
        panel.shutdown()
        save_as(doc, path)
    finally:
        doc.close()
    doc = reopen(path)
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
        again = generate_in_panel(panel)
        # The same request after reopening (settings, layers, seed), and so the same picture.
        sent_after = panel.model._plan.request.to_json()
        if sent_after != sent_before:
            import json

            a, b = json.loads(sent_before), json.loads(sent_after)
            diff = {
                k: (str(a.get(k))[:60], str(b.get(k))[:60])
                for k in a
                if k != "layers" and a.get(k) != b.get(k)
            }
            for i, (x, y) in enumerate(zip(a["layers"], b["layers"], strict=False)):
                diff.update(
                    {f"layers[{i}].{k}": (str(x[k])[:40], str(y.get(k))[:40]) for k in x if x[k] != y.get(k)}
                )
            raise AssertionError(f"the request changed after reopening: {diff}")
        assert_eq(again == with_net, True, "the same picture after reopening")
        panel.shutdown()
        report["detail"] = (
            f"clip skip 2 + random-edges, saved in {path.name} and restored, the same picture again"
        )
    finally:
        doc.close()
