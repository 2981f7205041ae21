"""The demo model's training kit: the synthetic data set and a (two-step) training run."""

from __future__ import annotations

import cv2
import numpy as np
import torch

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

    # Its ControlNet: two steps on the same latents, then packed with the pipeline into one file.
    from training.export import export, unpack
    from training.train_controlnet import main as train_controlnet

    net_dir = train_controlnet(
        [
            "--base",
            str(out),
            "--latents",
            str(tmp_path / "run" / "latents-8.pt"),
            "--run",
            str(tmp_path / "cn"),
            "--steps=2",
            "--batch=4",
        ]
    )
    assert (net_dir / "config.json").is_file()
    packed = export(out, tmp_path / "demo.safetensors", net_dir)
    folder = unpack(packed, tmp_path / "unpacked")
    from diffusers import ControlNetModel

    a = ControlNetModel.from_pretrained(net_dir)
    b = ControlNetModel.from_pretrained(folder / "controlnet")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, atol=1e-3, rtol=1e-3), name  # float16 storage
    model = load_pipeline(str(folder), device="cpu", dtype="float32")
    unload_pipeline()
    assert model.pipeline.unet.config.block_out_channels == pipe.unet.config.block_out_channels


def test_control_maps_are_the_engines_control_image_of_the_objects():
    from training.data import make_sample
    from training.train_controlnet import sample_control_map

    s = make_sample(3, 5)
    edges = sample_control_map(3, 5) > 0
    assert edges.shape == (64, 64) and 0.01 < edges.mean() < 0.3
    objects = np.clip(s.masks.sum(0), 0, 1)
    ring = cv2.dilate((objects > 0.05).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert edges[~ring].sum() == 0  # no background edges: grass and sky texture never show


def test_shipped_demo_model_draws_the_colours_it_is_asked_for(demo_pipeline):
    """The demo model is the trained one: a red circle comes out red, a blue square blue."""
    from training.data import COLOURS

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


def test_unknown_words_are_inserted_without_losing_the_caption():
    from core.demo_model import build_clip_tokenizer
    from training.train import EOS_ID, UNKNOWN_WORD_IDS, insert_unknown_words

    tokenizer = build_clip_tokenizer()
    captions = ["a red circle on grass", "a blue striped star and a green heart in the sky"] * 20
    ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    changed = ids.clone()
    insert_unknown_words(changed, np.random.default_rng(0), 0.5)
    touched = 0
    for before, after in zip(ids, changed, strict=True):
        if torch.equal(before, after):
            continue
        touched += 1
        at = int((before != after).nonzero()[0])  # the inserted word; the rest moved one place on
        assert at >= 1 and UNKNOWN_WORD_IDS[0] <= int(after[at]) < UNKNOWN_WORD_IDS[1]
        assert torch.equal(torch.cat([after[:at], after[at + 1 :]]), before[:-1])
        assert EOS_ID in after[at:].tolist()
    assert 5 < touched < 35  # about half
