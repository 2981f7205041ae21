"""Placeholder tokens in the shared model for one block (`added_tokens`), and a trainable vector
spliced into the text encoder's input embeddings (`_Spliced`); both leave the model as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


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


@contextlib.contextmanager
def added_tokens(pipe, tokens: list[str], rows: torch.Tensor) -> Iterator[tuple[list[int], nn.Embedding]]:
    """Tokens in the tokenizer and their rows (k, D) in the text encoder for one block.

    The text encoder gets a new input-embedding module (the old matrix plus the rows); on exit the
    original module and tokenizer backend are put back, so sizes and objects are as before.
    Yields the tokens' ids and the new embedding module.
    """
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    original = text_encoder.get_input_embeddings()
    restore_tokenizer = _extend_tokenizer(tokenizer, tokens)
    try:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
        for t in tokens:
            if tokenizer.tokenize(t) != [t]:
                raise RuntimeError(f"placeholder {t} does not tokenize as one token")
        weight = original.weight.detach()
        need = max(max(ids) + 1, weight.shape[0])
        extra = weight.new_zeros((need - weight.shape[0], weight.shape[1]))
        new_weight = torch.cat([weight, extra])  # a copy: the original matrix is never written
        new_weight[ids] = rows.to(device=new_weight.device, dtype=new_weight.dtype)
        embedding = nn.Embedding.from_pretrained(new_weight, freeze=True, padding_idx=original.padding_idx)
        text_encoder.set_input_embeddings(embedding)
        yield ids, embedding
    finally:
        text_encoder.set_input_embeddings(original)
        restore_tokenizer()


class _Spliced(nn.Module):
    """Input embeddings where one token id reads a separate (trainable, fp32) vector."""

    def __init__(self, base: nn.Embedding, token_id: int, vector: torch.Tensor):
        super().__init__()
        self.base = base
        self.token_id = token_id
        self._vector = [vector]  # a list: not registered as a parameter of the text encoder

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        hit = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(hit, self._vector[0].to(out.dtype), out)
