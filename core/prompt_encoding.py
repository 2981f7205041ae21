"""Long prompts in 75-token chunks, and emphasis weights on the encoder output (docs/prompts.md).

CLIP reads 77 positions: a start token, 75 tokens, an end token (then padding). A longer prompt
is cut into chunks of at most 75 tokens; each chunk gets its own start and end tokens and padding
to 77, goes through the text encoder on its own, and the chunks' features are concatenated along
the sequence axis, as A1111 and ComfyUI do. Token t of chunk k sits at position k * 77 + 1 + t of
the concatenated sequence (`PromptChunks.positions`), which is what masked attention biases.

Where a chunk is cut follows A1111: when a chunk is full and one of its last 20 tokens is a
comma, the chunk ends after that comma and the rest moves to the next chunk (phrases stay
whole). Without such a comma we end the chunk after the last whole word within its last 20 tokens
(A1111 would cut the word in two); a single word longer than that is cut.

Emphasis weights follow ComfyUI's default rule: a token of weight w != 1 gets
``z_empty + w * (z - z_empty)``, with z its encoder output and z_empty the output at the same
position for the empty prompt; tokens of weight 1 are left exactly as encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .prompt_syntax import WeightedText

CHUNK_TOKENS = 75  # words per chunk; with the start and end tokens, CLIP's 77 positions
CHUNK_POSITIONS = CHUNK_TOKENS + 2
MAX_CHUNKS = 8  # 600 tokens: far past any prompt a painter writes; more is dropped with a warning
BACKTRACK = 20  # how far back a full chunk looks for a comma (A1111's default) or a word end


@dataclass
class PromptChunks:
    """A plain prompt tokenized and cut into chunks: what is encoded, and where each token lands."""

    text: str  # the plain prompt (emphasis syntax taken out)
    offsets: list[tuple[int, int]]  # each token's character range in `text`
    weights: list[float]  # each token's emphasis weight
    bounds: list[tuple[int, int]]  # each chunk's token range [a, b); tokens past the last are dropped

    @property
    def n_chunks(self) -> int:
        return len(self.bounds)

    def tokens_in(self, start: int, end: int) -> list[int]:
        """Indices of the tokens overlapping the characters [start, end)."""
        return [t for t, (a, b) in enumerate(self.offsets) if b > a and a < end and b > start]

    def positions(self, start: int, end: int) -> list[int]:
        """Positions in the concatenated sequence of the kept tokens of characters [start, end)."""
        wanted = set(self.tokens_in(start, end))
        return [
            k * CHUNK_POSITIONS + 1 + (t - a)
            for k, (a, b) in enumerate(self.bounds)
            for t in range(a, b)
            if t in wanted
        ]

    def padded(self, n: int) -> PromptChunks:
        """The same prompt with empty chunks (start, end, padding) appended up to n chunks."""
        last = self.bounds[-1][1]
        return replace(self, bounds=self.bounds + [(last, last)] * (n - self.n_chunks))

    def token_ids(self, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """Each chunk's ids for `tokenizer` (chunks, 77) and its attention mask (1 up to the end
        token, 0 on padding). SDXL's two tokenizers share CLIP's vocabulary and split a prompt
        alike; one that does not is an error rather than misplaced tokens."""
        ids, offsets = _tokenize(tokenizer, self.text)
        if offsets != self.offsets:
            raise RuntimeError("the text encoders' tokenizers split the prompt differently")
        rows, masks = [], []
        for a, b in self.bounds:
            row = [tokenizer.bos_token_id, *ids[a:b], tokenizer.eos_token_id]
            masks.append([1] * len(row) + [0] * (CHUNK_POSITIONS - len(row)))
            rows.append(row + [tokenizer.pad_token_id] * (CHUNK_POSITIONS - len(row)))
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)

    def weight_matrix(self) -> torch.Tensor:
        """(chunks, 77) emphasis weights, 1 on start, end and padding positions."""
        out = torch.ones(self.n_chunks, CHUNK_POSITIONS, dtype=torch.float64)
        for k, (a, b) in enumerate(self.bounds):
            out[k, 1 : 1 + b - a] = torch.tensor(self.weights[a:b], dtype=torch.float64)
        return out

    @property
    def emphasised(self) -> bool:
        return any(w != 1.0 for a, b in self.bounds for w in self.weights[a:b])


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]


def chunk_prompt(tokenizer, prompt: WeightedText, max_chunks: int = MAX_CHUNKS) -> PromptChunks:
    """Tokenize a plain prompt with per-character weights and cut it into chunks (at least one)."""
    ids, offsets = _tokenize(tokenizer, prompt.text)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    weights = [prompt.weights[a] if a < len(prompt.weights) else 1.0 for a, _ in offsets]
    bounds: list[tuple[int, int]] = []
    start = 0
    while len(ids) - start > CHUNK_TOKENS and len(bounds) < max_chunks:
        end = start + CHUNK_TOKENS
        window = range(end - 1, end - 1 - BACKTRACK, -1)
        cut = next((t + 1 for t in window if pieces[t] == ",</w>"), None)
        if cut is None:  # no comma: end after the last whole word (CLIP marks word ends "</w>")
            cut = next((t + 1 for t in window if str(pieces[t]).endswith("</w>")), end)
        bounds.append((start, cut))
        start = cut
    if len(bounds) < max_chunks:
        bounds.append((start, len(ids)))
    return PromptChunks(prompt.text, offsets, weights, bounds)


def paired(cond: PromptChunks, uncond: PromptChunks | None) -> tuple[PromptChunks, PromptChunks | None]:
    """Prompt and negative prompt padded to the same number of chunks, so that classifier-free
    guidance batches them (padding chunks at the end move no token's position)."""
    if uncond is None:
        return cond, None
    n = max(cond.n_chunks, uncond.n_chunks)
    return cond.padded(n), uncond.padded(n)


@dataclass(frozen=True)
class EncoderReading:
    """How a family reads one text encoder's output (see `ModelFamily`)."""

    clip_skip: int  # 1: the last layer's (normed) output; n: the n-th hidden state from the end
    layer_norm: bool  # apply the final layer norm to a skipped-to hidden state (SD 1/2 do)


def encode_chunks(encoder, tokenizer, chunks: PromptChunks, reading: EncoderReading):
    """One encoder's features of every chunk, weighted and concatenated: (1, chunks * 77, D), and
    the encoder's output for the chunks (pooled embeddings live there)."""
    ids, mask = chunks.token_ids(tokenizer)
    hidden, out = _hidden(encoder, ids, mask, reading)
    if chunks.emphasised:
        empty = chunk_prompt(tokenizer, WeightedText("", []))
        z_empty, _ = _hidden(encoder, *empty.token_ids(tokenizer), reading)
        w = chunks.weight_matrix().to(hidden.device)[..., None]
        weighted = (hidden - z_empty) * w.to(hidden.dtype) + z_empty
        hidden = torch.where(w != 1.0, weighted, hidden)
    return hidden.reshape(1, -1, hidden.shape[-1]), out


def _hidden(encoder, ids: torch.Tensor, mask: torch.Tensor, reading: EncoderReading):
    device = encoder.device
    use_mask = getattr(encoder.config, "use_attention_mask", False)  # as diffusers' SD pipeline
    out = encoder(
        ids.to(device),
        attention_mask=mask.to(device) if use_mask else None,
        output_hidden_states=reading.clip_skip > 1,
    )
    if reading.clip_skip == 1:
        return out.last_hidden_state, out
    hidden = out.hidden_states[-reading.clip_skip]
    if reading.layer_norm:
        hidden = final_layer_norm(encoder)(hidden)
    return hidden, out


def final_layer_norm(encoder):
    """The encoder's last LayerNorm: on the model itself in transformers 5, on `text_model` in
    transformers 4 and in CLIPTextModelWithProjection."""
    norm = getattr(encoder, "final_layer_norm", None)
    return norm if norm is not None else encoder.text_model.final_layer_norm
