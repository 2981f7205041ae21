"""Emphasis syntax (core/prompt_syntax.py): A1111's rules, and it never fails."""

import pytest

from core.prompt_syntax import ROUND, SQUARE, parse_emphasis, weighted_text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red scarf", [("a red scarf", 1.0)]),
        ("a (red scarf) here", [("a ", 1.0), ("red scarf", ROUND), (" here", 1.0)]),
        ("[blurry]", [("blurry", SQUARE)]),
        ("a (red scarf:1.3)", [("a ", 1.0), ("red scarf", 1.3)]),
        ("(red scarf: 0.5 )", [("red scarf", 0.5)]),
        ("((red))", [("red", ROUND * ROUND)]),
        ("((red:1.5) scarf)", [("red", 1.5 * ROUND), (" scarf", ROUND)]),
        ("[(red:2)]", [("red", 2 * SQUARE)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_weights_and_nesting(text, expected):
    got = parse_emphasis(text)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\(red\) \[x\]", [("(red) [x]", 1.0)]),  # escaped brackets are text
        (r"a \\ b", [("a \\ b", 1.0)]),  # an escaped backslash
        ("a) b] c", [("a) b] c", 1.0)]),  # unmatched closers are literal (A1111)
        ("a (b c", [("a ", 1.0), ("b c", ROUND)]),  # an unclosed "(" emphasises to the end
        ("a [b", [("a ", 1.0), ("b", SQUARE)]),
        ("time: 3pm", [("time: 3pm", 1.0)]),  # a colon outside ":number)" is text
        ("(a:b)", [("a:b", ROUND)]),
        ("(a:1.2.3)", [("a:1.2.3)", ROUND)]),  # not a number: A1111 would crash; text here
        ("(a:.)", [("a:.)", ROUND)]),
        ("x:1.5)", [("x:1.5)", 1.0)]),  # ":number)" with no open bracket is text
    ],
)
def test_escapes_and_unbalanced_brackets(text, expected):
    got = parse_emphasis(text)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_weighted_text_has_one_weight_per_character():
    parsed = weighted_text("a (red:1.3) [box]")
    assert parsed.text == "a red box"
    assert parsed.weights == [1.0, 1.0, 1.3, 1.3, 1.3, 1.0] + [SQUARE] * 3
    assert parsed.emphasised
    assert not weighted_text("(plain:1.0) text").emphasised
    assert weighted_text("(plain:1.0) text").text == "plain text"


def test_any_text_parses():
    import random

    rng = random.Random(0)
    alphabet = "ab ()[]:\\1.5,"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        parsed = weighted_text(text)
        assert len(parsed.weights) == len(parsed.text)
