"""Single-image textual inversion per layer (core/inversion/) on the demo model: placeholder tokens
in the shared model, progress and cancel, and the wiring through generate(). The training is in
test_inversion_training.py, the cache in test_inversion_cache.py.

Step counts are tiny (the demo model is random; these check the machinery, not image quality).
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from core import inversion
from core.collage import Layer
from core.compositing import composite
from core.inversion import (
    InversionCache,
    appearance_tokens,
    placeholder_tokens,
)
from core.progress import GenerationCancelled
from core.tokens import token_spans
from tests.inversion_cases import TINY, learning_events, model_state, sushi_collage, sushi_image

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
