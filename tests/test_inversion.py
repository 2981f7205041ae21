"""Single-image textual inversion per layer (core/inversion/) on the demo model.

Step counts are tiny (the demo model is random; these check the machinery, not image quality).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading

import numpy as np
import pytest
import torch

from core import inversion
from core.collage import Collage, Layer
from core.compositing import composite
from core.inversion import (
    InversionCache,
    InversionResult,
    InversionSettings,
    appearance_tokens,
    cache_key,
    placeholder_tokens,
    read_embedding,
    train_embedding,
)
from core.progress import GenerationCancelled
from core.tokens import token_spans

TINY = InversionSettings(steps=2, resolution=64, seed=5)


def sushi_image(size=(24, 20)) -> np.ndarray:
    """An object (alpha 255) with a detail, inside a transparent border of junk colour."""
    h, w = size
    img = np.zeros((h, w, 4), np.uint8)
    img[..., :3] = (90, 140, 250)  # colour of the invisible border
    img[4 : h - 4, 3 : w - 3] = (230, 110, 60, 255)
    img[8:12, 6:10, :3] = (250, 250, 240)
    img[4 : h - 4, 3, 3] = 128  # a soft edge
    return img


def sushi_collage(appearance=True, **overrides) -> Collage:
    leaf = np.zeros((20, 28, 4), np.uint8)
    leaf[...] = (30, 200, 60, 255)
    kwargs = dict(
        prompt="salmon sushi on a green leaf",
        layers=[
            Layer("green leaf", leaf, offset=(30, 30)),
            Layer("salmon sushi", sushi_image(), offset=(6, 8), appearance=appearance),
        ],
        width=64,
        height=64,
        steps=4,
        strength=0.8,
        seed=3,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


def model_state(model):
    te = model.pipeline.text_encoder
    return len(model.pipeline.tokenizer), te.get_input_embeddings(), te.get_input_embeddings().weight.shape


def learning_events(events, text="salmon sushi"):
    return [(e.step, e.total) for e in events if e.phase == f"learning appearance of '{text}'"]


def encode(model, prompt: str) -> torch.Tensor:
    cond, _ = model.pipeline.encode_prompt(prompt, model.device, 1, False)
    return cond


# --- training --------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    s = InversionSettings()
    assert (s.steps, s.learning_rate, s.batch_size, s.resolution, s.weight_decay) == (
        400,
        2e-3,
        1,
        None,
        1e-2,
    )
    assert s.keep_size and s.timesteps == (0.0, 1.0)
    assert s.max_norm is None and s == inversion.recipe.DEFAULT_SETTINGS
    with pytest.raises(ValueError, match="resolution"):
        InversionSettings(resolution=100).check()
    with pytest.raises(ValueError, match="timesteps"):
        InversionSettings(timesteps=(0.5, 0.2)).check()


def _box(alpha: torch.Tensor) -> tuple[int, int]:
    ys, xs = torch.nonzero(alpha[0] > 0.5, as_tuple=True)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def test_keep_size_trains_the_object_at_its_share_of_the_canvas():
    # A 16x12 object on a 64-pixel canvas, trained at 128: with keep_size it is 32x24 there (its
    # share of the canvas), without it it fills the square (128 on its longer side).
    image = np.zeros((64, 64, 4), np.uint8)
    image[10:26, 40:52] = (200, 30, 30, 255)
    obj = inversion.training._object_tensor(image)
    fixed = dataclasses.replace(TINY, scale=(1.0, 1.0), flip=False)
    gen = torch.Generator().manual_seed(0)
    _, alpha = inversion.augment(obj, 128, gen, fixed, canvas_side=64)
    assert _box(alpha) == (32, 24)
    _, alpha = inversion.augment(obj, 128, gen, dataclasses.replace(fixed, keep_size=False), canvas_side=64)
    assert _box(alpha) == (128, 96)
    # The canvas is part of the key with keep_size (the same pixels on a bigger canvas train
    # smaller), and not without it.
    key = cache_key("m", image, "circle", TINY, 64, canvas_side=64)
    assert cache_key("m", image, "circle", TINY, 64, canvas_side=128) != key
    fill = dataclasses.replace(TINY, keep_size=False)
    assert cache_key("m", image, "circle", fill, 64, canvas_side=64) == cache_key(
        "m", image, "circle", fill, 64, canvas_side=128
    )


def test_max_norm_holds_the_embedding_near_its_words(demo_pipeline):
    # A large step lets v* grow well past a word's length; with max_norm it ends within that
    # multiple of the layer words' mean embedding norm (it is projected back after every step).
    loud = dataclasses.replace(TINY, steps=8, learning_rate=0.2, weight_decay=0.0)
    words = inversion.training.word_norm(demo_pipeline.pipeline, "salmon sushi")
    free = train_embedding(demo_pipeline, sushi_image(), "salmon sushi", settings=loud)
    assert free.embedding.norm() > 1.5 * words
    held = train_embedding(
        demo_pipeline, sushi_image(), "salmon sushi", settings=dataclasses.replace(loud, max_norm=1.0)
    )
    assert held.embedding.norm() <= words * (1 + 1e-5)
    assert held.embedding.norm() > 0.5 * words and not torch.equal(held.embedding, free.embedding)
    with pytest.raises(ValueError, match="max_norm"):
        InversionSettings(max_norm=0.0).check()


def test_timesteps_come_from_the_chosen_range(demo_pipeline):
    seen = []
    unet = demo_pipeline.pipeline.unet
    hook = unet.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    try:
        settings = dataclasses.replace(TINY, steps=12, timesteps=(0.6, 0.8))
        train_embedding(demo_pipeline, sushi_image(), "salmon sushi", settings=settings)
    finally:
        hook.remove()
    t = torch.cat(seen)
    n = demo_pipeline.pipeline.scheduler.config.num_train_timesteps
    assert len(t) == 12 and t.min() >= round(0.6 * (n - 1)) and t.max() <= round(0.8 * (n - 1))
    assert len(set(t.tolist())) > 1


def test_masked_loss_falls_on_a_fixed_batch(demo_pipeline):
    # The demo model is random and barely listens to the text, so fresh noise every step would
    # hide the progress; on one fixed batch (same seed) the masked loss must fall steadily.
    settings = InversionSettings(steps=12, resolution=64, seed=1, resample=False)
    result = train_embedding(demo_pipeline, sushi_image(), "salmon sushi", settings=settings)
    losses = result.losses
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert losses[-1] < losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 10  # (almost) monotone
    assert result.embedding.dtype == torch.float32 and result.embedding.shape == (32,)


def test_pixels_outside_the_mask_do_not_matter(demo_pipeline):
    image = sushi_image()
    other = image.copy()
    invisible = other[..., 3] == 0
    other[invisible, :3] = np.random.default_rng(0).integers(0, 256, (int(invisible.sum()), 3))
    a = train_embedding(demo_pipeline, image, "salmon sushi", settings=TINY)
    b = train_embedding(demo_pipeline, other, "salmon sushi", settings=TINY)
    assert torch.equal(a.embedding, b.embedding)
    assert a.losses == b.losses
    # ... and so they do not change the cache key either; a visible pixel does.
    key = cache_key("m", image, "salmon sushi", TINY, 64)
    assert cache_key("m", other, "salmon sushi", TINY, 64) == key
    visible = image.copy()
    visible[10, 10, 0] ^= 1
    assert cache_key("m", visible, "salmon sushi", TINY, 64) != key
    assert cache_key("m", image, "tuna sushi", TINY, 64) != key
    assert cache_key("other model", image, "salmon sushi", TINY, 64) != key
    assert cache_key("m", image, "salmon sushi", dataclasses.replace(TINY, steps=4), 64) != key


def test_train_embedding_leaves_the_model_as_it_was(demo_pipeline):
    before = model_state(demo_pipeline)
    train_embedding(demo_pipeline, sushi_image(), "salmon sushi", settings=dataclasses.replace(TINY, steps=1))
    after = model_state(demo_pipeline)
    assert after[0] == before[0] and after[1] is before[1] and after[2] == before[2]
    assert not any(p.grad is not None for p in demo_pipeline.pipeline.unet.parameters())


def test_fp16_model_trains_an_fp32_embedding(demo_pipeline):
    from diffusers import StableDiffusionPipeline

    from core.models import LoadedModel

    pipe = demo_pipeline.pipeline
    half = StableDiffusionPipeline(
        **{
            **pipe.components,
            "unet": copy.deepcopy(pipe.unet).half(),
            "vae": copy.deepcopy(pipe.vae).half(),
            "text_encoder": copy.deepcopy(pipe.text_encoder).half(),
        }
    )
    model = LoadedModel(half, "demo", "demo-fp16", torch.device("cpu"), torch.float16)
    result = train_embedding(model, sushi_image(), "salmon sushi", settings=TINY)
    assert result.embedding.dtype == torch.float32 and torch.isfinite(result.embedding).all()
    assert half.text_encoder.get_input_embeddings().weight.dtype == torch.float16  # untouched


def test_loss_scale_skips_overflowing_steps():
    scaler = inversion.training._LossScale(enabled=True)
    param = torch.ones(3, requires_grad=True)
    start = scaler.scale
    assert scaler.grad((param * float("inf")).sum(), param) is None
    assert scaler.scale == start / 2
    grad = scaler.grad((param * 2).sum(), param)
    assert grad.dtype == torch.float32 and torch.equal(grad, torch.full((3,), 2.0))


# --- placeholder tokens and the shared model -------------------------------------------------


def test_placeholder_tokens_are_unique_and_not_in_the_vocabulary():
    a, b = "ab12cd34" + "0" * 56, "ab12cd34" + "f" * 56
    tokens = placeholder_tokens([a, b, a], {"<collage-ab12cd34>": 1})
    assert set(tokens) == {a, b}
    assert tokens[a] != tokens[b]
    assert all(
        t.startswith("<collage-ab12cd34") and len(t) > len("<collage-ab12cd34>") for t in tokens.values()
    )
    assert placeholder_tokens([a], set())[a] == "<collage-ab12cd34>"


def test_tokens_live_only_inside_the_block(demo_pipeline, tmp_path):
    cache = InversionCache(tmp_path)
    collage = sushi_collage()
    flat = composite(collage)
    tokenizer = demo_pipeline.pipeline.tokenizer
    before = model_state(demo_pipeline)
    with appearance_tokens(demo_pipeline, collage, flat, settings=TINY, cache=cache) as prefixes:
        assert prefixes[0] is None and prefixes[1].startswith("<collage-")
        token = prefixes[1]
        assert tokenizer.tokenize(f"a photo of {token} salmon sushi")[3] == token  # one token
        assert len(tokenizer) == before[0] + 1
        assert demo_pipeline.pipeline.text_encoder.get_input_embeddings().weight.shape[0] == before[2][0] + 1
        spans = token_spans(tokenizer, collage.prompt, [layer.text for layer in flat.layers], prefixes)
        assert spans.prompt == f"{token} salmon sushi on a green leaf"
        assert spans.spans[1] == [1, 2, 3]  # the placeholder joins the layer's span
    after = model_state(demo_pipeline)
    assert after[0] == before[0] and after[1] is before[1] and after[2] == before[2]
    assert len(tokenizer.tokenize(token)) > 1  # a placeholder is no longer a token

    # An error inside the block restores too.
    with (
        pytest.raises(RuntimeError, match="boom"),
        appearance_tokens(demo_pipeline, collage, flat, settings=TINY, cache=cache),
    ):
        assert len(tokenizer) == before[0] + 1
        raise RuntimeError("boom")
    after = model_state(demo_pipeline)
    assert after[0] == before[0] and after[1] is before[1] and after[2] == before[2]


def test_layers_get_their_own_tokens(demo_pipeline, tmp_path):
    collage = sushi_collage()
    twin = Layer("salmon sushi", sushi_image(), offset=(30, 2), appearance=True)  # same content
    tuna = Layer("tuna sushi", sushi_image()[:, ::-1].copy(), offset=(40, 40), appearance=True)
    collage.layers += [twin, tuna]
    events = []
    with appearance_tokens(
        demo_pipeline,
        collage,
        composite(collage),
        settings=TINY,
        cache=InversionCache(tmp_path),
        report=events.append,
    ) as prefixes:
        assert prefixes[0] is None
        assert prefixes[1] == prefixes[2]  # identical layers share one embedding
        assert prefixes[3] not in (None, prefixes[1])
    assert learning_events(events) == [(1, 2), (2, 2)]  # trained once, not twice
    assert learning_events(events, "tuna sushi") == [(1, 2), (2, 2)]


def test_no_appearance_layers_leave_the_tokenizer_alone(demo_pipeline, tmp_path):
    collage = sushi_collage(appearance=False)
    backend = demo_pipeline.pipeline.tokenizer._tokenizer
    with appearance_tokens(
        demo_pipeline, collage, composite(collage), settings=TINY, cache=InversionCache(tmp_path)
    ) as prefixes:
        assert prefixes == [None, None]
        assert demo_pipeline.pipeline.tokenizer._tokenizer is backend
    assert not any(tmp_path.iterdir())


# --- cache -----------------------------------------------------------------------------------


def test_cache_hit_trains_zero_steps_and_gives_the_same_embedding(demo_pipeline, tmp_path):
    cache = InversionCache(tmp_path)
    collage = sushi_collage()
    flat = composite(collage)
    first, second = [], []
    with appearance_tokens(
        demo_pipeline, collage, flat, settings=TINY, cache=cache, report=first.append
    ) as p1:
        prompt = f"a photo of {p1[1]} salmon sushi"
        cond1 = encode(demo_pipeline, prompt)
    assert learning_events(first) == [(1, 2), (2, 2)]
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    with appearance_tokens(
        demo_pipeline, collage, flat, settings=TINY, cache=cache, report=second.append
    ) as p2:
        cond2 = encode(demo_pipeline, prompt)
    assert p2 == p1
    assert learning_events(second) == []
    assert torch.equal(cond1, cond2)
    # A fresh cache object on the same folder (a restart) hits too.
    third = []
    with appearance_tokens(
        demo_pipeline, collage, flat, settings=TINY, cache=InversionCache(tmp_path), report=third.append
    ):
        pass
    assert learning_events(third) == []
    # Different hyper-parameters are a different embedding.
    with appearance_tokens(
        demo_pipeline,
        collage,
        flat,
        settings=dataclasses.replace(TINY, seed=6),
        cache=cache,
        report=third.append,
    ) as p3:
        assert p3[1] != p1[1]
    assert learning_events(third) == [(1, 2), (2, 2)]


def test_cache_file_is_a_diffusers_textual_inversion_file(demo_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    cache = InversionCache(tmp_path)
    collage = sushi_collage()
    with appearance_tokens(
        demo_pipeline, collage, composite(collage), settings=TINY, cache=cache
    ) as prefixes:
        token = prefixes[1]
    (path,) = tmp_path.glob("*.safetensors")
    stored = read_embedding(path)
    assert stored.token == token

    pipe = demo_pipeline.pipeline
    other = StableDiffusionPipeline(
        **{
            **pipe.components,
            "tokenizer": copy.deepcopy(pipe.tokenizer),
            "text_encoder": copy.deepcopy(pipe.text_encoder),
        }
    )
    n, rows = len(other.tokenizer), other.text_encoder.get_input_embeddings().weight.shape[0]
    other.load_textual_inversion(str(path))  # the token comes from the file
    assert other.tokenizer.tokenize(f"a {token} b")[1] == token
    row = other.text_encoder.get_input_embeddings().weight[other.tokenizer.convert_tokens_to_ids(token)]
    assert torch.equal(row.detach(), stored.embedding)
    other.unload_textual_inversion(token)
    assert len(other.tokenizer) == n
    assert other.text_encoder.get_input_embeddings().weight.shape[0] == rows
    other.load_textual_inversion(str(path), token="<my-sushi>")  # or under a name of one's own
    assert other.tokenizer.tokenize("a <my-sushi> b")[1] == "<my-sushi>"
    other.unload_textual_inversion("<my-sushi>")
    assert len(other.tokenizer) == n


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_damaged_cache_file_is_discarded_with_a_warning(tmp_path, caplog, damage):
    cache = InversionCache(tmp_path)
    key = "ab" * 32
    path = cache.put(key, InversionResult("<collage-abababab>", torch.linspace(-1, 1, 32)))
    assert cache.get(key, dim=32) is not None
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 10])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file")
    else:  # a flipped bit in the tensor data: only the checksum notices
        path.write_bytes(data[:-4] + bytes([data[-4] ^ 1]) + data[-3:])
    with caplog.at_level(logging.WARNING, logger="core.inversion"):
        assert cache.get(key, dim=32) is None
    assert "damaged" in caplog.text
    assert not path.exists()


def test_truncated_cache_file_is_retrained(demo_pipeline, tmp_path, caplog):
    cache = InversionCache(tmp_path)
    collage = sushi_collage()
    flat = composite(collage)
    with appearance_tokens(demo_pipeline, collage, flat, settings=TINY, cache=cache):
        pass
    (path,) = tmp_path.glob("*.safetensors")
    good = read_embedding(path).embedding
    path.write_bytes(path.read_bytes()[:40])
    events = []
    with (
        caplog.at_level(logging.WARNING, logger="core.inversion"),
        appearance_tokens(demo_pipeline, collage, flat, settings=TINY, cache=cache, report=events.append),
    ):
        pass
    assert "damaged" in caplog.text
    assert learning_events(events) == [(1, 2), (2, 2)]
    assert torch.equal(read_embedding(path).embedding, good)  # retrained: same seed, same result


def test_wrong_size_embedding_counts_as_damaged(tmp_path, caplog):
    cache = InversionCache(tmp_path)
    cache.put("cd" * 32, InversionResult("<collage-cdcdcdcd>", torch.zeros(16)))
    with caplog.at_level(logging.WARNING, logger="core.inversion"):
        assert cache.get("cd" * 32, dim=32) is None
    assert "damaged" in caplog.text


def test_cache_evicts_least_recently_used(tmp_path):
    cache = InversionCache(tmp_path, max_bytes=10**9)
    paths = {}
    for i, name in enumerate("abcd"):
        paths[name] = cache.put(
            name * 64, InversionResult(f"<collage-{name * 8}>", torch.full((32,), float(i)))
        )
        os.utime(paths[name], (1000 + i, 1000 + i))  # a written first ... d written last
    one = paths["a"].stat().st_size
    assert cache.get("a" * 64, dim=32) is not None  # a use makes "a" the most recent
    cache.max_bytes = 3 * one
    assert cache.evict() == [paths["b"]]
    cache.max_bytes = 2 * one
    assert cache.evict() == [paths["c"]]
    assert sorted(p.name[0] for p, _s, _t in cache.entries()) == ["a", "d"]
    # A new entry evicts old ones but never itself.
    cache.max_bytes = one
    new = cache.put("e" * 64, InversionResult("<collage-eeeeeeee>", torch.zeros(32)))
    assert [p for p, _s, _t in cache.entries()] == [new]


# --- progress and cancel ---------------------------------------------------------------------


def test_cancel_stops_training_within_one_step(demo_pipeline, tmp_path):
    cache = InversionCache(tmp_path)
    collage = sushi_collage()
    cancel = threading.Event()
    seen = []

    def on_progress(p):
        seen.append(p.step)
        if p.step == 2:
            cancel.set()

    before = model_state(demo_pipeline)
    with (
        pytest.raises(GenerationCancelled),
        appearance_tokens(
            demo_pipeline,
            collage,
            composite(collage),
            settings=dataclasses.replace(TINY, steps=10),
            cache=cache,
            report=on_progress,
            cancel=cancel,
        ),
    ):
        pytest.fail("the block must not run after a cancel")
    assert seen == [1, 2]
    after = model_state(demo_pipeline)
    assert after[0] == before[0] and after[1] is before[1]
    assert not list(tmp_path.glob("*.safetensors"))  # nothing half-trained is cached


# --- through generate() (needs the wiring in core/generate.py) -------------------------------


def _wired() -> bool:
    import core.generate

    return hasattr(core.generate, "appearance_tokens")


wired = pytest.mark.skipif(not _wired(), reason="generate() does not call appearance_tokens yet")


@pytest.fixture
def small_inversion(monkeypatch, tmp_path):
    monkeypatch.setattr(inversion.recipe, "DEFAULT_SETTINGS", TINY)
    monkeypatch.setattr(inversion.cache, "cache_dir", lambda: tmp_path)
    return tmp_path / "embeddings"


@wired
def test_generate_second_run_trains_nothing_and_matches(demo_pipeline, small_inversion):
    from core.generate import generate

    before = model_state(demo_pipeline)
    first, second = [], []
    a = generate(demo_pipeline, sushi_collage(), progress=first.append)
    after = model_state(demo_pipeline)
    assert after[0] == before[0] and after[1] is before[1] and after[2] == before[2]
    b = generate(demo_pipeline, sushi_collage(), progress=second.append)
    assert learning_events(first) == [(1, 2), (2, 2)]
    phases = [e.phase for e in first]
    assert phases.index("learning appearance of 'salmon sushi'") < phases.index("sampling")
    assert learning_events(second) == []
    assert np.array_equal(a.images[0].image, b.images[0].image)
    assert "<collage-" in a.prompt
    assert len(list(small_inversion.glob("*.safetensors"))) == 1
    after = model_state(demo_pipeline)
    assert after[0] == before[0] and after[1] is before[1] and after[2] == before[2]


@wired
def test_generate_appearance_changes_the_prompt_encoding(demo_pipeline, small_inversion):
    from core.generate import generate

    plain = generate(demo_pipeline, sushi_collage(appearance=False))
    learned = generate(demo_pipeline, sushi_collage(appearance=True))
    assert "<collage-" not in plain.prompt
    assert not np.array_equal(plain.images[0].image, learned.images[0].image)


@wired
def test_appearance_token_in_a_long_prompt(demo_pipeline, small_inversion):
    """The learned token goes before the layer's words in whatever chunk they sit, joins the
    layer's span there, and is what that chunk is encoded with."""
    from core.families import SD1
    from core.generate import generate

    filler = ", ".join(["a wooden table in a quiet room"] * 11)
    collage = sushi_collage(prompt=f"{filler}, salmon sushi on a green leaf")
    flat = composite(collage)
    pipe = demo_pipeline.pipeline
    with appearance_tokens(demo_pipeline, collage, flat) as prefixes:
        spans = token_spans(pipe.tokenizer, collage.prompt, [layer.text for layer in flat.layers], prefixes)
        ids = spans.chunks.token_ids(pipe.tokenizer)[0]
        span = spans.spans[1]
        assert spans.chunks.n_chunks == 2 and min(span) > 77
        flat_ids = ids.reshape(-1)
        assert pipe.tokenizer.convert_ids_to_tokens(int(flat_ids[span[0]])) == prefixes[1]
        assert pipe.tokenizer.convert_ids_to_tokens(flat_ids[span[1:]].tolist()) == [
            "salmon</w>",
            "sushi</w>",
        ]
        c = SD1.encode_prompt(pipe, spans.chunks, None, demo_pipeline.device, False, (64, 64))
        with torch.no_grad():
            second = pipe.text_encoder(ids[1:2])[0]  # chunk 1 alone, with the spliced embedding
        torch.testing.assert_close(c.cond[:, 77:], second, rtol=0, atol=1e-6)
    plain = generate(demo_pipeline, sushi_collage(appearance=False, prompt=collage.prompt))
    learned = generate(demo_pipeline, collage)
    assert "<collage-" in learned.prompt and not learned.warnings
    assert not np.array_equal(plain.images[0].image, learned.images[0].image)
