"""`appearance_tokens`, what `generate()` uses: each appearance layer's embedding (from the cache
or trained now), loaded into the model for one ``with`` block."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator

import torch

from ..collage import Collage, appearance_mode
from ..compositing import CompositeResult
from ..progress import CancelFlag, ProgressCallback
from . import recipe
from .cache import InversionCache
from .recipe import InversionSettings, cache_key, embedding_parts, placeholder_tokens, resolved_resolution
from .splice import added_tokens, set_rows, slot_dims
from .training import _train, initial_embedding

log = logging.getLogger(__name__)


@contextlib.contextmanager
def appearance_tokens(
    model,
    collage: Collage,
    flat: CompositeResult,
    *,
    report: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    settings: InversionSettings | None = None,
    cache: InversionCache | None = None,
) -> Iterator[list[str | None]]:
    """Placeholder tokens of the appearance layers, loaded into the model for one ``with`` block.

    For each of ``flat.layers`` with ``appearance`` on: the cached embedding, or one trained now
    (progress ``"learning appearance of '<text>'"`` per step, cancel checked every step, the
    result cached). Yields one prefix per layer: its placeholder token, or None. On exit (also on
    error or cancel) the tokenizer and the text encoder's embedding matrix are restored.
    """
    layers = flat.layers
    if not any(appearance_mode(layer.appearance) == "learned" for layer in layers):
        yield [None] * len(layers)
        return
    settings = settings or recipe.DEFAULT_SETTINGS
    settings.check()
    cache = cache if cache is not None else InversionCache()
    report = report or (lambda p: None)
    pipe, family = model.pipeline, model.family
    size = resolved_resolution(pipe, settings)
    dims = slot_dims(pipe, family)
    parts = embedding_parts(family, dims)
    side = max(collage.width, collage.height)  # keep_size: each object's share of this canvas

    keys: list[str | None] = [None] * len(layers)
    for i, layer in enumerate(layers):
        if appearance_mode(layer.appearance) != "learned":
            continue
        if not layer.image[..., 3].any():
            log.warning("layer '%s' is fully transparent: no appearance to learn", layer.text)
            continue
        keys[i] = cache_key(model.identity, layer.image, layer.text, settings, size, family.id, side)
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    if not distinct:
        yield [None] * len(layers)
        return
    tokens = placeholder_tokens(distinct, pipe.tokenizer.get_vocab())
    first_layer = {k: layers[keys.index(k)] for k in distinct}

    known: dict[str, torch.Tensor] = {}
    for k in distinct:
        hit = cache.get(k, sum(dims), parts)
        if hit is not None:
            known[k] = hit.embedding
    inits = {
        k: known.get(k) if k in known else initial_embedding(pipe, first_layer[k].text, family)
        for k in distinct
    }
    rows = torch.stack([inits[k] for k in distinct])
    with added_tokens(pipe, [tokens[k] for k in distinct], rows, family) as (ids, embeddings):
        id_of = dict(zip(distinct, ids, strict=True))
        for k in distinct:
            if k in known:
                continue
            layer = first_layer[k]
            result = _train(
                model, tokens[k], id_of[k], layer.image, layer.text, inits[k], settings, report, cancel, side
            )
            metadata = {
                "text": layer.text,
                "model": model.identity,
                "family": family.id,
                "settings": json.dumps(dataclasses.asdict(settings) | {"resolution": size, "canvas": side}),
                "final_loss": f"{result.losses[-1]:.6g}" if result.losses else "",
            }
            try:
                cache.put(k, result, metadata)
            except OSError as e:  # a full or read-only disk must not fail the generation
                log.warning("appearance cache: could not store the embedding of '%s': %s", layer.text, e)
            set_rows(embeddings, id_of[k], result.embedding)
        yield [tokens[k] if k is not None else None for k in keys]
