"""Which token positions of the tokenized full prompt belong to each layer's text.

Layers are matched to the prompt by character ranges, then to tokens through the tokenizer's
offset mapping (never by string search over token strings, which breaks on BPE merges).
A text that occurs several times is matched to its occurrences in order: the first layer named
"cat" takes the first "cat", the second takes the second, and a third one (no occurrence left)
shares the last. A text that is not in the prompt is appended (", text") so that it has tokens.

Prompt and layer texts may carry emphasis syntax (`core.prompt_syntax`): matching works on the
plain texts, and a layer text with emphasis of its own ("(red scarf:1.3)") sets the weights of
its words in the prompt (otherwise the prompt's own weights stand).

A long prompt is encoded in chunks of 75 tokens (`core.prompt_encoding`); positions count in the
concatenated sequence (chunk k's i-th token at k * 77 + 1 + i). Past `MAX_CHUNKS` chunks the
tokens are dropped: a layer whose words all fall there has no tokens to steer, its span is empty
and it is listed in `TokenSpans.truncated`, so the caller can tell the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .prompt_encoding import MAX_CHUNKS, PromptChunks, chunk_prompt
from .prompt_syntax import WeightedText, weighted_text


@dataclass
class TokenSpans:
    """The prompt actually encoded, and per layer its token positions in the encoded sequence."""

    prompt: str  # the plain prompt (syntax taken out, missing layer texts appended)
    spans: list[list[int]]
    truncated: list[int] = field(default_factory=list)  # layers whose words fall past the limit
    chunks: PromptChunks | None = None  # the tokens and weights to encode


def _occurrences(prompt: str, text: str) -> list[tuple[int, int]]:
    """Case-insensitive whole-word occurrences of text in prompt, as (start, end) character ranges."""
    words = [re.escape(w) for w in text.split()]
    if not words:
        return []
    pattern = r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"
    return [(m.start(), m.end()) for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def locate_texts(prompt: str, texts: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Character range of each text in the prompt, appending the texts the prompt lacks."""
    ranges: list[tuple[int, int] | None] = [None] * len(texts)
    used: dict[str, int] = {}
    for i, text in enumerate(texts):
        found = _occurrences(prompt, text)
        if found:
            key = " ".join(text.lower().split())
            k = used.get(key, 0)
            ranges[i] = found[min(k, len(found) - 1)]
            used[key] = k + 1
    for i, text in enumerate(texts):
        if ranges[i] is None and not text.strip():
            ranges[i] = (0, 0)  # no words (a text of emphasis syntax only): no tokens
        elif ranges[i] is None:
            text = " ".join(text.split())
            prompt = f"{prompt.rstrip()}, {text}" if prompt.strip() else text
            ranges[i] = (len(prompt) - len(text), len(prompt))
    return prompt, ranges  # type: ignore[return-value]


def insert_prefixes(
    prompt: WeightedText, ranges: list[tuple[int, int]], prefixes: list[str | None]
) -> tuple[WeightedText, list[tuple[int, int]]]:
    """Put each layer's prefix (e.g. its learned appearance token) just before its words; the
    returned ranges cover prefix and words, so the prefix joins the layer's token span (and takes
    the weight of the layer's first word).

    Layers sharing one occurrence (more same-named layers than occurrences) share its first
    layer's prefix and range.
    """
    by_start: dict[int, int] = {}  # occurrence start -> first layer placed there
    for i in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
        by_start.setdefault(ranges[i][0], i)
    text, weights = prompt.text, prompt.weights
    pieces, weight_pieces, cursor, shift = [], [], 0, 0
    placed: dict[int, tuple[int, int]] = {}
    for start, i in sorted(by_start.items()):
        end = ranges[i][1]
        pieces.append(text[cursor:start])
        weight_pieces += weights[cursor:start]
        prefix = prefixes[i]
        if prefix:
            pieces.append(prefix + " ")
            weight_pieces += [weights[start] if start < len(weights) else 1.0] * (len(prefix) + 1)
            placed[start] = (start + shift, end + shift + len(prefix) + 1)
            shift += len(prefix) + 1
        else:
            placed[start] = (start + shift, end + shift)
        cursor = start
    pieces.append(text[cursor:])
    weight_pieces += weights[cursor:]
    return WeightedText("".join(pieces), weight_pieces), [placed[start] for start, _end in ranges]


def _layer_weights(prompt: WeightedText, ranges: list[tuple[int, int]], texts: list[WeightedText]) -> None:
    """Give each emphasised layer text's weights to its words in the prompt (in place): the
    non-space characters of a match are those of the layer text, in order."""
    for (start, end), text in zip(ranges, texts, strict=True):
        if not text.emphasised:
            continue
        own = [w for c, w in zip(text.text, text.weights, strict=True) if not c.isspace()]
        k = 0
        for p in range(start, end):
            if not prompt.text[p].isspace() and k < len(own):
                prompt.weights[p] = own[k]
                k += 1
            elif p > start:
                prompt.weights[p] = prompt.weights[p - 1]


def token_spans(
    tokenizer,
    prompt: str,
    texts: list[str],
    prefixes: list[str | None] | None = None,
    max_chunks: int = MAX_CHUNKS,
) -> TokenSpans:
    """Map each layer text to the token positions it occupies in the encoded prompt.

    `tokenizer` is a Hugging Face tokenizer that returns offsets (CLIPTokenizer in transformers 5,
    or any fast tokenizer). Positions count the start token of each chunk, as the U-Net sees the
    concatenated sequence. `prefixes` (one per text, or None) are inserted before the layer's
    words and join its span.
    """
    parsed = weighted_text(prompt)
    layer_texts = [weighted_text(t) for t in texts]
    plain, ranges = locate_texts(parsed.text, [t.text for t in layer_texts])
    # Appended layer texts start with weight 1; their own emphasis then applies like any layer's.
    weighted = WeightedText(plain, parsed.weights + [1.0] * (len(plain) - len(parsed.text)))
    _layer_weights(weighted, ranges, layer_texts)
    if prefixes and any(prefixes):
        weighted, ranges = insert_prefixes(weighted, ranges, prefixes)
    chunks = chunk_prompt(tokenizer, weighted, max_chunks)
    spans: list[list[int]] = []
    truncated: list[int] = []
    for i, (start, end) in enumerate(ranges):
        kept = chunks.positions(start, end)
        if chunks.tokens_in(start, end) and not kept:
            truncated.append(i)
        spans.append(kept)
    return TokenSpans(prompt=weighted.text, spans=spans, truncated=truncated, chunks=chunks)
