"""Results as a layer stack (core/layer_stack.py): the split, its exact recomposition, the fill."""

import numpy as np
import pytest

from core.collage import Collage, Layer
from core.compositing import composite
from core.formats.images import composite as ora_composite
from core.layer_stack import (
    background_prompt,
    composite_stack,
    fill_collage,
    object_alphas,
    opaque_region,
    split_result,
    stack_results,
)


def random_collage(rng, width=96, height=80, n=4) -> Collage:
    layers = []
    for i in range(n):
        h, w = rng.integers(10, 50, size=2)
        image = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
        # Mostly opaque or transparent with soft pixels between, like real cut-outs.
        alpha = rng.choice([0, 255, 255, 255, 1, 128, 254], size=(h, w)).astype(np.uint8)
        alpha[h // 2, w // 2] = 255
        image[..., 3] = alpha
        x, y = int(rng.integers(-10, width - 5)), int(rng.integers(-10, height - 5))
        opacity = float(rng.choice([1.0, 1.0, 0.6]))
        layers.append(
            Layer(text=f"object {i}", name=f"layer {i}", image=image, offset=(x, y), opacity=opacity)
        )
    return Collage(prompt="things on a table", layers=layers, width=width, height=height)


def check_recomposition(stack, result: np.ndarray) -> None:
    h, w = result.shape[:2]
    alphas = [_placed_alpha(layer, w, h) for layer in stack.layers if layer.kind == "object"]
    opaque = opaque_region(alphas, (h, w))
    for composed in (
        composite_stack(stack.layers, w, h),
        # the same stack through the OpenRaster writer's compositor (float32, as a file reader would)
        ora_composite(
            [Layer(text="", image=s.image, offset=s.offset) for s in stack.layers if s.visible], w, h
        ),
    ):
        assert (composed[..., 3] == 255).all()
        diff = np.abs(composed[..., :3].astype(int) - result.astype(int))
        assert diff.max() <= 1
        assert (diff[opaque] == 0).all()


def _placed_alpha(layer, w, h) -> np.ndarray:
    alpha = np.zeros((h, w), np.uint8)
    x, y = layer.offset
    lh, lw = layer.image.shape[:2]
    alpha[y : y + lh, x : x + lw] = layer.image[..., 3]
    return alpha


@pytest.mark.parametrize("seed", range(6))
def test_stack_recomposes_to_the_result_on_random_data(seed):
    rng = np.random.default_rng(seed)
    collage = random_collage(rng)
    result = rng.integers(0, 256, size=(collage.height, collage.width, 3), dtype=np.uint8)
    fill = rng.integers(0, 256, size=result.shape, dtype=np.uint8)  # anything at all
    stack = split_result(collage, result, fill, seed=seed)
    check_recomposition(stack, result)
    # The fill shows where objects are opaque, and only there.
    background = stack.layers[0].image[..., :3]
    alphas = [_placed_alpha(s, collage.width, collage.height) for s in stack.layers if s.kind == "object"]
    opaque = opaque_region(alphas, (collage.height, collage.width))
    assert opaque.any()
    assert np.array_equal(background[opaque], fill[opaque])
    assert np.array_equal(background[~opaque], result[~opaque])


def test_layers_are_named_in_input_order_and_hold_only_what_shows():
    rng = np.random.default_rng(1)
    collage = random_collage(rng, n=3)
    # The top layer covers layer 0 entirely: layer 0 shows nowhere beyond its own visible part.
    collage.layers[0].image[..., 3] = 255
    collage.layers[0].offset = (10, 10)
    top = np.zeros((collage.layers[0].height + 20, collage.layers[0].width + 20, 4), np.uint8)
    top[..., 3] = 255
    collage.layers[2].image, collage.layers[2].offset = top, (0, 0)
    result = rng.integers(0, 256, size=(collage.height, collage.width, 3), dtype=np.uint8)
    stack = split_result(collage, result, None, seed=0)
    assert [s.name for s in stack.layers] == ["background", "layer 0", "layer 1", "layer 2", "flat result"]
    assert [s.visible for s in stack.layers] == [True, True, True, True, False]
    hidden = _placed_alpha(stack.layers[1], collage.width, collage.height)
    assert not hidden.any()  # covered by the top layer: nothing of it shows
    flat = composite(collage)
    alphas = object_alphas(flat, 3, 3)
    for mask, alpha in zip(flat.masks.layers, alphas, strict=True):
        assert (alpha[mask > 0] == 255).all()  # every visible pixel comes along, opaque
        # growth only into the background: never over pixels another object fully covers
        others = flat.masks.layers.sum(axis=0) - mask
        assert not alpha[(others >= 1.0) & (mask == 0)].any()


def test_background_prompt_takes_the_objects_words_out():
    texts = ["a cup", "an apple"]
    assert background_prompt("a cup, an apple on a wooden table", texts) == "on a wooden table"
    assert background_prompt("An apple and a cup; a kitchen", texts) == "a kitchen"
    assert background_prompt("a cup, an apple", texts) == "background"


def test_fill_collage_regenerates_only_the_region():
    rng = np.random.default_rng(3)
    collage = random_collage(rng)
    image = rng.integers(0, 256, size=(collage.height, collage.width, 3), dtype=np.uint8)
    region = np.zeros((collage.height, collage.width), bool)
    region[20:40, 30:60] = True
    fill = fill_collage(collage, image, region, seed=11)
    fill.validate()
    flat = composite(fill)
    assert np.array_equal(flat.image[~region], image[~region])
    strength = flat.masks.layers[0] * fill.layers[0].strength + flat.masks.background * fill.strength
    assert (strength[region] == 1.0).all() and (strength[~region] == 0.0).all()
    assert fill.seed == 11
    assert all(layer.text in fill.negative_prompt for layer in collage.layers)


@pytest.mark.usefixtures("one_torch_thread")
def test_demo_generation_stack_recomposes_and_fills(demo_pipeline):
    from core.generate import generate

    rng = np.random.default_rng(7)
    collage = random_collage(rng, width=64, height=64, n=2)
    collage.steps, collage.seed = 3, 5
    result = generate(demo_pipeline, collage)
    stacked = stack_results(demo_pipeline, collage, result, (64, 64))
    assert len(stacked.stacks) == 1 and stacked.stacks[0].seed == 5
    stack = stacked.stacks[0]
    assert stack.fill_seconds > 0 and stacked.fill_seconds == stack.fill_seconds
    image = result.images[0].image
    check_recomposition(stack, image)
    alphas = [_placed_alpha(s, 64, 64) for s in stack.layers if s.kind == "object"]
    opaque = opaque_region(alphas, (64, 64))
    background = stack.layers[0].image[..., :3]
    assert not np.array_equal(background[opaque], image[opaque])  # the engine filled it
    assert np.array_equal(background[~opaque], image[~opaque])
    # Same seed, same fill: the pass is deterministic.
    again = stack_results(demo_pipeline, collage, result, (64, 64)).stacks[0]
    assert np.array_equal(again.layers[0].image, stack.layers[0].image)


def test_fill_phase_is_a_wire_phase():
    from core.progress import FILL_PHASE
    from krita_plugin.collage_diffusion import wire

    assert FILL_PHASE == wire.PHASE_FILL and FILL_PHASE in wire.PHASES


def test_the_plugin_names_the_flat_layer_as_core_does():
    import ast
    from pathlib import Path

    from core.layer_stack import FLAT_NAME

    source = Path(__file__).parents[1] / "krita_plugin" / "collage_diffusion" / "results.py"
    names = {
        node.targets[0].id: node.value.value
        for node in ast.parse(source.read_text()).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    assert names["FLAT_NAME"] == FLAT_NAME


@pytest.mark.usefixtures("one_torch_thread")
def test_the_fill_is_nearer_the_surroundings_than_the_object(demo_pipeline):
    """A fixed slice of benchmarks/eval_pieces.py's "layers" measure on held-out demo collages."""
    from benchmarks.eval_pieces import configured, fill_distances
    from benchmarks.held_out import HELD_OUT_SEED, make_cases
    from core.generate import generate

    values = []
    for case in make_cases(4, HELD_OUT_SEED, "layout"):
        collage = configured(case, strength=0.7, steps=12, guidance_scale=4.0)
        result = generate(demo_pipeline, collage)
        stack = stack_results(demo_pipeline, collage, result, (collage.width, collage.height)).stacks[0]
        alphas = [_placed_alpha(s, collage.width, collage.height) for s in stack.layers if s.kind == "object"]
        opaque = opaque_region(alphas, (collage.height, collage.width))
        values += fill_distances(stack.layers[0].image[..., :3], result.images[0].image, case, opaque)
    to_object, to_background, nearer = np.mean(values, axis=0)
    print(f"\nfill: to object {to_object:.0f}, to background {to_background:.0f}, nearer bg {nearer:.2f}")
    assert to_background < to_object / 2 and nearer >= 0.75
