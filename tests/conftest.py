"""Shared fixtures: the tiny random-weight model and its exported engines, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """gpu-marked tests skip before any fixture is built (the sd15 model takes minutes) without a GPU."""
    from sdrt.cuda import gpu_arch

    if any("gpu" in item.keywords for item in items) and gpu_arch() is None:
        skip = pytest.mark.skip(reason="no NVIDIA GPU (or no cuda-bindings / driver)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["SDRT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


def _model(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from sdrt.export.testmodel import build_test_model

    return build_test_model(kind, tmp_path_factory.mktemp("models") / kind)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model("tiny", tmp_path_factory)


def _export(model: Path, out: Path, precision: str) -> Path:
    from sdrt.export.exporter import ExportConfig, export

    export(ExportConfig(model, out, precision=precision), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_engines(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 ONNX engines of the tiny model."""
    return _export(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_engines_fp16(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-fp16", "fp16")


@pytest.fixture(scope="session")
def tiny_inpaint_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 9-channel (inpainting) U-Net, as a StableDiffusionInpaintPipeline folder."""
    return _model("tiny-inpaint", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_inpaint_engines(tiny_inpaint_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_inpaint_model, tmp_path_factory.mktemp("engines") / "tiny-inpaint-fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model("tiny-sdxl", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sdxl_engines(tiny_sdxl_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 ONNX engines of the tiny SDXL model."""
    return _export(tiny_sdxl_model, tmp_path_factory.mktemp("engines") / "tiny-sdxl-fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD 1.x as diffusers builds it: default-initialised CLIP, CLIP's real vocabulary, PNDM's saved config."""
    return _model("tiny-plain", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_plain_engines(tiny_plain_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_plain_model, tmp_path_factory.mktemp("engines") / "tiny-plain-fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_sdxl_plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SDXL as diffusers builds it: default-initialised encoders, CLIP's real vocabulary, Euler's saved config."""
    return _model("tiny-sdxl-plain", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sdxl_plain_engines(tiny_sdxl_plain_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_sdxl_plain_model, tmp_path_factory.mktemp("engines") / "tiny-sdxl-plain-fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 3.5 folder: MMDiT, CLIP-L, bigG and T5."""
    return _model("tiny-sd3", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd3_engines(tiny_sd3_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 ONNX engines of the tiny SD3 model, T5 included."""
    return _export(tiny_sd3_model, tmp_path_factory.mktemp("engines") / "tiny-sd3-fp32", "fp32")


@pytest.fixture(scope="session")
def sd15_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exact SD 1.5 architecture with random weights (~4.3 GB on disk); slow tests only."""
    return _model("sd15", tmp_path_factory)
