"""The bridge with model folders (--models-dir): /info lists them by name, kind and family; a
request names a library checkpoint and the bridge loads it (no path crosses the wire); a file added
while the bridge runs can be named at once. The library itself: test_model_library.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge_server import testing as T
from bridge_server.__main__ import config_from_args, main, parser
from bridge_server.app import create_app
from bridge_server.catalog import ModelCatalog
from bridge_server.config import BridgeConfig
from bridge_server.keys import MANAGER
from core.model_sources import ModelLoadError
from krita_plugin.collage_diffusion import wire
from tests.library_files import A1111, COMFY, place


@pytest.mark.asyncio
async def test_the_bridge_lists_the_model_folders_and_runs_a_library_checkpoint(
    aiohttp_client, library_files, tmp_path
):
    webui = place(library_files, tmp_path / "webui", A1111)
    comfy = place(library_files, tmp_path / "ComfyUI", COMFY)
    config = BridgeConfig(data_dir=tmp_path / "bridge", preview_interval=0.0, models_dirs=(webui, comfy))
    client = await aiohttp_client(create_app(config))
    raw = await (await client.get(wire.ROUTE_INFO)).json()
    assert str(tmp_path) not in json.dumps(raw)  # names only: no path of the server leaves it
    info = wire.InfoResponse.from_dict(raw)
    assert info.model == "demo" and info.models == [
        "demo",
        "demo.safetensors",
        "old/demo.ckpt",
        "sd1/demo.safetensors",
        "sdxl/tiny-xl.safetensors",
        "tiny-sdxl",
        "XL/tiny-xl.safetensors",
    ]
    assert info.details("demo.safetensors") == wire.ModelDetails(
        "demo.safetensors", "sd1", "Stable Diffusion 1.x", 64, 8
    )
    assert info.details("tiny-sdxl") == wire.ModelDetails("tiny-sdxl", "sdxl", "Stable Diffusion XL", 256, 64)
    unusable = {e.name: e.error for e in info.checkpoints if e.error}
    assert unusable.keys() == {"broken.safetensors", "misplaced-lora.safetensors"}
    assert len(info.checkpoints) == len(info.models) - 1 + len(unusable)
    assert [(e.name, e.family) for e in info.loras] == [
        ("sd1-style.safetensors", "sd1"),
        ("sd1.safetensors", "sd1"),
        ("sd2-thing.safetensors", "sd2"),
        ("wrong.safetensors", ""),
        ("xl/detail.safetensors", "sdxl"),
        ("xl/peft.safetensors", "sdxl"),
    ]
    assert info.loras[0] == wire.LibraryEntry(
        "sd1-style.safetensors",
        "lora",
        "sd1",
        "Stable Diffusion 1.x",
        library_files["lora-sd1"].stat().st_size,
    )
    assert {e.name for e in info.embeddings} == {
        "bad-hands.pt",
        "sd1-style.safetensors",
        "sd2-style.pt",
        "xl-negative.safetensors",
        "xl/neg.safetensors",
    }
    assert {(e.name, e.family) for e in info.controlnets} == {
        ("canny-xl.safetensors", "sdxl"),
        ("xl-canny-diffusers", "sdxl"),
        ("xl-canny.safetensors", "sdxl"),
    }

    # A job naming the demo model's single file (with its sidecar config) runs on it.
    r = await T.submit(client, T.small_request(steps=3, model="demo.safetensors"))
    assert r.status == 202, await r.text()
    done = await T.wait_done(client, (await r.json())["id"])
    assert done.state == wire.DONE and done.model == "demo.safetensors", done.error
    assert [(res.width, res.height) for res in done.results] == [(64, 64)]
    engine = client.app[MANAGER].engine
    assert engine.current_ref == "demo.safetensors"
    assert engine.current.identity.startswith(f"file:{webui / 'models/Stable-diffusion/demo.safetensors'}|")

    # Only names of the bridge: not a path (even of a library file), not an unusable entry.
    for name in (
        "nope.safetensors",
        str(webui / "models/Stable-diffusion/demo.safetensors"),
        "misplaced-lora.safetensors",
    ):
        r = await T.submit(client, T.small_request(model=name))
        problems = (await r.json())["problems"]
        assert r.status == 422 and problems[0].startswith(f"model: {name!r} is not a model of this bridge"), (
            problems
        )

    # A checkpoint added while the bridge runs can be named at once, and /info lists it.
    manager = client.app[MANAGER]
    manager.pause()
    place(library_files, webui, {"models/Stable-diffusion/new/xl.safetensors": "xl.safetensors"})
    r = await T.submit(client, T.small_request(model="new/xl.safetensors"))
    assert r.status == 202, await r.text()
    await client.post(wire.route(wire.ROUTE_JOB_CANCEL, job_id=(await r.json())["id"]))
    info = wire.InfoResponse.from_dict(await (await client.get(wire.ROUTE_INFO)).json())
    assert "new/xl.safetensors" in info.models


@pytest.mark.asyncio
async def test_ip_adapter_jobs_need_one_of_the_model_folders(aiohttp_client, library_files, tmp_path):
    """/info says which families have an IP-Adapter; a job asking for one runs with the library's
    (here a tiny one for the demo model's width) and is refused naming the layer without one."""
    ip_layer = T.solid_layer("salmon sushi", 24, 16, (250, 120, 90, 255), x=8, y=8, appearance="ip-adapter")
    request = T.small_request(steps=3, layers=[ip_layer, T.small_request().layers[1]])
    layout = {k: v for k, v in COMFY.items() if "/ipadapter/" in k or "/clip_vision/" in k}
    comfy = place(library_files, tmp_path / "ComfyUI", layout)
    client = await aiohttp_client(create_app(BridgeConfig(data_dir=tmp_path / "b1", models_dirs=(comfy,))))
    info = wire.InfoResponse.from_dict(await (await client.get(wire.ROUTE_INFO)).json())
    # sd2 too: the tiny adapter (for the demo model) is of no family, so every family may use it
    assert info.ip_adapter_families == ["sd1", "sd2", "sdxl"]
    assert "tiny/ipa-demo.bin" in [e.name for e in info.ipadapters]
    assert {e.name for e in info.clip_vision} == {"CLIP-ViT-H-14.safetensors", "tiny-vit"}
    r = await T.submit(client, request)
    assert r.status == 202, await r.text()
    done = await T.wait_done(client, (await r.json())["id"])
    assert done.state == wire.DONE, done.error

    # Only an SDXL adapter: a demo (SD 1.x) job asking for one is refused, naming the layer.
    sdxl_only = place(library_files, tmp_path / "xl", {"models/ipadapter/xl.safetensors": "ipa-sdxl"})
    client = await aiohttp_client(
        create_app(BridgeConfig(data_dir=tmp_path / "b2", models_dirs=(sdxl_only,)))
    )
    info = wire.InfoResponse.from_dict(await (await client.get(wire.ROUTE_INFO)).json())
    assert info.ip_adapter_families == []  # no image encoder
    r = await T.submit(client, request)
    problems = (await r.json())["problems"]
    assert r.status == 422 and problems[0].startswith(
        'layers[0].appearance: "ip-adapter" needs an IP-Adapter for Stable Diffusion 1.x'
    ), problems
    # Weight 0 asks for nothing.
    ip_layer.appearance_weight = 0.0
    r = await T.submit(client, T.small_request(steps=2, layers=[ip_layer]))
    assert r.status == 202, await r.text()


def test_the_bridge_command_line_takes_models_dirs(tmp_path, capsys):

    (tmp_path / "a").mkdir()
    config = config_from_args(
        parser().parse_args(["--models-dir", str(tmp_path / "a"), "--models-dir", "~/b"])
    )
    assert config.models_dirs == (tmp_path / "a", Path.home() / "b")
    assert main(["--models-dir", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "data")]) == 2
    assert f"--models-dir {tmp_path / 'missing'}: not a folder" in capsys.readouterr().err


def test_the_default_model_may_be_a_library_name(library_files, tmp_path):

    webui = place(library_files, tmp_path / "webui", A1111)
    folder = webui / "models/Stable-diffusion"
    config = BridgeConfig(
        data_dir=tmp_path / "data",
        model="demo.safetensors",
        allowed_models=("owner/hub",),
        models_dirs=(webui,),
    )
    catalog = ModelCatalog(config)
    assert catalog.names() == ["demo.safetensors", "owner/hub", "XL/tiny-xl.safetensors"]
    assert catalog.resolve("demo.safetensors") == (
        str(folder / "demo.safetensors"),
        str(folder / "demo.config"),
    )
    assert catalog.resolve("XL/tiny-xl.safetensors") == (str(folder / "XL/tiny-xl.safetensors"), None)
    assert catalog.resolve("owner/hub") == ("owner/hub", None)
    (folder / "XL/tiny-xl.safetensors").unlink()  # gone before its job ran
    with pytest.raises(ModelLoadError, match="'XL/tiny-xl.safetensors' is no longer in the model folders"):
        catalog.resolve("XL/tiny-xl.safetensors")
