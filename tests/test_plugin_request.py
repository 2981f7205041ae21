"""The Krita plugin builds the bridge request from layer records and settings (no Krita, no Qt)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from krita_plugin.collage_diffusion import collage, document, wire
from krita_plugin.collage_diffusion.collage import LayerRecord, build_request, generation_size
from krita_plugin.collage_diffusion.settings import DocumentSettings, LayerSettings

sys.path.insert(0, str(Path(__file__).resolve().parent / "krita"))
import fakekrita  # noqa: E402 - stand-ins for Krita's Document and Node

# -- building the request ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc, policy, expected",
    [
        ((512, 512), "document", (512, 512)),
        ((1000, 750), "document", (1000, 752)),
        ((30, 20), "document", (64, 64)),
        ((1920, 1080), "1024", (1024, 576)),
        ((1080, 1920), "512", (288, 512)),
        ((4096, 4096), "document", (4096, 4096)),
        ((8000, 6000), "document", (4728, 3544)),
        ((100, 9000), "document", (88, 8192)),
        ((512, 512), "nonsense", (512, 512)),
    ],
)
def test_generation_size(doc, policy, expected):
    w, h = generation_size(*doc, policy)
    assert (w, h) == expected
    assert w % 8 == 0 and h % 8 == 0 and w * h <= wire.Limits().max_canvas_pixels


def test_generation_size_respects_the_bridges_limits():
    assert generation_size(2048, 2048, "document", wire.Limits(max_canvas_pixels=1024 * 1024)) == (1024, 1024)


SDXL = wire.ModelDetails("xl.safetensors", "sdxl", "Stable Diffusion XL", 1024, 64)
SD15 = wire.ModelDetails("sd15.safetensors", "sd1", "Stable Diffusion 1.x", 512, 8)


@pytest.mark.parametrize(
    "doc, model, expected",
    [
        ((512, 512), SDXL, (1024, 1024)),  # far below SDXL's megapixel: up to it
        ((1920, 1080), SDXL, (1344, 768)),  # 16:9 at ~1 MP, multiples of 64
        ((1000, 1000), SDXL, (1000, 1000)),  # already about 1 MP: the document's size
        ((4000, 3000), SD15, (592, 440)),
        ((500, 520), SD15, (496, 520)),
        ((4000, 3000), None, (4000, 3000)),  # model not known (yet): the document's size
        ((4000, 3000), wire.ModelDetails("hub/x", "", "", 0), (4000, 3000)),
    ],
)
def test_auto_generation_size_follows_the_model(doc, model, expected):
    assert generation_size(*doc, "auto", model=model) == expected


def test_auto_is_the_default_and_info_carries_model_details():
    assert DocumentSettings().size_policy == "auto"
    info = wire.InfoResponse.from_dict(
        {
            "api_version": 1,
            "version": "x",
            "model": "sd15.safetensors",
            "models": ["sd15.safetensors"],
            "model_loaded": False,
            "device": "cpu",
            "dtype": "float32",
            "queue_length": 0,
            "running": None,
            "versions": {},
            "limits": {},
            "model_details": [SD15.to_dict(), SDXL.to_dict()],
        }
    )
    assert info.details() == SD15 and info.details("xl.safetensors") == SDXL
    assert info.details("other") is None
    # An older bridge sends no details: the dock falls back to the document's size.
    old = wire.InfoResponse.from_dict({**info.to_dict(), "model_details": None} | {"model_details": []})
    assert old.details() is None


def record(uid, name, box=(8, 8, 16, 16), opacity=1.0, kind="paintlayer"):
    x, y, w, h = box
    png = wire.encode_png(w, h, bytes((200, 10, 10, 255)) * (w * h))
    return LayerRecord(uid=uid, name=name, kind=kind, doc_box=box, png=png, x=x, y=y, opacity=opacity)


def test_build_request_from_records_and_settings():
    s = DocumentSettings(prompt="a cat on a rug", negative_prompt="blur", seed=42, steps=7, strength=0.6)
    records = [
        record("{rug}", "rug", (0, 40, 64, 24)),
        record("{cat}", "cat", opacity=0.5),
        record("{x}", "x"),
    ]
    layers = {
        "{rug}": LayerSettings(strength=0.2),
        "{cat}": LayerSettings(
            text="a ginger cat",
            attention_weight=2.0,
            control_weight=0.5,
            appearance="reference",
            appearance_weight=2.5,
        ),
        "{x}": LayerSettings(enabled=False),
    }
    plan, problems = build_request(records, s, layers, (64, 64), (128, 128))
    assert problems == [] and plan is not None
    r = plan.request
    assert r.validate() == []
    assert (r.prompt, r.negative_prompt, r.seed, r.steps, r.strength, r.width, r.height, r.variants) == (
        "a cat on a rug", "blur", 42, 7, 0.6, 64, 64, 1
    )  # fmt: skip
    assert [(lay.text, lay.name, lay.x, lay.y) for lay in r.layers] == [
        ("rug", "rug", 0, 40),
        ("a ginger cat", "cat", 8, 8),
    ]
    cat = r.layers[1]
    assert (cat.opacity, cat.strength, cat.attention_weight, cat.control_weight) == (0.5, 0.75, 2.0, 0.5)
    assert (cat.appearance, cat.appearance_weight) == ("reference", 2.5)
    assert (r.layers[0].strength, r.layers[0].appearance) == (0.2, "off")
    assert plan.uids == ["{rug}", "{cat}"] and plan.doc_size == (128, 128)
    # the request survives the wire
    again = wire.JobRequest.from_json(r.to_json())
    assert again.layers[1].png == cat.png and again.validate() == []
    assert (again.layers[1].appearance, again.layers[1].appearance_weight) == ("reference", 2.5)


def test_build_request_variants_and_regenerate():
    s = DocumentSettings(prompt="p")
    records = [record("{a}", "a"), record("{b}", "b", (30, 30, 10, 10))]
    plan, _ = build_request(records, s, {}, (64, 64), (64, 64), kind="variants", seed=99, variants=4)
    assert (plan.request.seed, plan.request.variants) == (99, 4)
    base = wire.encode_png(64, 64, bytes(64 * 64 * 3), channels=3)
    plan, problems = build_request(
        records, s, {}, (64, 64), (64, 64), kind="regenerate", base_png=base, regenerate_uid="{b}"
    )
    assert problems == []
    assert (plan.request.regenerate_layer, plan.request.base_image, plan.regenerate_name) == (1, base, "b")
    assert plan.request.validate() == []

    # A selection (its grey mask) instead of a layer: the mask goes, no layer index, whatever is active.
    mask = wire.encode_png(64, 64, bytes([0, 255]) * (32 * 64), channels=1)
    plan, problems = build_request(
        records, s, {}, (64, 64), (64, 64), kind="regenerate", base_png=base, regenerate_mask=mask
    )
    assert problems == []
    r = plan.request
    assert (r.regenerate_layer, r.regenerate_mask, r.base_image, plan.regenerate_name) == (
        None,
        mask,
        base,
        "selection",
    )
    assert r.validate() == [] and plan.regenerate_uid is None
    small = wire.encode_png(32, 32, bytes(32 * 32), channels=1)
    plan, problems = build_request(
        records, s, {}, (64, 64), (64, 64), kind="regenerate", base_png=base, regenerate_mask=small
    )
    assert plan is None and problems == ["regenerate_mask: is 32×32, must be the canvas size 64×64"]


@pytest.mark.parametrize(
    "kwargs, layers, message",
    [
        (dict(kind="regenerate", regenerate_uid="{a}"), {}, "generate an image first"),
        (dict(kind="regenerate", base_png=b"png"), {}, "Select the layer"),
        (dict(kind="regenerate", base_png=b"png", regenerate_uid="{zz}"), {}, "not part of the collage"),
        (
            dict(kind="regenerate", base_png=b"png", regenerate_uid="{a}"),
            {"{a}": LayerSettings(enabled=False)},
            "ticked off",
        ),
        ({}, {"{a}": LayerSettings(enabled=False)}, "No layer to generate from"),
    ],
)
def test_build_request_says_what_is_wrong(kwargs, layers, message):
    plan, problems = build_request(
        [record("{a}", "a")], DocumentSettings(), layers, (64, 64), (64, 64), **kwargs
    )
    assert plan is None and any(message in p for p in problems), problems


def test_build_request_without_layers_and_with_invalid_values():
    plan, problems = build_request([], DocumentSettings(), {}, (64, 64), (64, 64))
    assert plan is None and "no visible layer" in problems[0]
    bad = {"{a}": LayerSettings(attention_weight=50.0)}
    plan, problems = build_request([record("{a}", "cat")], DocumentSettings(), bad, (64, 64), (64, 64))
    assert plan is None and problems == ["layer 'cat'.attention_weight: must be in 0..10, got 50.0"]


def test_background_made_up_names_and_prompt_follow_the_cli_rules():
    bg = record("{bg}", "Background", (0, 0, 64, 64))
    bg.background_rgb = [250, 250, 240]
    unnamed, cat = record("{l2}", "Paint Layer 2"), record("{cat}", "cat")
    plan, problems = build_request([bg, unnamed, cat], DocumentSettings(), {}, (64, 64), (64, 64))
    assert problems == []
    r = plan.request
    assert (
        [lay.name for lay in r.layers] == ["cat"]
        and r.background == [250, 250, 240]
        and r.background_png is None
    )
    assert r.prompt == "cat"  # no prompt: the layers' texts
    assert any("'Background' is the background" in n for n in plan.notes)
    assert any("'Paint Layer 2' is left out" in n for n in plan.notes)
    # A text makes either an object; the background is then white.
    texts = {"{bg}": LayerSettings(text="a wooden table"), "{l2}": LayerSettings(text="a cup")}
    plan, _ = build_request([bg, unnamed, cat], DocumentSettings(prompt="p"), texts, (64, 64), (64, 64))
    assert [lay.text for lay in plan.request.layers] == ["a wooden table", "a cup", "cat"]
    assert plan.request.background == [255, 255, 255] and plan.request.prompt == "p"
    # Only the bottom-most usable layer can be the background.
    plan, _ = build_request([cat, bg], DocumentSettings(), {}, (64, 64), (64, 64))
    assert [lay.name for lay in plan.request.layers] == ["cat"] and plan.request.background == [255, 255, 255]
    # A background of several colours travels as a canvas image.
    picture = record("{pic}", "background", (0, 0, 64, 64))
    picture.background_png = wire.encode_png(64, 64, bytes(64 * 64 * 3), channels=3)
    plan, _ = build_request([picture, cat], DocumentSettings(), {}, (64, 64), (64, 64))
    assert plan.request.background_png == picture.background_png and plan.request.validate() == []
    # Regenerating the background or an undescribed layer says why it cannot.
    for uid, why in (("{bg}", "the background"), ("{l2}", "not described")):
        _, problems = build_request(
            [bg, unnamed, cat],
            DocumentSettings(),
            {},
            (64, 64),
            (64, 64),
            kind="regenerate",
            base_png=b"x",
            regenerate_uid=uid,
        )
        assert problems and f"({why})" in problems[0], problems
    # Nothing described: the reasons come with the error.
    plan, problems = build_request([unnamed], DocumentSettings(), {}, (64, 64), (64, 64))
    assert (
        plan is None
        and "No layer to generate from" in problems[0]
        and "'Paint Layer 2' is left out" in problems[1]
    )


def test_reading_finds_the_background(monkeypatch):
    monkeypatch.setattr(document, "qt", None)
    node = fakekrita.Node
    doc = fakekrita.Doc(
        32,
        32,
        [
            node("Background", box=(0, 0, 32, 32), color=(0, 0, 255, 128), opacity=128),
            node("cat", box=(4, 4, 8, 8)),
        ],
    )
    records, _ = document.read_layers(doc)
    alpha = 128 / 255 * 128 / 255  # the pixels' alpha times the layer's opacity
    faded = round(255 * (1 - alpha))
    assert records[0].background_rgb == [255, faded, faded]  # red over white
    assert records[1].background_rgb is None and records[1].background_png is None
    # Not covering the canvas, or not the bottom layer: an ordinary layer.
    doc = fakekrita.Doc(32, 32, [node("cat", box=(4, 4, 8, 8)), node("Background", box=(0, 0, 32, 32))])
    assert [r.background_rgb for r in document.read_layers(doc)[0]] == [None, None]
    doc = fakekrita.Doc(32, 32, [node("Background", box=(0, 1, 32, 31))])
    assert document.read_layers(doc)[0][0].background_rgb is None


def test_result_layer_name():
    assert collage.result_layer_name("a  cat\non a rug", 5) == "a cat on a rug · seed 5"
    assert collage.result_layer_name("", 1) == "collage · seed 1"
    long = collage.result_layer_name("word " * 40, 7)
    assert long.endswith("… · seed 7") and len(long) < 70
    assert collage.result_layer_name("p", 3, "cat") == "p · regenerated cat · seed 3"
