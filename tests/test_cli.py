"""The `sdrt` command line, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize("args, message", [
    (["--height", "65"], "multiple of 8"),
    (["--steps", "0"], "steps must be"),
    (["--guidance", "nan"], "guidance must be finite"),
    (["--batch", "0"], "batch must be"),
])
def test_bad_input_exits_nonzero_with_message(tiny_engines, tmp_path, args, message):
    r = sdrt("generate", str(tiny_engines), "a cat", *args, "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_unknown_scheduler_is_an_argparse_error(tiny_engines):
    r = sdrt("generate", str(tiny_engines), "a cat", "--scheduler", "heun")
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
