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


def chunk_ids(tokenizer, result):
    """The encoded sequence: every chunk's 77 ids, concatenated."""
    ids, _mask = result.chunks.token_ids(tokenizer)
    return ids.reshape(-1).tolist()


def test_words_past_77_tokens_land_in_the_next_chunk(tokenizer):
    prompt = " ".join(["red"] * 80) + " teapot"
    result = token_spans(tokenizer, prompt, ["red", "teapot"])
    assert result.chunks.n_chunks == 2 and not result.truncated
    assert result.spans[0] == [1]
    # Chunk 0 holds 75 "red"; chunk 1 starts at 77 with its start token, then 5 "red", "teapot".
    assert result.spans[1] == [77 + 1 + 5]
    ids = chunk_ids(tokenizer, result)
    assert len(ids) == 2 * 77
    assert tokenizer.decode([ids[83]]) == "teapot"
    assert ids[0] == ids[77] == tokenizer.bos_token_id and ids[76] == ids[84] == tokenizer.eos_token_id


def test_words_past_the_last_chunk_are_reported_truncated(tokenizer):
    prompt = " ".join(["red"] * 80) + " teapot"
    result = token_spans(tokenizer, prompt, ["red", "teapot"], max_chunks=1)
    assert result.spans[0] == [1]
    assert result.spans[1] == [] and result.truncated == [1]
    assert result.chunks.n_chunks == 1


def test_a_full_chunk_ends_after_a_late_comma(tokenizer):
    # 70 words, a comma, 10 more: the comma is the 71st token, within the last 20 of a full
    # chunk, so chunk 0 ends after it (A1111's rule) and the words after it move to chunk 1.
    prompt = " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10)
    result = token_spans(tokenizer, prompt, ["blue"])
    assert result.chunks.bounds == [(0, 71), (71, 81)]
    ids = chunk_ids(tokenizer, result)
    assert tokenizer.decode([ids[70 + 1]]) == "," and ids[72] == tokenizer.eos_token_id
    assert result.spans[0] == [78]  # the first "blue" opens chunk 1
    # A comma earlier than the last 20 tokens does not move the cut.
    early = token_spans(tokenizer, "red, " + " ".join(["blue"] * 80), ["red"])
    assert early.chunks.bounds[0] == (0, 75)


def test_a_word_is_not_cut_between_chunks(tokenizer):
    word = "photorealistic"
    pieces = len(tokenizer.tokenize(word))
    assert pieces > 1
    prompt = " ".join(["red"] * 74) + " " + word + " teapot"  # the word straddles token 75
    result = token_spans(tokenizer, prompt, [word])
    assert result.chunks.bounds[0] == (0, 74)
    assert result.spans[0] == [77 + 1 + i for i in range(pieces)]
    ids = chunk_ids(tokenizer, result)
    assert tokenizer.decode([ids[p] for p in result.spans[0]]) == word


def test_emphasis_is_taken_out_and_weighs_the_tokens(tokenizer):
    result = token_spans(tokenizer, "a (red scarf:1.3) on a [chair]", ["red scarf", "chair"])
    assert result.prompt == "a red scarf on a chair"
    assert result.spans == [[2, 3], [6]]
    chunks = result.chunks
    assert chunks.weights == pytest.approx([1.0, 1.3, 1.3, 1.0, 1.0, 1 / 1.1])
    assert chunks.weight_matrix()[0, 2].item() == pytest.approx(1.3)


def test_a_layer_text_with_emphasis_finds_its_words_and_weighs_them(tokenizer):
    result = token_spans(tokenizer, "a red  scarf on a chair", ["(red scarf:1.3)", "[lamp]"])
    assert result.prompt == "a red  scarf on a chair, lamp"
    assert result.spans[0] == [2, 3]
    assert [result.chunks.weights[t - 1] for t in result.spans[0]] == pytest.approx([1.3, 1.3])
    assert result.chunks.weights[result.spans[1][0] - 1] == pytest.approx(1 / 1.1)
    # Without emphasis of its own a layer keeps the prompt's weights.
    kept = token_spans(tokenizer, "a (red scarf:1.2)", ["red scarf"])
    assert [kept.chunks.weights[t - 1] for t in kept.spans[0]] == pytest.approx([1.2, 1.2])
    # Only syntax, no words: no tokens, nothing appended, no crash.
    assert token_spans(tokenizer, "a cat", ["()"]).spans == [[]]


def test_locate_texts_character_ranges():
    prompt, ranges = locate_texts("Salmon sushi on rice", ["salmon sushi", "rice", "tea"])
    assert [prompt[a:b] for a, b in ranges] == ["Salmon sushi", "rice", "tea"]


def test_prefixes_in_a_later_chunk(tokenizer):
    prompt = " ".join(["red"] * 80) + " sliced ginger"
    result = token_spans(tokenizer, prompt, ["sliced ginger"], ["<l0>"])
    ids = chunk_ids(tokenizer, result)
    assert all(p > 77 for p in result.spans[0])
    assert tokenizer.decode([ids[p] for p in result.spans[0]]).replace(" ", "") == "<l0>slicedginger"


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
