"""Model loading: the demo model, diffusers folders, single-file checkpoints, the cache, errors."""

import gc
import json
import os
import shutil
import sys
import threading
import weakref
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from core import demo_model, models
from core.demo_model import DEMO_VERSION, build_clip_tokenizer, build_demo_pipeline, ensure_demo_model
from core.ldm_export import save_as_ldm_checkpoint, unet_to_ldm, vae_to_ldm
from core.models import ModelLoadError, load_pipeline, pick_device, pick_dtype
from core.paths import cache_dir


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


@pytest.fixture
def count_loads(monkeypatch):
    calls = []
    real = models._load

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "_load", counting)
    return calls


# --- cache folder and the demo model ------------------------------------------------------


def test_cache_dir_env_and_platforms(monkeypatch, tmp_path):
    monkeypatch.setenv("COLLAGE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("COLLAGE_CACHE")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "collage-diffusion"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir().parent.name == ".cache"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_dir() == tmp_path / "local" / "collage-diffusion"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cache_dir().parts[-3:] == ("Library", "Caches", "collage-diffusion")


def test_demo_model_built_once_into_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COLLAGE_CACHE", str(tmp_path))
    builds = []
    real_build = demo_model.build_demo_pipeline
    monkeypatch.setattr(demo_model, "build_demo_pipeline", lambda: builds.append(1) or real_build())

    folder = ensure_demo_model()
    assert folder == tmp_path / "models" / DEMO_VERSION
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).exists(), part
    assert list((folder / "unet").glob("*.safetensors"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == [DEMO_VERSION]  # no temp folders left
    stamp = (folder / "model_index.json").stat().st_mtime_ns

    assert ensure_demo_model() == folder
    assert len(builds) == 1
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


def test_incomplete_demo_folder_is_rebuilt(tmp_path):
    broken = tmp_path / "models" / DEMO_VERSION
    (broken / "unet").mkdir(parents=True)  # e.g. a copy interrupted half way
    folder = ensure_demo_model(tmp_path)
    assert (folder / "model_index.json").is_file()


def test_demo_controlnet_unpacked_once_beside_the_model(tmp_path):
    from core.demo_model import demo_controlnet_dir, ensure_demo_controlnet

    folder = ensure_demo_controlnet(tmp_path)
    assert folder == demo_controlnet_dir(tmp_path) and (folder / "config.json").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert ensure_demo_controlnet(tmp_path) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp


def test_missing_or_foreign_demo_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="restore the file"):
        build_demo_pipeline(tmp_path / "demo-v2.safetensors")
    from safetensors.torch import save_file

    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not a demo model weights file"):
        build_demo_pipeline(foreign)


def test_demo_weights_are_deterministic_and_leave_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_demo_pipeline()
    assert torch.equal(torch.rand(3), expected)
    b = build_demo_pipeline()
    assert_same_weights(a.unet, b.unet)
    assert_same_weights(a.vae, b.vae)
    assert_same_weights(a.text_encoder, b.text_encoder)


def test_clip_tokenizer_matches_clip(tmp_path):
    tok = build_clip_tokenizer(tmp_path)
    assert len(tok) == 49408
    assert tok("a photo of salmon sushi").input_ids == [49406, 320, 1125, 539, 9137, 11729, 49407]
    enc = tok("a photo of salmon sushi", return_offsets_mapping=True)
    assert enc.offset_mapping[4] == (11, 17)  # "salmon"
    padded = tok("sushi", padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert len(padded.input_ids) == 77


def test_demo_model_shape(demo_pipeline):
    pipe = demo_pipeline.pipeline
    assert demo_pipeline.identity == DEMO_VERSION
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    names = list(pipe.unet.attn_processors)
    assert any(n.endswith("attn1.processor") for n in names)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor" in names
    assert pipe.tokenizer("a photo of salmon sushi").input_ids == [49406, 320, 1125, 539, 9137, 11729, 49407]
    with torch.no_grad():
        image = torch.zeros(1, 3, 64, 64, dtype=demo_pipeline.dtype, device=demo_pipeline.device)
        latents = pipe.vae.encode(image).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_demo_txt2img(demo_pipeline):
    generator = torch.Generator().manual_seed(0)
    out = demo_pipeline.pipeline(
        "a photo of salmon sushi", height=64, width=64, num_inference_steps=3, generator=generator
    )
    assert out.images[0].size == (64, 64)


# --- loading ----------------------------------------------------------------------------


def test_same_request_returns_cached_model(demo_pipeline, count_loads):
    assert load_pipeline("demo") is demo_pipeline
    assert load_pipeline("demo", device=demo_pipeline.device, dtype=demo_pipeline.dtype) is demo_pipeline
    assert count_loads == []


def test_concurrent_requests_load_once(demo_model_dir, count_loads):
    models.unload_pipeline()
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_pipeline("demo"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(count_loads) == 1
    assert all(r is results[0] for r in results)


def test_load_from_folder_and_release_previous(demo_model_dir, tmp_path):
    models.unload_pipeline()
    demo = load_pipeline("demo", device="cpu")
    demo_unet = weakref.ref(demo.pipeline.unet)
    demo_state = {k: v.clone() for k, v in demo.pipeline.unet.state_dict().items()}
    del demo

    copy = shutil.copytree(demo_model_dir, tmp_path / "my model")
    loaded = load_pipeline(str(copy), device="cpu")
    assert loaded.identity.startswith(f"folder:{copy.resolve()}")
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    gc.collect()
    assert demo_unet() is None  # the demo model was released, not kept beside the new one
    state = loaded.pipeline.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in demo_state.items())
    assert load_pipeline(copy, device="cpu") is loaded  # a Path works too


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_single_file_checkpoint(demo_pipeline, demo_model_dir, tmp_path, suffix):
    original = demo_pipeline.pipeline
    path = save_as_ldm_checkpoint(original, tmp_path / f"demo{suffix}")
    # Keep the originals: loading another model releases the cached demo pipeline.
    reference = {name: getattr(original, name) for name in ("unet", "vae", "text_encoder")}

    loaded = load_pipeline(str(path), config=demo_model_dir, device="cpu", dtype=torch.float32)
    assert loaded.identity.startswith(f"file:{path.resolve()}|")
    for name, module in reference.items():
        assert_same_weights(module, getattr(loaded.pipeline, name))
    assert loaded.pipeline.tokenizer("salmon sushi").input_ids == [49406, 9137, 11729, 49407]
    assert dict(loaded.pipeline.scheduler.config) == dict(original.scheduler.config)

    # A changed file is different weights: it is loaded again.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_pipeline(str(path), config=demo_model_dir, device="cpu", dtype=torch.float32) is not loaded


def test_ldm_keys_use_original_names(demo_pipeline, tmp_path):
    from safetensors import safe_open

    path = save_as_ldm_checkpoint(demo_pipeline.pipeline, tmp_path / "demo.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        attn_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.0.block.0.norm1.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ):
        assert key in keys, key
    assert attn_q.ndim == 4  # LDM's VAE attention uses 1x1 convolutions


def test_ldm_export_handles_the_sd15_layout():
    """The exporter on a small U-Net/VAE laid out like SD 1.5 (4 blocks, 2 layers each) round-trips
    through diffusers' own converters, and uses SD 1.5's key names."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    ldm = unet_to_ldm(unet)
    for key in (
        "input_blocks.11.0.in_layers.2.weight",  # last down block, no attention
        "input_blocks.9.0.op.weight",
        "output_blocks.2.1.conv.weight",  # up block without attention: upsampler in slot 1
        "output_blocks.5.2.conv.weight",  # with attention: slot 2
        "output_blocks.11.1.proj_out.weight",
        "middle_block.2.emb_layers.1.weight",
    ):
        assert key in ldm, key
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, unet.config)
    assert back.keys() == unet.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())

    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=4,
    )
    ldm = vae_to_ldm(vae)
    assert "encoder.down.2.block.0.nin_shortcut.weight" in ldm  # 8 -> 16 channels
    assert "decoder.up.1.block.0.nin_shortcut.weight" in ldm  # 16 -> 8, numbered bottom-up
    assert "decoder.up.3.upsample.conv.weight" in ldm
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, vae.config)
    assert back.keys() == vae.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())


# --- devices and references --------------------------------------------------------------


def test_device_and_dtype_choice(monkeypatch):
    monkeypatch.setenv("COLLAGE_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(torch.device("mps")) == torch.float16
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    monkeypatch.setenv("COLLAGE_DTYPE", "float16")
    assert pick_dtype(torch.device("cpu")) == torch.float16
    assert pick_dtype(torch.device("cpu"), torch.float32) == torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "float8")
    with pytest.raises(ModelLoadError, match="unknown device"):
        pick_device("gpu-please")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="no working CUDA"):
        load_pipeline("demo", device="cuda")


@pytest.mark.parametrize(
    ("ref", "is_path"),
    [
        ("runwayml/stable-diffusion-v1-5", False),
        ("stabilityai/stable-diffusion-2-1-base", False),
        ("models/sd15.safetensors", True),
        ("./runwayml/stable-diffusion-v1-5", True),
        ("~/models/sd15", True),
        ("/abs/model", True),
        ("C:\\models\\sd15", True),
        ("a/b/c", True),
        ("sd15", True),
    ],
)
def test_hub_id_or_path(ref, is_path):
    assert models.looks_like_path(ref) is is_path


# --- errors ------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="model file or folder not found: .*nope.safetensors"):
        load_pipeline(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelLoadError, match="not found"):
        load_pipeline("./no-such-folder")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json") as info:
        load_pipeline(str(tmp_path))
    assert "diffusers" in str(info.value) and ".safetensors" in str(info.value)


def test_folder_of_another_model_type(tmp_path):
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="FluxPipeline model; only Stable Diffusion 1.x/2.x and SDXL"):
        load_pipeline(str(tmp_path))
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="lacks vae, text_encoder, tokenizer, scheduler, text_encoder_2"):
        load_pipeline(str(tmp_path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"unsupported model file type '\.txt'"):
        load_pipeline(str(path))


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a valid .safetensors checkpoint"):
        load_pipeline(str(path))


def test_corrupt_ckpt(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"PK" + os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a valid .ckpt checkpoint"):
        load_pipeline(str(path))


def test_ckpt_that_torch_cannot_read(demo_model_dir, tmp_path):
    path = tmp_path / "model.ckpt"
    with zipfile.ZipFile(path, "w") as z:  # looks like a torch.save archive, but is not one
        z.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(ModelLoadError, match="could not be read"):
        load_pipeline(str(path), config=demo_model_dir)


def test_lora_file_is_not_a_model(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ModelLoadError, match="LoRA"):
        load_pipeline(str(path))


def test_config_folder_must_be_a_diffusers_model(demo_pipeline, tmp_path):
    path = save_as_ldm_checkpoint(demo_pipeline.pipeline, tmp_path / "demo.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config folder .* no model_index.json"):
        load_pipeline(str(path), config=tmp_path / "empty")


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants

    # Offline mode: fail from the local cache at once, whether or not this machine has a network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="from the Hugging Face Hub") as info:
        load_pipeline("collage-diffusion-tests/no-such-model")
    assert "Hugging Face cache" in str(info.value)


def test_single_file_of_unusual_shapes_asks_for_its_config(demo_pipeline, tmp_path, monkeypatch):
    """With no config given, a single file loads offline with its family's shipped configuration;
    the tiny demo model does not have SD 1.5's shapes, and the error says what to give."""
    import huggingface_hub.constants

    path = save_as_ldm_checkpoint(demo_pipeline.pipeline, tmp_path / "demo.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="do not have the standard Stable Diffusion 1.x shapes") as info:
        load_pipeline(str(path))
    assert "--model-config" in str(info.value)
    assert len(str(info.value)) < 1000
