"""Which token positions of the tokenized full prompt belong to each layer's text.

Layers are matched to the prompt by character ranges, then to tokens through the tokenizer's
offset mapping (never by string search over token strings, which breaks on BPE merges).
A text that occurs several times is matched to its occurrences in order: the first layer named
"cat" takes the first "cat", the second takes the second, and a third one (no occurrence left)
shares the last. A text that is not in the prompt is appended (", text") so that it has tokens.

CLIP reads 77 tokens (start, 75 words, end). Tokens past that are cut by the text encoder, so a
layer whose words fall past the limit has no tokens to steer: its span is empty and the layer is
listed in `TokenSpans.truncated`, so the caller can tell the user (the image is still generated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class TokenSpans:
    """The prompt actually encoded, and per layer the token indices (in the 77-token sequence)."""

    prompt: str
    spans: list[list[int]]
    truncated: list[int] = field(default_factory=list)  # layers whose words fall past the limit


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
        if ranges[i] is None:
            text = " ".join(text.split())
            prompt = f"{prompt.rstrip()}, {text}" if prompt.strip() else text
            ranges[i] = (len(prompt) - len(text), len(prompt))
    return prompt, ranges  # type: ignore[return-value]


def insert_prefixes(
    prompt: str, ranges: list[tuple[int, int]], prefixes: list[str | None]
) -> tuple[str, list[tuple[int, int]]]:
    """Put each layer's prefix (e.g. its learned appearance token) just before its words; the
    returned ranges cover prefix and words, so the prefix joins the layer's token span.

    Layers sharing one occurrence (more same-named layers than occurrences) share its first
    layer's prefix and range.
    """
    by_start: dict[int, int] = {}  # occurrence start -> first layer placed there
    for i in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
        by_start.setdefault(ranges[i][0], i)
    pieces, cursor, shift = [], 0, 0
    placed: dict[int, tuple[int, int]] = {}
    for start, i in sorted(by_start.items()):
        end = ranges[i][1]
        pieces.append(prompt[cursor:start])
        prefix = prefixes[i]
        if prefix:
            pieces.append(prefix + " ")
            placed[start] = (start + shift, end + shift + len(prefix) + 1)
            shift += len(prefix) + 1
        else:
            placed[start] = (start + shift, end + shift)
        cursor = start
    pieces.append(prompt[cursor:])
    return "".join(pieces), [placed[start] for start, _end in ranges]


def token_spans(
    tokenizer, prompt: str, texts: list[str], prefixes: list[str | None] | None = None
) -> TokenSpans:
    """Map each layer text to the token positions it occupies in the tokenized prompt.

    `tokenizer` is a Hugging Face tokenizer that returns offsets (CLIPTokenizer in transformers 5,
    or any fast tokenizer). Positions count the start token, as the text encoder sees them.
    `prefixes` (one per text, or None) are inserted before the layer's words and join its span.
    """
    prompt, ranges = locate_texts(prompt, texts)
    if prefixes and any(prefixes):
        prompt, ranges = insert_prefixes(prompt, ranges, prefixes)
    encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
    offsets = encoding["offset_mapping"]
    limit = tokenizer.model_max_length - 1  # the last position is the end token
    spans: list[list[int]] = []
    truncated: list[int] = []
    for i, (start, end) in enumerate(ranges):
        # Special tokens have the empty range (0, 0); everything else overlaps its characters.
        positions = [p for p, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        kept = [p for p in positions if p < limit]
        if positions and not kept:
            truncated.append(i)
        spans.append(kept)
    return TokenSpans(prompt=prompt, spans=spans, truncated=truncated)
