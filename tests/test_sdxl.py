"""SDXL: the family concept (core/families.py), loading, and every engine piece on a tiny SDXL."""

import json

import numpy as np
import pytest
import torch

from core.collage import Collage, Layer
from core.families import (
    FAMILIES,
    SD1,
    SD2,
    SDXL,
    UnsupportedModelError,
    checkpoint_family,
)
from core.generate import Regenerate, generate
from core.models import ModelLoadError, folder_family
from core.random_models import build_random_pipeline, component_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the shipped configurations are the real ones ---

# Parameter counts of the published models (diffusers' own loads of the hub checkpoints).
PUBLISHED = {
    ("sd1", "unet"): 859_520_964,
    ("sd2", "unet"): 865_910_724,
    ("sdxl", "unet"): 2_567_463_684,
    ("sd1", "vae"): 83_653_863,
    ("sdxl", "vae"): 83_653_863,
    ("sd1", "text_encoder"): 123_060_480,
    ("sd2", "text_encoder"): 340_387_840,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
}


@pytest.mark.parametrize(("family_id", "component"), list(PUBLISHED))
def test_shipped_configs_have_the_published_shapes(family_id, component):
    """Built on the meta device (no memory): each component has exactly the published size."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    family = FAMILIES[family_id]
    config = component_config(family, component)
    with torch.device("meta"):
        if component == "unet":
            module = UNet2DConditionModel.from_config(config)
        elif component == "vae":
            module = AutoencoderKL.from_config(config)
        else:
            cls = json.loads((family.config_dir / "model_index.json").read_text())[component][1]
            module = getattr(transformers, cls)(CLIPTextConfig.from_dict(config))
    assert sum(p.numel() for p in module.parameters()) == PUBLISHED[(family_id, component)]


# --- telling families apart ---

SD1_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"]
SD2_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.transformer.x"]
SDXL_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.x",
    "conditioner.embedders.1.model.transformer.x",
]


def shapes(channels):
    return lambda key: (320, channels, 3, 3)


@pytest.mark.parametrize(("keys", "family"), [(SD1_KEYS, SD1), (SD2_KEYS, SD2), (SDXL_KEYS, SDXL)])
def test_checkpoint_family_from_weight_names(keys, family):
    assert checkpoint_family(keys, shapes(4)) is family


@pytest.mark.parametrize(
    ("keys", "channels", "says"),
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.x"], 4, "refiner"),
        (SDXL_KEYS, 9, r"inpainting model \(Stable Diffusion XL"),
        (SD1_KEYS, 8, "8 input channels"),
        (["double_blocks.0.img_attn.qkv.weight"], 4, "Flux"),
        (["model.diffusion_model.joint_blocks.0.x"], 4, "Stable Diffusion 3"),
        (["model.diffusion_model.input_blocks.0.0.weight"], 4, "without its text encoder"),
    ],
)
def test_checkpoint_family_names_what_it_refuses(keys, channels, says):
    with pytest.raises(UnsupportedModelError, match=says):
        checkpoint_family(keys, shapes(channels))


def test_folder_family(tiny_sdxl_dir, demo_model_dir, tmp_path):
    assert folder_family(tiny_sdxl_dir) is SDXL
    assert folder_family(demo_model_dir) is SD1
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None])
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        folder_family(refiner)
    index.update(_class_name="StableDiffusionXLInpaintPipeline")
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="inpainting"):
        folder_family(refiner)


def test_loaded_tiny_sdxl_knows_its_family(tiny_sdxl):
    assert tiny_sdxl.family is SDXL
    assert type(tiny_sdxl.pipeline).__name__ == "StableDiffusionXLPipeline"


@pytest.mark.parametrize(
    ("family", "size", "expected"),
    [
        (SDXL, (1920, 1080), (1344, 768)),  # 16:9 at about one megapixel, multiples of 64
        (SDXL, (64, 64), (1024, 1024)),
        (SD1, (1920, 1080), (680, 384)),
        (SD2, (600, 800), (664, 888)),
    ],
)
def test_nearest_size(family, size, expected):
    w, h = family.nearest_size(*size)
    assert (w, h) == expected
    assert w % family.size_multiple == 0 and h % family.size_multiple == 0
    assert abs(w * h / family.native_size**2 - 1) < 0.1


# --- prompt conditioning ---


def test_sdxl_conditioning_is_both_encoders_and_time_ids(tiny_sdxl):
    pipe = tiny_sdxl.pipeline
    c = SDXL.encode_prompt(pipe, "a red box", "blurry", tiny_sdxl.device, True, (96, 160))
    assert c.cond.shape == (1, 77, pipe.unet.config.cross_attention_dim)  # 32 + 48 side by side
    assert c.added["text_embeds"].shape == (1, 40)  # encoder 2's projection
    assert c.added["time_ids"].tolist() == [[96, 160, 0, 0, 96, 160]]
    embeds, added = c.batch(3)
    assert embeds.shape[0] == 6 and added["text_embeds"].shape == (6, 40)
    assert torch.equal(added["text_embeds"][0], c.added_uncond["text_embeds"][0])
    assert torch.equal(added["text_embeds"][5], c.added["text_embeds"][0])
    # The first 32 channels of the context are encoder 1's penultimate layer, the other 48 encoder 2's.
    for encoder, tokenizer, part in (
        (pipe.text_encoder, pipe.tokenizer, slice(0, 32)),
        (pipe.text_encoder_2, pipe.tokenizer_2, slice(32, 80)),
    ):
        ids = tokenizer("a red box", padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(c.cond[..., part], hidden, atol=1e-6)


def test_both_tokenizers_put_a_layer_on_the_same_positions(tiny_sdxl):
    pipe = tiny_sdxl.pipeline
    prompt = "a red box next to a green leaf, on grass"
    one = pipe.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    two = pipe.tokenizer_2(prompt, padding="max_length", max_length=77).input_ids
    n = len(pipe.tokenizer(prompt).input_ids)
    assert one[:n] == two[:n]


# --- the pieces on the tiny SDXL ---


def collage(weight=1.0, **overrides):
    red = np.zeros((48, 48, 4), np.uint8)
    red[...] = (220, 30, 30, 255)
    green = np.zeros((40, 56, 4), np.uint8)
    green[...] = (30, 200, 60, 255)
    kwargs = dict(
        prompt="a red box next to a green leaf",
        layers=[
            Layer("red box", red, offset=(8, 16), attention_weight=weight),
            Layer("green leaf", green, offset=(68, 60), attention_weight=weight),
        ],
        width=128,
        height=128,
        steps=4,
        strength=1.0,
        seed=3,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


def test_generate_on_sdxl_keeps_strength_zero_pixels(tiny_sdxl):
    c = collage(strength=0.8)
    c.layers[0].strength = 0.0
    result = generate(tiny_sdxl, c, variants=2)
    assert len(result.images) == 2
    image = result.images[0].image
    assert image.shape == (128, 128, 3)
    # The first layer's pixels (away from the feather) are the composite's bytes exactly.
    inner = (slice(16 + 8, 16 + 48 - 8), slice(8 + 8, 8 + 48 - 8))
    assert np.array_equal(image[inner], result.composite[inner])
    assert not np.array_equal(image, result.composite)


def test_regenerate_on_sdxl_changes_only_the_layer_region(tiny_sdxl):
    c = collage(strength=0.9)
    base = generate(tiny_sdxl, c).images[0].image
    again = generate(tiny_sdxl, c, regenerate=Regenerate(base, 1, dilation_px=4)).images[0].image
    outside = np.ones((128, 128), bool)
    outside[60 - 4 : 60 + 40 + 4, 68 - 4 : 68 + 56 + 4] = False
    assert np.array_equal(again[outside], base[outside])
    assert not np.array_equal(again, base)


def test_vae_runs_in_float32_when_sdxl_is_half_precision():
    pipe = build_random_pipeline(SDXL)
    assert SDXL.vae_needs_upcast(pipe.vae, torch.float16)
    assert not SDXL.vae_needs_upcast(pipe.vae, torch.float32)
    assert not SD1.vae_needs_upcast(pipe.vae, torch.float16)


def test_masked_attention_moves_layer_attention_into_its_mask_on_sdxl(tiny_sdxl):
    """The mechanism test of tests/test_attention.py on SDXL's layout: cross-attention only at
    latent/2 (here 8×8), two transformer blocks deep. The rise must be at least the demo's
    (≥ 2.5× and ≥ +0.25 on average, +0.2 for each layer)."""
    from core.attention import masked_attention_hook

    built = {}

    def builder(name, **options):
        def build(setup):
            built[name] = masked_attention_hook(setup, **options)
            return built[name]

        return build

    c = collage(weight=8.0)
    generate(tiny_sdxl, c, hooks=[builder("without", record_only=True)])
    generate(tiny_sdxl, collage(weight=8.0), hooks=[builder("with", record=True)])
    records = built["with"].records
    attn2 = [n for n in tiny_sdxl.pipeline.unet.attn_processors if n.endswith("attn2.processor")]
    assert len(records) == 4 * len(attn2)  # every attn2 (both blocks of each stack), every step
    assert {r.seq_len for r in records} == {64}  # latent 16×16 → attention at 8×8 only
    without, with_bias = built["without"].mass_inside(), built["with"].mass_inside()
    print(f"\nSDXL share of layer-token attention inside the mask: without {without}, with {with_bias}")
    assert float(without.mean()) < 0.3
    assert float(with_bias.mean()) >= 2.5 * float(without.mean())
    assert float(with_bias.mean()) >= float(without.mean()) + 0.25
    assert (with_bias > without + 0.2).all()


# --- generating at the family's size ---


def test_generation_size_policies():
    from core.sizing import generation_size, parse_size

    assert parse_size("auto") == "auto" and parse_size(" 1024X768 ") == (1024, 768)
    for bad in ("big", "1000x77", "100x100x3"):
        with pytest.raises(ValueError):
            parse_size(bad)
    sdxl, sd1 = (SDXL.native_size, SDXL.size_multiple), (SD1.native_size, SD1.size_multiple)
    assert generation_size((1000, 1000), "auto", *sdxl) == (1000, 1000)  # near 1 MP: kept
    assert generation_size((512, 512), "auto", *sdxl) == (1024, 1024)
    assert generation_size((4000, 3000), "auto", *sd1) == (592, 440)
    assert generation_size((4001, 3001), "document", *sd1) == (4000, 3000)
    assert generation_size((300, 200), (256, 128), *sd1) == (256, 128)
    with pytest.raises(ValueError, match="unknown size policy"):
        generation_size((300, 200), "huge", *sd1)


def test_native_size_is_the_models_own(tiny_sdxl, demo_pipeline):
    from core.sizing import model_generation_size

    assert tiny_sdxl.native_size == 256 and demo_pipeline.native_size == 64
    assert model_generation_size(demo_pipeline, (64, 64), "auto") == (64, 64)
    assert model_generation_size(tiny_sdxl, (1920, 1080), "auto") == (320, 192)


def test_generate_at_another_size_keeps_the_canvas_guarantees(tiny_sdxl):
    """A 200×150 canvas (not even a multiple of 8) generated at 128×96 and scaled back: the result
    has the canvas size, and strength-0 pixels are the canvas composite's bytes."""
    from core.sizing import generate_at_size

    red = np.zeros((60, 60, 4), np.uint8)
    red[...] = (220, 30, 30, 255)
    c = Collage(
        prompt="a red box",
        layers=[Layer("red box", red, offset=(20, 30), strength=0.0)],
        width=200,
        height=150,
        steps=3,
        strength=0.8,
        seed=1,
    )
    result = generate_at_size(tiny_sdxl, c, (128, 96))
    image = result.images[0].image
    assert image.shape == (150, 200, 3)
    assert np.array_equal(image[30:90, 20:80], result.composite[30:90, 20:80])
    assert not np.array_equal(image, result.composite)
    c.layers[0].strength = 0.9
    again = generate_at_size(tiny_sdxl, c, (128, 96), regenerate=Regenerate(image, 0, dilation_px=4))
    regenerated = again.images[0].image
    outside = np.ones((150, 200), bool)
    outside[30 - 4 : 90 + 4, 20 - 4 : 80 + 4] = False
    assert np.array_equal(regenerated[outside], image[outside])
    assert not np.array_equal(regenerated[30:90, 20:80], image[30:90, 20:80])
