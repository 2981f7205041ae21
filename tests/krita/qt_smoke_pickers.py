"""qt_smoke.py's checks of what the dock offers from the bridge's /info (on PyQt5 or PyQt6,
stand-in documents from fakekrita.py): the model section's ControlNet picker and clip skip, and the
layers' "ip-adapter" look. The entries themselves are tested without Qt in
tests/test_plugin_controlnet_clip_skip.py and tests/test_plugin_choices.py."""

from __future__ import annotations

import fakekrita
from suite_common import assert_eq, combo_items

SD1, XL = ("sd1", "Stable Diffusion 1.x"), ("sdxl", "Stable Diffusion XL")


def controlnet_info(**changes):
    """/info of a bridge on the demo model (SD 1.x) that also lists tiny-xl (SDXL), with an SD 1.x,
    an SDXL, a family-less and a damaged ControlNet."""
    from collage_diffusion import wire

    nets = [("canny15", SD1, ""), ("xl/canny", XL, ""), ("lineart", ("", ""), ""), ("torn", SD1, "damaged")]
    return wire.InfoResponse.from_dict(
        {
            "api_version": wire.API_VERSION,
            "version": "test",
            "model": "demo",
            "models": ["demo", "tiny-xl"],
            "model_loaded": True,
            "device": "cpu",
            "dtype": "float32",
            "queue_length": 0,
            "running": None,
            "versions": {},
            "limits": {},
            "model_details": [
                wire.ModelDetails("demo", *SD1, 64).to_dict(),
                wire.ModelDetails("tiny-xl", *XL, 256, 64).to_dict(),
            ],
            "controlnets": [wire.LibraryEntry(n, "controlnet", *f, 0, e).to_dict() for n, f, e in nets],
        }
        | changes
    )


def dock_controlnet_and_clip_skip(report):
    """The ControlNet picker follows the chosen model's family, the clip skip offers auto and
    1..12; both are saved in the document and shown again by a new panel (a reopened document); a
    saved ControlNet that does not fit the model is marked and Generate refuses it in words."""
    from collage_diffusion import dock, document
    from collage_diffusion.model import CollageModel

    doc = fakekrita.sample_stack()
    model = CollageModel("http://127.0.0.1:9")  # never asked: /info is given below
    model._set_info(controlnet_info())
    panel = dock.CollagePanel(fakekrita.Host(doc), model)
    panel.refresh()
    m = panel.model_section
    assert_eq(
        [d for _, d in combo_items(m.controlnet)], ["", "canny15", "lineart", "torn"], "SD 1.x ControlNets"
    )
    assert_eq(m.controlnet.model().item(3).isEnabled(), False, "a damaged one is not choosable")
    assert_eq(m.controlnet.currentText(), "bridge default", "the default")
    assert_eq(combo_items(m.clip_skip)[:3], [("auto (model default)", 0), ("1", 1), ("2", 2)], "clip skips")
    assert_eq((m.clip_skip.count(), m.clip_skip.currentIndex()), (13, 0), "auto .. 12, auto chosen")
    if "above 0" not in m.controlnet.toolTip():
        raise AssertionError(f"the tooltip does not say when it matters: {m.controlnet.toolTip()}")
    assert_eq(m.choose_model("tiny-xl"), True, "tiny-xl chosen")
    assert_eq([d for _, d in combo_items(m.controlnet)], ["", "xl/canny", "lineart"], "SDXL ControlNets")
    assert_eq((m.choose_controlnet("xl/canny"), m.choose_clip_skip(2)), (True, True), "chosen")
    assert_eq(m.choose_controlnet("canny15"), False, "an SD 1.x ControlNet is not offered for SDXL")
    panel.save_settings()
    stored = document.load_settings(doc)
    assert_eq((stored.model, stored.controlnet, stored.clip_skip), ("tiny-xl", "xl/canny", 2), "stored")
    panel.shutdown()

    again = dock.CollagePanel(fakekrita.Host(doc), model)  # the document shown anew
    again.refresh()
    m = again.model_section
    shown = (m.model.currentData(), m.controlnet.currentData(), m.clip_skip.currentText())
    assert_eq(shown, ("tiny-xl", "xl/canny", "2"), "shown again")
    m.choose_model("")  # back to the SD 1.x default: the SDXL ControlNet stays, marked
    assert_eq(m.controlnet.currentText(), "xl/canny (for Stable Diffusion XL, not this model)", "marked")
    assert_eq(m.controlnet.styleSheet() != "", True, "marked in red")
    again.save_settings()
    stored = document.load_settings(doc)
    assert_eq((stored.model, stored.controlnet), ("", "xl/canny"), "the choice is kept")
    listed = document.list_layers(doc, stored.results_group)
    layers = stored.resolve([(n.uid, n.name) for n in listed])
    next(s for s in layers.values() if s.name == "cat").control_weight = 0.5  # a layer uses structure
    stored.update_layers(layers)
    document.save_settings(doc, stored)
    assert_eq(model.generate(doc), False, "generate refused")
    if not model.last_error.startswith("The ControlNet 'xl/canny' was made for Stable Diffusion XL"):
        raise AssertionError(model.last_error)
    assert_eq(again.error.text(), model.last_error, "error shown in the dock")
    again.refresh()  # the layer's new weight shown (the settings changed outside the dock)
    m.choose_controlnet("")
    m.choose_clip_skip(None)
    assert_eq((m.controlnet.styleSheet(), m.clip_skip.currentText()), ("", "auto (model default)"), "reset")
    again.save_settings()
    stored = document.load_settings(doc)
    assert_eq((stored.controlnet, stored.clip_skip), ("", None), "stored as the defaults")
    again.shutdown()
    report["detail"] = "ControlNet by family, clip skip, save, reopen, misfit refused"


def dock_ip_adapter_look(report):
    """The "ip-adapter" look is offered where the bridge has an IP-Adapter for the chosen model's
    family, greyed (and kept, marked) where it has none; Generate then refuses in words."""
    from collage_diffusion import dock, document
    from collage_diffusion.dock_widgets import LOOKS
    from collage_diffusion.model import CollageModel

    doc = fakekrita.sample_stack()
    model = CollageModel("http://127.0.0.1:9")  # never asked: /info is given below
    model._set_info(controlnet_info(ip_adapter_families=["sd1"]))  # an IP-Adapter for SD 1.x only
    panel = dock.CollagePanel(fakekrita.Host(doc), model)
    panel.refresh()
    cat = next(r for r in panel.rows.values() if r.info.name == "cat")
    ip = LOOKS.index("ip-adapter")
    item = cat.appearance.model().item(ip)
    assert_eq((item.isEnabled(), item.text()), (True, "ip-adapter"), "offered on the SD 1.x model")
    cat.appearance.setCurrentIndex(ip)
    assert_eq(cat.appearance_weight.isEnabled(), True, "ip-adapter: weight enabled")
    cat.appearance_weight.setValue(0.6)
    panel.save_settings()
    entry = document.load_settings(doc).layers[cat.info.uid]
    assert_eq((entry.appearance, entry.appearance_weight), ("ip-adapter", 0.6), "look stored")
    panel.model_section.choose_model("tiny-xl")  # no IP-Adapter for SDXL on this bridge
    assert_eq((item.isEnabled(), item.text()), (False, "ip-adapter (not available)"), "greyed for SDXL")
    if "Stable Diffusion XL" not in item.toolTip():
        raise AssertionError(f"the greyed look does not say why: {item.toolTip()!r}")
    assert_eq(cat.appearance.currentIndex(), ip, "the layer keeps its look")
    panel.save_settings()
    assert_eq(
        document.load_settings(doc).layers[cat.info.uid].appearance, "ip-adapter", "kept in the document"
    )
    assert_eq(model.generate(doc), False, "generate refused")
    if not model.last_error.startswith("The layer 'cat' has the look 'ip-adapter', but the bridge has no"):
        raise AssertionError(model.last_error)
    panel.shutdown()

    again = dock.CollagePanel(fakekrita.Host(doc), model)  # the document shown anew, on SDXL
    again.refresh()
    cat = next(r for r in again.rows.values() if r.info.name == "cat")
    item = cat.appearance.model().item(ip)
    assert_eq((cat.appearance.currentIndex(), item.isEnabled()), (ip, False), "reopened: kept, greyed")
    again.model_section.choose_model("")  # back to SD 1.x: offered again
    assert_eq((item.isEnabled(), item.text()), (True, "ip-adapter"), "offered again")
    again.shutdown()
    report["detail"] = "ip-adapter look offered by family, greyed and kept, refused in words"
