"""Masked reference attention (core/reference.py): the processor at attention level, generation on
the demo model and tiny SDXL, weight 0, install/restore."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from core.collage import Collage, CollageError, Layer, appearance_mode
from core.generate import generate
from core.options import EngineOptions, build_hooks
from core.reference import ReferenceAttention, ReferenceSelfAttnProcessor, reference_attention_hook

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def striped(h, w):
    img = np.zeros((h, w, 4), np.uint8)
    img[..., 3] = 255
    img[::4] = (230, 40, 40, 255)
    img[1::4] = (230, 40, 40, 255)
    img[2::4] = (30, 40, 220, 255)
    img[3::4] = (30, 40, 220, 255)
    return img


def collage(appearance="reference", weight=1.0, **overrides):
    leaf = np.zeros((20, 28, 4), np.uint8)
    leaf[...] = (30, 200, 60, 255)
    kwargs = dict(
        prompt="a box next to a green leaf",
        layers=[
            Layer("box", striped(24, 24), offset=(4, 8), appearance=appearance, appearance_weight=weight),
            Layer("green leaf", leaf, offset=(34, 30)),
        ],
        width=64,
        height=64,
        steps=6,
        strength=0.9,
        seed=3,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


class Builder:
    def __init__(self, **options):
        self.options, self.hooks = options, []

    def __call__(self, setup):
        hook = reference_attention_hook(setup, **self.options)
        self.hooks.append(hook)
        return hook


def _bank_hook(attn, x, masks, key_masks, weight):
    """A hook with these masks and one weight for every layer (its bank filled by a "write" call)."""
    n = masks.shape[0]
    hook = ReferenceAttention(
        torch.zeros(1, 4, 2, 2),
        {x.shape[1]: masks},
        {x.shape[1]: key_masks},
        [weight] * n,
        layers=list(range(n)),
    )
    return hook


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_processor_changes_nothing_outside_the_mask(dtype):
    """Attention level: queries outside every layer's mask get the stock output byte for byte;
    inside, the output moves (towards the reference), the more with a larger weight."""
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8).eval().to(dtype)
    pixels = 48
    x = torch.randn(2, pixels, 32, dtype=dtype)  # the main batch (e.g. uncond + cond)
    ref = torch.randn(2, pixels, 32, dtype=dtype) * 3  # the reference pass, with the same rows
    masks = torch.zeros(2, pixels)
    masks[0, 5:15] = 1.0
    masks[0, 15:18] = 0.5  # a soft edge
    masks[1, 30:40] = 1.0
    key_masks = torch.zeros(2, pixels, dtype=torch.bool)
    key_masks[0, 0:20] = True
    key_masks[1, 28:44] = True
    outside = masks.sum(0) == 0
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x)
        moved = []
        for weight in (1.0, 4.0):
            hook = _bank_hook(attn, x, masks, key_masks, weight)
            proc = ReferenceSelfAttnProcessor(hook)
            hook.mode = "write"
            assert torch.equal(proc(attn, ref), AttnProcessor2_0()(attn, ref))  # writing changes nothing
            assert [e[0].shape for e in hook.bank[id(attn)]] == [(2, 4, 20, 8), (2, 4, 16, 8)]
            hook.mode = "read"
            out = proc(attn, x)
            assert torch.equal(out[:, outside], stock[:, outside])
            inside = ~outside
            assert not torch.equal(out[:, inside], stock[:, inside])
            moved.append((out[:, inside] - stock[:, inside]).float().abs().mean().item())
            hook.mode = "off"
            assert torch.equal(proc(attn, x), stock)
        assert moved[1] > moved[0]
        # Cross-attention calls and unknown resolutions run the stock processor.
        hook.mode = "read"
        cross = Attention(32, cross_attention_dim=16, heads=4, dim_head=8).eval().to(dtype)
        enc = torch.randn(2, 7, 16, dtype=dtype)
        assert torch.equal(proc(cross, x, enc), AttnProcessor2_0()(cross, x, enc))
        other = torch.randn(2, 12, 32, dtype=dtype)
        assert torch.equal(proc(attn, other), AttnProcessor2_0()(attn, other))


def test_processor_matches_attention_over_concatenated_keys():
    """Inside a full mask with weight w, the output is attention over [own ; reference] keys with
    the reference logits raised by log w (an explicit softmax)."""
    torch.manual_seed(1)
    attn = Attention(16, heads=2, dim_head=8).eval()
    x, ref = torch.randn(1, 10, 16), torch.randn(1, 10, 16)
    masks = torch.ones(1, 10)
    key_masks = torch.zeros(1, 10, dtype=torch.bool)
    key_masks[0, 2:6] = True
    hook = _bank_hook(attn, x, masks, key_masks, 2.5)
    proc = ReferenceSelfAttnProcessor(hook)
    with torch.no_grad():
        hook.mode = "write"
        proc(attn, ref)
        hook.mode = "read"
        out = proc(attn, x)

        def heads(t):
            return t.view(1, -1, 2, 8).transpose(1, 2)

        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
        kr, vr = heads(attn.to_k(ref))[:, :, 2:6], heads(attn.to_v(ref))[:, :, 2:6]
        scores = torch.cat([q @ k.transpose(-1, -2), q @ kr.transpose(-1, -2)], -1) / 8**0.5
        scores[..., 10:] += np.log(2.5)
        mixed = scores.softmax(-1) @ torch.cat([v, vr], 2)
        expected = attn.to_out[0](mixed.transpose(1, 2).reshape(1, 10, 16))
    assert torch.allclose(out, expected, atol=1e-5)


def test_weight_zero_or_off_is_the_plain_path_exactly(demo_pipeline):
    plain = generate(demo_pipeline, collage(appearance=False)).images[0].image
    for art in (collage(weight=0.0), collage(appearance="off")):
        builder = Builder()
        out = generate(demo_pipeline, art, hooks=[builder]).images[0].image
        assert builder.hooks == [None]
        assert np.array_equal(out, plain)
    # Through the engine's hooks (masked attention, self-attention modulation): the same image as
    # with appearance off; the reference builder is there only when a layer asks for "reference"
    # with a weight, and then replaces the self-attention modulation (both are attn1 processors).
    images = []
    for art in (collage(weight=0.0), collage(appearance=False)):
        hooks, _ = build_hooks(demo_pipeline, art, EngineOptions())
        assert [h.func.__name__ for h in hooks] == ["masked_attention_hook", "self_attention_hook"]
        images.append(generate(demo_pipeline, art, hooks=hooks).images[0].image)
    assert np.array_equal(*images)
    hooks, _ = build_hooks(demo_pipeline, collage(weight=2.0), EngineOptions(reference_attention=True))
    assert [h.func.__name__ for h in hooks] == [
        "masked_attention_hook",
        "reference_attention_hook",
        "low_frequency_anchor_hook",
    ]
    # By default a reference layer gets the anchor (core/anchor.py) and keeps the modulation.
    hooks, _ = build_hooks(demo_pipeline, collage(weight=2.0), EngineOptions())
    assert [h.func.__name__ for h in hooks] == [
        "masked_attention_hook",
        "self_attention_hook",
        "low_frequency_anchor_hook",
    ]


def test_reference_changes_the_layer_and_restores_the_processors(demo_pipeline):
    unet = demo_pipeline.pipeline.unet
    before = dict(unet.attn_processors)
    seen = []

    def check(progress):
        if progress.phase == "sampling":
            now = dict(unet.attn_processors)
            seen.append(sum(isinstance(p, ReferenceSelfAttnProcessor) for p in now.values()))
            assert all(now[n] is before[n] for n in now if n.endswith("attn2.processor"))

    plain = generate(demo_pipeline, collage(appearance=False)).images[0].image
    builder = Builder()
    out = generate(demo_pipeline, collage(weight=2.0), hooks=[builder], progress=check).images[0].image
    assert seen and seen[0] == sum(n.endswith("attn1.processor") for n in before) > 0
    after = dict(unet.attn_processors)
    assert all(after[n] is before[n] for n in before)
    hook = builder.hooks[0]
    assert hook.layers == [0] and hook.z_ref.shape[0] == 1
    assert not np.array_equal(out, plain)
    # The layer's region moved more than the other layer's region (which only feels it indirectly).
    diff = np.abs(out.astype(int) - plain.astype(int)).mean(-1)
    assert diff[8:32, 4:28].mean() > diff[30:50, 34:62].mean()
    # Steps outside `end` run plain: end 0 gives the plain image.
    off = generate(demo_pipeline, collage(weight=2.0), hooks=[Builder(end=0.0)]).images[0].image
    assert np.array_equal(off, plain)


def test_runs_on_tiny_sdxl_with_both_layers(tiny_sdxl):
    art = collage(weight=1.5)
    art.layers[1].appearance = "reference"
    plain = generate(tiny_sdxl, collage(appearance=False)).images[0].image
    builder = Builder()
    out = generate(tiny_sdxl, art, hooks=[builder]).images[0].image
    hook = builder.hooks[0]
    assert hook.layers == [0, 1] and hook.z_ref.shape[0] == 1  # one reference pass for both
    assert hook.bank == {}  # cleared on exit
    assert out.shape == plain.shape and not np.array_equal(out, plain)


def test_appearance_values_and_errors():
    assert [appearance_mode(v) for v in (True, False, "learned", "reference", "off")] == [
        "learned",
        "off",
        "learned",
        "reference",
        "off",
    ]
    assert appearance_mode("ref") is None and appearance_mode(1) is None
    with pytest.raises(CollageError, match=r"layers\[0\] \('box'\)\.appearance: must be \"off\""):
        collage(appearance="ref").validate()
    with pytest.raises(CollageError, match=r"appearance_weight: must"):
        collage(weight=-1.0).validate()
    collage().validate()


def test_reference_applies_self_attention_modulation_too():
    """With self-attention modulation on, the reference processor owns attn1 and applies the
    modulation's bias itself: outside the reference masks (and whenever the reference is off) it
    gives the modulation processor's output; inside, the reference moves it further."""
    from core.self_attention import SelfAttentionModulation

    torch.manual_seed(2)
    attn = Attention(32, heads=4, dim_head=8).eval()
    pixels = 48
    x = torch.randn(2, pixels, 32)  # uncond + cond
    ref = torch.randn(2, pixels, 32) * 3
    masks = torch.zeros(1, pixels)
    masks[0, 5:15] = 1.0
    key_masks = masks > 0.5
    segments = np.zeros((1, pixels), np.float32)
    segments[0, 20:40] = 1.0  # the modulation's layer: another region
    modulation = SelfAttentionModulation(
        {pixels: segments}, 3.0, layers=[0], cfg=True, schedule=lambda s: 1.0
    )
    step = type("Step", (), {"sigma": 1.0, "timestep": 999.0, "index": 1})()
    hook = _bank_hook(attn, x, masks, key_masks, 4.0)
    hook.modulation = modulation
    hook.on_step(step)
    proc = ReferenceSelfAttnProcessor(hook)
    outside = masks.sum(0) == 0
    with torch.no_grad():
        modulated = modulation.processor(attn, x)
        assert not torch.equal(modulated, AttnProcessor2_0()(attn, x))  # the modulation acts
        hook.mode = "off"
        assert torch.equal(proc(attn, x), modulated)
        hook.mode = "write"
        assert torch.equal(proc(attn, ref), AttnProcessor2_0()(attn, ref))  # the reference pass: plain
        hook.mode = "read"
        out = proc(attn, x)
        assert torch.allclose(out[:, outside], modulated[:, outside], atol=1e-6)
        assert not torch.allclose(out[:, ~outside], modulated[:, ~outside], atol=1e-4)


def test_engine_hooks_run_reference_with_the_modulation(demo_pipeline):
    """build_hooks: a reference layer keeps self-attention modulation (through the reference
    processor), so the self-attention weight still changes the image."""
    art = collage(weight=2.0)
    images = []
    for sw in (0.0, 2.0):
        options = EngineOptions(self_attention_weight=sw, reference_attention=True, reference_anchor=0.0)
        hooks, _ = build_hooks(demo_pipeline, art, options)
        assert [h.func.__name__ for h in hooks] == ["masked_attention_hook", "reference_attention_hook"]
        images.append(generate(demo_pipeline, art, hooks=hooks).images[0].image)
    assert not np.array_equal(*images)


def test_conditional_only_leaves_the_unconditional_rows_plain():
    """`conditional_only`: the guidance batch's unconditional half (first) gets the stock output,
    the conditional half still reads the reference inside the mask."""
    torch.manual_seed(3)
    attn = Attention(32, heads=4, dim_head=8).eval()
    x, ref = torch.randn(2, 48, 32), torch.randn(2, 48, 32) * 3
    masks = torch.zeros(1, 48)
    masks[0, 5:15] = 1.0
    hook = _bank_hook(attn, x, masks, masks > 0.5, 4.0)
    hook.conditional_only = True
    proc = ReferenceSelfAttnProcessor(hook)
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x)
        hook.mode = "write"
        proc(attn, ref)
        hook.mode = "read"
        out = proc(attn, x)
    assert torch.equal(out[0], stock[0])
    assert torch.equal(out[1, 15:], stock[1, 15:]) and not torch.allclose(out[1, 5:15], stock[1, 5:15])
