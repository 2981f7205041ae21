"""The low-frequency appearance anchor (core/anchor.py) and the sampler's `after_step` hook point:
the function at tensor level, the latents outside a layer's mask at every step of a generation,
weight 0 / an empty window, per-layer strength, variants, and the tiny SDXL."""

import numpy as np
import pytest
import torch

from core.anchor import LowFrequencyAnchor, anchor_low_frequencies, low_frequency_anchor_hook, masked_lowpass
from core.generate import generate
from core.options import EngineOptions, build_hooks
from tests.test_reference import collage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kernel", [0, 3])
def test_anchor_moves_only_the_masks_low_frequencies(kernel):
    torch.manual_seed(0)
    x, ref = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8) * 2 + 1
    mask = torch.zeros(8, 8)
    mask[2:6, 1:5] = 1.0
    mask[6, 1:5] = 0.5  # a soft edge
    out = anchor_low_frequencies(x, ref, mask, 1.0, kernel)
    outside = (mask == 0).expand_as(x)
    assert torch.equal(out[outside], x[outside])  # the same values, not merely close
    assert not torch.allclose(out[~outside], x[~outside])
    assert torch.equal(anchor_low_frequencies(x, ref, mask, 0.0, kernel), x)
    # Where the mask is 1 the anchored low-pass is the reference's and the detail (x - LP x) is x's
    # (with a binary mask, exactly; the soft edge mixes them).
    hard = (mask == 1).float()
    out = anchor_low_frequencies(x, ref, hard, 1.0, kernel)
    inside = (hard > 0).expand_as(x)
    lp_out, lp_ref, lp_x = (masked_lowpass(t, hard, kernel) for t in (out, ref, x))
    if kernel == 0:  # the whole mask's mean: one value per channel
        assert torch.allclose(lp_out[inside], lp_ref[inside], atol=1e-5)
        assert torch.allclose((out - lp_out)[inside], (x - lp_x)[inside], atol=1e-5)
    half = anchor_low_frequencies(x, ref, hard, 0.5, kernel)
    assert torch.allclose(half[inside], (x + 0.5 * (lp_ref - lp_x))[inside], atol=1e-6)


def test_lowpass_kernel_and_window_are_checked():
    with pytest.raises(ValueError, match="kernel"):
        masked_lowpass(torch.zeros(1, 4, 8, 8), torch.ones(8, 8), 2)
    with pytest.raises(ValueError, match="start and end"):
        LowFrequencyAnchor(
            torch.zeros(1, 4, 8, 8), torch.ones(1, 8, 8), [1.0], layers=[0], start=0.9, end=0.5
        )
    # A mask that covers no latent pixel leaves everything as it is.
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(anchor_low_frequencies(x, x + 1, torch.zeros(8, 8), 1.0, 0), x)


class Spy:
    """Wraps the anchor hook and records each after_step's latents in and out."""

    def __init__(self, **options):
        self.options, self.hook, self.calls = options, None, []

    def __call__(self, setup):
        self.hook = low_frequency_anchor_hook(setup, **self.options)
        return None if self.hook is None else self

    def installed(self, unet):
        return self.hook.installed(unet)

    def on_step(self, step):
        self.hook.on_step(step)

    def after_step(self, result):
        before = result.latents.clone()
        out = self.hook.after_step(result)
        self.calls.append((before, out, self.hook._active, result.noised(self.hook.z_ref)))
        return out


def test_generation_changes_latents_only_inside_the_mask_at_every_step(demo_pipeline):
    """End to end, two variants: at every step the anchor's output equals its input outside the
    layer's latent mask, moves inside it in the steps of its window, and the reference it anchors
    to carries each variant's own noise (the clean reference after the last step)."""
    spy = Spy(start=0.5)
    plain = generate(demo_pipeline, collage(appearance=False), variants=2).images
    out = generate(demo_pipeline, collage(), variants=2, hooks=[spy]).images
    outside = (spy.hook.masks.sum(0) == 0)[None, None].expand_as(spy.calls[0][0])
    assert spy.hook.masks.sum() > 0 and outside.any()
    active = [c[2] for c in spy.calls]
    assert any(active) and not all(active)
    for before, after, acted, _noised in spy.calls:
        assert torch.equal(after[outside], before[outside])
        assert acted == (not torch.equal(after, before))
    for *_, noised in spy.calls[:-1]:
        assert not torch.equal(noised[0], noised[1])  # each variant's own noise
    assert torch.equal(spy.calls[-1][3], spy.hook.z_ref.expand(2, -1, -1, -1))
    for a, b in zip(out, plain, strict=True):
        diff = np.abs(a.image.astype(int) - b.image.astype(int)).mean(-1)
        assert diff[8:32, 4:28].mean() > diff[30:50, 34:62].mean()  # the layer's region moved most


def test_weight_zero_or_empty_window_is_the_plain_path_exactly(demo_pipeline):
    plain = generate(demo_pipeline, collage(appearance=False)).images[0].image
    assert low_frequency_anchor_hook_for(demo_pipeline, collage(weight=0.0)) is None
    # The hook in place but acting in no step: the after_step plumbing changes nothing.
    spy = Spy(start=0.0, end=0.0)
    assert np.array_equal(generate(demo_pipeline, collage(), hooks=[spy]).images[0].image, plain)
    assert spy.calls and not any(c[2] for c in spy.calls)
    # Through the engine: weight 0 is the same image as appearance off; a weight brings the anchor
    # (and, when asked for, reference attention).
    images = []
    for art in (collage(weight=0.0), collage(appearance=False)):
        hooks, _ = build_hooks(demo_pipeline, art, EngineOptions())
        images.append(generate(demo_pipeline, art, hooks=hooks).images[0].image)
    assert np.array_equal(*images)
    hooks, _ = build_hooks(demo_pipeline, collage(), EngineOptions(reference_attention=False))
    assert [h.func.__name__ for h in hooks][-1] == "low_frequency_anchor_hook"
    hooks, _ = build_hooks(demo_pipeline, collage(), EngineOptions(reference_anchor=0.0))
    assert "low_frequency_anchor_hook" not in [h.func.__name__ for h in hooks]


def low_frequency_anchor_hook_for(model, art):
    found = []
    generate(model, art, hooks=[lambda setup: found.append(low_frequency_anchor_hook(setup))])
    return found[0]


class InputSpy:
    """Records the latents each U-Net call gets (DDIM's scale_model_input is the identity)."""

    def __init__(self):
        self.inputs = []

    def __call__(self, setup):
        return self

    def installed(self, unet):
        import contextlib

        return contextlib.nullcontext(self)

    def on_step(self, step):
        pass

    def unet_kwargs(self, model_input, timestep, embeds, added_cond_kwargs):
        self.inputs.append(model_input.clone())
        return {}


def test_per_layer_strength_holds_a_region_that_has_not_started(demo_pipeline):
    """The anchored layer starts later (strength 0.3 under a background at 0.9): until its start
    its region is held at the noised composite, the same with or without the anchor."""
    art = collage(strength=0.9)
    art.layers[0].strength = 0.3
    plain_art = collage(appearance=False, strength=0.9)
    plain_art.layers[0].strength = 0.3
    with_anchor, without = InputSpy(), InputSpy()
    out = generate(demo_pipeline, art, hooks=[Spy(start=0.0), with_anchor]).images[0].image
    plain = generate(demo_pipeline, plain_art, hooks=[without]).images[0].image
    region = (slice(None), slice(None), slice(2, 4), slice(1, 3))  # inside the layer, latent pixels
    # 6 steps: the background runs 5 (0.9), the layer 1 (0.3), entering its step as the noised
    # composite: every U-Net input holds it.
    assert len(with_anchor.inputs) == 5
    for a, b in zip(with_anchor.inputs, without.inputs, strict=True):
        assert torch.equal(a[region], b[region])
    assert not np.array_equal(out, plain)  # after its one step, the anchor did act


def test_runs_on_tiny_sdxl_and_changes_only_the_mask_at_each_step(tiny_sdxl):
    art = collage()
    art.layers[1].appearance = "reference"
    spy = Spy()
    out = generate(tiny_sdxl, art, hooks=[spy]).images[0].image
    plain = generate(tiny_sdxl, collage(appearance=False)).images[0].image
    assert spy.hook.layers == [0, 1]
    outside = (spy.hook.masks.sum(0) == 0)[None, None].expand_as(spy.calls[0][0])
    for before, after, _acted, _noised in spy.calls:
        assert torch.equal(after[outside], before[outside])
    assert any(not torch.equal(after, before) for before, after, *_ in spy.calls)
    assert out.shape == plain.shape and not np.array_equal(out, plain)
    # The reference follows the latents' level down the (Euler) schedule: clean after the last step.
    levels = [float((noised - spy.hook.z_ref).std()) for *_, noised in spy.calls]
    assert all(a > b for a, b in zip(levels, levels[1:], strict=False)) and levels[-1] == 0.0
