"""Textual-inversion embeddings on exported engines: the files A1111 and diffusers write (read without
torch), what is refused and why, how they count in chunks, and images against diffusers'
load_textual_inversion on the same weights and noise."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from prompt_reference import reference_embeddings  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from sdrt.embeddings import load_embeddings, read_embedding  # noqa: E402
from sdrt.errors import EngineError, InputError  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402
from sdrt.prompts import CHUNK_TOKENS  # noqa: E402
from test_parity import assert_parity, diffusers_images  # noqa: E402

WIDTH = 32  # the tiny models' CLIP width (every encoder)
REL_TOLERANCE = 1e-4  # fp32 text embeddings, as tests/test_prompt_embeddings.py
REQUEST = dict(steps=4, guidance=7.5, scheduler="euler", seed=11, height=64, width=64)


def vectors(n, width=WIDTH, seed=0, scale=1.0):
    return np.random.default_rng(seed).normal(0, scale, (n, width)).astype(np.float32)


def save_a1111(path, v, **meta):
    """A1111's .pt: string_to_param {"*": Parameter (n, C)} with its name and training metadata."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(torch.from_numpy(v))},
                "name": path.stem, **meta}, path)
    return path


def save_diffusers(path, v):
    """diffusers' learned_embeds.bin: {"<token>": (C,)} for one vector, (n, C) for more."""
    torch.save({f"<{path.stem}>": torch.from_numpy(v[0] if len(v) == 1 else v)}, path)
    return path


def token_scale(model_dir, encoder="text_encoder"):
    """The std of the model's token embeddings: learned vectors of that size change an image as words do."""
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(model_dir / encoder)
    return float(model.get_input_embeddings().weight.std())


# --- files -------------------------------------------------------------------------------------------

def test_reads_a1111_pt_with_its_metadata(tmp_path):
    v = vectors(3)
    e = read_embedding(save_a1111(tmp_path / "style.pt", v, step=500, sd_checkpoint="a1b2c3", sd_checkpoint_name="m"))
    assert e.name == "style" and e.count == 3 and e.widths == (WIDTH,)
    np.testing.assert_array_equal(e.vectors[0], v)
    assert dict(e.metadata) == {"step": 500, "sd_checkpoint": "a1b2c3", "sd_checkpoint_name": "m"}


@pytest.mark.parametrize("n", [1, 4])
def test_reads_diffusers_bin(tmp_path, n):
    v = vectors(n)
    e = read_embedding(save_diffusers(tmp_path / "learned_embeds.bin", v))
    assert e.count == n
    np.testing.assert_array_equal(e.vectors[0], v)
    assert dict(e.metadata) == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}


def test_reads_safetensors_fp16_and_bf16(tmp_path):
    v = vectors(2)
    save_file({"emb_params": v.astype(np.float16)}, tmp_path / "half.safetensors")
    np.testing.assert_array_equal(read_embedding(tmp_path / "half.safetensors").vectors[0], v.astype(np.float16))
    torch.save({"emb_params": torch.from_numpy(v).to(torch.bfloat16).T.contiguous().T}, tmp_path / "bf16.pt")
    want = torch.from_numpy(v).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(read_embedding(tmp_path / "bf16.pt").vectors[0], want)  # a strided bf16 view


def test_reads_an_sdxl_pair_in_the_encoders_order(tmp_path):
    save_file({"clip_g": vectors(2, 1280, 1), "clip_l": vectors(2, 768, 2)}, tmp_path / "xl.safetensors")
    e = read_embedding(tmp_path / "xl.safetensors")
    assert e.widths == (768, 1280) and e.count == 2
    np.testing.assert_array_equal(e.vectors[1], vectors(2, 1280, 1))


class Gadget:  # a pickled object that is not a tensor: a file that could run code on load
    pass


BAD_FILES = {
    "two tensors": (lambda p: save_file({"a": vectors(1), "b": vectors(1)}, p.with_suffix(".safetensors")),
                    "holds 2 tensors"),
    "too many vectors": (lambda p: save_file({"emb_params": vectors(CHUNK_TOKENS + 1)}, p.with_suffix(".safetensors")),
                         "76 vectors"),
    "NaN": (lambda p: save_file({"emb_params": np.full((2, WIDTH), np.nan, np.float32)}, p.with_suffix(".safetensors")),
            "NaN or inf"),
    "integers": (lambda p: torch.save({"emb_params": torch.ones(2, WIDTH, dtype=torch.int32)}, p.with_suffix(".pt")),
                 "int32"),
    "integer safetensors": (lambda p: save_file({"emb_params": np.ones((2, WIDTH), np.int32)},
                                                p.with_suffix(".safetensors")), "I32"),
    "uneven pair": (lambda p: save_file({"clip_l": vectors(2), "clip_g": vectors(3)}, p.with_suffix(".safetensors")),
                    "2 and 3 vectors"),
    "legacy pickle": (lambda p: torch.save({"emb_params": torch.zeros(1, WIDTH)}, p.with_suffix(".pt"),
                                           _use_new_zipfile_serialization=False), "zip"),
    "an object": (lambda p: torch.save({"emb_params": torch.zeros(1, WIDTH), "x": Gadget()}, p.with_suffix(".pt")),
                  "Gadget"),
    "not a file of tensors": (lambda p: p.with_suffix(".safetensors").write_bytes(b"\xff" * 64), "not a readable"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_file_that_is_not_an_embedding_is_refused_by_name(tmp_path, case):
    write, message = BAD_FILES[case]
    write(tmp_path / "bad")
    (path,) = tmp_path.iterdir()
    with pytest.raises(InputError, match=message) as error:
        read_embedding(path)
    assert str(path) in str(error.value)


def test_a_folder_loads_what_fits_and_says_why_the_rest_was_skipped(tmp_path, caplog):
    save_a1111(tmp_path / "a.pt", vectors(2))
    (tmp_path / "sub").mkdir()
    save_a1111(tmp_path / "sub" / "b.pt", vectors(1))
    save_a1111(tmp_path / "sub" / "a.pt", vectors(5))  # a second "a": the first in path order wins
    save_file({"emb_params": vectors(1, 768)}, tmp_path / "sd15.safetensors")
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "broken.safetensors")
    (tmp_path / "notes.txt").write_text("not an embedding")
    found = load_embeddings(tmp_path, (WIDTH,))
    assert list(found.loaded) == ["a", "b"] and found.loaded["a"].count == 2
    assert set(found.skipped) == {"sd15", "broken"}
    assert "768 wide" in found.skipped["sd15"] and "another model family" in found.skipped["sd15"]
    assert list(found.unfit) == ["sd15"] and found.unfit["sd15"].widths == (768,)  # read, of another width
    assert found.rows[0].shape == (3, WIDTH)
    assert found.words()["a"] == (-1, -2) and found.words()["b"] == (-3,)
    assert "already loaded" in caplog.text
    with pytest.raises(InputError, match="does not exist"):
        load_embeddings(tmp_path / "missing", (WIDTH,))


# --- prompts: words, chunks, emphasis -----------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory):
    """SD 1.x embeddings of the tiny model's width: a 3-vector A1111 .pt, a 1-vector diffusers .bin, a
    5-vector one and one for SD 1.5's width (skipped)."""
    path = tmp_path_factory.mktemp("embeddings")
    scale = token_scale(tiny_model)
    save_a1111(path / "shinystyle.pt", vectors(3, seed=1, scale=scale), step=100)
    save_diffusers(path / "badhands.bin", vectors(1, seed=2, scale=scale))
    save_file({"emb_params": vectors(5, seed=3, scale=scale)}, path / "fivevec.safetensors")
    save_file({"emb_params": vectors(2, 768)}, path / "sd15only.safetensors")
    return path


@pytest.fixture(scope="module")
def sd1(tiny_engines, folder):
    return Pipeline.load(tiny_engines, backend="ort-cpu", embeddings_dir=folder)


def test_an_embedding_counts_as_its_vectors_in_the_prompt(sd1):
    tokenizer = sd1.tokenizers["tokenizer"]
    base = tokenizer.tokens("a photo of a cat")
    assert tokenizer.tokens("a photo of a cat shinystyle") == base + 3
    assert tokenizer.tokens("a photo of a cat (fivevec:1.2)") == base + 5


def test_an_embedding_that_would_cross_a_chunk_opens_the_next(sd1):
    tokenizer = sd1.tokenizers["tokenizer"]
    filler = "cat " * (CHUNK_TOKENS - 2)  # 73 tokens, no commas
    chunks = tokenizer.chunks(filler + "fivevec")
    assert [len(c.ids) for c in chunks] == [CHUNK_TOKENS - 2, 5]
    assert len(tokenizer.chunks(filler + "badhands")) == 1  # one vector still fits


def test_the_comma_backtrack_moves_an_embedding_with_its_vectors(sd1):
    tokenizer = sd1.tokenizers["tokenizer"]
    placeholders = sd1.embeddings.words()["fivevec"]
    chunks = tokenizer.chunks("cat " * 60 + ", " + "cat " * 5 + "fivevec " + "cat " * 9)  # 80 tokens
    assert [len(c.ids) for c in chunks] == [61, 19]  # the chunk ends after the comma, A1111's backtrack
    assert tuple(chunks[1].ids[5:10]) == placeholders and not any(i < 0 for i in chunks[0].ids)


def test_a_prompt_using_a_skipped_embedding_is_refused_with_the_reason(sd1):
    with pytest.raises(InputError, match="sd15only.*768 wide"):
        sd1.make_config("a photo in sd15only style", **REQUEST)


def test_embeddings_with_emphasis_match_the_transformers_reference(sd1, tiny_model, folder, tmp_path):
    """The reference: transformers' CLIP with diffusers' load_textual_inversion's added tokens, saved."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_model)
    load_diffusers_style(pipe, folder, ["shinystyle", "badhands"])
    pipe.text_encoder.save_pretrained(tmp_path / "text_encoder")
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = sd1.make_config("a cat (shinystyle:1.3) [badhands]", guidance=1.0, height=64, width=64)
    ours = sd1.encode_prompt(config)["text_embeddings"][0]
    pieces = [("a cat ", 1.0), ("shinystyle shinystyle_1 shinystyle_2", 1.3), (" ", 1.0), ("badhands", 1 / 1.1)]
    ref, _ = reference_embeddings(tmp_path, "text_encoder", "tokenizer", 1, True, pieces)
    assert np.all(np.isfinite(ours))
    assert float(np.abs(ours - ref).max() / np.abs(ref).max()) <= REL_TOLERANCE
    plain = sd1.encode_prompt(sd1.make_config("a cat (shinystyle:1.3) [badhands]", guidance=1.0, height=64,
                                              width=64))["text_embeddings"][0]
    np.testing.assert_array_equal(plain, ours)  # the same prompt, the same rows: deterministic


# --- images against diffusers -------------------------------------------------------------------------

def load_diffusers_style(pipe, folder, names, encoders=(("text_encoder", "tokenizer"),)):
    """diffusers' load_textual_inversion of each file, as a user of diffusers loads A1111's files: under
    the file's name, each encoder's tensor into its own encoder."""
    for name in names:
        (path,) = folder.glob(f"{name}.*")
        e = read_embedding(path)
        for (encoder, tokenizer), vectors_ in zip(encoders, e.vectors):
            pipe.load_textual_inversion(torch.from_numpy(vectors_), token=name, text_encoder=getattr(pipe, encoder),
                                        tokenizer=getattr(pipe, tokenizer))


@pytest.mark.parametrize("negative", ["badhands, blurry", ""], ids=["embedding in the negative", "empty negative"])
def test_sd1_images_match_diffusers_load_textual_inversion(sd1, tiny_model, tiny_engines, folder, negative):
    prompt = "a photo of a cat in shinystyle, fivevec"
    config = sd1.make_config(prompt, negative_prompt=negative, **REQUEST)
    init, _ = sd1.initial_noise(config)
    ours = sd1.generate(config).images
    ref = diffusers_images(tiny_model, "euler", [prompt], [negative], 4, 7.5, init, 64, 64,
                           prepare=lambda p: load_diffusers_style(p, folder, ["shinystyle", "badhands", "fivevec"]))
    assert_parity(ours, ref, "sd1 textual inversion")
    plain = Pipeline.load(tiny_engines, backend="ort-cpu")
    words = plain.generate(plain.make_config(prompt, negative_prompt=negative, **REQUEST)).images
    assert np.abs(words.astype(int) - ours.astype(int)).max() > 8, "the embeddings barely change the image"


def test_sdxl_pair_matches_diffusers_with_each_encoder_its_own_vectors(tiny_sdxl_model, tiny_sdxl_engines, tmp_path):
    scale = token_scale(tiny_sdxl_model)
    save_file({"clip_l": vectors(2, seed=5, scale=scale), "clip_g": vectors(2, seed=6, scale=scale)},
              tmp_path / "xlstyle.safetensors")
    pipe = Pipeline.load(tiny_sdxl_engines, backend="ort-cpu", embeddings_dir=tmp_path)
    assert list(pipe.embeddings.loaded) == ["xlstyle"]
    prompt = "a xlstyle painting of a house"
    config = pipe.make_config(prompt, negative_prompt="blurry", **REQUEST)
    init, _ = pipe.initial_noise(config)
    ours = pipe.generate(config).images
    pairs = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    ref = diffusers_images(tiny_sdxl_model, "euler", [prompt], ["blurry"], 4, 7.5, init, 64, 64,
                           prepare=lambda p: load_diffusers_style(p, tmp_path, ["xlstyle"], pairs))
    assert_parity(ours, ref, "sdxl textual inversion")


def test_fp16_engines_take_embeddings_close_to_fp32(tiny_engines, tiny_engines_fp16, folder):
    prompt = "a photo of a cat in shinystyle"
    images = []
    for engines in (tiny_engines, tiny_engines_fp16):
        pipe = Pipeline.load(engines, backend="ort-cpu", embeddings_dir=folder)
        images.append(pipe.generate(pipe.make_config(prompt, negative_prompt="badhands", **REQUEST)).images)
    assert np.all(np.isfinite(images[1]))
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 8  # test_parity's fp16 bound


# --- what cannot take them ----------------------------------------------------------------------------

def test_sd3_refuses_an_embeddings_folder(tiny_sd3_engines, folder):
    with pytest.raises(InputError, match="SD 3.*--embeddings-dir"):
        Pipeline.load(tiny_sd3_engines, backend="ort-cpu", embeddings_dir=folder)


def test_engines_exported_before_embeddings_say_re_export(tiny_engines, folder, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_engines, old)
    manifest = json.loads((old / "manifest.json").read_text())
    encoder = manifest["components"]["text_encoder"]
    encoder["inputs"] = [t for t in encoder["inputs"] if t["name"] != "token_rows"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="re-export"):
        Pipeline.load(old, backend="ort-cpu", embeddings_dir=folder, verify=False)


def test_loading_none_drops_them(tiny_engines, folder):
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu", embeddings_dir=folder)
    with_them = pipe.tokenizers["tokenizer"].tokens("shinystyle")
    pipe.load_embeddings(None)
    assert with_them == 3 and pipe.tokenizers["tokenizer"].tokens("shinystyle") != 3
    assert not pipe.embeddings.loaded
