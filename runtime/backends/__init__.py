"""Backend selection: the best available, or the one named."""

from __future__ import annotations

from sdrt.backends.base import Backend, Engine
from sdrt.errors import BackendError
from sdrt.manifest import Manifest
from sdrt.backends.onnxruntime import cuda_available, OrtBackend
from sdrt.backends.tensorrt import TrtBackend
from sdrt.cuda import gpu_arch
from sdrt.tensorrt_lib import available_flavours

BACKENDS = ("auto", "ort", "ort-cpu", "ort-cuda", "trt")


def select_backend(name: str = "auto", manifest: Manifest | None = None, optimized: bool = True) -> Backend:
    """auto: TensorRT where the engine directory has plans this machine can run, else ONNX Runtime
    CUDA, else ONNX Runtime CPU. ort: the best ONNX Runtime (CUDA, else CPU), never TensorRT.
    optimized: ONNX Runtime runs `sdrt optimize`'s graphs for its device where there are some."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "trt" or (name == "auto" and manifest is not None and _plans_runnable(manifest)):
        plans = manifest.plans if manifest is not None else None
        return TrtBackend(plans.flavour if plans is not None else "auto")
    if name in ("auto", "ort"):
        return OrtBackend("cuda" if cuda_available() else "cpu", optimized=optimized)
    return OrtBackend(name.removeprefix("ort-"), optimized=optimized)


def _plans_runnable(manifest: Manifest) -> bool:
    """Plans were built, their TensorRT flavour is importable and this machine has a GPU."""
    plans = manifest.plans
    return plans is not None and plans.flavour in available_flavours() and gpu_arch() in plans.archs


__all__ = ["Backend", "Engine", "BACKENDS", "select_backend"]
