"""Emphasis syntax in prompts and layer texts, read as A1111 (stable-diffusion-webui) reads it.

    (words)       weight × 1.1          [words]   weight ÷ 1.1
    (words:1.3)   weight × 1.3          nesting multiplies: ((words)) is × 1.21
    \\( \\) \\[ \\] \\\\  a literal bracket or backslash

As in A1111: an unmatched ``)`` or ``]`` is literal text; an unmatched ``(`` or ``[`` is dropped
and emphasises everything after it to the end; a ``:`` that is not ``:number)`` is literal; a
lone backslash before anything else is dropped. A1111's ``BREAK`` keyword is not supported (it is
an ordinary word here). Parsing never fails: every input reads as some text with weights.

`weighted_text` gives the plain text (syntax stripped), which is what token spans and layer-text
matching see, and one weight per character of it; `core.prompt_encoding` applies the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND = 1.1
SQUARE = 1 / 1.1

# A1111's `re_attention`: escapes, brackets, ":number)" closing a weighted group, plain runs.
_TOKENS = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\
    | \( | \[ | :\s*([+-]?[.\d]+)\s*\) | \) | \]
    | [^\\()\[\]:]+ | :
    """,
    re.X,
)


@dataclass
class WeightedText:
    """A text with the emphasis syntax taken out, and the weight of each of its characters."""

    text: str
    weights: list[float]  # len(text) entries

    @property
    def emphasised(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Runs of text and their weights (neighbouring runs of one weight merged), as A1111's
    `parse_prompt_attention`; `[("", 1.0)]` for an empty text."""
    runs: list[list] = []
    round_open: list[int] = []  # index in `runs` where each open "(" starts
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _TOKENS.finditer(text):
        piece, number = match.group(0), match.group(1)
        weight = _number(number)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif number is not None and round_open and weight is not None:
            multiply(round_open.pop(), weight)
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            runs.append([piece, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for piece, weight in runs:
        if not piece:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(piece, weight) for piece, weight in merged] or [("", 1.0)]


def _number(text: str | None) -> float | None:
    """The weight of ":number)", None when it is not a number (A1111 would crash on "(a:.)")."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def weighted_text(text: str) -> WeightedText:
    """The plain text and per-character weights of a text with emphasis syntax."""
    plain, weights = [], []
    for piece, weight in parse_emphasis(text):
        plain.append(piece)
        weights += [weight] * len(piece)
    return WeightedText("".join(plain), weights)
