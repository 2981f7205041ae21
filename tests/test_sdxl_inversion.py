"""Textual inversion on SDXL (core/inversion/ through core/families.py): one vector per text
encoder, the masked loss through both encoders and SDXL's added conditioning, the cache in the
SDXL layout other tools read (`clip_l` + `clip_g` tensors)."""

import copy

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core import inversion
from core.collage import Collage, Layer
from core.generate import generate
from core.inversion import InversionCache, InversionSettings, read_embedding, train_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sushi_image() -> np.ndarray:
    img = np.zeros((40, 32, 4), np.uint8)
    img[..., :3] = (90, 140, 250)  # colour of the invisible border
    img[6:34, 4:28] = (230, 110, 60, 255)
    img[12:18, 10:16, :3] = (250, 250, 240)
    return img


def state(model):
    pipe = model.pipeline
    return [
        (len(getattr(pipe, t)), getattr(pipe, e).get_input_embeddings())
        for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    ]


def widths(model):
    pipe = model.pipeline
    return [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]


def test_masked_loss_falls_through_both_encoders(tiny_sdxl):
    before = state(tiny_sdxl)
    settings = InversionSettings(steps=10, resolution=128, seed=1, resample=False, learning_rate=1e-2)
    result = train_embedding(tiny_sdxl, sushi_image(), "salmon sushi", settings=settings)
    losses = result.losses
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] and np.mean(losses[-3:]) < np.mean(losses[:3])
    w_l, w_g = widths(tiny_sdxl)
    assert result.embedding.shape == (w_l + w_g,) and result.parts == (("clip_l", w_l), ("clip_g", w_g))
    after = state(tiny_sdxl)
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before, strict=True))


def test_each_encoder_part_learns(tiny_sdxl):
    """Gradients reach both halves of v*: each encoder's part moves away from its start."""
    settings = InversionSettings(steps=4, resolution=128, seed=2, resample=False, learning_rate=1e-2)
    start = inversion.initial_embedding(tiny_sdxl.pipeline, "salmon sushi", tiny_sdxl.family)
    result = train_embedding(tiny_sdxl, sushi_image(), "salmon sushi", settings=settings)
    w_l, _ = widths(tiny_sdxl)
    moved = (result.embedding - start).abs()
    assert moved[:w_l].max() > 1e-3 and moved[w_l:].max() > 1e-3


@pytest.fixture
def small_inversion(monkeypatch, tmp_path):
    settings = InversionSettings(steps=2, resolution=128, seed=5)
    monkeypatch.setattr(inversion.recipe, "DEFAULT_SETTINGS", settings)
    monkeypatch.setattr(inversion.cache, "cache_dir", lambda: tmp_path)
    return tmp_path / "embeddings"


def collage(appearance=True):
    leaf = np.zeros((40, 56, 4), np.uint8)
    leaf[...] = (30, 200, 60, 255)
    return Collage(
        prompt="salmon sushi on a green leaf",
        layers=[
            Layer("green leaf", leaf, offset=(60, 60)),
            Layer("salmon sushi", sushi_image(), offset=(12, 16), appearance=appearance),
        ],
        width=128,
        height=128,
        steps=3,
        strength=0.8,
        seed=3,
    )


def test_generate_learns_once_and_caches_in_the_sdxl_layout(tiny_sdxl, small_inversion):
    before = state(tiny_sdxl)
    first, second = [], []
    a = generate(tiny_sdxl, collage(), progress=first.append)
    b = generate(tiny_sdxl, collage(), progress=second.append)
    learning = [e for e in first if e.phase.startswith("learning appearance")]
    assert [(e.step, e.total) for e in learning] == [(1, 2), (2, 2)]
    assert not [e for e in second if e.phase.startswith("learning appearance")]
    assert np.array_equal(a.images[0].image, b.images[0].image)
    assert "<collage-" in a.prompt
    plain = generate(tiny_sdxl, collage(appearance=False))
    assert not np.array_equal(plain.images[0].image, a.images[0].image)
    after = state(tiny_sdxl)
    assert all(x[0] == y[0] and x[1] is y[1] for x, y in zip(after, before, strict=True))

    (path,) = small_inversion.glob("*.safetensors")
    w_l, w_g = widths(tiny_sdxl)
    tensors = load_file(str(path))
    assert sorted(tensors) == ["clip_g", "clip_l"]
    assert tensors["clip_l"].shape == (1, w_l) and tensors["clip_g"].shape == (1, w_g)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["family"] == "sdxl" and meta["token"].startswith("<collage-")
    # The SD 1.x layout does not pass for an SDXL cache entry, and a damaged width is caught.
    with pytest.raises(inversion.CorruptEmbedding):
        read_embedding(path, w_l + w_g)
    with pytest.raises(inversion.CorruptEmbedding):
        read_embedding(path, parts=(("clip_l", w_l), ("clip_g", w_g + 1)))


def test_sdxl_cache_file_loads_the_way_diffusers_documents(tiny_sdxl, tmp_path):
    """diffusers' SDXL textual-inversion recipe: each tensor into its own encoder and tokenizer."""
    settings = InversionSettings(steps=1, resolution=128, seed=4)
    result = train_embedding(tiny_sdxl, sushi_image(), "salmon sushi", settings=settings)
    cache = InversionCache(tmp_path)
    path = cache.put("ab" * 32, result)
    assert cache.get("ab" * 32, result.embedding.numel(), result.parts) is not None

    pipe = tiny_sdxl.pipeline
    other = type(pipe)(
        **{
            **pipe.components,
            "tokenizer": copy.deepcopy(pipe.tokenizer),
            "tokenizer_2": copy.deepcopy(pipe.tokenizer_2),
            "text_encoder": copy.deepcopy(pipe.text_encoder),
            "text_encoder_2": copy.deepcopy(pipe.text_encoder_2),
        }
    )
    state_dict = load_file(str(path))
    token = "<my-sushi>"
    other.load_textual_inversion(
        state_dict["clip_l"], token=token, text_encoder=other.text_encoder, tokenizer=other.tokenizer
    )
    other.load_textual_inversion(
        state_dict["clip_g"], token=token, text_encoder=other.text_encoder_2, tokenizer=other.tokenizer_2
    )
    w_l, _ = widths(tiny_sdxl)
    row_l = other.text_encoder.get_input_embeddings().weight[other.tokenizer.convert_tokens_to_ids(token)]
    row_g = other.text_encoder_2.get_input_embeddings().weight[other.tokenizer_2.convert_tokens_to_ids(token)]
    assert torch.equal(row_l.detach(), result.embedding[:w_l])
    assert torch.equal(row_g.detach(), result.embedding[w_l:])
