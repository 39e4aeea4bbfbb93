"""ONNX Runtime backend: CUDA EP with IO binding (latents stay on the GPU) or the CPU EP.

Both devices take the same path: OrtValues allocated once per shape on the session's device and
bound by name, so the CPU tests exercise the code the GPU runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdrt.backends.base import Backend, Engine, Row
from sdrt.errors import BackendError, EngineError
from sdrt.manifest import ComponentSpec

_ELEMENT_TYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "uint8": np.uint8,
                  "int32": np.int32}


def cuda_available() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:  # the provider is compiled in; is there a device it can open?
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except ImportError:
        import ctypes.util

        return ctypes.util.find_library("cuda") is not None


class OrtEngine(Engine):
    def __init__(self, session: Any, spec: ComponentSpec, device: str):
        self.session = session
        self.spec = spec
        self.device = device
        self.binding = session.io_binding()
        self.last_run_s = 0.0

    def _bind(self, name: str, value: Any, is_input: bool) -> None:
        if isinstance(value, Row):
            buf = value.buffer
            shape = buf.shape()[1:]
            dtype = _ELEMENT_TYPES[_numpy_name(buf.data_type())]
            ptr = buf.data_ptr() + value.index * int(np.prod(shape)) * np.dtype(dtype).itemsize
            bind = self.binding.bind_input if is_input else self.binding.bind_output
            bind(name, self.device, 0, dtype, list(shape), ptr)
        elif is_input:
            self.binding.bind_ortvalue_input(name, value)
        else:
            self.binding.bind_ortvalue_output(name, value)

    def run(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        import time

        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        for name, value in inputs.items():
            self._bind(name, value, True)
        for name, value in outputs.items():
            self._bind(name, value, False)
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        self.last_run_s = time.perf_counter() - start

    def release(self) -> None:
        self.session = None
        self.binding = None


def _numpy_name(ort_type: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
            "tensor(uint8)": "uint8", "tensor(int32)": "int32"}[ort_type]


class OrtBackend(Backend):
    def __init__(self, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        if device not in ("cpu", "cuda"):
            raise BackendError(f"ONNX Runtime device must be cpu or cuda, got {device!r}")
        if device == "cuda" and not cuda_available():
            raise BackendError("ort-cuda needs onnxruntime-gpu and an NVIDIA GPU: install onnxruntime-gpu "
                               "(CUDA 12/13 build matching your driver) or use --backend ort-cpu")
        self.ort = ort
        self.device = device
        self.name = f"ort-{device}"
        self.threads = threads

    def describe(self) -> str:
        return f"{self.name} (onnxruntime {self.ort.__version__})"

    def load(self, engine_dir: Path, component: str, spec: ComponentSpec) -> Engine:
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": 0, "arena_extend_strategy": "kSameAsRequested",
                                                    "cudnn_conv_use_max_workspace": "1"}), "CPUExecutionProvider"]
        path = Path(engine_dir) / spec.onnx
        try:
            session = self.ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises its own exception types
            raise EngineError(f"ONNX Runtime could not load {path}: {e}. Re-export with `sdrt export`") from e
        names = {i.name: _numpy_name(i.type) for i in session.get_inputs()}
        names.update({o.name: _numpy_name(o.type) for o in session.get_outputs()})
        for t in spec.inputs + spec.outputs:
            if names.get(t.name) != t.dtype:
                raise EngineError(f"{path}: I/O {t.name!r} is {names.get(t.name)} in the graph but {t.dtype} in "
                                  "manifest.json; re-export with `sdrt export`")
        return OrtEngine(session, spec, self.device)

    def empty(self, shape: Sequence[int], dtype: str) -> Any:
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), _ELEMENT_TYPES[dtype], self.device, 0)

    def upload(self, array: np.ndarray) -> Any:
        # On the CPU ORT wraps numpy memory without a copy; copy so that every buffer owns its memory
        # on both devices (two uploads of one array must never alias).
        owned = np.array(array, copy=True, order="C") if self.device == "cpu" else np.ascontiguousarray(array)
        return self.ort.OrtValue.ortvalue_from_numpy(owned, self.device, 0)

    def download(self, buffer: Any) -> np.ndarray:
        return buffer.numpy()
