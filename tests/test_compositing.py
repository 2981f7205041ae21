"""Compositing with occlusion, offsets, opacity, and the mask pyramid."""

import numpy as np
import pytest

from core.collage import Collage, Layer
from core.compositing import area_resize, composite, mask_pyramid, unet_feature_sizes


def rect(w, h, color, alpha=255):
    img = np.zeros((h, w, 4), np.uint8)
    img[...] = (*color, alpha)
    return img


def collage_of(*layers, width=32, height=32, background=(0, 0, 0)):
    return Collage(prompt="p", layers=list(layers), width=width, height=height, background=background)


def test_upper_layer_occludes_lower():
    red = Layer("red", rect(16, 16, (255, 0, 0)), offset=(0, 0))
    blue = Layer("blue", rect(16, 16, (0, 0, 255)), offset=(8, 8))
    result = composite(collage_of(red, blue))
    assert tuple(result.image[4, 4]) == (255, 0, 0)
    assert tuple(result.image[12, 12]) == (0, 0, 255)  # overlap: blue is on top
    assert tuple(result.image[30, 30]) == (0, 0, 0)  # background
    m = result.masks
    assert m.layers[0][12, 12] == 0 and m.layers[1][12, 12] == 1
    assert m.layers[0][4, 4] == 1 and m.background[4, 4] == 0


def test_order_matters():
    red = Layer("red", rect(16, 16, (255, 0, 0)), offset=(0, 0))
    blue = Layer("blue", rect(16, 16, (0, 0, 255)), offset=(8, 8))
    assert tuple(composite(collage_of(blue, red)).image[12, 12]) == (255, 0, 0)


def test_semi_transparent_layers_blend_like_over():
    base = Layer("base", rect(32, 32, (200, 100, 0)))
    glass = Layer("glass", rect(32, 32, (0, 0, 255), alpha=128))
    result = composite(collage_of(base, glass))
    a = 128 / 255
    expected = np.rint(np.array([200, 100, 0]) * (1 - a) + np.array([0, 0, 255]) * a)
    assert np.array_equal(result.image[0, 0], expected.astype(np.uint8))
    assert result.masks.layers[0][0, 0] == pytest.approx(1 - a)
    assert result.masks.layers[1][0, 0] == pytest.approx(a)


def test_opacity_multiplies_alpha():
    layer = Layer("x", rect(32, 32, (255, 255, 255)), opacity=0.5)
    result = composite(collage_of(layer))
    assert result.masks.layers[0][0, 0] == pytest.approx(0.5)
    assert result.image[0, 0, 0] == 128


def test_offsets_and_partly_outside_layers_are_cropped():
    img = rect(16, 16, (255, 0, 0))
    img[0, 0] = (0, 255, 0, 255)  # marks the layer's own top-left pixel
    inside = Layer("a", img, offset=(5, 7))
    result = composite(collage_of(inside))
    assert tuple(result.image[7, 5]) == (0, 255, 0)
    assert result.masks.layers[0].sum() == 16 * 16

    hanging = Layer("b", img, offset=(-8, 24))  # left half off the canvas, bottom half below it
    m = composite(collage_of(hanging)).masks.layers[0]
    assert m.sum() == 8 * 8
    assert m[24:32, 0:8].all() and not m[:24].any()


def test_hidden_layers_are_skipped():
    hidden = Layer("hidden", rect(32, 32, (255, 0, 0)), visible=False)
    shown = Layer("shown", rect(8, 8, (0, 255, 0)))
    result = composite(collage_of(hidden, shown))
    assert [layer.text for layer in result.layers] == ["shown"]
    assert tuple(result.image[20, 20]) == (0, 0, 0)


def test_background_image_and_colour():
    bg = np.zeros((32, 32, 3), np.uint8)
    bg[:, 16:] = 90
    result = composite(collage_of(Layer("x", rect(4, 4, (1, 2, 3))), background=bg))
    assert result.image[10, 20, 0] == 90 and result.image[10, 10, 0] == 0
    result = composite(collage_of(Layer("x", rect(4, 4, (1, 2, 3))), background=(10, 20, 30)))
    assert tuple(result.image[10, 10]) == (10, 20, 30)


def random_collage(seed, n=4, size=64):
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n):
        w, h = rng.integers(8, 48, size=2)
        img = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
        layers.append(Layer(f"l{i}", img, offset=tuple(int(v) for v in rng.integers(-16, 56, size=2))))
    return collage_of(*layers, width=size, height=size)


@pytest.mark.parametrize("seed", range(5))
def test_masks_partition_every_pixel_at_every_resolution(seed):
    masks = composite(random_collage(seed)).masks
    assert np.allclose(masks.stacked.sum(0), 1.0, atol=1e-5)
    assert masks.stacked.min() >= 0
    sizes = unet_feature_sizes(64 // 8, 64 // 8, levels=4)
    assert sizes == [(8, 8), (4, 4), (2, 2), (1, 1)]
    pyramid = mask_pyramid(masks, sizes)
    for (h, w), level in pyramid.items():
        assert level.layers.shape == (4, h, w) and level.background.shape == (h, w)
        assert np.allclose(level.stacked.sum(0), 1.0, atol=1e-5)
        # Area averaging keeps each mask's share of the canvas.
        assert np.allclose(level.layers.sum((1, 2)) / (h * w), masks.layers.sum((1, 2)) / 64**2, atol=1e-5)


def test_feature_sizes_round_up_like_stride_two_convs():
    assert unet_feature_sizes(65, 40, 4) == [(65, 40), (33, 20), (17, 10), (9, 5)]


def test_area_resize_is_an_exact_box_average():
    m = np.zeros((8, 8), np.float32)
    m[:4, :2] = 1
    small = area_resize(m, 2, 2)
    assert np.allclose(small, [[0.5, 0], [0, 0]])
    odd = area_resize(np.ones((9, 9), np.float32), 5, 5)
    assert np.allclose(odd, 1.0)
