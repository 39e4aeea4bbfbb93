"""The runtime tokenizer gives the ids, padding and truncation of diffusers' CLIPTokenizer."""

import warnings

import numpy as np
import pytest

from sdrt.tokenizer import ClipTokenizer, PromptTruncatedWarning

PROMPTS = [
    "", " ", "a photograph of an astronaut riding a horse",
    "A PHOTOGRAPH   of an\tAstronaut\n\nriding a horse", "portrait, 8k, (masterpiece:1.2), [bad hands]",
    "café crème brûlée, naïve façade", "東京の夜景、ネオン", "🐱 cat emoji 🚀🚀", "ÅΩ≈ç√∫˜µ≤≥÷",
    "numbers 1234567890 and 3.14159", "it's a dog's life, they'll've done", "<|startoftext|>hi<|endoftext|>",
    "zzzzqqqxxjjj unknownwordsthatneverappear", "ﬁ ligature and Ｆｕｌｌｗｉｄｔｈ", "tab\tand\r\nnewlines",
    "word " * 100, "a, " * 80, "x" * 500, "mixed 日本 text with accents é and emoji 😀 " * 10,
]


@pytest.fixture(scope="module")
def tokenizers(tiny_model, tiny_engines):
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    return reference, ClipTokenizer(tiny_engines / "tokenizer", 77)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_diffusers_clip_tokenizer(tokenizers, prompt):
    reference, ours = tokenizers
    # exactly how StableDiffusionPipeline.encode_prompt calls it
    expected = reference(prompt, padding="max_length", max_length=reference.model_max_length,
                         truncation=True, return_tensors="np").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours([prompt])
    assert got.dtype == np.int64 and got.shape == (1, 77)
    np.testing.assert_array_equal(got, expected)


def test_batch_is_row_by_row(tokenizers):
    _, ours = tokenizers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        batch = ours(PROMPTS)
        rows = np.concatenate([ours([p]) for p in PROMPTS])
    np.testing.assert_array_equal(batch, rows)


def test_overlong_prompt_warns_and_short_does_not(tokenizers):
    _, ours = tokenizers
    with pytest.warns(PromptTruncatedWarning, match="truncated to 77 tokens"):
        ours(["word " * 100])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(["a short prompt"])
