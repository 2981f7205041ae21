"""The dock's ControlNet picker and clip skip without Qt: saved with the document's settings (old
documents without them keep working), the picker's entries from /info by the model's family
(krita_plugin/collage_diffusion/choices.py), and what reaches the request. The widgets are checked
in tests/krita/qt_smoke.py, real Krita in tests/krita/checks_generating.py."""

from __future__ import annotations

import json

import pytest

from krita_plugin.collage_diffusion import choices, wire
from krita_plugin.collage_diffusion.collage import LayerRecord, build_request
from krita_plugin.collage_diffusion.settings import DocumentSettings, LayerSettings
from tests.test_plugin_choices import SD1, XL, entry
from tests.test_plugin_choices import info as library_info

CONTROLNETS = [
    entry("canny-sd15.safetensors", "controlnet", SD1),
    entry("xl/canny.safetensors", "controlnet", XL),
    entry("lineart", "controlnet"),  # its files do not tell the family
    entry("torn.safetensors", "controlnet", SD1, error="the file is shorter than its header says"),
]


def info(**changes) -> wire.InfoResponse:
    """tests/test_plugin_choices.py's bridge (demo = SD 1.x, tiny-xl = SDXL) with ControlNets."""
    return library_info(controlnets=CONTROLNETS, **changes)


def layer_record(uid: str = "{a}") -> LayerRecord:
    png = wire.encode_png(8, 8, bytes((200, 10, 10, 255)) * 64)
    return LayerRecord(uid=uid, name="cat", kind="paintlayer", doc_box=(0, 0, 8, 8), png=png, x=0, y=0)


def request_for(settings: DocumentSettings, control_weight: float, bridge: wire.InfoResponse | None):
    """build_request as the dock's Generate calls it: (the request sent as JSON or None, problems)."""
    model, loras, problems = choices.request_choices(settings, bridge)
    assert problems == []
    controlnet, controlnet_problems = choices.controlnet_choice(settings, bridge)
    plan, problems = build_request(
        [layer_record()],
        settings,
        {"{a}": LayerSettings(control_weight=control_weight)},
        (64, 64),
        (64, 64),
        model=model,
        loras=loras,
        controlnet=controlnet,
        controlnet_problems=controlnet_problems,
    )
    return (json.loads(plan.request.to_json()) if plan else None), problems


# -- saved with the document ------------------------------------------------------------------------------


def test_clip_skip_and_controlnet_survive_the_documents_json():
    s = DocumentSettings(prompt="p", model="tiny-xl", clip_skip=2, controlnet="xl/canny.safetensors")
    data = json.loads(s.to_json())
    assert (data["clip_skip"], data["controlnet"]) == (2, "xl/canny.safetensors")
    assert DocumentSettings.from_json(s.to_json()) == s
    auto = DocumentSettings(prompt="p")
    assert (json.loads(auto.to_json())["clip_skip"], json.loads(auto.to_json())["controlnet"]) == (None, "")
    assert DocumentSettings.from_json(auto.to_json()) == auto


def test_documents_saved_before_the_settings_keep_working():
    old = json.dumps({"version": 1, "prompt": "a cat", "model": "tiny-xl", "layers": {}})
    s = DocumentSettings.from_json(old)
    assert (s.prompt, s.model, s.clip_skip, s.controlnet) == ("a cat", "tiny-xl", None, "")
    assert choices.controlnet_choice(s, info()) == (None, [])


@pytest.mark.parametrize(
    "saved, expected",
    [
        (2, 2),
        (12, 12),
        (2.7, 2),  # a whole number
        (0, 1),  # clamped to 1..12
        (40, 12),
        (None, None),
        (True, None),  # not a number: the model's default
        ("2", None),
        (float("nan"), None),
    ],
)
def test_saved_clip_skip_is_read_leniently(saved, expected):
    assert DocumentSettings.from_dict({"clip_skip": saved}).clip_skip == expected


def test_saved_controlnet_is_read_leniently():
    assert DocumentSettings.from_dict({"controlnet": " lineart "}).controlnet == "lineart"
    assert DocumentSettings.from_dict({"controlnet": 3}).controlnet == ""
    assert DocumentSettings.from_dict({"controlnet": None}).controlnet == ""


def test_an_ora_files_clip_skip_comes_with_it_but_no_controlnet():
    """`collage generate --clip-skip 2` writes "clip_skip" into collage.json: the dock shows it.
    A collage.json "controlnet" (not in its schema) would not be a bridge's name: not taken."""
    s = DocumentSettings.from_file_settings({"prompt": "p", "clip_skip": 2, "controlnet": "/x/cn"})
    assert (s.prompt, s.clip_skip, s.controlnet) == ("p", 2, "")
    assert DocumentSettings.from_file_settings({"clip_skip": None}).clip_skip is None


# -- the picker ---------------------------------------------------------------------------------------------


def test_controlnet_picker_follows_the_models_family():
    sd1 = choices.controlnet_options(info(), "sd1")
    assert [(o.name, o.label, o.usable, o.missing) for o in sd1] == [
        ("", "bridge default", True, False),
        ("canny-sd15.safetensors", "canny-sd15.safetensors · Stable Diffusion 1.x", True, False),
        ("lineart", "lineart", True, False),  # family not known: offered, the job checks it
        ("torn.safetensors", "torn.safetensors (cannot be used)", False, False),
    ]
    assert "does not say" not in sd1[1].tip and "do not say which model family" in sd1[2].tip
    assert sd1[3].tip == "the file is shorter than its header says"
    xl = choices.controlnet_options(info(), choices.chosen_family(info(), "tiny-xl"))
    assert [o.name for o in xl] == ["", "xl/canny.safetensors", "lineart"]
    # Model of unknown family: everything usable is offered.
    assert [o.name for o in choices.controlnet_options(info(), "")][:4] == [
        "",
        "canny-sd15.safetensors",
        "xl/canny.safetensors",
        "lineart",
    ]


def test_a_saved_controlnet_the_bridge_lacks_or_that_does_not_fit():
    gone = choices.controlnet_options(info(), "sd1", "gone.safetensors")[-1]
    assert (gone.name, gone.label, gone.missing) == (
        "gone.safetensors",
        "gone.safetensors (not on this bridge)",
        True,
    )
    misfit = choices.controlnet_options(info(), "sdxl", "canny-sd15.safetensors")
    assert [o.name for o in misfit].count("canny-sd15.safetensors") == 1
    assert (misfit[-1].label, misfit[-1].missing) == (
        "canny-sd15.safetensors (for Stable Diffusion 1.x, not this model)",
        True,
    )
    torn = choices.controlnet_options(info(), "sd1", "torn.safetensors")
    assert [o.label for o in torn if o.name == "torn.safetensors"] == [
        "torn.safetensors (cannot be used: the file is shorter than its header says)"
    ]
    assert not any(o.missing for o in choices.controlnet_options(info(), "sd1", "lineart"))
    # Not connected: the default and the saved name, unchecked.
    offline = choices.controlnet_options(None, "sd1", "gone.safetensors")
    assert [(o.name, o.missing) for o in offline] == [("", False), ("gone.safetensors", False)]


# -- what is sent ---------------------------------------------------------------------------------------------


def test_the_request_carries_clip_skip_and_the_controlnet():
    s = DocumentSettings(prompt="a cat", model="tiny-xl", clip_skip=2, controlnet="xl/canny.safetensors")
    sent, problems = request_for(s, 0.8, info())
    assert problems == []
    assert (sent["clip_skip"], sent["controlnet"], sent["model"]) == (2, "xl/canny.safetensors", "tiny-xl")
    sent, _ = request_for(DocumentSettings(prompt="a cat"), 0.8, info())
    assert (sent["clip_skip"], sent["controlnet"]) == (None, None)  # auto, the bridge's own
    # No layer uses structure: no ControlNet runs, none is sent (the clip skip is).
    sent, _ = request_for(s, 0.0, info())
    assert (sent["clip_skip"], sent["controlnet"]) == (2, None)
    # Not connected: sent as saved; the bridge judges.
    s.controlnet = "gone"
    sent, _ = request_for(s, 0.8, None)
    assert sent["controlnet"] == "gone"


@pytest.mark.parametrize(
    "model, controlnet, expected",
    [
        (
            "",
            "gone.safetensors",
            "The ControlNet 'gone.safetensors' chosen for this document is not on this bridge: choose"
            " another in the dock's ControlNet list, or 'bridge default' (it has canny-sd15.safetensors,"
            " xl/canny.safetensors, lineart).",
        ),
        (
            "tiny-xl",
            "canny-sd15.safetensors",
            "The ControlNet 'canny-sd15.safetensors' was made for Stable Diffusion 1.x, but the model"
            " tiny-xl is Stable Diffusion XL: choose a ControlNet of its family in the dock's ControlNet"
            " list, or 'bridge default'.",
        ),
        (
            "",
            "xl/canny.safetensors",
            "The ControlNet 'xl/canny.safetensors' was made for Stable Diffusion XL, but the model demo"
            " (the default) is Stable Diffusion 1.x",
        ),
        (
            "",
            "torn.safetensors",
            "The ControlNet 'torn.safetensors' cannot be used: the file is shorter than its header says:"
            " choose another",
        ),
    ],
)
def test_generate_refuses_a_controlnet_it_cannot_send(model, controlnet, expected):
    s = DocumentSettings(prompt="a cat", model=model, controlnet=controlnet)
    sent, problems = request_for(s, 0.5, info())
    assert sent is None and len(problems) == 1 and problems[0].startswith(expected), problems
    # Without structure the ControlNet is not used: nothing to refuse, nothing sent.
    sent, problems = request_for(s, 0.0, info())
    assert problems == [] and sent["controlnet"] is None


def test_a_clip_skip_outside_the_wires_range_is_refused_naming_the_field():
    sent, problems = request_for(DocumentSettings(prompt="a cat", clip_skip=13), 0.0, info())
    assert sent is None and problems == ["clip_skip: must be a whole number in 1..12, got 13"], problems
