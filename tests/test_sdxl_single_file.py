"""Single-file SDXL (and SD 2.x) checkpoints: the LDM exporter's SGM/OpenCLIP layout, family
detection from the file's keys, and offline loading that round-trips every weight."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from core.collage import Collage, Layer
from core.families import SD2, SDXL, checkpoint_family, family_of_pipeline
from core.generate import generate
from core.ldm_export import ldm_state_dict, open_clip_text_to_ldm, save_as_ldm_checkpoint, unet_to_ldm
from core.models import ModelLoadError, checkpoint_file_family, folder_family, load_pipeline
from core.random_models import build_random_pipeline, component_config, ensure_random_model

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, name: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), name
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, (name, different[:5])


# --- the exporter's layout ---


def test_sdxl_export_uses_the_original_key_names(tiny_sdxl):
    pipe = tiny_sdxl.pipeline
    state = ldm_state_dict(pipe)
    enc2 = pipe.text_encoder_2
    g = "conditioner.embedders.1.model."
    expected_shapes = {
        "model.diffusion_model.label_emb.0.0.weight": (pipe.unet.add_embedding.linear_1.weight.shape),
        # Down block 1 has attention, two transformer blocks deep; block 0 has none.
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (64, 80),
        "model.diffusion_model.input_blocks.3.0.op.weight": (32, 32, 3, 3),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (64, 64, 3, 3),  # after the attention
        "first_stage_model.encoder.mid.attn_1.q.weight": (64, 64, 1, 1),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 32),
        g + "token_embedding.weight": (49408, 48),
        g + "positional_embedding": (77, 48),
        g + "transformer.resblocks.4.attn.in_proj_weight": (3 * 48, 48),
        g + "transformer.resblocks.4.attn.in_proj_bias": (3 * 48,),
        g + "transformer.resblocks.4.mlp.c_fc.weight": (37, 48),
        g + "ln_final.weight": (48,),
        g + "text_projection": (48, 40),  # OpenCLIP's (width, projection): the Linear's transpose
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == tuple(shape), key
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in state)
    assert not any(k.startswith("cond_stage_model.") for k in state)
    layer = enc2.text_model.encoder.layers[4].self_attn
    in_proj = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    assert torch.equal(state[g + "transformer.resblocks.4.attn.in_proj_weight"], in_proj)
    assert torch.equal(state[g + "text_projection"], enc2.text_projection.weight.T)
    assert checkpoint_family(state) is SDXL


def test_real_sdxl_layout_is_the_reverse_of_diffusers_converters():
    """At SDXL's true shapes (on the meta device: no memory): three blocks, transformer stacks
    10 deep, 32 OpenCLIP layers. diffusers' own converters give back every name and shape."""
    import transformers
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig

    prefix = "conditioner.embedders.1.model."
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(component_config(SDXL, "unet"))
        config = CLIPTextConfig.from_dict(component_config(SDXL, "text_encoder_2"))
        bigg = transformers.CLIPTextModelWithProjection(config)
    ldm = unet_to_ldm(unet)
    for key, shape in {
        "label_emb.0.0.weight": (1280, 2816),
        "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    }.items():
        assert tuple(ldm[key].shape) == shape, key
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, unet.config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}

    text = {prefix + k: v for k, v in open_clip_text_to_ldm(bigg).items()}
    assert text[prefix + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    back = convert_open_clip_checkpoint(bigg, text, prefix=prefix)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in bigg.state_dict().items()}


# --- loading a single file ---


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sdxl_single_file_loads_offline_with_every_weight(
    tiny_sdxl, tiny_sdxl_dir, tmp_path, offline, suffix
):
    original = tiny_sdxl.pipeline
    # Keep the originals: loading another model releases the cached folder model.
    reference = {name: getattr(original, name) for name in COMPONENTS}
    path = save_as_ldm_checkpoint(original, tmp_path / f"tiny-sdxl{suffix}")
    if suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            assert checkpoint_family(f.keys()) is SDXL
    assert checkpoint_file_family(path) is SDXL  # a .ckpt is read memory-mapped

    loaded = load_pipeline(path, config=tiny_sdxl_dir, device="cpu", dtype=torch.float32)
    assert loaded.family is SDXL
    assert type(loaded.pipeline).__name__ == "StableDiffusionXLPipeline"
    for name, module in reference.items():
        assert_same_weights(module, getattr(loaded.pipeline, name), name)
    assert loaded.pipeline.tokenizer_2("salmon sushi").input_ids == [49406, 9137, 11729, 49407]
    assert dict(loaded.pipeline.scheduler.config) == dict(original.scheduler.config)


def test_sdxl_single_file_without_its_config_is_a_clear_error(tiny_sdxl, tmp_path, offline):
    """Without config the shipped (real SDXL) configuration is used; the tiny file's widths do
    not fit it, and the error says so in a few lines (not a network error, not a tensor list)."""
    path = save_as_ldm_checkpoint(tiny_sdxl.pipeline, tmp_path / "tiny-sdxl.safetensors")
    with pytest.raises(ModelLoadError, match="do not have the standard Stable Diffusion XL shapes") as info:
        load_pipeline(path, device="cpu", dtype=torch.float32)
    message = str(info.value)
    assert "--model-config" in message and "First difference:" in message
    assert len(message) < 600 and "Hugging Face" not in message


def collage() -> Collage:
    red = np.zeros((48, 48, 4), np.uint8)
    red[...] = (220, 30, 30, 255)
    return Collage(
        prompt="a red box",
        layers=[Layer("red box", red, offset=(40, 40), attention_weight=2.0)],
        width=128,
        height=128,
        steps=3,
        strength=0.9,
        seed=5,
    )


def test_single_file_sdxl_generates_what_the_folder_generates(tiny_sdxl, tiny_sdxl_dir, tmp_path, offline):
    from_folder = generate(tiny_sdxl, collage()).images[0].image
    path = save_as_ldm_checkpoint(tiny_sdxl.pipeline, tmp_path / "tiny-sdxl.safetensors")
    loaded = load_pipeline(path, config=tiny_sdxl_dir, device="cpu", dtype=torch.float32)
    image = generate(loaded, collage()).images[0].image
    assert image.shape == (128, 128, 3)
    assert np.array_equal(image, from_folder)


# --- SD 2.x: OpenCLIP under cond_stage_model.model. ---


def test_sd2_single_file_is_detected_and_round_trips(demo_model_dir, tmp_path, offline):
    """The tiny SD 2.x-shaped model is only 32 wide: its OpenCLIP activation (gelu, where CLIP-L
    has quick_gelu) tells it apart from SD 1.x; the file's keys then say so to the loader."""
    sd2_dir = ensure_random_model("sd2", "tiny", demo_model_dir.parent.parent)
    original = build_random_pipeline(SD2, "tiny")
    assert family_of_pipeline(original) is SD2 and folder_family(sd2_dir) is SD2
    path = save_as_ldm_checkpoint(original, tmp_path / "tiny-sd2.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.4.attn.in_proj_weight" in keys
    assert not any(k.startswith(("cond_stage_model.transformer.", "conditioner.")) for k in keys)
    assert checkpoint_file_family(path) is SD2

    loaded = load_pipeline(path, config=sd2_dir, device="cpu", dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(original, name), getattr(loaded.pipeline, name), name)
