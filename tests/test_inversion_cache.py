"""Single-image textual inversion (core/inversion/): the embedding cache on disk."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os

import pytest
import torch

from core.compositing import composite
from core.inversion import (
    InversionCache,
    InversionResult,
    appearance_tokens,
    read_embedding,
)
from tests.inversion_cases import TINY, encode, learning_events, sushi_collage

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
