"""A request chooses its ControlNet by name among the model folders' (`JobRequest.controlnet`):
resolved on the bridge (no path crosses the wire), 422 naming `controlnet` for an unknown name or
one of another family than the job's model, null the bridge's own as before; and the CLI's
--controlnet takes a name in --models-dir too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bridge_server import testing as T
from bridge_server.app import create_app
from bridge_server.config import BridgeConfig
from krita_plugin.collage_diffusion import wire
from tests.library_files import place


def controlled_request(**overrides) -> wire.JobRequest:
    """`small_request` whose layers both ask for the ControlNet."""
    layers = [
        T.solid_layer("salmon sushi", 24, 16, (250, 120, 90, 255), x=8, y=8, control_weight=1.5),
        T.solid_layer("ginger", 16, 16, (240, 200, 200, 255), x=36, y=36, control_weight=1.5),
    ]
    return T.small_request(layers=layers, steps=3, **overrides)


def other_demo_controlnet(folder: Path) -> Path:
    """A ControlNet for the demo model other than its own: random, from its U-Net."""
    from core.models import load_pipeline
    from core.random_models import build_random_controlnet

    net = build_random_controlnet(load_pipeline("demo").pipeline.unet, seed=11, zero_conv_scale=0.5)
    net.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def models_dir(library_files, demo_model_dir, tmp_path) -> Path:
    from core.demo_model import ensure_demo_controlnet

    root = place(library_files, tmp_path / "models", {"controlnet/xl-canny": "cn-xl-dir"})
    (root / "controlnet" / "demo-edges").symlink_to(ensure_demo_controlnet(), target_is_directory=True)
    other_demo_controlnet(root / "controlnet" / "random-edges")
    return root


async def _done(client, request) -> wire.JobStatus:
    r = await T.submit(client, request)
    assert r.status == 202, await r.text()
    return await T.wait_done(client, (await r.json())["id"])


async def _png(client, request) -> bytes:
    done = await _done(client, request)
    assert done.state == wire.DONE, (done.error, done.problems)
    return await (await client.get(done.results[0].url)).read()


async def _problems(client, request) -> list[str]:
    r = await T.submit(client, request)
    assert r.status == 422, await r.text()
    return (await r.json())["problems"]


@pytest.mark.asyncio
async def test_a_request_chooses_its_controlnet_by_name(aiohttp_client, models_dir, tiny_sdxl_dir, tmp_path):
    config = BridgeConfig(
        data_dir=tmp_path / "bridge",
        preview_interval=0.0,
        models_dirs=(models_dir,),
        allowed_models=(str(tiny_sdxl_dir),),
    )
    client = await aiohttp_client(create_app(config))
    info = wire.InfoResponse.from_dict(await (await client.get(wire.ROUTE_INFO)).json())
    assert {e.name for e in info.controlnets} == {"demo-edges", "random-edges", "xl-canny"}

    # Names only, of the model folders' ControlNets, of the job's model family.
    assert await _problems(client, controlled_request(controlnet="nope")) == [
        "controlnet: 'nope' is not a ControlNet of this bridge's model folders (see /info's controlnets)"
    ]
    path = str(models_dir / "controlnet" / "random-edges")
    assert (await _problems(client, controlled_request(controlnet=path)))[0].startswith(
        f"controlnet: {path!r} is not a ControlNet of this bridge's model folders"
    )
    assert await _problems(client, controlled_request(controlnet="xl-canny")) == [
        "controlnet: ControlNet 'xl-canny' was made for Stable Diffusion XL, not for the model of this"
        " job (sd1)"
    ]
    for bad in ("", 3):
        problems = await _problems(client, controlled_request(controlnet=bad))
        assert problems == [
            f"controlnet: must be the name of a ControlNet listed in /info or null, got {bad!r}"
        ]

    # null: the bridge's own (the demo model's); its library copy by name gives the same bytes;
    # another ControlNet gives another image; null afterwards is the bridge's own again.
    default = await _png(client, controlled_request())
    assert await _png(client, controlled_request(controlnet="demo-edges")) == default
    other = await _png(client, controlled_request(controlnet="random-edges"))
    assert other != default
    assert await _png(client, controlled_request(controlnet=None)) == default

    # On the tiny SDXL, which has no ControlNet of the bridge: the library's SDXL one steers it.
    xl = str(tiny_sdxl_dir)
    plain = await _done(client, controlled_request(model=xl))
    assert any("no ControlNet is loaded" in w for w in plain.warnings)
    steered = await _done(client, controlled_request(model=xl, controlnet="xl-canny"))
    assert steered.state == wire.DONE and steered.warnings == [], (steered.error, steered.warnings)
    a = await (await client.get(plain.results[0].url)).read()
    assert await (await client.get(steered.results[0].url)).read() != a

    # A ControlNet whose family its files do not tell, which does not fit the model: the job
    # fails naming `controlnet` and the ControlNet by its name, not by its path on the server.
    failed = await _done(client, controlled_request(model=xl, controlnet="demo-edges"))
    assert failed.state == wire.FAILED
    assert failed.problems[0].startswith("controlnet: ControlNet 'demo-edges' cannot be used with model")
    assert str(models_dir) not in " ".join(failed.problems)


def test_wire_controlnet_field_round_trips():
    request = T.small_request(controlnet="xl/canny.safetensors")
    again = wire.JobRequest.from_json(request.to_json())
    assert again.controlnet == "xl/canny.safetensors" and again.validate() == []
    assert wire.JobRequest.from_json(T.small_request().to_json()).controlnet is None


def controlled_folder(folder: Path) -> Path:
    """A 64×64 collage folder (collage.toml and two PNGs) whose layers ask for the ControlNet."""
    from PIL import Image

    folder.mkdir()
    for name, color in [("red", (220, 30, 30, 255)), ("blue", (30, 30, 220, 255))]:
        Image.new("RGBA", (24, 24), color).save(folder / f"{name}.png")
    (folder / "collage.toml").write_text(
        'prompt = "a red ball and a blue box"\nwidth = 64\nheight = 64\nsteps = 3\nstrength = 1.0\n'
        '[[layers]]\nfile = "red.png"\ntext = "a red ball"\nx = 4\ny = 4\ncontrol_weight = 1.5\n'
        '[[layers]]\nfile = "blue.png"\ntext = "a blue box"\nx = 30\ny = 28\ncontrol_weight = 1.5\n'
    )
    return folder


def test_cli_controlnet_by_name_in_models_dir(models_dir, tmp_path, capsys):
    from PIL import Image

    from core.cli import main

    doc = controlled_folder(tmp_path / "scene")

    def run(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        args = ["generate", str(doc), "-o", str(out), "--models-dir", str(models_dir), *extra]
        assert main(args) == 0, capsys.readouterr().err
        return np.asarray(Image.open(out))

    default = run("default")  # the demo model's own ControlNet
    by_name = run("name", "--controlnet", "random-edges")
    by_path = run("path", "--controlnet", str(models_dir / "controlnet" / "random-edges"))
    assert np.array_equal(by_name, by_path) and not np.array_equal(by_name, default)
    args = ["generate", str(doc), "-o", str(tmp_path / "x.png"), "--models-dir", str(models_dir)]
    assert main([*args, "--controlnet", "xl-canny"]) == 2
    err = capsys.readouterr().err
    assert f"ControlNet '{models_dir / 'controlnet' / 'xl-canny'}' cannot be used with model 'demo'" in err
    assert "this ControlNet was made for Stable Diffusion XL" in err
