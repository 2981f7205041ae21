"""Placeholder tokens in the shared model for one block (`added_tokens`), and a trainable vector
spliced into the text encoder's input embeddings (`_Spliced`); both leave the model as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..families import SD1, ModelFamily


def _extend_tokenizer(tokenizer, tokens: list[str]) -> Callable[[], None]:
    """Add `tokens` to the tokenizer; returns a function that restores it exactly.

    Fast (tokenizers-backed) tokenizers, which transformers 5's CLIPTokenizer is, cannot remove
    added tokens, so the tokens go into a copy of the Rust backend and the original backend object
    is put back afterwards (the copy costs ~0.1-0.3 s for CLIP's vocabulary). Slow (Python)
    tokenizers keep added tokens in two dicts, which are snapshotted and restored.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        from tokenizers import Tokenizer

        tokenizer._tokenizer = Tokenizer.from_str(backend.to_str())

        def restore() -> None:
            tokenizer._tokenizer = backend

    else:
        decoder = dict(tokenizer._added_tokens_decoder)
        encoder = dict(tokenizer._added_tokens_encoder)

        def restore() -> None:
            tokenizer._added_tokens_decoder = decoder
            tokenizer._added_tokens_encoder = encoder
            for refresh in ("_update_trie", "_update_total_vocab_size"):
                if hasattr(tokenizer, refresh):
                    getattr(tokenizer, refresh)()

    try:
        tokenizer.add_tokens(list(tokens))
    except BaseException:
        restore()
        raise
    return restore


def slot_dims(pipe, family: ModelFamily) -> list[int]:
    """The input-embedding width of each of the family's text encoders (768 and 1280 for SDXL)."""
    return [
        getattr(pipe, slot.encoder).get_input_embeddings().weight.shape[1] for slot in family.text_encoders
    ]


def split_rows(rows: torch.Tensor, dims: list[int]) -> list[torch.Tensor]:
    """Rows (k, sum(dims)) → each encoder's part (k, dim): an embedding is one vector per token,
    its encoders' parts side by side."""
    return list(torch.split(rows, dims, dim=-1))


@contextlib.contextmanager
def added_tokens(
    pipe, tokens: list[str], rows: torch.Tensor, family: ModelFamily = SD1
) -> Iterator[tuple[list[int], list[nn.Embedding]]]:
    """Tokens in each of the family's tokenizers and their rows in its text encoders for one block.

    `rows` is (k, D) with D the encoders' widths added up (one part per encoder). Each text encoder
    gets a new input-embedding module (the old matrix plus the rows); on exit the original modules
    and tokenizer backends are put back, so sizes and objects are as before. Yields the tokens' ids
    (the same in every tokenizer: they share CLIP's vocabulary) and the new embedding modules.
    """
    dims = slot_dims(pipe, family)
    restores: list[Callable[[], None]] = []
    embeddings: list[nn.Embedding] = []
    ids: list[int] = []
    try:
        for slot, part in zip(family.text_encoders, split_rows(rows, dims), strict=True):
            tokenizer, text_encoder = getattr(pipe, slot.tokenizer), getattr(pipe, slot.encoder)
            original = text_encoder.get_input_embeddings()
            restore_tokenizer = _extend_tokenizer(tokenizer, tokens)
            restores.append(restore_tokenizer)
            slot_ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
            for t in tokens:
                if tokenizer.tokenize(t) != [t]:
                    raise RuntimeError(f"placeholder {t} does not tokenize as one token")
            if ids and slot_ids != ids:
                raise RuntimeError(f"placeholder ids differ between tokenizers: {ids} vs {slot_ids}")
            ids = slot_ids
            weight = original.weight.detach()
            need = max(max(ids) + 1, weight.shape[0])
            extra = weight.new_zeros((need - weight.shape[0], weight.shape[1]))
            new_weight = torch.cat([weight, extra])  # a copy: the original matrix is never written
            new_weight[ids] = part.to(device=new_weight.device, dtype=new_weight.dtype)
            embedding = nn.Embedding.from_pretrained(
                new_weight, freeze=True, padding_idx=original.padding_idx
            )
            text_encoder.set_input_embeddings(embedding)
            restores.append(lambda enc=text_encoder, emb=original: enc.set_input_embeddings(emb))
            embeddings.append(embedding)
        yield ids, embeddings
    finally:
        for restore in reversed(restores):
            restore()


def set_rows(embeddings: list[nn.Embedding], token_id: int, vector: torch.Tensor) -> None:
    """Write one token's embedding (its encoders' parts side by side) into the spliced modules."""
    dims = [e.weight.shape[1] for e in embeddings]
    with torch.no_grad():
        for embedding, part in zip(embeddings, split_rows(vector, dims), strict=True):
            embedding.weight[token_id] = part.to(embedding.weight)


class _Spliced(nn.Module):
    """Input embeddings where one token id reads a separate (trainable, fp32) vector: the slice
    [start:end] of `vector`, this encoder's part of a multi-encoder embedding."""

    def __init__(self, base: nn.Embedding, token_id: int, vector: torch.Tensor, start: int = 0, end=None):
        super().__init__()
        self.base = base
        self.token_id = token_id
        self._vector = [vector]  # a list: not registered as a parameter of the text encoder
        self._range = (start, end if end is not None else vector.shape[-1])

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        hit = (input_ids == self.token_id).unsqueeze(-1)
        start, end = self._range
        return torch.where(hit, self._vector[0][start:end].to(out.dtype), out)
