"""LoRAs per job (core/loras.py): LoRAs made here on the demo model and the tiny SDXL, in
diffusers/PEFT and kohya names, change the output, and the model is exactly as before afterwards."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from core.collage import CollageError
from core.generate import generate
from core.loras import LoraSpec, applied_loras
from core.progress import GenerationCancelled
from tests.library_files import kohya_lora
from tests.test_generate import two_layer_collage

peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def peft_unet_lora(unet, seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA of `unet`'s attention projections with random, non-zero A and B (a fresh
    LoRA has B = 0, which would change nothing)."""
    from peft import LoraConfig, get_peft_model_state_dict

    twin = copy.deepcopy(unet)
    twin.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(twin)
    return {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in state.items()}


def save_diffusers(pipe, state: dict[str, torch.Tensor], folder: Path) -> Path:
    type(pipe).save_lora_weights(folder, unet_lora_layers=state, weight_name="lora.safetensors")
    return folder / "lora.safetensors"


def save_kohya(state: dict[str, torch.Tensor], path: Path) -> Path:
    """The same LoRA in kohya/A1111 names: lora_unet_<module with _>.lora_down/up.weight + .alpha."""
    from safetensors.torch import save_file

    out = {}
    for key, tensor in state.items():
        module, part = key.rsplit(".lora_", 1)
        base = "lora_unet_" + module.replace(".", "_")
        out[f"{base}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = tensor.contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(tensor.shape[0 if part.startswith("A") else 1]))
    save_file(out, str(path))
    return path


def snapshot(pipe) -> dict[str, torch.Tensor]:
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
    return {f"{n}.{k}": v.clone() for n, m in parts.items() for k, v in m.state_dict().items()}


def assert_same_state(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def image(model, collage, loras=()) -> np.ndarray:
    with applied_loras(model, list(loras)):
        return generate(model, collage).images[0].image


@pytest.fixture
def demo_loras(demo_pipeline, tmp_path):
    folder = tmp_path
    state = peft_unet_lora(demo_pipeline.pipeline.unet, seed=1)
    return {
        "diffusers": save_diffusers(demo_pipeline.pipeline, state, folder),
        "kohya": save_kohya(state, folder / "kohya.safetensors"),
    }


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_changes_output_and_the_model_is_restored(demo_pipeline, demo_loras, fmt):
    pipe = demo_pipeline.pipeline
    collage = two_layer_collage()
    before = snapshot(pipe)
    plain = image(demo_pipeline, collage)
    with_lora = image(demo_pipeline, collage, [LoraSpec(demo_loras[fmt], 1.0)])
    assert np.abs(with_lora.astype(int) - plain.astype(int)).mean() > 1.0
    assert_same_state(pipe, before)
    assert np.array_equal(image(demo_pipeline, collage), plain)  # byte-identical after unloading


def test_both_formats_give_the_same_image(demo_pipeline, demo_loras):
    collage = two_layer_collage()
    a = image(demo_pipeline, collage, [LoraSpec(demo_loras["diffusers"], 0.7)])
    b = image(demo_pipeline, collage, [LoraSpec(demo_loras["kohya"], 0.7)])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_weight_scales_the_lora(demo_pipeline, demo_loras):
    collage = two_layer_collage()
    plain = image(demo_pipeline, collage)
    zero = image(demo_pipeline, collage, [LoraSpec(demo_loras["diffusers"], 0.0)])
    one = image(demo_pipeline, collage, [LoraSpec(demo_loras["diffusers"], 1.0)])
    assert np.abs(zero.astype(int) - plain.astype(int)).max() <= 1
    assert np.abs(one.astype(int) - zero.astype(int)).mean() > 1.0


def test_model_restored_after_error_and_cancel(demo_pipeline, demo_loras):
    pipe = demo_pipeline.pipeline
    collage = two_layer_collage()
    before = snapshot(pipe)
    plain = image(demo_pipeline, collage)
    cancel = threading.Event()

    def progress(p):  # cancel in the middle of sampling, with the LoRA in the U-Net
        if p.phase == "sampling" and p.step == 2:
            cancel.set()

    kohya = [LoraSpec(demo_loras["kohya"], 1.0)]
    with pytest.raises(GenerationCancelled), applied_loras(demo_pipeline, kohya):
        generate(demo_pipeline, collage, progress=progress, cancel=cancel)
    assert cancel.is_set()
    diffusers = [LoraSpec(demo_loras["diffusers"], 1.0)]
    with pytest.raises(RuntimeError, match="boom"), applied_loras(demo_pipeline, diffusers):
        raise RuntimeError("boom")
    assert_same_state(pipe, before)
    assert np.array_equal(image(demo_pipeline, collage), plain)


def test_refused_before_loading(demo_pipeline, tiny_sdxl, demo_loras, tmp_path):
    before = snapshot(tiny_sdxl.pipeline)
    spec = LoraSpec(demo_loras["diffusers"], 1.0, field="loras[0]", name="demo-style")
    with pytest.raises(CollageError) as e, applied_loras(tiny_sdxl, [spec]):
        pytest.fail("the block must not run")
    assert e.value.problems[0].startswith("loras[0]: LoRA 'demo-style': was made for")
    assert "width 32" in e.value.problems[0] and "Stable Diffusion XL" in e.value.problems[0]
    sd15 = kohya_lora(tmp_path / "sd15-style.safetensors", "sd1")  # an SD 1.5 LoRA's names and shapes
    with (
        pytest.raises(
            CollageError,
            match=r"^loras\[0\]: LoRA 'sd15-style.safetensors': was made for "
            r"Stable Diffusion 1.x, not for this Stable Diffusion XL model",
        ),
        applied_loras(tiny_sdxl, [LoraSpec(sd15, 1.0, field="loras[0]")]),
    ):
        pytest.fail("the block must not run")
    assert_same_state(tiny_sdxl.pipeline, before)
    bad = [LoraSpec(demo_loras["kohya"], 9.0, field="loras[1]"), LoraSpec(tmp_path / "none.safetensors")]
    with pytest.raises(CollageError) as e, applied_loras(demo_pipeline, bad):
        pytest.fail("the block must not run")
    assert e.value.problems[0].startswith("loras[1]: LoRA 'kohya.safetensors': weight must be")
    assert "no such file" in e.value.problems[1]


def test_lora_on_tiny_sdxl(tiny_sdxl, tmp_path):
    pipe = tiny_sdxl.pipeline
    path = save_diffusers(pipe, peft_unet_lora(pipe.unet, seed=2), tmp_path)
    from tests.test_sdxl import collage as sdxl_collage

    collage = sdxl_collage(steps=3)
    before = snapshot(pipe)
    plain = image(tiny_sdxl, collage)
    changed = image(tiny_sdxl, collage, [LoraSpec(path, 1.0)])
    assert np.abs(changed.astype(int) - plain.astype(int)).mean() > 1.0
    assert_same_state(pipe, before)
    assert np.array_equal(image(tiny_sdxl, collage), plain)


async def _run_png(client, request) -> bytes:
    from bridge_server import testing as T
    from krita_plugin.collage_diffusion import wire

    r = await T.submit(client, request)
    assert r.status == 202, await r.text()
    done = await T.wait_done(client, (await r.json())["id"])
    assert done.state == wire.DONE, (done.error, done.problems)
    return await (await client.get(done.results[0].url)).read()


@pytest.mark.asyncio
async def test_the_bridge_applies_library_loras_by_name(
    aiohttp_client, demo_pipeline, tiny_sdxl_dir, library_files, tmp_path
):
    from bridge_server import testing as T
    from bridge_server.app import create_app
    from bridge_server.config import BridgeConfig
    from bridge_server.keys import MANAGER

    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    save_kohya(peft_unet_lora(demo_pipeline.pipeline.unet, seed=3), loras / "demo-ink.safetensors")
    (loras / "sd15-style.safetensors").write_bytes(library_files["lora-sd1"].read_bytes())
    config = BridgeConfig(
        data_dir=tmp_path / "bridge",
        preview_interval=0.0,
        models_dirs=(tmp_path / "models",),
        allowed_models=(str(tiny_sdxl_dir),),
        loaded_loras=0,  # removed after each job, read again from the cache (kept: test_lora_keeping.py)
    )
    client = await aiohttp_client(create_app(config))

    # An SD 1.5 LoRA on an SDXL model, and a name the bridge does not have: 422 naming the field.
    xl_job = T.small_request(model=str(tiny_sdxl_dir), loras=[{"name": "sd15-style.safetensors"}])
    r = await T.submit(client, xl_job)
    problems = (await r.json())["problems"]
    assert r.status == 422 and problems == [
        "loras[0]: LoRA 'sd15-style.safetensors' was made for Stable Diffusion 1.x, not for the model"
        " of this job (sdxl)"
    ]
    r = await T.submit(client, T.small_request(loras=[{"name": "demo-ink"}, {"name": str(loras)}]))
    problems = (await r.json())["problems"]
    assert r.status == 422 and [p.split(":")[0] for p in problems] == ["loras[0].name", "loras[1].name"]

    plain = await _run_png(client, T.small_request(steps=3))
    inked = await _run_png(client, T.small_request(steps=3, loras=[{"name": "demo-ink.safetensors"}]))
    assert inked != plain
    assert await _run_png(client, T.small_request(steps=3)) == plain  # unloaded after the job
    # Used again: its file comes from the engine's cache, with the same result.
    cache = client.app[MANAGER].engine.lora_cache
    assert (cache.misses, cache.hits) == (1, 0) and cache.max_bytes == config.lora_cache_bytes
    assert await _run_png(client, T.small_request(steps=3, loras=[{"name": "demo-ink.safetensors"}])) == inked
    assert (cache.misses, cache.hits) == (1, 1)


def test_cli_lora_by_file_and_by_name_with_weight(demo_pipeline, demo_loras, library_files, tmp_path, capsys):
    from PIL import Image

    from core.cli import main
    from tests.test_cli import small_psd

    doc = small_psd(tmp_path / "scene.psd")
    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    (models / "loras" / "ink.safetensors").write_bytes(demo_loras["kohya"].read_bytes())
    (models / "loras" / "xl.safetensors").write_bytes(library_files["lora-xl"].read_bytes())

    def run(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        args = ["generate", str(doc), "-o", str(out), "--steps", "3", "--models-dir", str(models), *extra]
        assert main(args) == 0, capsys.readouterr().err
        return np.asarray(Image.open(out))

    plain = run("plain")
    by_file = run("file", "--lora", f"{demo_loras['kohya']}:0.8")
    by_name = run("name", "--lora", "ink.safetensors:0.8")
    assert np.array_equal(by_file, by_name) and not np.array_equal(by_file, plain)
    assert not np.array_equal(run("half", "--lora", "ink.safetensors:0.4"), by_name)

    out = tmp_path / "refused.png"
    args = ["generate", str(doc), "-o", str(out), "--models-dir", str(models)]
    assert main([*args, "--lora", "xl.safetensors"]) == 2
    assert (
        "--lora xl.safetensors: LoRA 'xl.safetensors': was made for Stable Diffusion XL"
        in capsys.readouterr().err
    )
    assert main([*args, "--lora", "nope:1"]) == 2
    assert "--lora nope:1: no such file, nor a LoRA in --models-dir (which has: ink.safetensors" in (
        capsys.readouterr().err
    )
    assert not out.exists()
