"""Backend selection: the best available, or the one named."""

from __future__ import annotations

from sdrt.backends.base import Backend, Engine
from sdrt.errors import BackendError

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")


def select_backend(name: str = "auto") -> Backend:
    """auto: TensorRT if importable with a GPU, else ONNX Runtime CUDA, else ONNX Runtime CPU."""
    from sdrt.backends.onnxruntime import OrtBackend, cuda_available

    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "trt":
        raise NotImplementedError("the TensorRT runtime backend is not implemented yet: use --backend ort-cuda")
    if name == "auto":
        return OrtBackend("cuda" if cuda_available() else "cpu")
    return OrtBackend(name.removeprefix("ort-"))


__all__ = ["Backend", "Engine", "BACKENDS", "select_backend"]
