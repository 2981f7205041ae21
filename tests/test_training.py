"""The demo model's training kit: the synthetic data set and a (two-step) training run."""

from __future__ import annotations

import numpy as np

from training.data import COLOURS, SHAPES, make_images, make_sample, render_object


def test_samples_are_deterministic_per_seed_and_index():
    a, b = make_sample(7, 3), make_sample(7, 3)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(make_sample(8, 3).image, a.image)
    images, captions = make_images(7, 4, start=2)
    assert np.array_equal(images[1], a.image) and captions[1] == a.caption


def test_captions_name_the_drawn_objects_and_masks_mark_them():
    for i in range(30):
        s = make_sample(1, i)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert len(s.masks) == len(s.objects)
        for obj, mask in zip(s.objects, s.masks, strict=True):
            assert obj.text in s.caption and obj.shape in SHAPES
            if obj.texture == "plain" and mask.max() > 0.99:
                # Fully covered pixels of a flat object have exactly its colour.
                px = s.image[mask > 0.999].astype(int)
                assert np.abs(px - np.array(COLOURS[obj.colour])).max() <= 1


def test_render_object_is_an_rgba_layer():
    s = make_sample(2, 0)
    rgba = render_object(s.objects[0], 64, 64)
    assert rgba.shape == (64, 64, 4) and rgba[..., 3].max() == 255 and rgba[..., 3].min() == 0


def test_two_step_training_saves_a_loadable_pipeline(tmp_path):
    from core.models import load_pipeline, unload_pipeline
    from training.train import main

    out = main(
        [
            "--run",
            str(tmp_path / "run"),
            "--vae-steps=2",
            "--vae-batch=2",
            "--unet-steps=2",
            "--decoder-steps=2",
            "--batch=4",
            "--n-images=8",
        ]
    )
    assert (out / "model_index.json").is_file()
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    model = load_pipeline(str(out), device="cpu", dtype="float32")
    try:
        pipe = model.pipeline
        assert pipe.vae_scale_factor == 8 and pipe.unet.config.in_channels == 4
        assert pipe.text_encoder.config.vocab_size == 49408
        assert any(name.endswith("attn2.processor") for name in pipe.unet.attn_processors)
        image = pipe(
            "a red circle on grass", height=64, width=64, num_inference_steps=2, output_type="np"
        ).images
        assert image.shape == (1, 64, 64, 3)
    finally:
        unload_pipeline()


def test_shipped_demo_model_draws_the_colours_it_is_asked_for(demo_pipeline):
    """The demo model is the trained one: a red circle comes out red, a blue square blue."""
    import pytest
    import torch

    from core import demo_model
    from training.data import COLOURS

    if not hasattr(demo_model, "DEMO_WEIGHTS_FILE"):
        pytest.skip("the default demo model is the random one")

    pipe = demo_pipeline.pipeline
    prompts = ["a red circle on white", "a blue square on white"]
    out = pipe(
        prompts,
        height=64,
        width=64,
        num_inference_steps=15,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    images = (out * 255).round().astype(np.float32)
    for image, colour, other in zip(images, ("red", "blue"), ("blue", "red"), strict=True):
        near = np.linalg.norm(image - np.array(COLOURS[colour], np.float32), axis=-1) < 80
        near_other = np.linalg.norm(image - np.array(COLOURS[other], np.float32), axis=-1) < 80
        assert near.mean() > 0.05, f"{colour}: {near.mean():.3f}"
        assert near.mean() > 5 * near_other.mean()
