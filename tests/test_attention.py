"""Masked cross-attention (core/attention.py): the mechanism on the demo model, exactness, install/restore."""

import functools
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from core.attention import (
    SCHEDULES,
    MaskedCrossAttention,
    MaskedCrossAttnProcessor,
    g_collage,
    g_ediffi,
    get_schedule,
    masked_attention_hook,
)
from core.collage import Collage, Layer
from core.compositing import composite
from core.generate import SamplingSetup, StepContext, generate
from core.progress import GenerationCancelled
from core.tokens import TokenSpans, token_spans

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def collage(weight=1.0, **overrides):
    """Two opaque layers, about 14% of the canvas each, apart from each other."""
    red = np.zeros((24, 24, 4), np.uint8)
    red[...] = (220, 30, 30, 255)
    green = np.zeros((20, 28, 4), np.uint8)
    green[...] = (30, 200, 60, 255)
    kwargs = dict(
        prompt="a red box next to a green leaf",
        layers=[
            Layer("red box", red, offset=(4, 8), attention_weight=weight),
            Layer("green leaf", green, offset=(34, 30), attention_weight=weight),
        ],
        width=64,
        height=64,
        steps=6,
        strength=1.0,
        seed=7,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


class Builder:
    """A hook builder that keeps the hooks it built (to read their records afterwards)."""

    def __init__(self, **options):
        self.options = options
        self.hooks = []

    def __call__(self, setup):
        hook = masked_attention_hook(setup, **self.options)
        self.hooks.append(hook)
        return hook


def processors(unet):
    return dict(unet.attn_processors)


# --- schedules ---


def test_schedules_grow_with_noise():
    sigmas = [0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 14.6, 100.0]
    for name, g in SCHEDULES.items():
        values = [g(s) for s in sigmas]
        assert all(b > a for a, b in zip(values, values[1:], strict=False)), name
        assert values[0] < 0.02 and values[-3] > 1.0, name  # small at low noise, large at high
    assert g_ediffi(1.0) == pytest.approx(np.log(2.0))
    assert g_collage(0.0) == pytest.approx(np.log(np.log(1.01) + 1.0))
    assert get_schedule("collage") is g_collage
    assert get_schedule(abs) is abs
    with pytest.raises(ValueError, match="unknown attention schedule"):
        get_schedule("linear")


# --- the processor against an explicit softmax ---


def reference_attention(attn, x, enc, masks, spans, weights, g, *, cfg, negative_weight=0.0, mode="exact"):
    """Paint-with-words written out: scores, bias on the conditional half, softmax, values."""
    batch, pixels, _ = x.shape
    heads = attn.heads
    q = attn.to_q(x).view(batch, pixels, heads, -1).transpose(1, 2)
    k = attn.to_k(enc).view(batch, enc.shape[1], heads, -1).transpose(1, 2)
    v = attn.to_v(enc).view(batch, enc.shape[1], heads, -1).transpose(1, 2)
    scale = q.shape[-1] ** -0.5
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, P, L)
    bias = torch.zeros_like(scores)
    for b in range(batch // 2 if cfg else 0, batch):
        for h in range(heads):
            for i, span in enumerate(spans):
                if mode == "exact":
                    top = scores[b, h][:, span].max()
                else:
                    top = q[b, h].norm(dim=-1).max() * k[b, h, span].norm(dim=-1).max() * scale
                top = top.clamp_min(0.0)
                m = torch.as_tensor(masks[i])
                profile = weights[i] * m - negative_weight * (1.0 - m)
                bias[b, h][:, span] += g * top * profile[:, None]
    probs = (scores + bias).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, pixels, -1)
    return attn.to_out[0](out)


@pytest.mark.parametrize(
    "cfg, negative_weight, mode, grad",
    [
        (True, 0.0, "exact", False),
        (True, 0.5, "exact", False),
        (False, 0.0, "exact", False),
        (True, 0.0, "bound", False),
        (True, 0.3, "exact", True),  # the autograd path builds a fresh bias instead of the buffer
    ],
)
def test_processor_matches_explicit_softmax(cfg, negative_weight, mode, grad):
    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    batch, side, n_tokens = 4, 6, 77
    x = torch.randn(batch, side * side, 32)
    enc = torch.randn(batch, n_tokens, 24) * 3.0
    rng = np.random.default_rng(0)
    masks = (rng.random((3, side * side)) > 0.6).astype(np.float32) * rng.random((3, side * side)).astype(
        np.float32
    )
    spans, weights = [[1, 2], [5], [8, 9, 10]], [1.0, 2.5, 0.7]
    sigma = 3.0
    hook = MaskedCrossAttention(
        {side * side: masks},
        spans,
        weights,
        layers=[0, 1, 2],
        cfg=cfg,
        negative_weight=negative_weight,
        max_score=mode,
    )
    hook.on_step(StepContext(0, torch.tensor(600), sigma))
    with torch.set_grad_enabled(grad):
        out = hook.processor(attn, x, enc)
    with torch.no_grad():
        expected = reference_attention(
            attn,
            x,
            enc,
            masks,
            spans,
            weights,
            g_ediffi(sigma),
            cfg=cfg,
            negative_weight=negative_weight,
            mode=mode,
        )
        stock = AttnProcessor2_0()(attn, x, enc)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-5)
    if cfg:  # the unconditional half is the stock computation (bit for bit without autograd)
        torch.testing.assert_close(
            out[: batch // 2].detach(), stock[: batch // 2], rtol=0, atol=0 if not grad else 1e-6
        )
    assert not torch.allclose(out[batch // 2 :].detach(), stock[batch // 2 :], atol=1e-3)


def test_processor_leaves_self_attention_and_unknown_resolutions_alone():
    torch.manual_seed(1)
    attn = Attention(32, heads=4, dim_head=8).eval()
    hook = MaskedCrossAttention({64: np.ones((1, 64), np.float32)}, [[3]], [1.0], layers=[0], cfg=True)
    hook.on_step(StepContext(0, torch.tensor(900), 10.0))
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        assert torch.equal(hook.processor(attn, x), AttnProcessor2_0()(attn, x))  # self-attention
        cross = Attention(32, cross_attention_dim=16, heads=4, dim_head=8).eval()
        enc = torch.randn(2, 77, 16)
        y = torch.randn(2, 49, 32)  # 7x7: no masks at this resolution -> unbiased
        assert torch.equal(hook.processor(cross, y, enc), AttnProcessor2_0()(cross, y, enc))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_processor_in_half_precision(dtype):
    torch.manual_seed(2)
    attn = Attention(32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    x, enc = torch.randn(2, 36, 32), torch.randn(2, 77, 24) * 3.0
    masks = {36: (np.random.default_rng(2).random((2, 36)) > 0.5).astype(np.float32)}
    outs = {}
    for dt in (torch.float32, dtype):
        hook = MaskedCrossAttention(masks, [[1, 2], [5]], [1.0, 2.0], layers=[0, 1], cfg=True)
        hook.on_step(StepContext(0, torch.tensor(600), 3.0))
        with torch.no_grad():
            outs[dt] = hook.processor(attn.to(dt), x.to(dt), enc.to(dt))
        assert all(f.bias.dtype == dt for f in hook._cache.values())  # the bias in the query's dtype
    assert outs[dtype].dtype == dtype
    torch.testing.assert_close(outs[dtype].float(), outs[torch.float32], rtol=0, atol=0.05)


def test_sd2_shaped_unet_odd_latent_size():
    """Linear projections, per-level head counts, upcast attention, 3 levels, a 10x6 latent."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=48,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
    ).eval()
    art = collage(width=48, height=80)  # latent 6 wide, 10 high: levels 10x6, 5x3, 3x2
    flat = composite(art)
    spans = TokenSpans(art.prompt, spans=[[2, 3], [7, 8]])  # "a red box next to a green leaf"
    model = SimpleNamespace(pipeline=SimpleNamespace(unet=unet), device=torch.device("cpu"))
    hook = masked_attention_hook(SamplingSetup(art, flat, spans, model, (10, 6)), record=True)
    x, enc, t = torch.randn(2, 4, 10, 6), torch.randn(2, 77, 48), torch.tensor(500)
    before = processors(unet)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=enc).sample
        hook.on_step(StepContext(0, t, 5.0))
        with hook.installed(unet):
            biased = unet(x, t, encoder_hidden_states=enc).sample
    assert not hook._warned  # every cross-attention call found its resolution's masks
    assert {r.seq_len for r in hook.records} == {60, 15, 6}
    assert not torch.allclose(plain, biased)
    assert all(processors(unet)[n] is before[n] for n in before)


# --- on the demo model ---


def test_bias_moves_layer_attention_into_its_mask(demo_pipeline):
    """The mechanism: each layer's tokens attend inside the layer's mask far more with the bias.

    Without the bias, nothing but chance puts a layer's words where its mask is (each mask is
    ~14 % of the image); the layers use weight 8 to show the effect clearly on a 6-step run
    (benchmarks/eval_pieces.py measures weights 1 and 2 on generated objects).
    """
    without, with_bias = Builder(record_only=True), Builder(record=True)
    plain = generate(demo_pipeline, collage(weight=8.0), hooks=[without])
    generate(demo_pipeline, collage(weight=8.0), hooks=[with_bias])
    share_without = without.hooks[0].mass_inside()
    share_with = with_bias.hooks[0].mass_inside()
    # Every cross-attention layer (5 at 8x8, 1 at 4x4) of every step (6) was recorded.
    assert len(with_bias.hooks[0].records) == 6 * 6
    assert {r.seq_len for r in with_bias.hooks[0].records} == {64, 16}
    print(
        f"\nshare of layer-token attention inside the layer's mask: without bias {share_without}, with {share_with}"
    )
    mean_without, mean_with = float(share_without.mean()), float(share_with.mean())
    assert mean_without < 0.3  # near the masks' area: the prompt alone does not say where
    assert mean_with >= 2.5 * mean_without and mean_with >= mean_without + 0.25
    assert (share_with > share_without + 0.2).all()  # for each layer
    # Recording without a bias goes through the masked processor yet changes nothing.
    assert np.array_equal(plain.images[0].image, generate(demo_pipeline, collage()).images[0].image)


def test_zero_weights_give_the_plain_path_exactly(demo_pipeline):
    builder = Builder()
    with_hook = generate(demo_pipeline, collage(weight=0.0), hooks=[builder])
    assert builder.hooks == [None]  # nothing to do: the plain path runs untouched
    plain = generate(demo_pipeline, collage(weight=0.0))
    assert np.array_equal(with_hook.images[0].image, plain.images[0].image)
    # A layer with weight 0 takes no part while the other is biased.
    mixed = collage()
    mixed.layers[0].attention_weight = 0.0
    one = Builder()
    generate(demo_pipeline, mixed, hooks=[one])
    assert one.hooks[0].layers == [1]


def test_a_layer_past_token_77_gets_its_bias_on_its_columns(demo_pipeline):
    """Long prompts: the layers' words sit in the second 77-token chunk of the concatenated
    context, and the bias lands on exactly those key columns (and moves attention as before)."""
    filler = ", ".join(["a wooden table in a quiet room"] * 11)
    art = collage(weight=8.0, prompt=f"{filler}, a red box next to a green leaf")
    tokenizer = demo_pipeline.pipeline.tokenizer
    spans = token_spans(tokenizer, art.prompt, ["red box", "green leaf"])
    ids = spans.chunks.token_ids(tokenizer)[0].reshape(-1)
    assert [tokenizer.decode(ids[s]) for s in spans.spans] == ["red box", "green leaf"]
    assert min(min(s) for s in spans.spans) > 77
    with_bias, without = Builder(record=True), Builder(record_only=True)
    generate(demo_pipeline, art, hooks=[with_bias])
    hook = with_bias.hooks[0]
    assert hook.spans == spans.spans
    columns = sorted(p for s in spans.spans for p in s)
    for factors in hook._cache.values():  # the bias of the last call at each resolution
        assert factors.bias.shape[-1] == 2 * 77  # the keys of both chunks
        conditional = factors.bias[factors.start :]
        assert conditional.abs().sum((0, 1, 2)).nonzero().flatten().tolist() == columns
        assert not factors.bias[: factors.start].any()  # the negative prompt's half: no bias
    generate(demo_pipeline, art, hooks=[without])
    assert (hook.mass_inside() > without.hooks[0].mass_inside() + 0.2).all()


def test_bias_changes_the_image(demo_pipeline):
    plain = generate(demo_pipeline, collage()).images[0].image
    biased = generate(demo_pipeline, collage(weight=4.0), hooks=[masked_attention_hook]).images[0].image
    assert not np.array_equal(plain, biased)


def test_processors_installed_for_one_generation_and_restored(demo_pipeline):
    unet = demo_pipeline.pipeline.unet
    before = processors(unet)
    seen = []

    def check(progress):
        if progress.phase == "sampling":
            now = processors(unet)
            seen.append(now)
            for name, proc in now.items():
                if name.endswith("attn2.processor"):
                    assert isinstance(proc, MaskedCrossAttnProcessor), name
                else:
                    assert proc is before[name], name  # self-attention never replaced

    generate(demo_pipeline, collage(), hooks=[masked_attention_hook], progress=check)
    assert seen and sum(name.endswith("attn2.processor") for name in seen[0]) == 6
    after = processors(unet)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_processors_restored_after_an_error_or_cancel(demo_pipeline):
    unet = demo_pipeline.pipeline.unet
    before = processors(unet)

    def fail(progress):
        if progress.phase == "sampling" and progress.step == 2:
            assert isinstance(unet.attn_processors[next(iter(_attn2(before)))], MaskedCrossAttnProcessor)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate(demo_pipeline, collage(), hooks=[masked_attention_hook], progress=fail)
    assert all(processors(unet)[n] is before[n] for n in before)

    cancel = threading.Event()

    def stop(progress):
        if progress.phase == "sampling":
            cancel.set()

    with pytest.raises(GenerationCancelled):
        generate(demo_pipeline, collage(), hooks=[masked_attention_hook], progress=stop, cancel=cancel)
    assert all(processors(unet)[n] is before[n] for n in before)


def _attn2(procs):
    return [name for name in procs if name.endswith("attn2.processor")]


def test_batch_of_variants(demo_pipeline, monkeypatch):
    vae = demo_pipeline.pipeline.vae
    decode, latents = vae.decode, []
    monkeypatch.setattr(vae, "decode", lambda z, *a, **k: latents.append(z.clone()) or decode(z, *a, **k))
    builder = Builder(record=True)
    batch = generate(demo_pipeline, collage(weight=4.0), variants=2, max_batch=2, hooks=[builder])
    assert [img.seed for img in batch.images] == [7, 8]
    assert not np.array_equal(batch.images[0].image, batch.images[1].image)
    # The batch holds 2 unconditional + 2 conditional rows; the bias goes to the last 2 only.
    factors = next(iter(builder.hooks[0]._cache.values()))
    assert factors.start == 2 and factors.bias.shape[0] == 4
    assert not factors.bias[:2].any() and factors.bias[2:].any()
    # A variant is reproduced by its seed alone, also with the bias: the same final latents. (Pixels
    # may differ by 1: the VAE decoder itself is not exactly batch-invariant, with or without a hook.)
    generate(demo_pipeline, collage(weight=4.0, seed=8), hooks=[masked_attention_hook])
    assert torch.equal(latents[0][1], latents[1][0])


def test_guidance_off(demo_pipeline):
    without, with_bias = Builder(record_only=True), Builder(record=True)
    generate(demo_pipeline, collage(weight=8.0, guidance_scale=1.0), hooks=[without])
    result = generate(demo_pipeline, collage(weight=8.0, guidance_scale=1.0), hooks=[with_bias])
    assert result.images[0].image.shape == (64, 64, 3)
    hook = with_bias.hooks[0]
    assert not hook.cfg and all(f.start == 0 for f in hook._cache.values())  # the whole batch is conditional
    assert hook.mass_inside().mean() > without.hooks[0].mass_inside().mean() + 0.2


def test_schedule_and_negative_weight_options(demo_pipeline):
    results = {}
    for name, options in {
        "ediffi": {},
        "collage": {"schedule": "collage"},
        "negative": {"negative_weight": 0.5},
        "bound": {"max_score": "bound"},
    }.items():
        builder = Builder(record=True, **options)
        generate(demo_pipeline, collage(weight=2.0), hooks=[builder])
        results[name] = float(builder.hooks[0].mass_inside().mean())
    # The gentler schedule biases less; a negative weight outside the mask adds to the effect.
    assert results["collage"] < results["ediffi"] < results["negative"]
    assert results["bound"] > results["ediffi"]  # the bound overstates the max
    with pytest.raises(ValueError):
        generate(demo_pipeline, collage(), hooks=[functools.partial(masked_attention_hook, max_score="mean")])
