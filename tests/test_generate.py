"""The generation entry point on the demo model: determinism, variants, progress, cancel."""

import threading

import numpy as np
import pytest

from core.collage import Collage, CollageError, Layer
from core.generate import generate
from core.progress import GenerationCancelled


def two_layer_collage(**overrides):
    red = np.zeros((24, 24, 4), np.uint8)
    red[...] = (220, 30, 30, 255)
    green = np.zeros((20, 28, 4), np.uint8)
    green[...] = (30, 200, 60, 255)
    kwargs = dict(
        prompt="a red box next to a green leaf",
        layers=[Layer("red box", red, offset=(4, 8)), Layer("green leaf", green, offset=(34, 30))],
        width=64,
        height=64,
        steps=6,
        strength=0.8,
        seed=7,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


def test_same_seed_same_pixels(demo_pipeline):
    a = generate(demo_pipeline, two_layer_collage())
    b = generate(demo_pipeline, two_layer_collage())
    assert a.images[0].image.shape == (64, 64, 3) and a.images[0].image.dtype == np.uint8
    assert np.array_equal(a.images[0].image, b.images[0].image)
    assert a.images[0].seed == 7


def test_variants_have_their_own_seeds_and_differ(demo_pipeline):
    result = generate(demo_pipeline, two_layer_collage(), variants=3, max_batch=2)
    assert [img.seed for img in result.images] == [7, 8, 9]
    assert not np.array_equal(result.images[0].image, result.images[1].image)
    # A variant is reproduced by its seed alone, whatever batch it was generated in.
    again = generate(demo_pipeline, two_layer_collage(seed=9))
    assert np.array_equal(again.images[0].image, result.images[2].image)


def test_strength_zero_returns_the_composite(demo_pipeline):
    result = generate(demo_pipeline, two_layer_collage(strength=0.0))
    assert np.array_equal(result.images[0].image, result.composite)


def test_progress_is_reported_every_step(demo_pipeline):
    events = []
    generate(demo_pipeline, two_layer_collage(steps=10, strength=0.5), progress=events.append)
    sampling = [(e.step, e.total) for e in events if e.phase == "sampling"]
    assert sampling == [(i, 5) for i in range(1, 6)]
    assert events[0].phase == "encoding" and events[-1].phase == "decoding"
    preview = next(e for e in events if e.phase == "sampling").preview()
    assert preview.shape == (8, 8, 3) and preview.dtype == np.uint8


def test_cancel_stops_within_one_step(demo_pipeline):
    cancel = threading.Event()
    steps_seen = []

    def on_progress(p):
        if p.phase == "sampling":
            steps_seen.append(p.step)
            if p.step == 2:
                cancel.set()

    with pytest.raises(GenerationCancelled):
        generate(
            demo_pipeline, two_layer_collage(steps=10, strength=1.0), progress=on_progress, cancel=cancel
        )
    assert steps_seen == [1, 2]


def test_invalid_collage_fails_before_any_model_work(demo_pipeline):
    with pytest.raises(CollageError, match="width: must be a multiple of 8"):
        generate(demo_pipeline, two_layer_collage(width=70))


def test_prompt_gets_missing_layer_texts(demo_pipeline):
    result = generate(demo_pipeline, two_layer_collage(prompt="a still life", steps=2))
    assert result.prompt == "a still life, red box, green leaf"


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_schedulers_run_and_are_deterministic(demo_pipeline, scheduler):
    a = generate(demo_pipeline, two_layer_collage(scheduler=scheduler, steps=4))
    b = generate(demo_pipeline, two_layer_collage(scheduler=scheduler, steps=4))
    assert np.array_equal(a.images[0].image, b.images[0].image)
    assert not np.array_equal(a.images[0].image, a.composite)
