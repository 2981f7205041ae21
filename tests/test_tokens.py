"""Layer texts → token positions in the tokenized prompt, with the real CLIP tokenizer."""

import pytest

from core.demo_model import build_clip_tokenizer
from core.tokens import locate_texts, token_spans


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def words_at(tokenizer, prompt, positions):
    ids = tokenizer(prompt).input_ids
    return tokenizer.decode([ids[p] for p in positions]).strip()


def test_single_and_multi_token_texts(tokenizer):
    result = token_spans(
        tokenizer, "a photo of salmon sushi and sliced ginger", ["salmon sushi", "sliced ginger"]
    )
    assert result.prompt == "a photo of salmon sushi and sliced ginger"
    # 0 is the start token; "a photo of" are 1..3.
    assert result.spans == [[4, 5], [7, 8]]
    assert words_at(tokenizer, result.prompt, result.spans[0]) == "salmon sushi"
    assert words_at(tokenizer, result.prompt, result.spans[1]) == "sliced ginger"


def test_repeated_words_are_taken_in_order(tokenizer):
    prompt = "a cat next to a dog and a cat"
    result = token_spans(tokenizer, prompt, ["cat", "cat", "dog"])
    first, second, dog = result.spans
    assert first != second and len(first) == len(second) == 1
    assert first[0] < dog[0] < second[0]
    # A third "cat" layer has no occurrence left: it shares the last one.
    assert token_spans(tokenizer, prompt, ["cat", "cat", "cat"]).spans[2] == second


def test_match_is_whole_word_and_case_insensitive(tokenizer):
    result = token_spans(tokenizer, "Cathedral with a CAT", ["cat"])
    assert words_at(tokenizer, result.prompt, result.spans[0]) == "cat"
    assert result.spans[0] == [4]


def test_punctuation_does_not_join_the_span(tokenizer):
    result = token_spans(tokenizer, "sushi, ginger! (rice)", ["ginger", "rice"])
    assert [words_at(tokenizer, result.prompt, s) for s in result.spans] == ["ginger", "rice"]
    assert all(len(s) == 1 for s in result.spans)


def test_text_missing_from_prompt_is_appended(tokenizer):
    result = token_spans(tokenizer, "a bento box", ["edamame", "sliced  ginger"])
    assert result.prompt == "a bento box, edamame, sliced ginger"
    assert words_at(tokenizer, result.prompt, result.spans[0]) == "edamame"
    assert words_at(tokenizer, result.prompt, result.spans[1]) == "sliced ginger"
    assert token_spans(tokenizer, "", ["rice"]).prompt == "rice"


def test_words_past_77_tokens_are_reported_truncated(tokenizer):
    prompt = " ".join(["red"] * 80) + " teapot"
    result = token_spans(tokenizer, prompt, ["red", "teapot"])
    assert result.spans[0] == [1]
    assert result.spans[1] == [] and result.truncated == [1]
    assert all(p < tokenizer.model_max_length - 1 for span in result.spans for p in span)


def test_locate_texts_character_ranges():
    prompt, ranges = locate_texts("Salmon sushi on rice", ["salmon sushi", "rice", "tea"])
    assert [prompt[a:b] for a, b in ranges] == ["Salmon sushi", "rice", "tea"]


def test_prefixes_go_before_the_layer_words_and_join_the_span(tokenizer):
    result = token_spans(
        tokenizer,
        "salmon sushi next to sliced ginger",
        ["sliced ginger", "salmon sushi", "rice"],
        ["<l0>", None, "<l2>"],
    )
    assert result.prompt == "salmon sushi next to <l0> sliced ginger, <l2> rice"
    ids = tokenizer(result.prompt).input_ids
    assert tokenizer.decode([ids[p] for p in result.spans[0]]).replace(" ", "") == "<l0>slicedginger"
    assert words_at(tokenizer, result.prompt, result.spans[1]) == "salmon sushi"
    assert tokenizer.decode([ids[p] for p in result.spans[2]]).replace(" ", "") == "<l2>rice"
