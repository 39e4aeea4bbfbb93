"""The runtime tokenizer: diffusers' CLIPTokenizer ids for prompts of one chunk without emphasis, and
A1111's chunks past 75 tokens (against transformers' tokenizer, chunked by hand)."""

import numpy as np
import pytest

from sdrt.prompts import CHUNK_LENGTH
from sdrt.tokenizer import ClipTokenizer

PROMPTS = [
    "", " ", "a photograph of an astronaut riding a horse",
    "A PHOTOGRAPH   of an\tAstronaut\n\nriding a horse", "portrait, 8k, masterpiece, bad hands",
    "café crème brûlée, naïve façade", "東京の夜景、ネオン", "🐱 cat emoji 🚀🚀", "ÅΩ≈ç√∫˜µ≤≥÷",
    "numbers 1234567890 and 3.14159", "it's a dog's life, they'll've done", "<|startoftext|>hi<|endoftext|>",
    "zzzzqqqxxjjj unknownwordsthatneverappear", "ﬁ ligature and Ｆｕｌｌｗｉｄｔｈ", "tab\tand\r\nnewlines",
    "word " * 20, "mixed 日本 text with accents é and emoji 😀 ",
]
LONG = ["word " * 100, "a, " * 80, "x" * 500, "mixed 日本 text with accents é and emoji 😀 " * 10]


@pytest.fixture(scope="module")
def tokenizers(tiny_model, tiny_engines):
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    return reference, ClipTokenizer(tiny_engines / "tokenizer")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_one_chunk_ids_match_diffusers_clip_tokenizer(tokenizers, prompt):
    reference, ours = tokenizers
    # exactly how StableDiffusionPipeline.encode_prompt calls it
    expected = reference(prompt, padding="max_length", max_length=reference.model_max_length,
                         truncation=True, return_tensors="np").input_ids
    assert len(ours.chunks(prompt)) == 1
    ids, weights = ours([prompt])
    assert ids.dtype == np.int64 and ids.shape == (1, 77)
    np.testing.assert_array_equal(ids, expected)
    assert weights.dtype == np.float32 and np.all(weights == 1.0)


@pytest.mark.parametrize("prompt", LONG)
def test_long_prompts_are_chunks_of_75_between_bos_and_eos(tokenizers, prompt):
    reference, ours = tokenizers
    tokens = reference(prompt, add_special_tokens=False).input_ids
    assert len(tokens) > 75
    ids, weights = ours([prompt], chunks=len(ours.chunks(prompt)))
    assert ids.shape[1] % CHUNK_LENGTH == 0 and np.all(weights == 1.0)
    rows = ids.reshape(-1, CHUNK_LENGTH)
    assert np.all(rows[:, 0] == reference.bos_token_id)
    got = []  # the prompt tokens of every chunk, between BOS and the first EOS
    for row in rows:
        end = list(row[1:]).index(reference.eos_token_id) + 1
        assert set(row[end + 1:]) <= {reference.pad_token_id}
        got.append(list(row[1:end]))
    assert [t for chunk in got for t in chunk] == tokens  # nothing lost, nothing repeated
    assert all(len(chunk) <= 75 for chunk in got)
    if reference.convert_tokens_to_ids(",</w>") not in tokens:
        assert [len(chunk) for chunk in got[:-1]] == [75] * (len(got) - 1)


def test_batch_is_row_by_row_and_pads_with_empty_chunks(tokenizers):
    _, ours = tokenizers
    prompts = PROMPTS + LONG
    chunks = max(len(ours.chunks(p)) for p in prompts)
    ids, weights = ours(prompts, chunks)
    for i, prompt in enumerate(prompts):
        own, _ = ours([prompt], len(ours.chunks(prompt)))
        np.testing.assert_array_equal(ids[i, : own.shape[1]], own[0])
        empty, _ = ours([""])
        for rest in range(own.shape[1], ids.shape[1], CHUNK_LENGTH):
            np.testing.assert_array_equal(ids[i, rest : rest + CHUNK_LENGTH], empty[0])


def test_more_chunks_than_asked_is_an_error(tokenizers):
    _, ours = tokenizers
    with pytest.raises(ValueError, match="chunks"):
        ours(["word " * 100], chunks=1)


def test_emphasis_weights_the_tokens_of_its_text(tokenizers):
    reference, ours = tokenizers
    ids, weights = ours(["a (red:1.5) [cat]"])
    red = reference("red", add_special_tokens=False).input_ids
    cat = reference("cat", add_special_tokens=False).input_ids
    a = reference("a", add_special_tokens=False).input_ids
    n = len(a) + len(red) + len(cat)
    np.testing.assert_array_equal(ids[0, 1 : 1 + n], a + red + cat)
    expected = [1.0] * len(a) + [1.5] * len(red) + [1 / 1.1] * len(cat)
    np.testing.assert_allclose(weights[0, 1 : 1 + n], expected, rtol=1e-7)
    assert np.all(weights[0, 1 + n :] == 1.0) and weights[0, 0] == 1.0
    plain, _ = ours(["a red cat"])
    np.testing.assert_array_equal(ids, plain)


def test_break_starts_a_new_chunk(tokenizers):
    _, ours = tokenizers
    assert len(ours.chunks("a red cat BREAK a blue dog")) == 2
    ids, _ = ours(["a red cat BREAK a blue dog"], 2)
    first, _ = ours(["a red cat"])
    second, _ = ours(["a blue dog"])
    np.testing.assert_array_equal(ids[0], np.concatenate([first[0], second[0]]))


def test_token_count_as_a1111_shows_it(tokenizers):
    reference, ours = tokenizers
    assert ours.tokens("") == 0
    for prompt in PROMPTS + LONG[:1]:  # no commas: no backtrack
        assert ours.tokens(prompt) == len(reference(prompt, add_special_tokens=False).input_ids)
    assert ours.tokens("a BREAK a") == 75 + len(reference("a", add_special_tokens=False).input_ids)
