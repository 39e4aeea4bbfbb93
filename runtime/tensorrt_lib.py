"""One shim over the two TensorRT flavours: full TensorRT (`tensorrt` >= 10) and TensorRT for RTX
(`tensorrt_rtx`). Both expose the same Python API for what sdrt uses (parser, strongly typed
networks, profiles, runtime, execution contexts); where they differ, the caller asks `lib.rtx`.

Full TensorRT is preferred when both are importable: it builds for the GPU it runs on (Hopper and
data-center GPUs included). TensorRT-RTX targets RTX architectures and can build without a GPU.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from sdrt.errors import BackendError
from sdrt.paths import cache_dir

FLAVOURS = ("tensorrt", "tensorrt_rtx")
# what TensorRT-RTX can target (ComputeCapability enum names, lowercased)
RTX_ARCHS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32", "UINT8": "uint8",
           "BOOL": "bool", "INT8": "int8", "BF16": "bfloat16"}
INSTALL_HINT = ("install TensorRT for RTX (`pip install tensorrt-rtx`, builds without a GPU, runs on RTX cards) "
                "or full TensorRT >= 10 (`pip install tensorrt`, from NVIDIA's index)")


@dataclass(frozen=True)
class TensorRT:
    module: ModuleType
    flavour: str  # "tensorrt" | "tensorrt_rtx"
    version: str

    @property
    def rtx(self) -> bool:
        return self.flavour == "tensorrt_rtx"

    def error_logger(self) -> Any:
        """A trt.ILogger that keeps error messages (in `.errors`) for the exceptions sdrt raises."""
        trt = self.module

        class ErrorLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)

        return ErrorLogger()

    def dtype_name(self, dtype: Any) -> str:
        """trt.DataType -> the manifest's numpy name."""
        return _DTYPES.get(dtype.name, dtype.name.lower())


def _try_import(flavour: str) -> TensorRT | None:
    try:
        module = importlib.import_module(flavour)
    except Exception:  # ImportError, or a placeholder package that raises on import
        return None
    version = getattr(module, "__version__", None)
    if version is None or not hasattr(module, "Builder"):
        return None
    if flavour == "tensorrt" and int(version.split(".")[0]) < 10:
        return None
    return TensorRT(module, flavour, version)


def import_tensorrt(flavour: str = "auto") -> TensorRT:
    """The TensorRT to use: `auto` prefers full TensorRT, else TensorRT-RTX; a named flavour or nothing."""
    if flavour not in ("auto",) + FLAVOURS:
        raise BackendError(f"unknown TensorRT flavour {flavour!r}: choose auto, {' or '.join(FLAVOURS)}")
    for name in FLAVOURS if flavour == "auto" else (flavour,):
        lib = _try_import(name)
        if lib is not None:
            return lib
    wanted = "no TensorRT" if flavour == "auto" else f"{flavour} is not"
    raise BackendError(f"{wanted} importable: {INSTALL_HINT}")


def available_flavours() -> list[str]:
    return [name for name in FLAVOURS if _try_import(name) is not None]


def cache_path(lib: TensorRT, kind: str, arch: str | None = None) -> Path:
    """The one place TensorRT caches live: `timing` (builder) or `runtime` (TensorRT-RTX JIT kernels).

    Keyed by flavour, version and, for caches of one GPU, its architecture: a cache from another
    version or GPU is never fed back.
    """
    suffix = f"-{arch}" if arch else ""
    return cache_dir("trt") / f"{kind}-{lib.flavour}-{lib.version}{suffix}.cache"
