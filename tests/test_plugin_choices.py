"""The dock's model and LoRA choice without Qt: saved with the document's settings, the picker's and
the LoRA list's entries from /info (krita_plugin/collage_diffusion/choices.py), and what reaches
the request. The widgets are checked in tests/krita/qt_smoke.py, real Krita in krita_suite.py."""

from __future__ import annotations

import json

import pytest

from krita_plugin.collage_diffusion import choices, collage, wire
from krita_plugin.collage_diffusion.collage import LayerRecord, build_request, generation_size
from krita_plugin.collage_diffusion.settings import DocumentSettings, LayerSettings, LoraChoice

SD1 = ("sd1", "Stable Diffusion 1.x")
XL = ("sdxl", "Stable Diffusion XL")


def entry(name: str, kind: str, family=("", ""), error: str = "") -> dict:
    return wire.LibraryEntry(name, kind, family[0], family[1], 1000, error).to_dict()


def details(name: str, family, native: int) -> dict:
    return wire.ModelDetails(name, family[0], family[1], native, 64 if family == XL else 8).to_dict()


def info(**changes) -> wire.InfoResponse:
    """A bridge on the demo model with model folders: an SDXL and an SD 1.x checkpoint, a damaged
    one, LoRAs of both families, one of no known family and one it cannot use."""
    data = {
        "api_version": wire.API_VERSION,
        "version": "test",
        "model": "demo",
        "models": ["demo", "tiny-xl", "sd15/photo.safetensors"],
        "model_loaded": True,
        "device": "cpu",
        "dtype": "float32",
        "queue_length": 0,
        "running": None,
        "versions": {},
        "limits": {},
        "model_details": [
            details("demo", SD1, 64),
            details("tiny-xl", XL, 256),
            details("sd15/photo.safetensors", SD1, 512),
        ],
        "checkpoints": [
            entry("tiny-xl", "checkpoint", XL),
            entry("sd15/photo.safetensors", "checkpoint", SD1),
            entry("broken.safetensors", "checkpoint", error="the file is shorter than its header says"),
        ],
        "loras": [
            entry("ink.safetensors", "lora"),
            entry("xl/detail.safetensors", "lora", XL),
            entry("sd1-style.safetensors", "lora", SD1),
            entry("half.safetensors", "lora", SD1, error="damaged"),
        ],
    }
    return wire.InfoResponse.from_dict(json.loads(json.dumps(data | changes)))


# -- saved with the document ------------------------------------------------------------------------------


def test_model_and_loras_survive_the_documents_json():
    s = DocumentSettings(prompt="p", model="tiny-xl")
    s.loras = [LoraChoice("xl/detail.safetensors", 0.65), LoraChoice("ink.safetensors", -1.5)]
    data = json.loads(s.to_json())
    assert data["model"] == "tiny-xl"
    assert data["loras"] == [
        {"name": "xl/detail.safetensors", "weight": 0.65},
        {"name": "ink.safetensors", "weight": -1.5},
    ]
    assert DocumentSettings.from_json(s.to_json()) == s


def test_documents_saved_before_the_choice_keep_working():
    old = json.dumps({"version": 1, "prompt": "a cat", "seed": 7, "layers": {}})
    s = DocumentSettings.from_json(old)
    assert (s.prompt, s.seed, s.model, s.loras) == ("a cat", 7, "", [])
    model, loras, problems = choices.request_choices(s, info())
    assert (model, loras, problems) == (None, [], [])


def test_saved_loras_are_read_leniently():
    data = {
        "model": 5,  # not a name: the default
        "loras": [
            {"name": "a.safetensors", "weight": 9},  # clamped to the wire's range
            {"name": " b ", "weight": "x"},  # unreadable weight: 1
            {"name": "c", "weight": float("nan")},
            {"name": "", "weight": 1},  # no name: dropped
            {"weight": 1},
            "d",
            {"name": "e", "weight": True},
        ],
    }
    s = DocumentSettings.from_dict(data)
    assert s.model == ""
    assert s.loras == [
        LoraChoice("a.safetensors", 4.0),
        LoraChoice("b", 1.0),
        LoraChoice("c", 1.0),
        LoraChoice("e", 1.0),
    ]
    assert DocumentSettings.from_dict({"loras": {"name": "a"}}).loras == []


def test_an_ora_files_model_is_not_a_bridge_model():
    """`collage generate` writes its --model (a path or hub id) into collage.json: the dock keeps
    the bridge's default rather than a name the bridge cannot know."""
    s = DocumentSettings.from_file_settings({"prompt": "p", "model": "/models/x.safetensors", "loras": [1]})
    assert (s.prompt, s.model, s.loras) == ("p", "", [])


# -- the picker and the LoRA list ----------------------------------------------------------------------------


def test_model_picker_lists_the_default_first_then_the_others_with_their_family():
    options = choices.model_options(info())
    assert [(o.name, o.label, o.family, o.usable) for o in options] == [
        ("", "default (demo) · Stable Diffusion 1.x", "sd1", True),
        ("tiny-xl", "tiny-xl · Stable Diffusion XL", "sdxl", True),
        ("sd15/photo.safetensors", "sd15/photo.safetensors · Stable Diffusion 1.x", "sd1", True),
        ("broken.safetensors", "broken.safetensors (cannot be used)", "", False),
    ]
    assert options[3].tip == "the file is shorter than its header says"
    assert options[1].tip == "native size 256 px"


def test_a_saved_model_the_bridge_does_not_list():
    options = choices.model_options(info(), "gone.safetensors")
    last = options[-1]
    assert (last.name, last.label, last.missing, last.usable) == (
        "gone.safetensors",
        "gone.safetensors (not on this bridge)",
        True,
        False,
    )
    assert not any(o.missing for o in choices.model_options(info(), "tiny-xl"))
    # The default chosen by its own name (a script may save that): shown under that name too.
    assert [o.name for o in choices.model_options(info(), "demo")][:2] == ["", "demo"]
    # Not connected: the default and the saved name, unchecked.
    offline = choices.model_options(None, "tiny-xl")
    assert [(o.name, o.missing) for o in offline] == [("", False), ("tiny-xl", False)]
    assert [o.name for o in choices.model_options(None)] == [""]


def test_loras_offered_follow_the_chosen_models_family():
    sd1 = choices.lora_options(info(), "sd1")
    assert [(o.name, o.fits, o.usable) for o in sd1] == [
        ("ink.safetensors", True, True),  # family not known: offered, the bridge checks it
        ("sd1-style.safetensors", True, True),
        ("half.safetensors", True, False),  # shown, not choosable
    ]
    assert "does not say which model family" in sd1[0].tip
    everything = choices.lora_options(info(), "sd1", all_families=True)
    assert [(o.label, o.fits) for o in everything] == [
        ("ink.safetensors", True),
        ("sd1-style.safetensors", True),
        ("xl/detail.safetensors (for Stable Diffusion XL)", False),
        ("half.safetensors (cannot be used)", True),
    ]
    xl = choices.lora_options(info(), choices.chosen_family(info(), "tiny-xl"), exclude=["ink.safetensors"])
    assert [o.name for o in xl] == ["xl/detail.safetensors"]
    assert choices.lora_options(None, "sd1") == []


def test_marks_of_chosen_loras():
    i = info()
    assert choices.lora_mark(i, "sd1", "sd1-style.safetensors") == ""
    assert choices.lora_mark(i, "sd1", "ink.safetensors") == ""
    assert choices.lora_mark(i, "sd1", "xl/detail.safetensors") == "for Stable Diffusion XL, not this model"
    assert choices.lora_mark(i, "sd1", "gone") == "not on this bridge"
    assert choices.lora_mark(i, "sd1", "half.safetensors") == "cannot be used: damaged"
    assert choices.lora_mark(None, "sd1", "gone") == ""


# -- what is sent ---------------------------------------------------------------------------------------------


def test_request_choices_send_names_and_weights():
    s = DocumentSettings(model="tiny-xl", loras=[LoraChoice("xl/detail.safetensors", 0.5)])
    assert choices.request_choices(s, info()) == (
        "tiny-xl",
        [{"name": "xl/detail.safetensors", "weight": 0.5}],
        [],
    )
    # Not connected: sent as saved; the bridge judges.
    s.model, s.loras = "gone", [LoraChoice("nope", 2.0)]
    assert choices.request_choices(s, None) == ("gone", [{"name": "nope", "weight": 2.0}], [])


@pytest.mark.parametrize(
    "model, loras, expected",
    [
        (
            "gone.safetensors",
            [],
            "The model 'gone.safetensors' chosen for this document is not on this bridge: choose one of its"
            " models in the dock's Model list (it has demo, tiny-xl, sd15/photo.safetensors).",
        ),
        (
            "",
            ["nope.safetensors"],
            "The LoRA 'nope.safetensors' is not on this bridge: remove it from the dock's LoRA list",
        ),
        ("", ["half.safetensors"], "The LoRA 'half.safetensors' cannot be used: damaged"),
        (
            "",
            ["xl/detail.safetensors"],
            "The LoRA 'xl/detail.safetensors' was made for Stable Diffusion XL, but the model demo (the default)"
            " is Stable Diffusion 1.x: remove the LoRA or choose a model of its family.",
        ),
        (
            "tiny-xl",
            ["ink.safetensors", "sd1-style.safetensors"],
            "The LoRA 'sd1-style.safetensors' was made for Stable Diffusion 1.x, but the model tiny-xl is",
        ),
    ],
)
def test_generate_refuses_what_the_bridge_does_not_list(model, loras, expected):
    s = DocumentSettings(model=model, loras=[LoraChoice(name) for name in loras])
    _model, _loras, problems = choices.request_choices(s, info())
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_auto_size_follows_the_chosen_model():
    i = info()
    demo, xl = choices.chosen_details(i, ""), choices.chosen_details(i, "tiny-xl")
    assert (demo.native_size, xl.native_size) == (64, 256)
    assert generation_size(128, 128, "auto", None, demo) == (64, 64)
    assert generation_size(128, 128, "auto", None, xl) == (256, 256)
    assert choices.chosen_details(i, "gone") is None and choices.chosen_details(None, "") is None


def test_the_request_carries_model_and_loras():
    png = wire.encode_png(8, 8, bytes((200, 10, 10, 255)) * 64)
    records = [LayerRecord(uid="{a}", name="cat", kind="paintlayer", doc_box=(0, 0, 8, 8), png=png, x=0, y=0)]
    s = DocumentSettings(prompt="a cat", model="tiny-xl", loras=[LoraChoice("xl/detail.safetensors", 0.75)])
    model, loras, _ = choices.request_choices(s, info())
    plan, problems = build_request(
        records, s, {"{a}": LayerSettings()}, (64, 64), (64, 64), model=model, loras=loras
    )
    assert problems == []
    sent = json.loads(plan.request.to_json())
    assert (sent["model"], sent["loras"]) == ("tiny-xl", [{"name": "xl/detail.safetensors", "weight": 0.75}])
    # More LoRAs than the wire allows: refused before sending, naming the field.
    nine = [{"name": f"l{i}", "weight": 1.0} for i in range(9)]
    plan, problems = collage.build_request(
        records, s, {"{a}": LayerSettings()}, (64, 64), (64, 64), loras=nine
    )
    assert plan is None and problems == ["loras: 9 LoRAs, more than the limit of 8"]


def test_the_ip_adapter_look_is_offered_where_the_bridge_has_one():
    with_sd1 = info(ip_adapter_families=["sd1"])
    # Offered for the demo (SD 1.x) model; not for the SDXL one, saying which family lacks it.
    assert choices.ip_adapter_missing(with_sd1, "") == ""
    assert choices.ip_adapter_missing(with_sd1, "sd15/photo.safetensors") == ""
    assert choices.ip_adapter_missing(with_sd1, "tiny-xl") == (
        "the bridge has no IP-Adapter with its image encoder for Stable Diffusion XL models"
    )
    # A bridge that lists none (an older one has no such field): missing for every family.
    assert "Stable Diffusion 1.x" in choices.ip_adapter_missing(info(), "")
    # Not connected, or a model /info does not describe: the bridge judges the job.
    assert choices.ip_adapter_missing(None, "tiny-xl") == ""
    assert choices.ip_adapter_missing(with_sd1, "gone") == ""


def test_generate_refuses_an_ip_adapter_look_the_bridge_cannot_run():
    png = wire.encode_png(8, 8, bytes((200, 10, 10, 255)) * 64)
    records = [
        LayerRecord(uid=uid, name=name, kind="paintlayer", doc_box=(0, 0, 8, 8), png=png, x=0, y=0)
        for uid, name in (("{a}", "vase"), ("{b}", "cat"))
    ]
    s = DocumentSettings(prompt="a vase and a cat", model="tiny-xl")
    layers = {
        "{a}": LayerSettings(appearance="ip-adapter", appearance_weight=0.8),
        "{b}": LayerSettings(appearance="ip-adapter", appearance_weight=0.0),  # weight 0: off
    }
    missing = choices.ip_adapter_missing(info(ip_adapter_families=["sd1"]), s.model)
    plan, problems = build_request(records, s, layers, (64, 64), (64, 64), ip_adapter_missing=missing)
    assert plan is None and len(problems) == 1, problems
    assert problems[0].startswith(
        "The layer 'vase' has the look 'ip-adapter', but the bridge has no IP-Adapter"
    )
    # Where the bridge has one, the look and its weight reach the request.
    plan, problems = build_request(records, s, layers, (64, 64), (64, 64), ip_adapter_missing="")
    assert problems == []
    sent = json.loads(plan.request.to_json())["layers"]
    assert [(x["appearance"], x["appearance_weight"]) for x in sent] == [
        ("ip-adapter", 0.8),
        ("ip-adapter", 0.0),
    ]
