"""The Krita plugin's logic that needs no Krita and no Qt: pixels, settings, messages and the
local-bridge config. Building the request is in test_plugin_request.py, reading a document on
stand-in nodes in test_plugin_reading.py.

These run on the project's Python (no PyQt): the modules must import without Krita or Qt.
"""

from __future__ import annotations

import json
import random
import sys
import zipfile

import pytest

from krita_plugin.collage_diffusion import bridge_process, collage, document, messages, pixels, settings, wire
from krita_plugin.collage_diffusion.settings import DocumentSettings, LayerSettings

# -- pure helpers for the tests ---------------------------------------------------------------------------


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
