"""The spatial modes next to masked attention: regional conditioning (core/regional.py) and
self-attention modulation (core/self_attention.py): the mechanisms at attention level, off means
the plain path exactly, install/restore, the demo model and the tiny SDXL."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from core.attention import MaskedCrossAttention, g_ediffi
from core.generate import StepContext, generate
from core.options import EngineOptions, build_hooks
from core.regional import RegionalConditioning, region_prompt, regional_hook
from core.self_attention import SelfAttentionModulation, self_attention_hook
from tests.test_attention import collage, processors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _masks(side: int, n: int, seed: int) -> np.ndarray:
    """n soft masks over side² pixels, disjoint where they are on, zero over the last third."""
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, n, side * side)
    masks = np.stack([(owner == i) * rng.uniform(0.3, 1.0, side * side) for i in range(n)]).astype(np.float32)
    masks[:, 2 * side * side // 3 :] = 0.0
    return masks


# --- regional conditioning at attention level ---


def _own_bias(masks, p, spans, weights, sigma):
    """Per layer, paint with words on its own words inside its own mask (what regional_hook builds)."""
    hooks = [
        MaskedCrossAttention({p: masks[i : i + 1]}, [spans[i]], [weights[i]], layers=[i], cfg=False)
        for i in range(len(spans))
    ]
    for hook in hooks:
        hook.on_step(StepContext(0, torch.tensor(600), sigma))
    return hooks


@pytest.mark.parametrize("cfg, own_bias", [(True, False), (False, False), (True, True)])
def test_regional_output_is_the_mask_weighted_mix_and_plain_outside_the_masks(cfg, own_bias):
    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    side, batch = 6, 4
    p = side * side
    x, enc = torch.randn(batch, p, 32), torch.randn(batch, 77, 24) * 3.0
    contexts = [torch.randn(1, 77, 24) * 3.0 for _ in range(2)]
    masks, weights = _masks(side, 2, 0), [1.0, 0.6]
    stock = AttnProcessor2_0()
    spans = [[1, 2], [1]]
    biases = _own_bias(masks, p, spans, [1.0, 3.0], 5.0) if own_bias else None
    hook = RegionalConditioning(contexts, {p: masks}, weights, layers=[0, 1], cfg=cfg, own_bias=biases)
    with hook.installed(_OneModule(attn)):
        proc = attn.processor
        with torch.no_grad():
            out = proc(attn, x, enc)
    assert attn.processor is not proc  # restored
    with torch.no_grad():
        base = stock(attn, x, enc)
        start = batch // 2 if cfg else 0
        own = [stock(attn, x[start:], c.expand(batch - start, -1, -1)) for c in contexts]
        if own_bias:  # written out with fresh hooks: the words biased inside their mask
            fresh = _own_bias(masks, p, spans, [1.0, 3.0], 5.0)
            biased = [
                h.processor(attn, x[start:], c.expand(batch - start, -1, -1))
                for h, c in zip(fresh, contexts, strict=True)
            ]
            for o, bo, m in zip(own, biased, masks, strict=True):
                assert not torch.allclose(o[:, m > 0], bo[:, m > 0], atol=1e-3)  # the bias acts
            own = biased
    expected = base.clone()
    for i, o in enumerate(own):
        m = torch.as_tensor(masks[i] * weights[i])[None, :, None]
        expected[start:] += m * (o - base[start:])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    outside = torch.as_tensor(masks.sum(0) == 0)
    # Region-only: outside every mask, and on the unconditional rows, bit for bit the plain output.
    assert torch.equal(out[:, outside], base[:, outside])
    assert torch.equal(out[:start], base[:start])
    assert not torch.allclose(out[start:, ~outside], base[start:, ~outside], atol=1e-3)
    # Self-attention calls and levels without masks pass through.
    with torch.no_grad():
        self_attn = Attention(32, heads=4, dim_head=8).eval()
        assert torch.equal(proc(self_attn, x), stock(self_attn, x))
        y = torch.randn(batch, 49, 32)
        assert torch.equal(proc(attn, y, enc), stock(attn, y, enc))


def test_regional_contexts_of_different_lengths():
    """Long prompts can encode to more than 77 tokens: each layer then gets its own call."""
    torch.manual_seed(3)
    attn = Attention(32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    x, enc = torch.randn(2, 16, 32), torch.randn(2, 77, 24)
    contexts = [torch.randn(1, 77, 24), torch.randn(1, 154, 24)]
    masks = _masks(4, 2, 1)
    hook = RegionalConditioning(contexts, {16: masks}, [1.0, 1.0], layers=[0, 1], cfg=True)
    stock = AttnProcessor2_0()
    with hook.installed(_OneModule(attn)), torch.no_grad():
        out = attn.processor(attn, x, enc)
        base = stock(attn, x, enc)
        second = stock(attn, x[1:], contexts[1])
    m = torch.as_tensor(masks[1])[:, None]
    torch.testing.assert_close(out[1, masks[1] > 0], (base[1] + m * (second[0] - base[1]))[masks[1] > 0])


def test_region_prompt():
    assert region_prompt(" red  circle ", "a red circle on grass") == "red circle, a red circle on grass"
    assert region_prompt("cat", "  ") == "cat"


# --- self-attention modulation at attention level ---


def test_self_attention_bias_matches_explicit_softmax():
    torch.manual_seed(1)
    attn = Attention(32, heads=4, dim_head=8).eval()
    side, batch, weight, sigma = 5, 4, 1.5, 4.0
    p = side * side
    masks = _masks(side, 2, 2)
    hook = SelfAttentionModulation({p: masks}, weight, layers=[0, 1], cfg=True)
    hook.on_step(StepContext(0, torch.tensor(700), sigma))
    x = torch.randn(batch, p, 32)
    with torch.no_grad():
        out = hook.processor(attn, x)
        stock = AttnProcessor2_0()(attn, x)
        # Written out: segments = the masks and the rest; bias w g(sigma) sum_k s_k(p) s_k(q).
        seg = np.concatenate([masks, np.clip(1 - masks.sum(0, keepdims=True), 0, None)])
        bias = torch.as_tensor(seg.T @ seg) * weight * g_ediffi(sigma)
        q = attn.to_q(x).view(batch, p, 4, 8).transpose(1, 2)
        k = attn.to_k(x).view(batch, p, 4, 8).transpose(1, 2)
        v = attn.to_v(x).view(batch, p, 4, 8).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * 8**-0.5
        scores[batch // 2 :] += bias
        expected = attn.to_out[0]((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, p, 32))
        probs = scores.softmax(-1)
        plain_probs = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[: batch // 2], stock[: batch // 2])  # the unconditional rows: stock
    # The mechanism: a layer's pixels take more of their attention from their own layer.
    same = torch.as_tensor((masks[0][:, None] > 0) & (masks[0][None, :] > 0), dtype=torch.float32)
    inside = masks[0] > 0
    share = (probs[batch // 2 :] * same).sum(-1)[..., inside].mean()
    plain_share = (plain_probs[batch // 2 :] * same).sum(-1)[..., inside].mean()
    assert share > plain_share + 0.1
    # Cross-attention calls and unknown levels pass through.
    cross = Attention(32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    enc = torch.randn(batch, 77, 16)
    with torch.no_grad():
        assert torch.equal(hook.processor(cross, x, enc), AttnProcessor2_0()(cross, x, enc))
        y = torch.randn(batch, 49, 32)
        assert torch.equal(hook.processor(attn, y), AttnProcessor2_0()(attn, y))


# --- on the demo model ---


def _image(model, c, options):
    hooks, warnings = build_hooks(model, c, options)
    assert warnings == []
    return generate(model, c, hooks=hooks).images[0].image


def test_weight_zero_is_the_plain_path_exactly(demo_pipeline):
    c = collage()
    default = _image(demo_pipeline, c, EngineOptions(regional_weight=0.0, self_attention_weight=0.0))
    hooks, _ = build_hooks(demo_pipeline, c, EngineOptions(regional_weight=0.0, self_attention_weight=0.0))
    assert len(hooks) == 1  # masked attention alone
    from core.attention import masked_attention_hook

    assert np.array_equal(default, generate(demo_pipeline, c, hooks=[masked_attention_hook]).images[0].image)
    # The builders themselves say "nothing to do" at weight 0, and for layers of weight 0.
    built = []
    generate(
        demo_pipeline,
        c,
        hooks=[
            lambda s: built.append(regional_hook(s, weight=0.0)),
            lambda s: built.append(self_attention_hook(s, weight=0.0)),
        ],
    )
    generate(
        demo_pipeline,
        collage(weight=0.0),
        hooks=[lambda s: built.append(regional_hook(s)), lambda s: built.append(self_attention_hook(s))],
    )
    assert built == [None] * 4


@pytest.mark.parametrize(
    "options",
    [
        EngineOptions(regional_weight=1.0),
        EngineOptions(self_attention_weight=1.0),
        EngineOptions(regional_weight=1.0, self_attention_weight=1.0),
    ],
)
def test_each_mode_changes_the_image_and_restores_the_processors(demo_pipeline, options):
    unet = demo_pipeline.pipeline.unet
    before = processors(unet)
    c = collage()
    masked_only = _image(demo_pipeline, c, EngineOptions(regional_weight=0.0, self_attention_weight=0.0))
    moded = _image(demo_pipeline, c, options)
    assert not np.array_equal(masked_only, moded)
    after = processors(unet)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    # Variants in one batch: each variant is the one sampled alone (latents; pixels within 1).
    hooks, _ = build_hooks(demo_pipeline, c, options)
    pair = generate(demo_pipeline, c, seeds=[7, 8], hooks=hooks).images
    assert np.abs(pair[0].image.astype(int) - moded.astype(int)).max() <= 1


def test_regional_reads_each_layer_text(demo_pipeline):
    """The layer's own text matters: changing only its words changes the image in regional mode
    more than the masked bias alone can, since the prompt then no longer names them twice."""
    built = []

    def build(setup):
        built.append(regional_hook(setup))
        return built[-1]

    generate(demo_pipeline, collage(), hooks=[build])
    (hook,) = built
    assert hook.layers == [0, 1] and len(hook.contexts) == 2
    assert not torch.equal(hook.contexts[0], hook.contexts[1])
    assert set(hook._masks) == {64, 16}  # the demo's 8x8 and 4x4 attention levels


def test_bad_weights_name_the_option(demo_pipeline):
    c = collage()
    for options, name in (
        (EngineOptions(regional_weight=-1.0), "regional_weight"),
        (EngineOptions(self_attention_weight=-0.5), "self_attention_weight"),
    ):
        hooks, _ = build_hooks(demo_pipeline, c, options)
        with pytest.raises(ValueError, match=name):
            generate(demo_pipeline, c, hooks=hooks)


def test_tiny_sdxl_runs_every_mode(tiny_sdxl):
    c = collage(width=64, height=64, steps=3)
    plain = _image(tiny_sdxl, c, EngineOptions(self_attention_weight=0.0))
    built = []

    def build(setup):
        built.append(regional_hook(setup))
        return built[-1]

    for options in (EngineOptions(regional_weight=1.0, self_attention_weight=0.0), EngineOptions()):
        image = _image(tiny_sdxl, c, options)
        assert image.shape == plain.shape and not np.array_equal(image, plain)
    generate(tiny_sdxl, c, hooks=[build])
    # SDXL's context is both encoders' states concatenated: the layers' contexts are too.
    assert built[0].contexts[0].shape[-1] == tiny_sdxl.pipeline.unet.config.cross_attention_dim


class _OneModule:
    """A stand-in U-Net holding one cross-attention module named like diffusers' ``attn2``."""

    def __init__(self, attn):
        self.attn = attn

    def named_modules(self):
        return [("block.attn2", self.attn)]


# --- command lines ---


def test_command_line_weights(capsys):
    from bridge_server.__main__ import config_from_args, parser
    from core.cli import _parser
    from core.engine_arguments import given_engine_options

    args = _parser().parse_args(["generate", "in.ora", "-o", "out.png", "--regional-weight", "0.5"])
    assert (args.regional_weight, args.self_attention_weight) == (0.5, None)
    config = config_from_args(parser().parse_args(["--self-attention-weight", "2"]))
    assert config.engine_options["self_attention_weight"] == 2.0
    assert "regional_weight" not in config.engine_options  # not given: the engine's default
    assert "reference_attention" not in config.engine_options
    on = config_from_args(parser().parse_args(["--reference-attention"]))
    assert on.engine_options["reference_attention"] is True
    args = _parser().parse_args(["generate", "in.ora", "-o", "out.png", "--reference-attention"])
    assert given_engine_options(args) == {"reference_attention": True}
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit):
            parser().parse_args(["--regional-weight", bad])
        assert "--regional-weight" in capsys.readouterr().err


def test_self_attention_levels_past_the_cap_run_plain():
    """A level past MAX_MODULATED_PIXELS gets no (P, P) bias (memory grows with P²); smaller
    levels do."""
    from core.self_attention import MAX_MODULATED_PIXELS, SelfAttentionModulation

    small, big = 16, 2 * MAX_MODULATED_PIXELS
    masks = {p: np.eye(1, p, 0, dtype=np.float32) for p in (small, big)}  # one layer: pixel 0
    hook = SelfAttentionModulation(masks, 2.0, layers=[0], cfg=False, schedule=lambda sigma: 1.0)
    hook.on_step(type("Step", (), {"sigma": 1.0})())
    assert hook.bias(small, torch.float32, "cpu") is not None
    assert hook.bias(big, torch.float32, "cpu") is None
