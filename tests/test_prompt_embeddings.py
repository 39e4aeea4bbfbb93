"""Prompt embeddings from the exported text encoders (tokenizer, chunks, emphasis, clip skip, all in the
runtime and its graph) against a reference built on transformers' CLIP (tests/prompt_reference.py),
and what that does to images."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from prompt_reference import BREAK, reference_embeddings  # noqa: E402
from sdrt.errors import InputError  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402

REL_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # max |ours - ref| / max |ref|, the exporter's text-encoder tolerances
LONG = "a red apple on a wooden table in the morning light "  # 11 words, no commas


def assert_close(ours, ref, label, precision="fp32"):
    assert ours.shape == ref.shape, label
    assert np.all(np.isfinite(ours)), f"{label}: NaN/inf"
    err = float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())
    assert err <= REL_TOLERANCE[precision], f"{label}: relative error {err:.3g} ({precision})"


@pytest.fixture(scope="module")
def sd1(tiny_engines):
    return Pipeline.load(tiny_engines, backend="ort-cpu")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_engines):
    return Pipeline.load(tiny_sdxl_engines, backend="ort-cpu")


SD1_CASES = {  # prompt -> the reference's pieces
    "one chunk": ("a red apple on a table", [("a red apple on a table", 1.0)]),
    "long": (LONG * 12, [(LONG * 12, 1.0)]),  # more than two chunks
    "weighted": ("a (red:1.4) apple on a [table] ((sunny))",
                 [("a ", 1.0), ("red", 1.4), (" apple on a ", 1.0), ("table", 1 / 1.1), (" ", 1.0), ("sunny", 1.21)]),
    "long weighted": (LONG * 8 + "(bright blue sky:1.3)" + LONG * 4,
                      [(LONG * 8, 1.0), ("bright blue sky", 1.3), (LONG * 4, 1.0)]),
    "break": ("a red apple BREAK on a (table:0.8)", [("a red apple", 1.0), BREAK, ("on a ", 1.0), ("table", 0.8)]),
}


@pytest.mark.parametrize("case", list(SD1_CASES))
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_embeddings_match_the_transformers_reference(sd1, tiny_model, case, clip_skip):
    prompt, pieces = SD1_CASES[case]
    config = sd1.make_config(prompt, guidance=1.0, clip_skip=clip_skip, height=64, width=64)
    ours = sd1.encode_prompt(config)["text_embeddings"][0]
    ref, _ = reference_embeddings(tiny_model, "text_encoder", "tokenizer", clip_skip, True, pieces)
    assert_close(ours, ref, f"{case}, clip skip {clip_skip}")


@pytest.mark.parametrize("case", ["long weighted", "break"])
def test_sd1_fp16_embeddings_match_the_reference(tiny_engines_fp16, tiny_model, case):
    pipe = Pipeline.load(tiny_engines_fp16, backend="ort-cpu")
    prompt, pieces = SD1_CASES[case]
    ours = pipe.encode_prompt(pipe.make_config(prompt, guidance=1.0, clip_skip=2, height=64, width=64))
    ref, _ = reference_embeddings(tiny_model, "text_encoder", "tokenizer", 2, True, pieces)
    assert ours["text_embeddings"].dtype == np.float16
    assert_close(ours["text_embeddings"][0], ref, case, "fp16")


def test_negative_is_padded_with_empty_chunks(sd1, tiny_model):
    config = sd1.make_config(LONG * 12, negative_prompt="blurry", guidance=7.5, height=64, width=64)
    assert config.prompts.chunks >= 2
    embeddings = sd1.encode_prompt(config)["text_embeddings"]  # [negative; positive]
    assert embeddings.shape[:2] == (2, 77 * config.prompts.chunks)
    ref, _ = reference_embeddings(tiny_model, "text_encoder", "tokenizer", 1, True, [("blurry", 1.0)],
                                  chunks=config.prompts.chunks)
    assert_close(embeddings[0], ref, "negative")


@pytest.mark.parametrize("case", ["one chunk", "long weighted", "break"])
def test_sdxl_both_encoders_chunked_alike_pooled_from_the_first_chunk(sdxl, tiny_sdxl_model, case):
    prompt, pieces = SD1_CASES[case]
    config = sdxl.make_config(prompt, guidance=1.0, height=64, width=64)
    ours = sdxl.encode_prompt(config)
    for encoder, tokenizer, name in (("text_encoder", "tokenizer", "text_embeddings"),
                                     ("text_encoder_2", "tokenizer_2", "text_embeddings_2")):
        ref, pooled = reference_embeddings(tiny_sdxl_model, encoder, tokenizer, 2, False, pieces)
        assert_close(ours[name][0], ref, f"{case} {name}")
    assert_close(ours["pooled_embeds"][0], pooled, f"{case} pooled")


def test_sdxl_refuses_clip_skip(sdxl):
    with pytest.raises(InputError, match="clip_skip applies to SD 1.x/2.x"):
        sdxl.make_config("a cat", clip_skip=2)


@pytest.mark.parametrize("bad", [0, 3, -1, 1.5, "2", True])
def test_clip_skip_outside_the_layers_is_refused(sd1, bad):
    with pytest.raises(InputError, match="clip_skip must be an integer from 1"):
        sd1.make_config("a cat", clip_skip=bad)


def _plans_of(pipe, max_chunks=4):
    """What TensorRT plans profiled for max_chunks chunks accept (their sequence axis is fixed)."""
    from dataclasses import replace

    from sdrt.validation import build_request

    accepts = replace(pipe.accepts, limits=replace(pipe.limits, kind="dynamic", max_chunks=max_chunks))
    return lambda prompt, **kwargs: build_request(accepts, prompt, **kwargs)


def test_over_the_plans_limit_is_refused_with_the_limit_and_the_fix(sd1):
    limit = 4
    make_config = _plans_of(sd1, limit)
    with pytest.raises(InputError, match=rf"prompt is \d+ tokens .*at most {limit * 75}.*--max-chunks"):
        make_config(LONG * 40)
    with pytest.raises(InputError, match="negative_prompt is"):
        make_config("a cat", negative_prompt=LONG * 40)
    make_config("a cat", negative_prompt=LONG * 40, guidance=1.0)  # no CFG: the negative is not encoded


def test_onnx_runtime_takes_any_length_and_encodes_it_as_the_reference(sd1, tiny_model):
    """A1111 takes prompts of any length; the ONNX graphs' sequence axis is dynamic (export profiled 4 chunks)."""
    assert sd1.limits.max_chunks is None and sd1.manifest.shapes.max_chunks == 4
    prompt = LONG * 8 + "(bright blue sky:1.3)" + LONG * 40
    config = sd1.make_config(prompt, negative_prompt=LONG * 30, guidance=7.5, height=64, width=64, steps=2)
    assert config.prompts.chunks >= 10  # the export profiled 4
    embeddings = sd1.encode_prompt(config)["text_embeddings"]
    assert embeddings.shape[:2] == (2, 77 * config.prompts.chunks)
    ref, _ = reference_embeddings(tiny_model, "text_encoder", "tokenizer", 1, True,
                                  [(LONG * 8, 1.0), ("bright blue sky", 1.3), (LONG * 40, 1.0)])
    assert_close(embeddings[1], ref, f"{config.prompts.chunks}-chunk prompt")
    images = sd1.generate(config).images
    assert np.isfinite(images).all() and images.std() > 0


def test_an_out_of_memory_run_names_the_fix(sd1, monkeypatch):
    from sdrt.errors import BackendError
    from sdrt.manifest import STEP

    engine = sd1.device.engines[STEP]

    def exhausted(binding):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")

    monkeypatch.setattr(engine.session, "run_with_iobinding", exhausted, raising=False)
    with pytest.raises(BackendError, match="not enough memory to run denoise_step.onnx.*shorter prompts"):
        sd1.generate(sd1.make_config("a cat", steps=1, height=64, width=64))


def image(pipe, prompt, **kwargs):
    config = pipe.make_config(prompt, steps=3, seed=7, height=64, width=64, scheduler="euler", **kwargs)
    return pipe.generate(config).images[0]


def test_a_word_past_token_77_changes_the_image(sd1):
    filler = "a red apple on a table " * 20  # 120 tokens, more than a chunk
    assert sd1.tokenizers["tokenizer"].tokens(filler) >= 110
    cat, dog = image(sd1, filler + "cat"), image(sd1, filler + "dog")
    assert np.abs(cat.astype(int) - dog.astype(int)).max() > 0


def test_weight_one_and_plain_text_give_the_same_image(sd1):
    np.testing.assert_array_equal(image(sd1, "a (red:1.0) apple"), image(sd1, "a red apple"))
    assert np.abs(image(sd1, "a (red:1.5) apple").astype(int) - image(sd1, "a red apple").astype(int)).max() > 0


def test_chunk_count_is_part_of_the_batch_key(sd1):
    short = sd1.make_config("a cat", height=64, width=64)
    long = sd1.make_config(LONG * 12, height=64, width=64)
    assert short.prompts.chunks == 1 and long.prompts.chunks > 1 and short.batch_key != long.batch_key
