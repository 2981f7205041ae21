"""The Krita plugin's logic that needs no Krita and no Qt: pixels, settings, building the request,
messages, the local-bridge config, and the document walk on stand-in nodes.

These run on the project's Python (no PyQt): the modules must import without Krita or Qt.
(Past ~500 lines: one short test module per plugin module would repeat the same fixtures; the
sections below follow the plugin's modules.)
"""

from __future__ import annotations

import json
import random
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

from krita_plugin.collage_diffusion import bridge_process, collage, document, messages, pixels, settings, wire
from krita_plugin.collage_diffusion.collage import LayerRecord, build_request, generation_size
from krita_plugin.collage_diffusion.settings import DocumentSettings, LayerSettings

sys.path.insert(0, str(Path(__file__).resolve().parent / "krita"))
import fakekrita  # noqa: E402 - stand-ins for Krita's Document and Node

# -- pure helpers for the tests ---------------------------------------------------------------------------


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(w, h, RGBA) of an 8-bit RGBA PNG written by wire.encode_png (filter 0 rows)."""
    w, h = wire.png_size(data)
    pos, idat = 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = w * 4
    rows = [raw[y * (stride + 1) : (y + 1) * (stride + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, b"".join(r[1:] for r in rows)


def image(w: int, h: int, boxes: list[tuple[int, int, int, int, tuple[int, int, int, int]]]) -> bytes:
    """A w×h 4-byte-per-pixel image, transparent but for the given (x, y, bw, bh, pixel) boxes."""
    data = bytearray(w * h * 4)
    for x, y, bw, bh, px in boxes:
        for row in range(y, y + bh):
            data[(row * w + x) * 4 : (row * w + x + bw) * 4] = bytes(px) * bw
    return bytes(data)


# -- pixels -----------------------------------------------------------------------------------------------------


def test_bgra_rgba_swap_both_ways():
    bgra = bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert pixels.bgra_to_rgba(bgra) == bytes([3, 2, 1, 4, 7, 6, 5, 8])
    assert pixels.rgba_to_bgra(pixels.bgra_to_rgba(bgra)) == bgra


@pytest.mark.parametrize(
    "boxes, expected",
    [
        ([], None),
        ([(0, 0, 1, 1, (9, 9, 9, 1))], (0, 0, 1, 1)),
        ([(15, 11, 1, 1, (0, 0, 0, 255))], (15, 11, 1, 1)),
        ([(3, 2, 4, 5, (1, 1, 1, 255)), (10, 9, 2, 1, (1, 1, 1, 7))], (3, 2, 9, 8)),
        ([(0, 0, 16, 12, (0, 0, 0, 255))], (0, 0, 16, 12)),
        ([(0, 4, 16, 1, (0, 0, 0, 255)), (5, 8, 1, 1, (0, 0, 0, 3))], (0, 4, 16, 5)),
    ],
)
def test_alpha_box(boxes, expected):
    assert pixels.alpha_box(16, 12, image(16, 12, boxes)) == expected


def test_alpha_box_ignores_colour_of_transparent_pixels_and_agrees_with_wire():
    rng = random.Random(3)
    for _ in range(30):
        w, h = rng.randint(1, 20), rng.randint(1, 20)
        data = bytearray(rng.randbytes(w * h * 4))
        for i in range(3, len(data), 4):
            data[i] = 0 if rng.random() < 0.9 else rng.randint(1, 255)
        assert pixels.alpha_box(w, h, bytes(data)) == wire.content_box(w, h, bytes(data))


def test_alpha_box_rejects_a_wrong_size():
    with pytest.raises(ValueError, match="bytes"):
        pixels.alpha_box(4, 4, bytes(10))


def test_crop_and_boxes():
    data = image(8, 6, [(2, 1, 3, 2, (1, 2, 3, 255))])
    assert pixels.crop(8, data, (2, 1, 3, 2)) == bytes((1, 2, 3, 255)) * 6
    assert pixels.crop(8, data, (0, 1, 8, 1)) == data[8 * 4 : 16 * 4]
    assert pixels.intersect((-10, 10, 20, 20), (0, 0, 128, 128)) == (0, 10, 10, 20)
    assert pixels.intersect((130, 0, 5, 5), (0, 0, 128, 128)) is None
    assert pixels.scale_box((16, 40, 32, 32), 0.5, 0.5) == (8, 20, 16, 16)
    assert pixels.scale_box((3, 3, 1, 1), 0.5, 0.5) == (1, 1, 1, 1)  # never empty
    assert pixels.scale_box((1, 1, 3, 3), 0.5, 0.5) == (0, 0, 2, 2)  # rounded outward
    assert pixels.dilate_box((16, 40, 32, 32), 8, 128, 128) == (8, 32, 48, 48)
    assert pixels.dilate_box((0, 0, 10, 10), 8, 12, 12) == (0, 0, 12, 12)


# -- settings ---------------------------------------------------------------------------------------------------


def test_settings_round_trip():
    s = DocumentSettings(
        prompt="a cat", negative_prompt="blur", seed=2**40, steps=12, size_policy="768", variants=3
    )
    s.layers["{a}"] = LayerSettings(
        name="cat",
        text="a ginger cat",
        strength=0.3,
        attention_weight=2.5,
        appearance="reference",
        appearance_weight=2.5,
    )
    s.layers["{b}"] = LayerSettings(name="ball", appearance="learned")
    s.results_group = "{g}"
    again = DocumentSettings.from_json(s.to_json())
    assert again == s
    assert json.loads(s.to_json())["version"] == settings.VERSION
    assert json.loads(s.to_json())["layers"]["{a}"]["appearance"] == "reference"


def test_settings_appearance_of_older_documents_and_bad_values():
    """Before the modes, `appearance` was a bool: true meant the textual inversion ("learned")."""
    saved = {
        "layers": {
            "{a}": {"name": "cat", "appearance": True},
            "{b}": {"name": "ball", "appearance": False},
            "{c}": {"name": "sign", "appearance": "style-transfer", "appearance_weight": 42},
            "{d}": {"name": "rug", "appearance": 1, "appearance_weight": "heavy"},
            "{e}": {"name": "tree"},
            "{f}": {"name": "vase", "appearance": "ip-adapter", "appearance_weight": 0.5},
        }
    }
    layers = DocumentSettings.from_json(json.dumps(saved)).layers
    assert {uid: (s.appearance, s.appearance_weight) for uid, s in layers.items()} == {
        "{a}": ("learned", 1.0),
        "{b}": ("off", 1.0),
        "{c}": ("off", 10.0),  # an unknown mode is off; the weight clamped to 0..10
        "{d}": ("off", 1.0),
        "{e}": ("off", 1.0),
        "{f}": ("ip-adapter", 0.5),
    }
    from_file = DocumentSettings.from_file_settings({"layers": {"cat": {"appearance": True}}})
    assert from_file.layers["name:cat"].appearance == "learned"


@pytest.mark.parametrize("text", [None, "", b"", "not json", "[1, 2]", "null", b"\xff\xfe"])
def test_unreadable_settings_give_defaults(text):
    assert DocumentSettings.from_json(text) == DocumentSettings()


def test_settings_read_leniently():
    data = {
        "prompt": 3,  # wrong type: default
        "seed": -5,  # clamped
        "steps": 1e9,
        "variants": True,  # a bool is not a count
        "strength": float("nan"),
        "size_policy": "huge",  # unknown: default
        "future_field": {"x": 1},  # ignored
        "layers": {
            "{a}": {"enabled": "yes", "attention_weight": 99, "text": "cat", "control_weight": 1},
            5: {},
        },
    }
    s = DocumentSettings.from_dict(data)
    assert (s.prompt, s.seed, s.steps, s.variants, s.strength, s.size_policy) == (
        "",
        0,
        1000,
        4,
        0.75,
        "auto",
    )
    layer = s.layers["{a}"]
    assert (layer.enabled, layer.attention_weight, layer.text, layer.control_weight) == (
        True,
        10.0,
        "cat",
        1.0,
    )
    assert isinstance(layer.control_weight, float)


def test_settings_from_an_ora_files_collage_json(tmp_path):
    data = {
        "version": 1,
        "prompt": "a red heart on grass",
        "steps": 25,
        "strength": 0.85,
        "model": "demo",  # not a dock setting: ignored
        "layers": {"red heart": {"attention_weight": 1.5}, "star": {"strength": 0.6, "text": "a star"}},
    }
    s = DocumentSettings.from_file_settings(data)
    assert (s.prompt, s.steps, s.strength) == ("a red heart on grass", 25, 0.85)
    resolved = s.resolve([("{1}", "red heart"), ("{2}", "star"), ("{3}", "Layer 3")])
    assert (resolved["{1}"].attention_weight, resolved["{1}"].strength) == (1.5, 0.85)  # the collage's
    assert (resolved["{2}"].strength, resolved["{2}"].text) == (0.6, "a star")
    assert resolved["{3}"] == LayerSettings(name="Layer 3")
    assert DocumentSettings.from_file_settings(None) == DocumentSettings()

    ora = tmp_path / "doc.ora"
    with zipfile.ZipFile(ora, "w") as z:
        z.writestr("collage.json", json.dumps(data))
    assert document.file_settings(str(ora)) == data
    assert document.file_settings(str(tmp_path / "missing.ora")) is None
    assert document.file_settings(str(tmp_path / "doc.kra")) is None
    (tmp_path / "broken.ora").write_bytes(b"not a zip")
    assert document.file_settings(str(tmp_path / "broken.ora")) is None


def test_resolve_by_uid_then_unambiguous_name():
    s = DocumentSettings()
    s.layers = {
        "{cat}": LayerSettings(name="cat", text="a cat"),
        "{old-dog}": LayerSettings(name="dog", text="a dog"),
        "{gone1}": LayerSettings(name="twin", text="one"),
        "{gone2}": LayerSettings(name="twin", text="two"),
        "{old-bird}": LayerSettings(name="bird", text="a bird"),
    }
    nodes = [
        ("{cat}", "cat renamed"),
        ("{new-dog}", "dog"),
        ("{t}", "twin"),
        ("{b1}", "bird"),
        ("{b2}", "bird"),
    ]
    r = s.resolve(nodes)
    assert r["{cat}"].text == "a cat" and r["{cat}"].name == "cat renamed"  # uid wins, name updated
    assert r["{new-dog}"].text == "a dog"  # one orphan entry named "dog"
    assert r["{t}"].text == ""  # two orphans named "twin": ambiguous
    assert r["{b1}"].text == r["{b2}"].text == ""  # two layers named "bird": ambiguous
    assert r["{new-dog}"] is not s.layers["{old-dog}"]  # copied, the orphan stays as it was
    s.update_layers(r)
    assert list(s.layers)[-5:] == ["{cat}", "{new-dog}", "{t}", "{b1}", "{b2}"]
    assert s.layer("{zzz}", "cat").text == ""  # no entry is named "cat" any more (it was renamed)
    s.update_layers({f"{{n{i}}}": LayerSettings() for i in range(10)}, keep=8)
    assert len(s.layers) == 8 and "{n9}" in s.layers


def test_layer_text_defaults_to_a_meaningful_name():
    assert collage.layer_text(LayerSettings(), " cat ") == "cat"
    assert collage.layer_text(LayerSettings(text="  a ginger cat "), "cat") == "a ginger cat"
    for made_up in (
        "",
        "  ",
        "12",
        "Layer 3",
        "Paint Layer 2",
        "Background",
        "Group 1",
        "layer 3 copy 2",
        "Vector Layer",
    ):
        assert collage.is_default_name(made_up), made_up
        assert collage.layer_text(LayerSettings(), made_up) == ""
        assert collage.layer_text(LayerSettings(text="sky"), made_up) == "sky"
    for real in ("a red armchair", "cat 2", "Background trees", "ground"):
        assert not collage.is_default_name(real), real


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


# -- messages ---------------------------------------------------------------------------------------------------


def test_network_errors_in_plain_words():
    text = messages.network_error_text("refused", "http://127.0.0.1:7870", "Connection refused")
    assert text.startswith("Cannot reach the bridge at http://127.0.0.1:7870: nothing is listening there")
    assert "Start local bridge" in text
    assert "did not answer in time" in messages.network_error_text("timeout", "u")
    assert messages.network_error_text("weird", "u", "Boom.") == "Cannot talk to the bridge at u: Boom."


def test_http_errors_in_plain_words():
    body = json.dumps(
        {
            "status": 422,
            "error": "invalid request",
            "problems": ["layers[1].png: has no visible pixels", "steps: bad"],
        }
    )
    text = messages.http_error_text(422, body, "u", ["rug", "cat"])
    assert (
        text == "The bridge cannot run this collage:\n• layer 'cat' png: has no visible pixels\n• steps: bad"
    )
    assert "token" in messages.http_error_text(401, b'{"error": "Authorization: missing"}', "u")
    assert "Its log has the details" in messages.http_error_text(500, b"<html>oops</html>", "u")
    assert "oops" in messages.http_error_text(500, b"<html>oops</html>", "u")
    assert "busy" in messages.http_error_text(503, None)
    assert "too big" in messages.http_error_text(413, b'{"error": "body: larger"}')


def test_job_failed_text():
    status = wire.JobStatus(
        id="x",
        state=wire.FAILED,
        created=0,
        model="demo",
        error="out of memory",
        problems=["layers[0].png: bad"],
    )
    assert (
        messages.job_failed_text(status, ["cat"])
        == "Generation failed: out of memory.\n• layer 'cat' png: bad"
    )
    assert (
        messages.job_failed_text(wire.JobStatus(id="x", state=wire.CANCELLED, created=0, model="m"))
        == "Cancelled."
    )


def test_progress_text():
    def event(**kw):
        return wire.ProgressEvent(
            seq=1, job_id="j", kind=wire.EVENT_PROGRESS, state=wire.RUNNING, time=0, **kw
        )

    assert messages.progress_text(event(phase="sampling", step=12, total=30)) == "sampling 12/30"
    assert messages.progress_text(event(phase="learning appearance of 'cat'", step=3, total=100)) == (
        "learning appearance of 'cat'… 3/100"
    )
    assert messages.progress_text(event(phase="encoding", step=0, total=1)) == "encoding"
    assert messages.progress_text(event(phase="sampling", step=2, total=4, variants=4, variants_done=2)) == (
        "sampling 2/4 · variants 2/4 done"
    )
    state = wire.ProgressEvent(seq=1, job_id="j", kind=wire.EVENT_STATE, state=wire.QUEUED, time=0)
    assert messages.progress_text(state) == "waiting in the bridge's queue…"
    assert messages.progress_fraction(event(phase="sampling", step=15, total=30)) == 0.5
    assert (
        messages.progress_fraction(event(phase="sampling", step=2, total=4, variants=4, variants_done=2))
        == 0.625
    )
    assert messages.progress_fraction(state) == 0.0


# -- the local bridge's recorded environment --------------------------------------------------------------------


def test_bridge_config(tmp_path, monkeypatch):
    missing = tmp_path / "missing.json"
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"python": sys.executable, "project": str(tmp_path), "args": ["--preload"]}))
    assert bridge_process.load_config([missing, broken]) is None
    env = bridge_process.load_config([missing, broken, good])
    assert (env.python, env.model, env.args, env.source) == (sys.executable, "demo", ["--preload"], str(good))
    assert env.problems() == []
    program, args, cwd = bridge_process.bridge_command(env, 7871, "other")
    assert program == sys.executable and cwd == str(tmp_path)
    assert args == [
        "-m",
        "bridge_server",
        "--host",
        "127.0.0.1",
        "--port",
        "7871",
        "--model",
        "other",
        "--preload",
    ]
    assert "does not exist" in bridge_process.BridgeEnv(python=str(missing)).problems()[0]
    monkeypatch.setenv(bridge_process.CONFIG_ENV, str(good))
    assert bridge_process.config_paths()[0] == good
    assert bridge_process.load_config().source == str(good)


# -- reading a document (stand-in Krita nodes; Qt-less encoding) ---------------------------------------------


def stack():
    return fakekrita.sample_stack()


def test_walk_lists_visible_layers_bottom_to_top():
    doc = stack()
    listed = document.list_layers(doc)
    assert [(n.name, n.kind, n.path, n.problem) for n in listed] == [
        ("ground", "paintlayer", (), ""),
        ("cat", "paintlayer", ("animals",), ""),
        ("ball", "paintlayer", (), ""),
        ("ghost", "paintlayer", ("hidden group",), "hidden by group 'hidden group'"),
        ("sign", "vectorlayer", (), ""),
        ("empty", "paintlayer", (), "empty"),
        ("far away", "paintlayer", (), "no pixel on the canvas"),
    ]
    assert [n.name for n in listed if not n.problem.startswith("hidden")] == [
        node.name() for node, _, _ in document.walk(doc)
    ]


def test_layer_marks_say_why_a_layer_will_not_take_part():
    """The marks come from the rules `build_request` applies (collage.take_part)."""
    doc = stack()
    root = doc.rootNode()
    ground, ball, sign = (root.childNodes()[i] for i in (0, 2, 4))
    ground.setName("Background")
    ground.setPixelData(fakekrita.fill(64, 64, (255, 255, 255, 255)), 0, 0, 64, 64)  # covers the canvas
    ball.setOpacity(0)
    sign.setName("Layer 3")  # a made-up name says nothing
    listed = document.list_layers(doc)
    layers = DocumentSettings().resolve([(n.uid, n.name) for n in listed])
    cat = next(n.uid for n in listed if n.name == "cat")
    layers[cat].enabled = False  # ticked off: shown by its tick, not marked
    marks = collage.layer_marks(listed, layers)
    assert {n.name: marks[n.uid] for n in listed if n.uid in marks} == {
        "Background": "the background",
        "ball": "at opacity 0",
        "ghost": "hidden by group 'hidden group'",
        "Layer 3": "not described",
        "empty": "empty",
        "far away": "no pixel on the canvas",
    }
    sign = next(n.uid for n in listed if n.name == "Layer 3")
    layers[sign].text = "a red sign"  # described in the dock: the mark goes
    assert sign not in collage.layer_marks(listed, layers)


def test_read_layers_at_document_scale_without_qt(monkeypatch):
    monkeypatch.setattr(document, "qt", None)  # the pure-Python encoder, whatever is installed
    doc = stack()
    records, stats = document.read_layers(doc)
    assert [(r.name, r.doc_box, (r.x, r.y), round(r.opacity, 3), r.path) for r in records] == [
        ("ground", (0, 48, 64, 16), (0, 48), 1.0, ()),
        ("cat", (8, 8, 16, 16), (8, 8), 0.502, ("animals",)),
        ("ball", (0, 20, 6, 10), (0, 20), 0.2, ()),
        ("sign", (40, 4, 20, 10), (40, 4), 1.0, ()),
    ]
    assert stats.skipped == [
        "layer 'empty' is empty; left out",
        "layer 'far away' has no pixel on the canvas; left out",
    ]
    w, h, rgba = decode_png(records[1].png)
    assert (w, h) == (16, 16) and rgba[:4] == bytes((240, 140, 30, 255))  # BGRA in, RGBA out
    assert records[3].kind == "vectorlayer" and records[3].note == ""
    sign = doc.rootNode().childNodes()[4]
    assert sign.reads == [("projectionPixelData", 40, 4, 20, 10)]
    ball = doc.rootNode().childNodes()[2]
    assert ball.reads == [("pixelData", 0, 20, 6, 10)]  # only the part on the canvas is read
    with pytest.raises(RuntimeError, match="needs Qt"):
        document.read_layers(doc, (32, 32))


def test_settings_in_the_document_annotation():
    doc = stack()
    assert document.load_settings(doc) == DocumentSettings()
    s = DocumentSettings(prompt="a cat")
    assert document.save_settings(doc, s) is True
    assert document.save_settings(doc, s) is False  # unchanged: the document is not touched again
    assert list(doc.annotations) == [settings.ANNOTATION_TYPE]
    assert document.load_settings(doc).prompt == "a cat"


def test_results_group_found_by_uid_or_name():
    doc = stack()
    group = doc.rootNode().childNodes()[-1]
    assert document.find_results_group(doc) is group
    assert document.find_results_group(doc, document.uid_of(group)) is group
    assert (
        document.node_by_uid(doc, document.uid_of(doc.rootNode().childNodes()[1].childNodes()[0])).name()
        == "cat"
    )
    assert document.node_by_uid(doc, "{nope}") is None
