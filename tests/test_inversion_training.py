"""Single-image textual inversion (core/inversion/) on the demo model: the training itself.

Step counts are tiny (these check the machinery, not image quality).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from core import inversion
from core.inversion import (
    InversionSettings,
    cache_key,
    train_embedding,
)
from tests.inversion_cases import TINY, model_state, sushi_image

# --- training --------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    s = InversionSettings()
    assert (s.steps, s.learning_rate, s.batch_size, s.resolution, s.weight_decay) == (
        400,
        2e-3,
        1,
        None,
        1e-2,
    )
    assert s.keep_size and s.timesteps == (0.0, 1.0)
    assert s.max_norm is None and s == inversion.recipe.DEFAULT_SETTINGS
    with pytest.raises(ValueError, match="resolution"):
        InversionSettings(resolution=100).check()
    with pytest.raises(ValueError, match="timesteps"):
        InversionSettings(timesteps=(0.5, 0.2)).check()


def _box(alpha: torch.Tensor) -> tuple[int, int]:
    ys, xs = torch.nonzero(alpha[0] > 0.5, as_tuple=True)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def test_keep_size_trains_the_object_at_its_share_of_the_canvas():
    # A 16x12 object on a 64-pixel canvas, trained at 128: with keep_size it is 32x24 there (its
    # share of the canvas), without it it fills the square (128 on its longer side).
    image = np.zeros((64, 64, 4), np.uint8)
    image[10:26, 40:52] = (200, 30, 30, 255)
    obj = inversion.training._object_tensor(image)
    fixed = dataclasses.replace(TINY, scale=(1.0, 1.0), flip=False)
    gen = torch.Generator().manual_seed(0)
    _, alpha = inversion.augment(obj, 128, gen, fixed, canvas_side=64)
    assert _box(alpha) == (32, 24)
    _, alpha = inversion.augment(obj, 128, gen, dataclasses.replace(fixed, keep_size=False), canvas_side=64)
    assert _box(alpha) == (128, 96)
    # The canvas is part of the key with keep_size (the same pixels on a bigger canvas train
    # smaller), and not without it.
    key = cache_key("m", image, "circle", TINY, 64, canvas_side=64)
    assert cache_key("m", image, "circle", TINY, 64, canvas_side=128) != key
    fill = dataclasses.replace(TINY, keep_size=False)
    assert cache_key("m", image, "circle", fill, 64, canvas_side=64) == cache_key(
        "m", image, "circle", fill, 64, canvas_side=128
    )


def test_max_norm_holds_the_embedding_near_its_words(demo_pipeline):
    # A large step lets v* grow well past a word's length; with max_norm it ends within that
    # multiple of the layer words' mean embedding norm (it is projected back after every step).
    loud = dataclasses.replace(TINY, steps=8, learning_rate=0.2, weight_decay=0.0)
    words = inversion.training.word_norm(demo_pipeline.pipeline, "salmon sushi")
    free = train_embedding(demo_pipeline, sushi_image(), "salmon sushi", settings=loud)
    assert free.embedding.norm() > 1.5 * words
    held = train_embedding(
        demo_pipeline, sushi_image(), "salmon sushi", settings=dataclasses.replace(loud, max_norm=1.0)
    )
    assert held.embedding.norm() <= words * (1 + 1e-5)
    assert held.embedding.norm() > 0.5 * words and not torch.equal(held.embedding, free.embedding)
    with pytest.raises(ValueError, match="max_norm"):
        InversionSettings(max_norm=0.0).check()


def test_timesteps_come_from_the_chosen_range(demo_pipeline):
    seen = []
    unet = demo_pipeline.pipeline.unet
    hook = unet.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    try:
        settings = dataclasses.replace(TINY, steps=12, timesteps=(0.6, 0.8))
        train_embedding(demo_pipeline, sushi_image(), "salmon sushi", settings=settings)
    finally:
        hook.remove()
    t = torch.cat(seen)
    n = demo_pipeline.pipeline.scheduler.config.num_train_timesteps
    assert len(t) == 12 and t.min() >= round(0.6 * (n - 1)) and t.max() <= round(0.8 * (n - 1))
    assert len(set(t.tolist())) > 1


def test_masked_loss_falls_on_a_fixed_batch(demo_pipeline):
    # The demo model is random and barely listens to the text, so fresh noise every step would
    # hide the progress; on one fixed batch (same seed) the masked loss must fall steadily.
    settings = InversionSettings(steps=12, resolution=64, seed=1, resample=False)
    result = train_embedding(demo_pipeline, sushi_image(), "salmon sushi", settings=settings)
    losses = result.losses
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert losses[-1] < losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 10  # (almost) monotone
    assert result.embedding.dtype == torch.float32 and result.embedding.shape == (32,)


def test_pixels_outside_the_mask_do_not_matter(demo_pipeline):
    image = sushi_image()
    other = image.copy()
    invisible = other[..., 3] == 0
    other[invisible, :3] = np.random.default_rng(0).integers(0, 256, (int(invisible.sum()), 3))
    a = train_embedding(demo_pipeline, image, "salmon sushi", settings=TINY)
    b = train_embedding(demo_pipeline, other, "salmon sushi", settings=TINY)
    assert torch.equal(a.embedding, b.embedding)
    assert a.losses == b.losses
    # ... and so they do not change the cache key either; a visible pixel does.
    key = cache_key("m", image, "salmon sushi", TINY, 64)
    assert cache_key("m", other, "salmon sushi", TINY, 64) == key
    visible = image.copy()
    visible[10, 10, 0] ^= 1
    assert cache_key("m", visible, "salmon sushi", TINY, 64) != key
    assert cache_key("m", image, "tuna sushi", TINY, 64) != key
    assert cache_key("other model", image, "salmon sushi", TINY, 64) != key
    assert cache_key("m", image, "salmon sushi", dataclasses.replace(TINY, steps=4), 64) != key


def test_train_embedding_leaves_the_model_as_it_was(demo_pipeline):
    before = model_state(demo_pipeline)
    train_embedding(demo_pipeline, sushi_image(), "salmon sushi", settings=dataclasses.replace(TINY, steps=1))
    after = model_state(demo_pipeline)
    assert after[0] == before[0] and after[1] is before[1] and after[2] == before[2]
    assert not any(p.grad is not None for p in demo_pipeline.pipeline.unet.parameters())


def test_fp16_model_trains_an_fp32_embedding(demo_pipeline):
    from diffusers import StableDiffusionPipeline

    from core.models import LoadedModel

    pipe = demo_pipeline.pipeline
    half = StableDiffusionPipeline(
        **{
            **pipe.components,
            "unet": copy.deepcopy(pipe.unet).half(),
            "vae": copy.deepcopy(pipe.vae).half(),
            "text_encoder": copy.deepcopy(pipe.text_encoder).half(),
        }
    )
    model = LoadedModel(half, "demo", "demo-fp16", torch.device("cpu"), torch.float16)
    result = train_embedding(model, sushi_image(), "salmon sushi", settings=TINY)
    assert result.embedding.dtype == torch.float32 and torch.isfinite(result.embedding).all()
    assert half.text_encoder.get_input_embeddings().weight.dtype == torch.float16  # untouched


def test_loss_scale_skips_overflowing_steps():
    scaler = inversion.training._LossScale(enabled=True)
    param = torch.ones(3, requires_grad=True)
    start = scaler.scale
    assert scaler.grad((param * float("inf")).sum(), param) is None
    assert scaler.scale == start / 2
    grad = scaler.grad((param * 2).sum(), param)
    assert grad.dtype == torch.float32 and torch.equal(grad, torch.full((3,), 2.0))
