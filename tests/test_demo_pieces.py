"""On the trained demo model, each Collage Diffusion piece improves its own fidelity measure.

A small, fixed slice of `benchmarks/eval_pieces.py` (held-out collages of the demo model's shapes;
the full table is in docs/demo_model.md): strong enough effects that a regression in a piece, or
in the demo model, shows here.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.eval_pieces import configured, run
from benchmarks.held_out import HELD_OUT_SEED, composite_of, edge_recall, make_cases, placed
from core.options import EngineOptions

STEPS = dict(steps=12, guidance_scale=4.0)


@pytest.fixture(scope="module")
def layout_cases():
    return make_cases(6, HELD_OUT_SEED, "layout")


def test_masked_attention_puts_objects_in_their_layers(demo_pipeline, layout_cases):
    def accuracy(weight: float) -> float:
        hits = []
        for case in layout_cases:
            image, _ = run(
                demo_pipeline, configured(case, strength=1.0, layer={"attention_weight": weight}, **STEPS)
            )
            hits += [placed(image, o, m) for o, m in zip(case.objects, case.visible, strict=True)]
        return float(np.mean(hits))

    without, with_bias = accuracy(0.0), accuracy(1.5)
    print(f"\nspatial accuracy: without {without:.2f}, with masked attention {with_bias:.2f}")
    assert with_bias >= without + 0.25


def test_demo_controlnet_keeps_the_layers_edges(demo_pipeline, layout_cases):
    def recall(weight: float) -> float:
        values = []
        for case in layout_cases:
            c = configured(
                case, strength=0.7, layer={"attention_weight": 0.0, "control_weight": weight}, **STEPS
            )
            image, _ = run(demo_pipeline, c, EngineOptions())  # the demo brings its own ControlNet
            values += [edge_recall(image, composite_of(case), m) for m in case.visible]
        return float(np.mean(values))

    without, with_control = recall(0.0), recall(1.0)
    print(f"\nedge recall: without {without:.2f}, with ControlNet {with_control:.2f}")
    assert with_control >= without + 0.1


def test_per_layer_strength_keeps_one_layer_and_blends_another(demo_pipeline):
    """One strength for everything keeps the first cut-out (low) or hides the second one's seam
    (high); per-layer strength does both."""
    from dataclasses import replace

    from benchmarks.held_out import harmonization_scores

    cases = make_cases(6, HELD_OUT_SEED, "seams")

    def scores(background: float, keep: float | None, blend: float | None) -> np.ndarray:
        values = []
        for case in cases:
            layers = [
                replace(layer, attention_weight=0.0, strength=s)
                for layer, s in zip(case.collage.layers, (keep, blend), strict=True)
            ]
            image, _ = run(demo_pipeline, replace(case.collage, layers=layers, strength=background, **STEPS))
            values.append(harmonization_scores(image, case))
        return np.mean(values, axis=0)

    low, high, per_layer = scores(0.2, None, None), scores(0.9, None, None), scores(0.9, 0.2, 0.9)
    print(f"\n(seam of the 2nd, distance of the 1st): s=0.2 {low}, s=0.9 {high}, per layer {per_layer}")
    assert per_layer[0] < low[0] - 10  # the second layer's seam goes as with a high strength
    assert per_layer[1] < high[1] - 10  # while the first layer stays as with a low one


def test_reference_mode_keeps_an_unnamed_colour(demo_pipeline):
    """The unnamed-colour measure (strength 0.9): the reference mode's anchor keeps the layer's
    colour that SDEdit loses (docs/appearance.md: distance -76 % on 20 collages)."""
    from dataclasses import replace

    from benchmarks.held_out import inside_distance

    def distance(mode) -> float:
        values = []
        for case in make_cases(4, HELD_OUT_SEED, "colour"):
            t = case.textured
            layers = [
                replace(layer, attention_weight=0.0, appearance=mode if i == t else False)
                for i, layer in enumerate(case.collage.layers)
            ]
            image, _ = run(demo_pipeline, replace(case.collage, layers=layers, strength=0.9, **STEPS))
            values.append(inside_distance(image, case.collage.layers[t].image[..., :3], case.visible[t]))
        return float(np.mean(values))

    sdedit, reference = distance(False), distance("reference")
    print(f"\nunnamed colour distance: SDEdit {sdedit:.1f}, reference {reference:.1f}")
    assert reference <= 0.6 * sdedit
