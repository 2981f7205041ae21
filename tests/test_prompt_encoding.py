"""Long prompts, emphasis and clip skip on the encoders (core/prompt_encoding.py, core/families.py):
short prompts exactly as the stock pipelines encode them, the rest against independent math."""

import numpy as np
import pytest
import torch

from core.collage import Collage, CollageError, Layer
from core.families import SD1, SDXL
from core.generate import generate
from core.tokens import token_spans

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = ", ".join(["a red box on a wooden table"] * 12) + ", a green leaf"  # ~90 tokens


def padded_ids(tokenizer, text):
    return tokenizer(
        text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def encode_plain(encoder, ids, skip=None, norm=True):
    """An encoder's output for (B, 77) ids: last layer, or hidden state `skip` from the end."""
    out = encoder(ids, output_hidden_states=True)
    if skip is None:
        return out.last_hidden_state
    hidden = out.hidden_states[-skip]
    return encoder.final_layer_norm(hidden) if norm else hidden  # transformers 5's CLIPTextModel


# --- no regression: short plain prompts are what diffusers encodes ---


def test_sd_short_prompt_is_the_pipelines_encoding(demo_pipeline):
    pipe, device = demo_pipeline.pipeline, demo_pipeline.device
    for negative, guidance in (("blurry", True), (None, True), (None, False)):
        c = SD1.encode_prompt(pipe, "a red box next to a green leaf", negative, device, guidance, (64, 64))
        cond, uncond = pipe.encode_prompt("a red box next to a green leaf", device, 1, guidance, negative)
        assert torch.equal(c.cond, cond)
        assert (c.uncond is None) == (not guidance)
        if guidance:
            assert torch.equal(c.uncond, uncond)


def test_sdxl_short_prompt_is_the_pipelines_encoding(tiny_sdxl):
    pipe, device = tiny_sdxl.pipeline, tiny_sdxl.device
    for negative in ("blurry", None):  # None: zeros (force_zeros_for_empty_prompt), as diffusers
        c = SDXL.encode_prompt(pipe, "a red box", negative, device, True, (64, 64))
        cond, uncond, pooled, pooled_u = pipe.encode_prompt(
            "a red box", device=device, do_classifier_free_guidance=True, negative_prompt=negative
        )
        assert torch.equal(c.cond, cond) and torch.equal(c.uncond, uncond)
        assert torch.equal(c.added["text_embeds"], pooled)
        assert torch.equal(c.added_uncond["text_embeds"], pooled_u)


@pytest.mark.parametrize("family_fixture", ["demo_pipeline", "tiny_sdxl"])
def test_weight_one_is_plain_text_exactly(family_fixture, request):
    model = request.getfixturevalue(family_fixture)
    plain = model.family.encode_prompt(model.pipeline, "a red box", "blurry", model.device, True, (64, 64))
    weighted = model.family.encode_prompt(
        model.pipeline, "a (red:1.0) box", "(blurry:1.0)", model.device, True, (64, 64)
    )
    assert torch.equal(plain.cond, weighted.cond) and torch.equal(plain.uncond, weighted.uncond)
    assert all(torch.equal(plain.added[k], weighted.added[k]) for k in plain.added)


# --- emphasis: ComfyUI's rule, z_empty + w (z - z_empty) on tokens of weight w != 1 ---


def test_emphasis_follows_the_documented_rule_sd(demo_pipeline):
    pipe = demo_pipeline.pipeline
    c = SD1.encode_prompt(pipe, "a (red:1.3) box [blurry]", None, demo_pipeline.device, False, (64, 64))
    with torch.no_grad():
        z = encode_plain(pipe.text_encoder, padded_ids(pipe.tokenizer, "a red box blurry"))
        z_empty = encode_plain(pipe.text_encoder, padded_ids(pipe.tokenizer, ""))
    expected = z.clone()
    expected[0, 2] = z_empty[0, 2] + 1.3 * (z[0, 2] - z_empty[0, 2])  # "red" (0 = start, 1 = "a")
    expected[0, 4] = z_empty[0, 4] + (1 / 1.1) * (z[0, 4] - z_empty[0, 4])  # "blurry"
    torch.testing.assert_close(c.cond, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(c.cond[0, 2], z[0, 2], atol=1e-4)  # it did change
    assert torch.equal(c.cond[0, [0, 1, 3, 5, 76]], z[0, [0, 1, 3, 5, 76]])  # the rest did not


def test_emphasis_follows_the_documented_rule_sdxl(tiny_sdxl):
    pipe = tiny_sdxl.pipeline
    c = SDXL.encode_prompt(pipe, "a (red box:1.5)", None, tiny_sdxl.device, False, (64, 64))
    parts = []
    with torch.no_grad():
        for encoder, tokenizer in (
            (pipe.text_encoder, pipe.tokenizer),
            (pipe.text_encoder_2, pipe.tokenizer_2),
        ):
            z = encode_plain(encoder, padded_ids(tokenizer, "a red box"), skip=2, norm=False)
            z_empty = encode_plain(encoder, padded_ids(tokenizer, ""), skip=2, norm=False)
            z[0, 2:4] = z_empty[0, 2:4] + 1.5 * (z[0, 2:4] - z_empty[0, 2:4])
            parts.append(z)
        pooled = pipe.text_encoder_2(padded_ids(pipe.tokenizer_2, "a red box")).text_embeds
    torch.testing.assert_close(c.cond, torch.cat(parts, -1), rtol=0, atol=1e-6)
    assert torch.equal(c.added["text_embeds"], pooled)  # weights do not touch the pooled embedding


# --- long prompts: chunks encoded alone and concatenated ---


def test_long_prompt_chunks_sd(demo_pipeline):
    pipe = demo_pipeline.pipeline
    spans = token_spans(pipe.tokenizer, LONG, ["green leaf"])
    chunks = spans.chunks
    assert chunks.n_chunks == 2 and spans.spans[0][0] > 77
    c = SD1.encode_prompt(pipe, chunks, "blurry", demo_pipeline.device, True, (64, 64))
    assert c.cond.shape[1] == c.uncond.shape[1] == 2 * 77
    (a0, b0), (a1, b1) = chunks.bounds
    with torch.no_grad():
        for k, (a, b) in enumerate(chunks.bounds):
            text = spans.prompt[chunks.offsets[a][0] : chunks.offsets[b - 1][1]]
            alone = encode_plain(pipe.text_encoder, padded_ids(pipe.tokenizer, text))
            torch.testing.assert_close(c.cond[:, k * 77 : (k + 1) * 77], alone, rtol=0, atol=1e-6)
        # The negative prompt is padded with an empty chunk.
        blurry = encode_plain(pipe.text_encoder, padded_ids(pipe.tokenizer, "blurry"))
        empty = encode_plain(pipe.text_encoder, padded_ids(pipe.tokenizer, ""))
    torch.testing.assert_close(c.uncond, torch.cat([blurry, empty], 1), rtol=0, atol=1e-6)
    # A prompt given as text is chunked the same way.
    again = SD1.encode_prompt(pipe, spans.prompt, "blurry", demo_pipeline.device, True, (64, 64))
    assert torch.equal(again.cond, c.cond)
    # A long negative prompt pads the prompt instead.
    c2 = SD1.encode_prompt(pipe, "a red box", LONG, demo_pipeline.device, True, (64, 64))
    assert c2.cond.shape[1] == c2.uncond.shape[1] == 154


def test_long_prompt_chunks_sdxl(tiny_sdxl):
    pipe = tiny_sdxl.pipeline
    spans = token_spans(pipe.tokenizer, LONG, ["green leaf"])
    c = SDXL.encode_prompt(pipe, spans.chunks, "blurry", tiny_sdxl.device, True, (64, 64))
    assert c.cond.shape == c.uncond.shape == (1, 154, pipe.unet.config.cross_attention_dim)
    chunks = spans.chunks
    a, b = chunks.bounds[1]
    text = spans.prompt[chunks.offsets[a][0] : chunks.offsets[b - 1][1]]
    with torch.no_grad():
        second = torch.cat(
            [
                encode_plain(encoder, padded_ids(tokenizer, text), skip=2, norm=False)
                for encoder, tokenizer in (
                    (pipe.text_encoder, pipe.tokenizer),
                    (pipe.text_encoder_2, pipe.tokenizer_2),
                )
            ],
            -1,
        )
        a, b = chunks.bounds[0]
        first_text = spans.prompt[chunks.offsets[a][0] : chunks.offsets[b - 1][1]]
        pooled = pipe.text_encoder_2(padded_ids(pipe.tokenizer_2, first_text)).text_embeds
    torch.testing.assert_close(c.cond[:, 77:], second, rtol=0, atol=1e-6)
    torch.testing.assert_close(c.added["text_embeds"], pooled, rtol=0, atol=1e-6)  # the first chunk's


def art(prompt, **overrides):
    leaf = np.zeros((20, 28, 4), np.uint8)
    leaf[...] = (30, 200, 60, 255)
    kwargs = dict(
        prompt=prompt,
        layers=[Layer("green leaf", leaf, offset=(20, 20))],
        width=64,
        height=64,
        steps=4,
        strength=1.0,
        seed=3,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


def test_a_long_prompt_changes_the_image_against_the_truncated_one(demo_pipeline):
    pipe = demo_pipeline.pipeline
    chunks = token_spans(pipe.tokenizer, LONG, []).chunks
    a, b = chunks.bounds[0]
    truncated = LONG[: chunks.offsets[b - 1][1]]  # what one 77-token window held
    long_result = generate(demo_pipeline, art(LONG))
    short_result = generate(demo_pipeline, art(truncated))
    assert not long_result.warnings
    assert not np.array_equal(long_result.images[0].image, short_result.images[0].image)


# --- clip skip ---


def test_clip_skip_sd_is_a_hidden_state_through_the_final_norm(demo_pipeline):
    pipe = demo_pipeline.pipeline
    c = SD1.encode_prompt(pipe, "a red box", "blurry", demo_pipeline.device, True, (64, 64), clip_skip=2)
    with torch.no_grad():
        expected = encode_plain(pipe.text_encoder, padded_ids(pipe.tokenizer, "a red box"), skip=2)
        expected_u = encode_plain(pipe.text_encoder, padded_ids(pipe.tokenizer, "blurry"), skip=2)
    torch.testing.assert_close(c.cond, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(c.uncond, expected_u, rtol=0, atol=1e-6)  # both halves, as A1111
    one = SD1.encode_prompt(pipe, "a red box", None, demo_pipeline.device, False, (64, 64), clip_skip=1)
    assert torch.equal(
        one.cond, SD1.encode_prompt(pipe, "a red box", None, demo_pipeline.device, False, (64, 64)).cond
    )
    assert not torch.allclose(one.cond, c.cond, atol=1e-3)


def test_clip_skip_sdxl(tiny_sdxl):
    pipe = tiny_sdxl.pipeline
    default = SDXL.encode_prompt(pipe, "a red box", None, tiny_sdxl.device, False, (64, 64))
    two = SDXL.encode_prompt(pipe, "a red box", None, tiny_sdxl.device, False, (64, 64), clip_skip=2)
    assert torch.equal(default.cond, two.cond)  # SDXL's default is the penultimate layer
    for skip in (1, 3):
        c = SDXL.encode_prompt(pipe, "a red box", None, tiny_sdxl.device, False, (64, 64), clip_skip=skip)
        with torch.no_grad():
            parts = [
                encoder(padded_ids(tokenizer, "a red box"), output_hidden_states=True)
                for encoder, tokenizer in (
                    (pipe.text_encoder, pipe.tokenizer),
                    (pipe.text_encoder_2, pipe.tokenizer_2),
                )
            ]
        expected = [p.last_hidden_state if skip == 1 else p.hidden_states[-skip] for p in parts]
        torch.testing.assert_close(c.cond, torch.cat(expected, -1), rtol=0, atol=1e-6)


def test_clip_skip_is_checked(demo_pipeline):
    layers = demo_pipeline.pipeline.text_encoder.config.num_hidden_layers
    with pytest.raises(CollageError, match=rf"clip_skip: this model's text encoder has {layers} layers"):
        generate(demo_pipeline, art("a green leaf", clip_skip=layers + 1))
    with pytest.raises(CollageError, match=r"clip_skip: must be a whole number in 1\.\.12"):
        art("a green leaf", clip_skip=0).validate()
    image = generate(demo_pipeline, art("a green leaf", clip_skip=2)).images[0].image
    assert not np.array_equal(image, generate(demo_pipeline, art("a green leaf")).images[0].image)
