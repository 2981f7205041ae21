"""LoRAs of the text encoders (diffusers/PEFT and kohya `lora_te_*` names) on the demo model and
kohya SDXL LoRAs (`lora_unet_*` in the original module names, `lora_te1_*`, `lora_te2_*`) on the
tiny SDXL, and the LoRA cache (core/loras.py `LoraCache`): each part changes the output, unloading
restores byte-identical output, and a second use from the cache gives the first use's output."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.generate import generate
from core.loras import LoraCache, LoraSpec, _read_state_dict, applied_loras
from tests.test_generate import two_layer_collage
from tests.test_loras import assert_same_state, peft_unet_lora, snapshot

peft = pytest.importorskip("peft")

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def peft_text_lora(encoder, seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA of a CLIP text encoder's attention projections, random A and B, in PEFT
    names (`text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    twin = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS, init_lora_weights=False),
        copy.deepcopy(encoder),
    )
    gen = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(twin)
    assert state, "no layer of the text encoder was targeted"
    return {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in state.items()}


def kohya(state: dict[str, torch.Tensor], prefix: str, rename=lambda module: module) -> dict:
    """PEFT names -> kohya/A1111: `<prefix>_<module with _>.lora_down/up.weight` and `.alpha`."""
    out = {}
    for key, tensor in state.items():
        module, part = key.rsplit(".lora_", 1)
        base = f"{prefix}_" + rename(module).replace(".", "_")
        down = part.startswith("A")
        out[f"{base}.lora_{'down' if down else 'up'}.weight"] = tensor.contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(tensor.shape[0 if down else 1]))
    return out


def sgm_name(unet):
    """A U-Net module's name in the original (SGM/LDM) layout, as kohya's SDXL LoRAs use them:
    down_blocks.1.attentions.0.… -> input_blocks.4.1.…"""
    from core.ldm_export import _unet_prefix_map

    prefixes = sorted(_unet_prefix_map(unet).items(), key=lambda kv: len(kv[0]), reverse=True)

    def rename(module: str) -> str:
        hf, ldm = next((hf, ldm) for hf, ldm in prefixes if (module + ".").startswith(hf))
        return ldm + module[len(hf) :]

    return rename


def image(model, collage, loras=(), cache=None) -> np.ndarray:
    with applied_loras(model, list(loras), cache):
        return generate(model, collage).images[0].image


def changed(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# -- text encoders of the demo model -------------------------------------------------------------


@pytest.fixture
def demo_text_loras(demo_pipeline, tmp_path):
    pipe = demo_pipeline.pipeline
    text = peft_text_lora(pipe.text_encoder, seed=5)
    type(pipe).save_lora_weights(tmp_path, text_encoder_lora_layers=text, weight_name="te.safetensors")
    save_file(kohya(text, "lora_te"), str(tmp_path / "te-kohya.safetensors"))
    both = {**kohya(text, "lora_te"), **kohya(peft_unet_lora(pipe.unet, seed=6), "lora_unet")}
    save_file(both, str(tmp_path / "both-kohya.safetensors"))
    return {
        "diffusers": tmp_path / "te.safetensors",
        "kohya": tmp_path / "te-kohya.safetensors",
        "both": tmp_path / "both-kohya.safetensors",
    }


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "both"])
def test_text_encoder_lora_changes_output_and_is_undone(demo_pipeline, demo_text_loras, fmt):
    pipe = demo_pipeline.pipeline
    collage = two_layer_collage()
    before = snapshot(pipe)
    plain = image(demo_pipeline, collage)
    cache = LoraCache()
    spec = [LoraSpec(demo_text_loras[fmt], 1.0)]
    first = image(demo_pipeline, collage, spec, cache)
    assert changed(first, plain) > 1.0
    assert_same_state(pipe, before)
    assert np.array_equal(image(demo_pipeline, collage), plain)  # byte-identical after unloading
    second = image(demo_pipeline, collage, spec, cache)
    assert (cache.misses, cache.hits) == (1, 1)
    assert np.array_equal(second, first)
    assert_same_state(pipe, before)


def test_text_encoder_lora_in_both_formats_gives_the_same_image(demo_pipeline, demo_text_loras):
    collage = two_layer_collage()
    a = image(demo_pipeline, collage, [LoraSpec(demo_text_loras["diffusers"], 0.7)])
    b = image(demo_pipeline, collage, [LoraSpec(demo_text_loras["kohya"], 0.7)])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# -- kohya SDXL LoRAs on the tiny SDXL -----------------------------------------------------------


@pytest.fixture
def sdxl_kohya_parts(tiny_sdxl):
    """A kohya SDXL LoRA's three parts in kohya names: U-Net (original module names), CLIP-L
    (`lora_te1_`) and OpenCLIP-bigG (`lora_te2_`)."""
    pipe = tiny_sdxl.pipeline
    return {
        "unet": kohya(peft_unet_lora(pipe.unet, seed=7), "lora_unet", sgm_name(pipe.unet)),
        "te1": kohya(peft_text_lora(pipe.text_encoder, seed=8), "lora_te1"),
        "te2": kohya(peft_text_lora(pipe.text_encoder_2, seed=9), "lora_te2"),
    }


def test_kohya_sdxl_lora_each_part_changes_output_and_is_undone(tiny_sdxl, sdxl_kohya_parts, tmp_path):
    from tests.test_sdxl import collage as sdxl_collage

    pipe = tiny_sdxl.pipeline
    collage = sdxl_collage(steps=3)
    assert any(k.startswith("lora_unet_input_blocks_") for k in sdxl_kohya_parts["unet"])
    before = snapshot(pipe)
    plain = image(tiny_sdxl, collage)
    outputs = {}
    for part, state in sdxl_kohya_parts.items():
        path = tmp_path / f"{part}.safetensors"
        save_file(state, str(path))
        outputs[part] = image(tiny_sdxl, collage, [LoraSpec(path, 1.0)])
        assert changed(outputs[part], plain) > 1.0, part
        assert_same_state(pipe, before)
    assert len({o.tobytes() for o in outputs.values()}) == 3  # each part does something of its own

    whole = tmp_path / "xl-kohya.safetensors"
    save_file({k: v for state in sdxl_kohya_parts.values() for k, v in state.items()}, str(whole))
    cache = LoraCache()
    first = image(tiny_sdxl, collage, [LoraSpec(whole, 0.8)], cache)
    assert all(changed(first, o) > 0.0 for o in [plain, *outputs.values()])
    assert np.array_equal(image(tiny_sdxl, collage), plain)
    assert np.array_equal(image(tiny_sdxl, collage, [LoraSpec(whole, 0.8)], cache), first)
    assert (cache.misses, cache.hits) == (1, 1)
    assert_same_state(pipe, before)


# -- the cache -----------------------------------------------------------------------------------


def lora_file(path: Path, n: int, value: float = 1.0) -> Path:
    """A file of n float32 numbers (4n bytes of tensors) in LoRA names."""
    save_file({"lora_unet_x.lora_down.weight": torch.full((n,), value)}, str(path))
    return path


def test_cache_keeps_files_within_its_bound_least_recently_used_first(tmp_path):
    a, b, c = (lora_file(tmp_path / f"{x}.safetensors", 100) for x in "abc")  # 400 bytes each
    cache = LoraCache(max_bytes=1000)
    sa = cache.state_dict(a)
    assert cache.state_dict(a) is sa and (cache.hits, cache.misses) == (1, 1)
    cache.state_dict(b)
    cache.state_dict(a)  # a is now the most recently used
    cache.state_dict(c)  # 1200 bytes: b goes
    assert a in cache and c in cache and b not in cache
    assert cache.nbytes == 800 and len(cache) == 2
    big = lora_file(tmp_path / "big.safetensors", 300)  # 1200 bytes: larger than the bound
    assert torch.equal(cache.state_dict(big)["lora_unet_x.lora_down.weight"], torch.ones(300))
    assert big not in cache and cache.nbytes == 800
    none = LoraCache(max_bytes=0)
    none.state_dict(a)
    assert len(none) == 0 and none.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        LoraCache(max_bytes=-1)


def test_cache_reads_a_changed_file_again(tmp_path):
    path = lora_file(tmp_path / "a.safetensors", 10, 1.0)
    cache = LoraCache()
    assert cache.state_dict(path)["lora_unet_x.lora_down.weight"][0] == 1.0
    lora_file(path, 12, 2.0)  # written again: another size (and modification time)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.state_dict(path)["lora_unet_x.lora_down.weight"][0] == 2.0
    assert cache.misses == 2 and len(cache) == 1  # the old version was dropped


def test_cached_tensors_are_not_changed_by_loading(demo_pipeline, demo_text_loras):
    """diffusers renames kohya keys in the dict it gets: the cache's dict and tensors stay as read."""
    cache = LoraCache()
    path = demo_text_loras["both"]
    with applied_loras(demo_pipeline, [LoraSpec(path, 1.0)], cache):
        pass
    cached, fresh = cache.state_dict(path), _read_state_dict(path)
    assert cached.keys() == fresh.keys()
    assert all(torch.equal(cached[k], fresh[k]) for k in fresh)


def test_bridge_lora_cache_size_from_the_command_line(capsys, tmp_path):
    from bridge_server.__main__ import config_from_args, main, parser
    from bridge_server.jobs import JobManager

    config = config_from_args(parser().parse_args(["--lora-cache-mb", "64", "--data-dir", str(tmp_path)]))
    assert config.lora_cache_bytes == 64 * 2**20 and config.problems() == []
    assert JobManager(config).engine.lora_cache.max_bytes == 64 * 2**20
    assert config_from_args(parser().parse_args([])).lora_cache_bytes == 2**30
    assert main(["--lora-cache-mb", "-1", "--data-dir", str(tmp_path)]) == 2
    assert "--lora-cache-mb: must be 0 (no cache) or more, got -1" in capsys.readouterr().err
