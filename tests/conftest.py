"""Shared fixtures: the tiny random-weight model and its exported engines, built once per session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def _export(model: Path, out: Path, precision: str) -> Path:
    from sdrt.export.exporter import ExportConfig, export

    export(ExportConfig(model, out, precision=precision), progress=False)
    return out


def _name(kind: str, what: str) -> str:
    """tiny-sdxl, engines -> tiny_sdxl_engines."""
    return f"{kind.replace('-', '_')}_{what}"


def _model_fixture(kind: str, doc: str) -> Any:
    """A session fixture `<kind>_model`: the random-weight test model `sdrt testmodel KIND` writes."""
    def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return _model(kind, tmp_path_factory)

    model.__doc__ = doc
    return pytest.fixture(scope="session", name=_name(kind, "model"))(model)


def _engines_fixture(kind: str, precision: str = "fp32") -> Any:
    """A session fixture `<kind>_engines` (fp32) or `<kind>_engines_fp16`: the model's ONNX engines."""
    def engines(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
        model = request.getfixturevalue(_name(kind, "model"))
        return _export(model, tmp_path_factory.mktemp("engines") / f"{kind}-{precision}", precision)

    engines.__doc__ = f"{precision} ONNX engines of the {kind} test model."
    suffix = "" if precision == "fp32" else f"_{precision}"
    return pytest.fixture(scope="session", name=_name(kind, "engines") + suffix)(engines)


tiny_model = _model_fixture("tiny", "Tiny random SD 1.x.")
tiny_engines = _engines_fixture("tiny")
tiny_engines_fp16 = _engines_fixture("tiny", "fp16")
tiny_inpaint_model = _model_fixture(
    "tiny-inpaint", "The tiny model with a 9-channel (inpainting) U-Net, as a StableDiffusionInpaintPipeline folder.")
tiny_inpaint_engines = _engines_fixture("tiny-inpaint")
tiny_sdxl_model = _model_fixture("tiny-sdxl", "Tiny random SDXL: two text encoders, text-time embedding.")
tiny_sdxl_engines = _engines_fixture("tiny-sdxl")
tiny_sdxl_engines_fp16 = _engines_fixture("tiny-sdxl", "fp16")
tiny_plain_model = _model_fixture(
    "tiny-plain", "Tiny SD 1.x as diffusers builds it: default-initialised CLIP, CLIP's real vocabulary, PNDM's "
    "saved config.")
tiny_plain_engines = _engines_fixture("tiny-plain")
tiny_sdxl_plain_model = _model_fixture(
    "tiny-sdxl-plain", "Tiny SDXL as diffusers builds it: default-initialised encoders, CLIP's real vocabulary, "
    "Euler's saved config.")
tiny_sdxl_plain_engines = _engines_fixture("tiny-sdxl-plain")
tiny_sd3_model = _model_fixture("tiny-sd3", "A tiny SD 3.5 folder: MMDiT, CLIP-L, bigG and T5.")
tiny_sd3_engines = _engines_fixture("tiny-sd3")
tiny_sd3_engines_fp16 = _engines_fixture("tiny-sd3", "fp16")
sd15_model = _model_fixture("sd15", "The exact SD 1.5 architecture with random weights (~4.3 GB on disk); slow "
                            "tests only.")
