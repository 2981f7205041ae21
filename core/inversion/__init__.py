"""Appearance fidelity: single-image textual inversion per layer, cached on disk (algorithm.md §2).

For each visible layer with ``appearance`` on, one new token embedding v* is learned so that the
frozen model reconstructs that layer's object:

    loss = sum( m · (ε − ε_θ(noisy(z), t, "a photo of <token> salmon sushi"))² ) / (C · sum(m))

where ``m`` is the layer's alpha after augmentation, area-averaged to latent size (pixels outside
the object do not count), ``z`` the VAE latents of the augmented object on a random background
colour, and ``C`` the number of latent channels (so the value reads like the usual mean squared
error). Only v* is trained: it is a separate fp32 parameter spliced into the text encoder's input
embeddings; the model's weights are never touched and never get gradients.

`appearance_tokens` is what `generate()` uses: it gets each embedding (from the cache, or by
training with progress and cancel per step), adds the placeholder tokens to the tokenizer and the
text encoder for the duration of a ``with`` block, and removes them again on exit, also on error
or cancel, so the shared model never accumulates tokens.

The cache stores one ``<key>.safetensors`` per embedding, in the single-tensor format that
diffusers' ``load_textual_inversion`` (and A1111 / ComfyUI) read. See docs/inversion.md.

Modules: `recipe` (settings, cache key, placeholder tokens), `cache` (the disk cache and its file
format), `splice` (tokens in the shared model for one block), `training` (learning one
embedding), `appearance` (the entry point). Every public name is importable from `core.inversion`.
"""

from .appearance import appearance_tokens
from .cache import DEFAULT_CACHE_BYTES, CorruptEmbedding, InversionCache, read_embedding
from .recipe import (
    RECIPE_VERSION,
    TOKEN_PREFIX,
    InversionResult,
    InversionSettings,
    cache_key,
    canonical_image,
    placeholder_tokens,
    resolved_resolution,
)
from .splice import added_tokens
from .training import augment, initial_embedding, train_embedding

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "RECIPE_VERSION",
    "TOKEN_PREFIX",
    "CorruptEmbedding",
    "InversionCache",
    "InversionResult",
    "InversionSettings",
    "added_tokens",
    "appearance_tokens",
    "augment",
    "cache_key",
    "canonical_image",
    "initial_embedding",
    "placeholder_tokens",
    "read_embedding",
    "resolved_resolution",
    "train_embedding",
]
