"""Per-layer strength, paste-back and regenerate (algorithm.md §4, §5) on the demo model."""

import contextlib

import numpy as np
import pytest
import torch

from core.collage import Collage, CollageError, Layer
from core.compositing import composite
from core.generate import Regenerate, generate, image_to_tensor, seed_noise
from core.schedulers import make_scheduler
from core.strength import feather_weights, paste_back, region_mask, start_indices, strength_map

SCHEDULERS = ["ddim", "euler", "dpm++2m"]


def block(w, h, color):
    img = np.zeros((h, w, 4), np.uint8)
    img[...] = (*color, 255)
    return img


def collage(**overrides):
    kwargs = dict(
        prompt="a red box, a blue ball and a green leaf",
        layers=[
            Layer("red box", block(24, 24, (220, 40, 40)), offset=(0, 0), strength=0.0),
            Layer("blue ball", block(24, 24, (40, 40, 220)), offset=(40, 0), strength=1.0),
            Layer("green leaf", block(32, 24, (40, 200, 40)), offset=(16, 40), strength=0.5),
        ],
        width=64,
        height=64,
        steps=8,
        strength=0.8,
        seed=3,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


def test_strength_map_weights_each_layer_by_its_visible_mask():
    c = collage()
    s = strength_map(c, composite(c))
    assert s[5, 5] == 0.0 and s[5, 45] == 1.0 and s[45, 20] == 0.5
    assert s[30, 30] == pytest.approx(0.8)  # background


def test_start_indices_follow_img2img_rounding():
    s = np.array([[0.0, 0.25, 0.5], [0.7, 0.6999999, 1.0]], np.float32)
    assert start_indices(s, 10).tolist() == [[10, 8, 5], [3, 3, 0]]


def test_feather_is_inside_the_changed_region_only():
    changed = np.zeros((32, 32), bool)
    changed[8:24, 8:24] = True
    w = feather_weights(changed, 4)
    assert (w[~changed] == 0).all()
    assert w[16, 16] == 1.0 and 0 < w[8, 16] < 1
    original = np.full((32, 32, 3), 7, np.uint8)
    generated = np.full((32, 32, 3), 200, np.uint8)
    out = paste_back(generated, original, w)
    assert np.array_equal(out[~changed], original[~changed])
    assert (out[16, 16] == 200).all()


def test_region_mask_dilates():
    m = np.zeros((32, 32), np.float32)
    m[16, 16] = 0.3
    region = region_mask(m, 3)
    assert region[16, 19] and not region[16, 20] and region.sum() > 1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_strength_zero_layer_is_byte_identical(demo_pipeline, scheduler):
    c = collage(scheduler=scheduler)
    result = generate(demo_pipeline, c)
    out, start = result.images[0].image, result.composite
    assert np.array_equal(out[:24, :24], start[:24, :24])  # the strength-0 red box
    assert not np.array_equal(out[:24, 40:64], start[:24, 40:64])  # the strength-1 ball changed
    assert not np.array_equal(out[40:64, 16:48], start[40:64, 16:48])  # the leaf too


def test_strength_one_changes_a_layer_that_would_otherwise_stay(demo_pipeline):
    c = collage(strength=0.0)
    for layer in c.layers:
        layer.strength = 0.0
    c.layers[1].strength = 1.0
    result = generate(demo_pipeline, c)
    out, start = result.images[0].image, result.composite
    changed = np.any(out != start, axis=2)
    assert changed[:24, 40:64].all()
    assert not changed[:, :36].any()  # everything at strength 0, farther than the feather, is exact


class RecordUNetInputs:
    """A sampler hook that records the latents the U-Net sees at every step."""

    def __init__(self):
        self.inputs = []

    def installed(self, unet):
        @contextlib.contextmanager
        def ctx():
            handle = unet.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].clone()))
            try:
                yield
            finally:
                handle.remove()

        return ctx()

    def on_step(self, step):
        pass


def test_regions_wait_at_the_noised_composite_until_their_start(demo_pipeline):
    c = collage(guidance_scale=1.0, scheduler="ddim")  # DDIM: model input = latents
    recorder = RecordUNetInputs()
    generate(demo_pipeline, c, hooks=[lambda setup: recorder])
    pipe = demo_pipeline.pipeline
    start_image = composite(c).image
    z0 = pipe.vae.encode(image_to_tensor(start_image, torch.device("cpu"), torch.float32)).latent_dist.mode()
    z0 = z0 * pipe.vae.config.scaling_factor
    noise = seed_noise([c.seed], tuple(z0.shape[1:]))
    scheduler = make_scheduler("ddim", pipe.scheduler)
    scheduler.set_timesteps(c.steps)
    # The ball (strength 1) starts at step 0 of 8; the leaf (0.5) at step 4; the box (0) never.
    assert len(recorder.inputs) == c.steps
    ball, leaf, box = (slice(0, 3), slice(5, 8)), (slice(6, 8), slice(3, 5)), (slice(0, 3), slice(0, 3))
    for i, x in enumerate(recorder.inputs):
        held = scheduler.add_noise(z0, noise, scheduler.timesteps[i : i + 1])
        assert torch.allclose(x[(0, slice(None), *box)], held[(0, slice(None), *box)], atol=1e-5)
        leaf_held = torch.allclose(x[(0, slice(None), *leaf)], held[(0, slice(None), *leaf)], atol=1e-5)
        assert leaf_held == (i <= 4)  # held up to and including its first step's input
        if i > 0:
            assert not torch.allclose(x[(0, slice(None), *ball)], held[(0, slice(None), *ball)], atol=1e-3)


def test_regenerate_changes_only_the_dilated_layer_region(demo_pipeline):
    c = collage()
    base = generate(demo_pipeline, c).images[0].image
    regen = Regenerate(base_image=base, layer_index=2, dilation_px=4)
    result = generate(demo_pipeline, c, regenerate=regen, seeds=[11])
    out = result.images[0].image
    leaf_region = np.zeros((64, 64), bool)
    leaf_region[40 - 4 : 64, 16 - 4 : 48 + 4] = True
    assert np.array_equal(out[~leaf_region], base[~leaf_region])
    assert not np.array_equal(out[44:60, 20:44], base[44:60, 20:44])
    assert result.images[0].seed == 11


def test_regenerate_validates_its_inputs(demo_pipeline):
    c = collage()
    base = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(CollageError, match="regenerate.layer_index: must be in 0..2"):
        generate(demo_pipeline, c, regenerate=Regenerate(base, 5))
    with pytest.raises(CollageError, match="regenerate.base_image: is 32×32"):
        generate(demo_pipeline, c, regenerate=Regenerate(np.zeros((32, 32, 3), np.uint8), 0))
    c.layers[0].visible = False
    with pytest.raises(CollageError, match="layer 0 .* is hidden"):
        generate(demo_pipeline, c, regenerate=Regenerate(base, 0))


def test_regenerate_a_mask_changes_no_pixel_outside_the_grown_mask(demo_pipeline):
    c = collage()
    base = generate(demo_pipeline, c).images[0].image
    mask = np.zeros((64, 64), np.uint8)
    mask[28:36, 20:30] = 255  # a selection across the background and the leaf's top
    result = generate(demo_pipeline, c, regenerate=Regenerate(base, mask=mask, dilation_px=3), seeds=[11])
    out = result.images[0].image
    grown = region_mask(mask.astype(np.float32), 3)
    assert grown.sum() > mask.astype(bool).sum()  # grown: the test checks the dilation too
    assert np.array_equal(out[~grown], base[~grown])
    assert not np.array_equal(out[29:35, 21:29], base[29:35, 21:29])
    assert np.array_equal(result.composite, base)  # a selection redoes the result itself


def test_regenerate_a_mask_at_another_size_keeps_the_outside(demo_pipeline):
    from core.sizing import generate_at_size

    c = collage(width=60, height=60)
    base = generate_at_size(demo_pipeline, c, (64, 64)).images[0].image
    mask = np.zeros((60, 60), bool)
    mask[10:20, 30:50] = True
    out = generate_at_size(demo_pipeline, c, (64, 64), regenerate=Regenerate(base, mask=mask, dilation_px=2))
    grown = region_mask(mask.astype(np.float32), 2)
    assert np.array_equal(out.images[0].image[~grown], base[~grown])
    assert not np.array_equal(out.images[0].image[mask], base[mask])


def test_regenerate_mask_is_validated(demo_pipeline):
    c = collage()
    base = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(CollageError, match="regenerate.layer_index, mask: give one of them"):
        generate(demo_pipeline, c, regenerate=Regenerate(base, 0, mask=np.ones((64, 64), bool)))
    with pytest.raises(CollageError, match="regenerate.layer_index, mask: give one of them"):
        generate(demo_pipeline, c, regenerate=Regenerate(base))
    with pytest.raises(CollageError, match="regenerate.mask: selects no pixel"):
        generate(demo_pipeline, c, regenerate=Regenerate(base, mask=np.zeros((64, 64), np.uint8)))
    with pytest.raises(CollageError, match="regenerate.mask: is 32×64"):
        generate(demo_pipeline, c, regenerate=Regenerate(base, mask=np.ones((64, 32), np.uint8)))
    with pytest.raises(CollageError, match="regenerate.mask: must be an"):
        generate(demo_pipeline, c, regenerate=Regenerate(base, mask=np.ones((64, 64), np.float64)))


def test_all_strengths_zero_returns_the_start_image(demo_pipeline):
    c = collage(strength=0.0)
    for layer in c.layers:
        layer.strength = 0.0
    result = generate(demo_pipeline, c, variants=2)
    assert all(np.array_equal(img.image, result.composite) for img in result.images)
    assert [img.seed for img in result.images] == [3, 4]
