"""The wire format: standard library only, JSON round trips, and problems that name their fields."""

import dataclasses
import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.collage import SCHEDULERS, Collage, Layer
from krita_plugin.collage_diffusion import wire

ROOT = Path(__file__).resolve().parents[1]


def png(w, h, color=(255, 0, 0, 255)):
    return wire.encode_png(w, h, bytes(color) * (w * h))


def grey(w, h, value=255):
    return wire.encode_png(w, h, bytes([value]) * (w * h), channels=1)


def request(**overrides):
    fields = dict(
        prompt="a cat on a sofa",
        layers=[wire.LayerSpec("cat", png(16, 16), x=8, y=8), wire.LayerSpec("sofa", png(32, 16), x=0, y=40)],
        width=64,
        height=64,
    )
    fields.update(overrides)
    return wire.JobRequest(**fields)


def test_imports_nothing_but_the_standard_library():
    code = (
        "import sys; from krita_plugin.collage_diffusion import wire; "
        "bad = sorted({'numpy', 'PIL', 'aiohttp', 'torch', 'core', 'PyQt5', 'krita'} & set(sys.modules)); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_request_json_round_trip():
    req = request(seeds=[3, 4], variants=2, model="demo", background=[1, 2, 3])
    text = req.to_json()
    data = json.loads(text)
    assert isinstance(data["layers"][0]["png"], str)  # base64
    back = wire.JobRequest.from_json(text)
    assert back == req
    assert back.validate() == []


def test_defaults_agree_with_core():
    def default(f):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return list(value) if isinstance(value, tuple) else value

    req_fields = {f.name: f for f in dataclasses.fields(wire.JobRequest)}
    for f in dataclasses.fields(Collage):
        if f.name in req_fields and f.default is not dataclasses.MISSING:
            assert default(req_fields[f.name]) == default(f), f.name
    layer_fields = {f.name: f for f in dataclasses.fields(wire.LayerSpec)}
    for f in dataclasses.fields(Layer):
        if f.name in ("image", "offset"):
            continue  # png, x and y on the wire
        assert f.name in layer_fields, f"LayerSpec lacks Layer.{f.name}"
        assert layer_fields[f.name].default == f.default, f.name
    assert wire.SCHEDULERS == SCHEDULERS
    from core.collage import MAX_CLIP_SKIP
    from krita_plugin.collage_diffusion import wire_request

    assert wire_request.MAX_CLIP_SKIP == MAX_CLIP_SKIP


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(width=63), "width: must be a whole number of pixels in 64..8192"),
        (dict(height=32), "height: must be a whole number of pixels in 64..8192"),
        (dict(width=8192, height=8192), "width, height: the canvas 8192×8192"),
        (dict(variants=0), "variants: must be a whole number in 1..16"),
        (dict(variants=2, seeds=[1]), "seeds: gives 1 seeds for 2 variants"),
        (dict(seed=-1), "seed: must be a whole number in 0..2^63-1"),
        (dict(steps=True), "steps: must be a whole number"),
        (dict(strength=1.5), "strength: must be in 0..1"),
        (dict(guidance_scale="7"), "guidance_scale: must be a number"),
        (dict(scheduler="plms"), "scheduler: must be one of"),
        (dict(feather_px=100), "feather_px: must be a whole number in 0..64"),
        (dict(clip_skip=0), "clip_skip: must be a whole number in 1..12, got 0"),
        (dict(clip_skip=13), "clip_skip: must be a whole number in 1..12, got 13"),
        (dict(clip_skip=2.0), "clip_skip: must be a whole number in 1..12, got 2.0"),
        (dict(prompt=None), "prompt: must be text"),
        (dict(prompt="x" * 5000), "prompt: 5000 characters"),
        (dict(background=[0, 0]), "background: must be an RGB colour"),
        (dict(background_png=png(8, 8)), "background_png: is 8×8, must be the canvas size 64×64"),
        (dict(model=""), "model: must be a model name"),
        (dict(api_version=2), "api_version: this bridge speaks API version 1"),
        (dict(layers=[]), "layers: a collage needs at least one layer"),
        (dict(base_image=png(64, 64)), "regenerate_layer or regenerate_mask: missing; base_image needs it"),
        (dict(regenerate_mask=grey(64, 64)), "base_image: missing; regenerate_mask needs it"),
        (
            dict(base_image=png(64, 64), regenerate_layer=0, regenerate_mask=grey(64, 64)),
            "regenerate_layer, regenerate_mask: give one of them",
        ),
        (dict(base_image=png(64, 64), regenerate_mask=grey(32, 64)), "regenerate_mask: is 32×64, must be"),
        (dict(base_image=png(64, 64), regenerate_mask=b"nope"), "regenerate_mask: not a PNG image"),
        (
            dict(base_image=png(64, 64), regenerate_mask=grey(64, 64), regenerate_dilation=-1),
            "regenerate_dilation:",
        ),
        (dict(regenerate_layer=0), "base_image: missing; regenerate_layer needs it"),
        (
            dict(base_image=png(64, 64), regenerate_layer=5),
            "regenerate_layer: must be the index of a layer, 0..1",
        ),
        (dict(base_image=b"nope", regenerate_layer=0), "base_image: not a PNG image"),
        (dict(loras={"name": "x"}), "loras: must be a list"),
        (dict(loras=["x"]), 'loras[0]: must be a {"name", "weight"} object'),
        (dict(loras=[{"name": "x", "strength": 1}]), "loras[0]: unknown field(s) 'strength'"),
        (dict(loras=[{"weight": 1}]), "loras[0].name: must be the name of a LoRA"),
        (dict(loras=[{"name": "a"}, {"name": "b", "weight": 4.5}]), "loras[1].weight: must be in -4..4"),
        (dict(loras=[{"name": "a", "weight": "1"}]), "loras[0].weight: must be a number"),
        (dict(loras=[{"name": "a"}] * 9), "loras: 9 LoRAs, more than the limit of 8"),
    ],
)
def test_validate_names_the_field(change, expected):
    problems = request(**change).validate()
    assert any(p.startswith(expected) for p in problems), problems


def test_a_selection_regenerate_round_trips_as_a_grey_png():
    mask = grey(64, 64)
    r = request(base_image=png(64, 64), regenerate_mask=mask, regenerate_dilation=5)
    assert r.validate() == []
    back = wire.JobRequest.from_json(r.to_json())
    assert back.regenerate_mask == mask and back.regenerate_layer is None and back.regenerate_dilation == 5
    decoded = Image.open(io.BytesIO(mask))
    assert decoded.mode == "L" and decoded.size == (64, 64) and decoded.getpixel((3, 3)) == 255


def test_any_canvas_size_from_64_is_valid():
    """The engine generates at the nearest multiples of 8 and scales back, so the wire takes any size."""
    assert request(width=100, height=75).validate() == []
    assert request(width=97, height=8191).validate() == []


@pytest.mark.parametrize(
    "layer_change, expected",
    [
        (dict(text=" "), "layers[1].text: must not be empty"),
        (dict(png=b"GIF89a...."), "layers[1].png: not a PNG image"),
        (dict(x=1.5), "layers[1].x: must be a whole number"),
        (dict(x=500), "layers[1].x, y: the layer (32×16 at 500,40) lies entirely outside the 64×64 canvas"),
        (dict(opacity=-0.1), "layers[1].opacity: must be in 0..1"),
        (dict(strength=2), "layers[1].strength: must be in 0..1"),
        (dict(attention_weight=11), "layers[1].attention_weight: must be in 0..10"),
        (dict(control_weight=float("nan")), "layers[1].control_weight: must be in 0..2"),
        (dict(appearance=1), 'layers[1].appearance: must be "off", "learned", "reference"'),
        (dict(appearance="ref"), "layers[1].appearance: must be"),
        (
            dict(appearance="ipadapter"),
            'layers[1].appearance: must be "off", "learned", "reference", "ip-adapter"',
        ),
        (dict(appearance_weight=11.0), "layers[1].appearance_weight: must be in 0..10"),
        (dict(visible="yes"), "layers[1].visible: must be true or false"),
        (dict(name=3), "layers[1].name: must be text"),
    ],
)
def test_validate_names_the_layer_field(layer_change, expected):
    req = request()
    req.layers[1] = dataclasses.replace(req.layers[1], **layer_change)
    problems = req.validate()
    assert any(p.startswith(expected) for p in problems), problems


def test_validate_reports_every_problem_at_once():
    req = request(width=32, steps=0)
    req.layers[0] = dataclasses.replace(req.layers[0], strength=3)
    problems = req.validate()
    assert {p.split(":")[0] for p in problems} >= {"width", "steps", "layers[0].strength"}


def test_limits_apply():
    limits = wire.Limits(max_layers=1, max_layer_pixels=100, max_canvas_pixels=64 * 64)
    problems = request().validate(limits)
    assert any(p.startswith("layers: 2 layers, more than this bridge's limit of 1") for p in problems)
    problems = request(layers=[wire.LayerSpec("big", png(16, 16))]).validate(limits)
    assert any(p.startswith("layers[0].png: 16×16 is 256 pixels, more than") for p in problems)
    assert wire.Limits.from_dict(limits.to_dict()) == limits


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"{not json", "body: not valid JSON"),
        (b"[1, 2]", "body: must be a JSON object, got a list"),
        (b"{}", "prompt: missing (required)"),
        (b'{"prompt": "p", "layers": 3}', "layers: must be a list of layers, got a number"),
        (b'{"prompt": "p", "layers": [3]}', "layers[0]: must be an object, got a number"),
        (b'{"prompt": "p", "layers": [{"text": "a"}]}', "layers[0].png: missing (required)"),
        (b'{"prompt": "p", "layers": [{"text": "a", "png": "!!"}]}', "layers[0].png: not valid base64"),
        (
            b'{"prompt": "p", "layers": [{"text": "a", "png": 5}]}',
            "layers[0].png: must be a base64-encoded PNG",
        ),
        (b'{"prompt": "p", "layers": [], "colour": 1}', "colour: unknown field"),
        (
            b'{"prompt": "p", "layers": [{"text": "a", "png": "", "path": "/etc"}]}',
            "layers[0].path: unknown field",
        ),
    ],
)
def test_from_json_rejects_unreadable_requests(body, expected):
    with pytest.raises(wire.WireError) as info:
        wire.JobRequest.from_json(body)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_data_url_prefix_is_accepted():
    data = request().to_dict()
    data["layers"][0]["png"] = "data:image/png;base64," + data["layers"][0]["png"]
    assert wire.JobRequest.from_dict(data).layers[0].png == request().layers[0].png


def test_png_helpers_agree_with_pil():
    rgba = bytes(range(256)) * (12 * 10 * 4 // 256) + bytes(12 * 10 * 4 % 256)
    data = wire.encode_png(12, 10, rgba)
    assert wire.png_size(data) == (12, 10)
    img = Image.open(__import__("io").BytesIO(data))
    assert img.mode == "RGBA" and img.size == (12, 10)
    assert np.asarray(img).tobytes() == rgba
    assert wire.png_size(b"\x89PNG\r\n\x1a\n" + b"\0" * 8) is None
    assert wire.png_size(zlib.compress(b"x")) is None


def test_crop_to_content_finds_the_visible_box():
    w, h = 40, 30
    pixels = bytearray(w * h * 4)
    for y in range(5, 9):
        for x in range(10, 25):
            pixels[(y * w + x) * 4 : (y * w + x) * 4 + 4] = b"\x10\x20\x30\xff"
    pixels[(20 * w + 3) * 4 + 3] = 1  # a single faint pixel
    x, y, cw, ch, cropped = wire.crop_to_content(w, h, bytes(pixels))
    assert (x, y, cw, ch) == (3, 5, 22, 16)
    assert len(cropped) == cw * ch * 4
    assert wire.crop_to_content(w, h, bytes(w * h * 4)) is None
    layer = wire.layer_from_rgba("thing", w, h, bytes(pixels), x=100, y=200, opacity=0.5)
    assert (layer.x, layer.y, wire.png_size(layer.png), layer.opacity) == (103, 205, (22, 16), 0.5)


def test_status_and_event_round_trip():
    status = wire.JobStatus(
        id="a" * 32,
        state=wire.DONE,
        created=1.0,
        model="demo",
        progress=wire.ProgressInfo("sampling", 3, 10),
        results=[wire.ResultInfo(0, 7, 64, 64, "/jobs/x/results/0")],
    )
    assert wire.JobStatus.from_json(status.to_json()) == status
    event = wire.ProgressEvent(
        seq=3, job_id="a" * 32, kind="progress", state="running", time=2.0, preview=b"png"
    )
    assert wire.ProgressEvent.from_json(event.to_json()) == event
    # A newer bridge may send fields this client does not know.
    assert wire.JobStatus.from_dict({**status.to_dict(), "new_field": 1}) == status
    assert wire.route(wire.ROUTE_JOB_RESULT, job_id="ab", index=2) == "/jobs/ab/results/2"


def test_info_round_trip_with_the_model_library():
    lora = wire.LibraryEntry("xl/detail.safetensors", "lora", "sdxl", "Stable Diffusion XL", 1234)
    broken = wire.LibraryEntry("broken.safetensors", "checkpoint", size=10, error="an incomplete download?")
    info = wire.InfoResponse(
        1, "x", "demo", ["demo"], False, "cpu", "float32", 0, None, {}, {}, checkpoints=[broken], loras=[lora]
    )
    data = json.loads(json.dumps(info.to_dict()))
    assert data["loras"][0] == {
        "name": "xl/detail.safetensors",
        "kind": "lora",
        "family": "sdxl",
        "family_label": "Stable Diffusion XL",
        "size": 1234,
        "error": "",
    }
    assert wire.InfoResponse.from_dict(data) == info
    # A bridge without model folders (or from before them) sends none of the library fields;
    # a newer one may add fields to an entry.
    old = {k: v for k, v in data.items() if k not in ("checkpoints", "loras", "embeddings", "controlnets")}
    assert wire.InfoResponse.from_dict(old).loras == []
    data["loras"][0]["hash"] = "abc"
    assert wire.InfoResponse.from_dict(data).loras == [lora]


def test_loras_are_optional_and_round_trip():
    assert request().loras == [] and request().validate() == []
    req = request(loras=[{"name": "styles/ink", "weight": -1.5}, {"name": "paper"}])
    assert req.validate() == []
    assert wire.JobRequest.from_json(req.to_json()).loras == req.loras


def test_clip_skip_reaches_the_collage(tmp_path):
    from bridge_server.config import BridgeConfig
    from bridge_server.convert import to_collage
    from bridge_server.testing import small_request

    config = BridgeConfig(data_dir=tmp_path)
    assert to_collage(small_request(clip_skip=2), config).collage.clip_skip == 2
    assert to_collage(small_request(), config).collage.clip_skip is None  # the model's default
    assert small_request(clip_skip=2).validate() == []


def test_appearance_choices_round_trip_and_reach_the_collage(tmp_path):
    """`appearance` takes "off" / "learned" / "reference" / "ip-adapter" and the older true / false; with
    `appearance_weight` it reaches the engine's layer as sent."""
    from bridge_server.config import BridgeConfig
    from bridge_server.convert import to_collage
    from core.collage import appearance_mode

    config = BridgeConfig(data_dir=tmp_path)
    for value, mode in (
        (True, "learned"),
        (False, "off"),
        ("learned", "learned"),
        ("reference", "reference"),
        ("ip-adapter", "ip-adapter"),
    ):
        req = request()
        req.layers[0] = dataclasses.replace(req.layers[0], appearance=value, appearance_weight=2.5)
        back = wire.JobRequest.from_json(req.to_json())
        assert back == req and back.validate() == []
        layer = to_collage(back, config).collage.layers[0]
        assert appearance_mode(layer.appearance) == mode and layer.appearance_weight == 2.5
