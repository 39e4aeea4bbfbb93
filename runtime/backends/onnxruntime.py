"""ONNX Runtime backend: CUDA EP with IO binding (latents stay on the GPU) or the CPU EP.

Both devices take the same path: OrtValues allocated once per shape on the session's device and
bound by name, so the CPU tests exercise the code the GPU runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from sdrt.backends.base import Backend, Engine
from sdrt.errors import BackendError, EngineError
from sdrt.manifest import ComponentSpec, Manifest, OptimizedGraph

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


class RowView(NamedTuple):
    """buffer[i] as IO binding takes it: a device pointer with its shape and element type."""

    ptr: int
    shape: list[int]
    dtype: type


class OrtEngine(Engine):
    def __init__(self, open_session: Callable[[Mapping[str, np.ndarray]], tuple[Any, list[Any]]], spec: ComponentSpec, device: str,
                 weights: Mapping[str, np.ndarray] | None = None):
        self.open_session = open_session
        self.spec = spec
        self.device = device
        self.set_weights(weights or {})

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """A new session whose initializers `weights` replace the file's (add_external_initializers)."""
        self.session = None
        # ONNX Runtime may run on the values' memory itself (CPU): they live as long as the session
        self.session, self.held = self.open_session(weights)
        self.binding = self.session.io_binding()

    def _bind(self, name: str, value: Any, is_input: bool) -> None:
        if isinstance(value, RowView):
            bind = self.binding.bind_input if is_input else self.binding.bind_output
            bind(name, self.device, 0, value.dtype, value.shape, value.ptr)
        elif is_input:
            self.binding.bind_ortvalue_input(name, value)
        else:
            self.binding.bind_ortvalue_output(name, value)

    def run(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        for name, value in inputs.items():
            self._bind(name, value, True)
        for name, value in outputs.items():
            self._bind(name, value, False)
        start = time.perf_counter()
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as e:  # ORT raises its own exception types
            if any(marker in str(e).lower() for marker in _OUT_OF_MEMORY):
                raise BackendError(f"not enough memory to run {self.spec.onnx} at these shapes: shorter prompts, a "
                                   f"smaller size or batch, or --low-vram ({e})") from e
            raise
        if self._run_times is not None:
            self._run_times.append(time.perf_counter() - start)

    def release(self) -> None:
        self.session = None
        self.binding = None
        self.held = []


# ONNX Runtime's exception classes that mean the file itself is bad (not the machine)
_BAD_FILE = ("InvalidProtobuf", "InvalidGraph", "NoModel", "NoSuchFile", "ModelRequiresCompilation")
_OUT_OF_MEMORY = ("out of memory", "failed to allocate", "bad_alloc", "cudaerrormemoryallocation", "alloc_failed")


def load_error(error: Exception, path: Path, version: str) -> Exception:
    """What a failed InferenceSession means for the user: a damaged engine file (re-export), memory
    (not the engine's fault), or an operator this onnxruntime lacks (upgrade it)."""
    kind, text = type(error).__name__, str(error)
    if any(marker in text.lower() for marker in _OUT_OF_MEMORY):
        return BackendError(f"not enough memory to load {path.name}: free memory (other processes on the GPU), "
                            f"use --low-vram, or build engines for smaller sizes or batches ({text})")
    if kind in _BAD_FILE:
        return EngineError(f"{path} is damaged or incomplete ({kind}: {text}); re-export with `sdrt export`")
    if kind == "NotImplemented":
        return BackendError(f"onnxruntime {version} cannot run {path.name} ({text}): install the onnxruntime "
                            "version the engines were exported with (manifest.json, versions)")
    return BackendError(f"ONNX Runtime could not load {path.name}: {kind}: {text}")


def _numpy_name(ort_type: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
            "tensor(uint8)": "uint8", "tensor(int32)": "int32"}[ort_type]


class OrtBackend(Backend):
    """optimized: run the graphs `sdrt optimize --provider DEVICE` wrote where the manifest has them
    (False: the plain exported graphs, for comparison)."""

    def __init__(self, device: str = "cpu", threads: int | None = None, optimized: bool = True):
        import onnxruntime as ort

        if device not in ("cpu", "cuda"):
            raise BackendError(f"ONNX Runtime device must be cpu or cuda, got {device!r}")
        if device == "cuda" and not cuda_available():
            raise BackendError("ort-cuda needs onnxruntime-gpu and an NVIDIA GPU: install onnxruntime-gpu "
                               "(CUDA 12/13 build matching your driver) or use --backend ort-cpu")
        if device == "cuda" and hasattr(ort, "preload_dlls"):
            # the CUDA EP dlopens cudart/cuBLAS/cuDNN; without torch imported first they are found only
            # on LD_LIBRARY_PATH, so load them from the nvidia-* pip packages where those are installed
            ort.preload_dlls()
        self.ort = ort
        self.device = device
        self.name = f"ort-{device}"
        self.threads = threads
        self.optimized = optimized
        self.graphs: dict[str, str] = {}  # component -> the file loaded

    def describe(self) -> str:
        optimized = sorted(c for c, f in self.graphs.items() if f".{self.device}.onnx" in f)
        which = f", optimized graphs: {', '.join(optimized)}" if optimized else ""
        return f"{self.name} (onnxruntime {self.ort.__version__}{which})"

    def graph(self, manifest: Manifest, component: str) -> OptimizedGraph | None:
        """The optimized graph this backend runs for component, or None for the plain one."""
        return manifest.optimized.get(self.device, {}).get(component) if self.optimized else None

    def load(self, engine_dir: Path, manifest: Manifest, component: str,
             weights: Mapping[str, np.ndarray] | None = None) -> Engine:
        spec = manifest.components[component]
        graph = self.graph(manifest, component)

        def session(w: Mapping[str, np.ndarray]) -> tuple[Any, list[Any]]:
            # a LoRA's and a swapped ControlNet's weights are the plain graph's initializers: where the optimized
            # graph packed some (self-attention's q, k, v), they run on the plain graph until they are cleared
            holds = graph is not None and graph.lora_weights and (
                graph.control_weights or not any(name in spec.control_weights for name in w))
            use = graph if graph is not None and (holds or not w) else None
            path = Path(engine_dir) / (use.onnx if use is not None else spec.onnx)
            self.graphs[component] = path.name
            return self._session(path, spec, w)

        return OrtEngine(session, spec, self.device, weights)

    def _session(self, path: Path, spec: ComponentSpec, weights: Mapping[str, np.ndarray]) -> tuple[Any, list[Any]]:
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        # external initializers are replaced as the model loads, before graph optimization (add_initializer's
        # values arrive after it: a CPU session's NCHWc-reordered convolutions would keep the file's weights)
        held = [self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in weights.values()]  # each holds its array
        if held:
            options.add_external_initializers(list(weights), held)
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device == "cuda":
            # NHWC kernels where the EP has them (the optimized graphs' convolutions are NHWC already), cuDNN's
            # exhaustive search for the fastest convolution (once per shape, at the first run)
            providers = [("CUDAExecutionProvider", {"device_id": 0, "arena_extend_strategy": "kSameAsRequested",
                                                    "cudnn_conv_use_max_workspace": "1", "prefer_nhwc": "1",
                                                    "cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
        try:
            session = self.ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises its own exception types
            raise load_error(e, path, self.ort.__version__) from e
        if self.device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise BackendError(f"ONNX Runtime fell back to the CPU for {path.name}: its CUDA provider did not load "
                               "(usually a CUDA or cuDNN library it cannot find; its log names it). Install the "
                               "onnxruntime-gpu build for your CUDA, or use --backend ort-cpu")
        names = {i.name: _numpy_name(i.type) for i in session.get_inputs()}
        names.update({o.name: _numpy_name(o.type) for o in session.get_outputs()})
        for t in spec.inputs + spec.outputs:
            if names.get(t.name) != t.dtype:
                raise EngineError(f"{path}: I/O {t.name!r} is {names.get(t.name)} in the graph but {t.dtype} in "
                                  "manifest.json; re-export with `sdrt export`")
        return session, held

    def empty(self, shape: Sequence[int], dtype: str) -> Any:
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), _ELEMENT_TYPES[dtype], self.device, 0)

    def write(self, buffer: Any, array: np.ndarray) -> None:
        # a copy into ORT-owned memory on either device (ortvalue_from_numpy would wrap host memory)
        buffer.update_inplace(np.ascontiguousarray(array))

    def rows(self, buffer: Any) -> list[RowView]:
        shape = buffer.shape()
        dtype = _ELEMENT_TYPES[_numpy_name(buffer.data_type())]
        row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        base = buffer.data_ptr()
        return [RowView(base + i * row_bytes, list(shape[1:]), dtype) for i in range(shape[0])]

    def download(self, buffer: Any) -> np.ndarray:
        return buffer.numpy()
