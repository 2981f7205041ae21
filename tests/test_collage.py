"""Validation of the collage data model: every bad value gets a message that names its field."""

import numpy as np
import pytest

from core.collage import Collage, CollageError, Layer, LayerGroup, flatten_layers


def square(size=16, color=(255, 0, 0), alpha=255):
    img = np.zeros((size, size, 4), np.uint8)
    img[...] = (*color, alpha)
    return img


def good_collage(**overrides):
    kwargs = dict(
        prompt="a bento box",
        layers=[Layer("salmon sushi", square(), offset=(8, 8)), Layer("ginger", square(), offset=(30, 30))],
        width=64,
        height=64,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


def problems_of(collage):
    with pytest.raises(CollageError) as info:
        collage.validate()
    return info.value.problems


def test_good_collage_validates():
    good_collage().validate()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(width=100), "width: must be a multiple of 8"),
        (dict(height=68), "height: must be a multiple of 8"),
        (dict(width=32), "width: must be a whole number of pixels in 64..8192"),
        (dict(width=64.0), "width: must be a whole number"),
        (dict(steps=0), "steps: must be a whole number in 1..1000"),
        (dict(seed=-1), "seed: must be a whole number"),
        (dict(seed=True), "seed: must be a whole number"),
        (dict(strength=1.5), "strength: must be in 0..1, got 1.5"),
        (dict(strength=float("nan")), "strength: must be in 0..1, got nan"),
        (dict(guidance_scale="high"), "guidance_scale: must be a number"),
        (dict(scheduler="plms"), "scheduler: must be one of"),
        (dict(background=(255, 0)), "background: must be an RGB colour"),
        (dict(background=np.zeros((32, 32, 3), np.uint8)), "background: image is 32×32, the canvas is 64×64"),
        (dict(layers=[]), "layers: a collage needs at least one layer"),
        (dict(prompt=None), "prompt: must be text"),
    ],
)
def test_collage_field_errors(overrides, expected):
    problems = problems_of(good_collage(**overrides))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "layer, expected",
    [
        (Layer("  ", square()), ".text: must not be empty"),
        (Layer("x", square(), strength=-0.1), ".strength: must be in 0..1"),
        (Layer("x", square(), strength=float("nan")), ".strength: must be in 0..1, got nan"),
        (Layer("x", square(), opacity=2.0), ".opacity: must be in 0..1"),
        (Layer("x", square(), attention_weight=float("inf")), ".attention_weight: must be in 0..10"),
        (Layer("x", square(), control_weight=-1.0), ".control_weight: must be in 0..2"),
        (Layer("x", square(), appearance="yes"), '.appearance: must be "off", "learned", "reference"'),
        (Layer("x", square(), offset=(1.5, 2)), ".offset: must be two whole numbers"),
        (Layer("x", square(), offset=(64, 0)), "lies entirely outside the 64×64 canvas"),
        (Layer("x", square(), offset=(-16, 0)), "lies entirely outside"),
        (Layer("x", square(alpha=0)), "has no visible pixels"),
        (Layer("x", np.zeros((16, 16, 3), np.uint8)), ".image: must be an 8-bit RGBA image"),
        (Layer("x", np.zeros((16, 16, 4), np.uint16)), ".image: must be an 8-bit RGBA image"),
        (Layer("x", np.zeros((0, 16, 4), np.uint8)), ".image: is empty"),
    ],
)
def test_layer_field_errors(layer, expected):
    problems = problems_of(good_collage(layers=[Layer("ok", square()), layer]))
    assert any(p.startswith("layers[1]") and expected in p for p in problems), problems


def test_every_problem_is_reported_at_once():
    problems = problems_of(good_collage(width=100, strength=2.0, layers=[Layer("", square())]))
    assert len(problems) == 3


def test_all_hidden_is_an_error_but_a_hidden_layer_outside_is_not():
    assert "every layer is hidden" in " ".join(
        problems_of(good_collage(layers=[Layer("x", square(), visible=False)]))
    )
    good_collage(
        layers=[Layer("x", square()), Layer("gone", square(), offset=(500, 500), visible=False)]
    ).validate()


def test_partly_outside_layer_is_fine():
    good_collage(layers=[Layer("x", square(), offset=(-8, 56))]).validate()


def test_flatten_groups_in_order_respects_visibility_and_opacity():
    a, b, c, d = (Layer(t, square()) for t in "abcd")
    tree = [
        a,
        LayerGroup([b, LayerGroup([c], opacity=0.5)], opacity=0.5),
        LayerGroup([Layer("hidden in group", square())], visible=False),
        Layer("hidden", square(), visible=False),
        d,
    ]
    flat = flatten_layers(tree)
    assert [layer.text for layer in flat] == ["a", "b", "c", "d"]
    assert [layer.opacity for layer in flat] == [1.0, 0.5, 0.25, 1.0]
    assert c.opacity == 1.0  # the tree itself is not modified
