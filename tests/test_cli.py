"""The `sdrt` command line, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def sdrt(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ})


def test_generate_writes_pngs_with_parameters_and_timings(tiny_engines, tmp_path):
    out = tmp_path / "img" / "cat.png"
    r = sdrt("generate", str(tiny_engines), "a cat", "--negative", "dog", "--steps", "3", "--seed", "4",
             "--scheduler", "euler_a", "--batch", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "text encoder" in r.stdout and "decode" in r.stdout and "total" in r.stdout
    for i in range(2):
        image = Image.open(tmp_path / "img" / f"cat-{i}.png")
        assert image.size == (64, 64)
        assert f"Seed: {4 + i}" in image.info["parameters"] and "Sampler: Euler a" in image.info["parameters"]


def test_generate_with_hires_fix_and_a_two_call_sampler(tiny_engines, tmp_path):
    out = tmp_path / "hires.png"
    r = sdrt("generate", str(tiny_engines), "a cat", "--steps", "3", "--seed", "4", "--scheduler", "dpmpp_sde_karras",
             "--hires-scale", "1.5", "--hires-upscaler", "Lanczos", "--hires-steps", "4", "--hires-strength", "0.5",
             "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "hires fix to 96x96 (Lanczos, strength 0.5)" in r.stdout
    image = Image.open(out)
    assert image.size == (96, 96)
    text = image.info["parameters"]
    assert "Sampler: DPM++ SDE, Schedule type: Karras" in text and "Size: 64x64" in text
    assert "Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 4, Hires upscaler: Lanczos, " in text
    bad = sdrt("generate", str(tiny_engines), "a cat", "--hires-size", "96", "64", "-o", str(tmp_path / "x.png"))
    assert bad.returncode != 0 and "sdrt does not crop" in bad.stderr and not (tmp_path / "x.png").exists()


def test_clip_skip_and_a_long_prompt(tiny_engines, tmp_path):
    out = tmp_path / "long.png"
    prompt = "a (red:1.2) cat on a table, " * 20
    r = sdrt("generate", str(tiny_engines), prompt, "--clip-skip", "2", "--steps", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "Clip skip: 2" in Image.open(out).info["parameters"]


@pytest.mark.parametrize("args, message", [
    (["--height", "65"], "multiple of 8"),
    (["--steps", "0"], "steps must be"),
    (["--guidance", "nan"], "guidance must be finite"),
    (["--batch", "0"], "batch must be"),
    (["--clip-skip", "5"], "clip_skip must be an integer from 1 (the last layer) to 2"),
    (["--strength", "0.5"], "strength applies to img2img"),
])
def test_bad_input_exits_nonzero_with_message(tiny_engines, tmp_path, args, message):
    r = sdrt("generate", str(tiny_engines), "a cat", *args, "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_generate_with_embeddings_dir(tiny_engines, tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": np.random.default_rng(0).normal(0, 1, (2, 32)).astype(np.float32)},
              folder / "shinystyle.safetensors")
    save_file({"emb_params": np.ones((1, 768), np.float32)}, folder / "sd15only.safetensors")
    common = ["a cat in shinystyle", "--steps", "2", "--seed", "1"]
    r = sdrt("generate", str(tiny_engines), *common, "--embeddings-dir", str(folder), "-o", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert "sd15only skipped" in r.stderr and "768 wide" in r.stderr  # the log names the skipped one and why
    assert sdrt("generate", str(tiny_engines), *common, "-o", str(tmp_path / "b.png")).returncode == 0
    with_it, without = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.abs(with_it.astype(int) - without.astype(int)).max() > 8, "the embedding did not change the image"
    r = sdrt("generate", str(tiny_engines), "sd15only", "--embeddings-dir", str(folder), "-o", str(tmp_path / "c.png"))
    assert r.returncode == 2 and "sd15only" in r.stderr and not (tmp_path / "c.png").exists()
    r = sdrt("generate", str(tiny_engines), "a cat", "--embeddings-dir", str(tmp_path / "nope"), "-o", str(tmp_path / "d.png"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_img2img_and_inpainting_from_files(tiny_engines, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((70, 83, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((70, 83), np.uint8)
    mask[20:50, 20:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = sdrt("generate", str(tiny_engines), "a cat", "--image", str(tmp_path / "in.png"), "--strength", "0.6",
             "--steps", "5", "-o", str(tmp_path / "img2img.png"))
    assert r.returncode == 0, r.stderr
    assert "img2img (strength 0.6) | 80x64" in r.stdout and "image encoder" in r.stdout
    out = Image.open(tmp_path / "img2img.png")
    assert out.size == (80, 64) and "Denoising strength: 0.6" in out.info["parameters"]
    r = sdrt("generate", str(tiny_engines), "a cat", "--image", str(tmp_path / "in.png"), "--mask",
             str(tmp_path / "mask.png"), "--steps", "4", "--width", "64", "--height", "64", "-o", str(tmp_path / "i.png"))
    assert r.returncode == 0, r.stderr
    assert "inpaint" in r.stdout and "Mask blur: 4" in Image.open(tmp_path / "i.png").info["parameters"]


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "--image missing.png: No such file"),
    (["--mask", "mask.png"], "mask_image needs the image"),
    (["--image", "in.png", "--strength", "2"], "strength must be a number in (0, 1]"),
    (["--image", "notes.txt"], "not a readable image"),
])
def test_bad_image_arguments_exit_nonzero_with_message(tiny_engines, tmp_path, args, message):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    Image.new("L", (64, 64)).save(tmp_path / "mask.png")
    (tmp_path / "notes.txt").write_text("hello")
    r = sdrt("generate", str(tiny_engines), "a cat", *args, "-o", str(tmp_path / "x.png"), cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_unknown_scheduler_is_an_argparse_error(tiny_engines):
    r = sdrt("generate", str(tiny_engines), "a cat", "--scheduler", "dpm_fast")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_missing_engines_message_names_export(tmp_path):
    r = sdrt("generate", str(tmp_path / "none"), "a cat")
    assert r.returncode == 2 and "sdrt export" in r.stderr


def test_testmodel_and_export_commands(tmp_path):
    model, engines = tmp_path / "tiny", tmp_path / "engines" / "tiny"
    r = sdrt("testmodel", "tiny", str(model))
    assert r.returncode == 0, r.stderr
    r = sdrt("export", str(model), "-o", str(engines), "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "error vs PyTorch" in r.stdout and (engines / "manifest.json").is_file()
    r = sdrt("export", str(model), "-o", str(engines))
    assert r.returncode == 2 and "--force" in r.stderr
    r = sdrt("export", str(model), "-o", str(tmp_path / "v"), "--vae", str(tmp_path / "no-vae"))
    assert r.returncode == 2 and "no-vae does not exist" in r.stderr
    r = sdrt("export", str(model), "-o", str(tmp_path / "v"), "--variant", "fp16")
    assert r.returncode == 2 and "has no fp16 .safetensors weights" in r.stderr
    r = sdrt("export", str(model), "-o", str(tmp_path / "v"), "--vae", str(model / "vae"), "--precision", "fp32")
    assert r.returncode == 0, r.stderr  # the model's own VAE, passed as a swap
    single = tmp_path / "tiny.safetensors"
    r = sdrt("testmodel", "tiny", str(single))
    assert r.returncode == 0 and single.is_file(), r.stderr
    r = sdrt("export", str(single), "-o", str(tmp_path / "s"), "--config", str(model), "--precision", "fp32",
             "--prediction-type", "epsilon")
    assert r.returncode == 0 and "error vs PyTorch" in r.stdout, r.stderr
    r = sdrt("export", str(single), "-o", str(tmp_path / "s2"))  # SD 1.x keys, not SD 1.5's shapes
    assert r.returncode == 2 and "pass --config DIR" in r.stderr and not (tmp_path / "s2").exists()
