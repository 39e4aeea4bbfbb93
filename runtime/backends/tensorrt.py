"""TensorRT backend: plans from `sdrt build`, CUDA through cuda-bindings (no torch).

- One stream; I/O buffers are cudaMalloc'd once per shape by the pipeline and reused.
- One device-memory block holds every engine's activations (contexts are USER_MANAGED), grown to
  the largest need; engines run one at a time on one stream, so they can share it.
- Host <-> device copies go through one pinned staging buffer.
- CUDA graphs: TensorRT-RTX captures and replays them itself (WHOLE_GRAPH_CAPTURE), for dynamic
  shapes too, once their shape-specialized kernels are compiled. With full TensorRT, static-shape
  plans capture each distinct binding (addresses + shapes) once, after one plain run has done
  TensorRT's lazy setup, and replay it from then on; its dynamic plans run plainly.
- `run` only queues work: the host prepares step i+1 while step i runs. Runs are timed, when asked,
  by CUDA events read after the loop, so the pipeline's engine time and host-overhead figures mean
  the same as on ONNX Runtime without a wait per step.
"""

from __future__ import annotations

import atexit
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sdrt.backends.base import Backend, Engine
from sdrt.cuda import CudaGraph, DeviceMemory, EventTimer, PinnedMemory, Stream, cudart, gpu_arch
from sdrt.errors import BackendError, EngineError
from sdrt.manifest import Manifest, ShapeLimits, verify_files
from sdrt.paths import write_atomic
from sdrt.plans import build_hint, check_io, check_plans
from sdrt.tensorrt_lib import TensorRT, cache_path, import_tensorrt
from sdrt.loras import base_weight

MAX_GRAPHS = 512  # captured bindings kept per engine (a 50-step loop uses 50)


@dataclass(frozen=True)
class DeviceArray:
    """A device buffer (owner set) or a view into one (rows)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str
    owner: DeviceMemory | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class TrtEngine(Engine):
    def __init__(self, backend: TrtBackend, engine: Any, spec: Any, static: bool, refittable: bool = False):
        self.backend = backend
        self.engine = engine
        self.spec = spec
        self.refittable = refittable
        self._changed: set[str] = set()  # weights set_weights moved off the plan's own
        self.context = backend.create_context(engine)
        self.manual_graphs = static and backend.cuda_graphs and not backend.lib.rtx
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._memory_size = 0
        self._memory = (0, 0)  # (ptr, bytes) of the shared activation block this context is bound to
        self._graphs: OrderedDict[tuple, CudaGraph] = OrderedDict()
        self._warm: set[tuple] = set()
        self._timer: EventTimer | None = None  # created on the first start_timing, reused after
        self._timing = False

    def _bind(self, inputs: Mapping[str, DeviceArray], outputs: Mapping[str, DeviceArray]) -> None:
        changed = False
        for name, buf in inputs.items():
            if self._shapes.get(name) != buf.shape:
                if not self.context.set_input_shape(name, buf.shape):
                    raise BackendError(f"{name} {buf.shape} is outside the plan's profile; "
                                       f"{build_hint(self.backend.engine_dir, ' --shapes ...')} covering it")
                self._shapes[name] = buf.shape
                changed = True
            self.context.set_tensor_address(name, buf.ptr)
        for name, buf in outputs.items():
            self.context.set_tensor_address(name, buf.ptr)
        if changed or not self._memory_size:
            self._memory_size = int(self.context.update_device_memory_size_for_shapes())
        block = (self.backend.activations(self._memory_size), self.backend.activation_bytes)
        if block != self._memory:  # the shared block was (re)allocated since this context last ran
            pointer, size = block
            self.context.set_device_memory(pointer, size)
            self._memory = block

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.backend.stream.ptr):
            raise BackendError(f"TensorRT failed to run {self.spec.onnx.removesuffix('.onnx')}: "
                               f"{'; '.join(self.backend.logger_errors()) or 'no message'}")

    def run(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Queues one run on the backend's stream and returns without waiting for it."""
        queue = self._prepare(inputs, outputs)
        if self._timing:
            self._timer.start()  # type: ignore[union-attr]
        queue()
        if self._timing:
            self._timer.stop()  # type: ignore[union-attr]

    def _prepare(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> Callable[[], None]:
        """Binds the buffers; returns what queues the run: a plain enqueue or a captured graph's launch."""
        if not self.manual_graphs:
            self._bind(inputs, outputs)
            return self._enqueue
        key = (self.backend.activation_ptr,) + tuple((b.ptr, b.shape) for b in inputs.values()) + tuple(
            b.ptr for b in outputs.values())
        graph = self._graphs.get(key)
        if graph is None:
            self._bind(inputs, outputs)
            shape_key = tuple(b.shape for b in inputs.values())
            if shape_key not in self._warm:  # TensorRT's lazy setup happens in a first plain run

                def first_run() -> None:
                    self._enqueue()
                    self._warm.add(shape_key)

                return first_run
            graph = self.backend.stream.capture(self._enqueue)  # recorded once, replayed from then on
            self._graphs[key] = graph
            if len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        return graph.launch

    def start_timing(self) -> None:
        if self._timer is None:
            self._timer = self.backend.stream.timer()
        self._timer.reset()
        self._timing = True

    def run_times_s(self) -> list[float]:
        """Each run's device time since start_timing (CUDA events); stops timing."""
        if not self._timing:
            return []
        self._timing = False
        return self._timer.spans_s()  # type: ignore[union-attr]

    def release(self) -> None:
        self._graphs.clear()
        self.context = None
        self.engine = None

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Refits the plan in place: `weights`, and the ones an earlier call changed back to the file's."""
        if not self.refittable:
            raise EngineError(f"{self.spec.onnx}'s plan was built without refittable weights (on a machine without a "
                              f"GPU, or --no-refit): {build_hint(self.backend.engine_dir, ' --refit')} on a GPU to "
                              "use LoRA on TensorRT, or use --backend ort")

        trt = self.backend.lib.module
        self.backend.synchronize()  # no run may read the weights while they change
        refitter = trt.Refitter(self.engine, self.backend._logger)
        restored = {name: base_weight(self.backend.engine_dir, self.spec, name) for name in self._changed - set(weights)}
        arrays = {name: np.ascontiguousarray(a) for name, a in {**restored, **weights}.items()}  # alive until the refit
        for name, array in arrays.items():
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise EngineError(f"TensorRT refused weights {name} {array.shape}: "
                                  f"{'; '.join(self.backend.logger_errors()) or 'no message'}")
        if not refitter.refit_cuda_engine():
            raise EngineError(f"TensorRT could not refit {self.spec.onnx}'s plan: "
                              f"{'; '.join(self.backend.logger_errors()) or 'no message'}")
        self._graphs.clear()  # captured graphs replay kernels that may have read folded copies
        self._warm.clear()
        self._changed = set(weights)


class TrtBackend(Backend):
    def __init__(self, flavour: str = "auto", cuda_graphs: bool = True):
        self.lib: TensorRT = import_tensorrt(flavour)
        cudart()  # a clear error when cuda-bindings is missing
        self.arch = gpu_arch()
        if self.arch is None:
            raise BackendError("--backend trt needs an NVIDIA GPU with its driver (none found): use --backend "
                               "ort-cpu here, and build plans for another machine with `sdrt build`")
        self.name = "trt"
        self.cuda_graphs = cuda_graphs
        self.stream = Stream()
        self._logger = self.lib.error_logger()
        self.runtime = self.lib.module.Runtime(self._logger)
        self.engine_dir = Path(".")
        self._activations: DeviceMemory | None = None
        self._staging: PinnedMemory | None = None
        self._runtime_cache: Any = None
        atexit.register(self.save_runtime_cache)

    def describe(self) -> str:
        graphs = "CUDA graphs" if self.cuda_graphs else "no CUDA graphs"
        return f"trt ({self.lib.flavour} {self.lib.version}, {self.arch}, {graphs})"

    def logger_errors(self) -> list[str]:
        errors = list(self._logger.errors)
        self._logger.errors.clear()
        return errors

    # --- checks and loading ---------------------------------------------------------------------

    def verify(self, engine_dir: Path, manifest: Manifest) -> None:
        check_plans(engine_dir, manifest, self.lib.flavour, self.lib.version, self.arch)
        verify_files(engine_dir, manifest, [rel for rel in manifest.files if rel.startswith("tokenizer/")])

    def limits(self, manifest: Manifest) -> ShapeLimits:
        if manifest.plans is None:
            raise EngineError(f"{manifest.name} has no TensorRT plans: build them with `sdrt build`")
        return manifest.plans.limits

    def load(self, engine_dir: Path, manifest: Manifest, component: str,
             weights: Mapping[str, np.ndarray] | None = None) -> Engine:
        self.engine_dir = Path(engine_dir)
        if manifest.plans is None:
            raise EngineError(f"{engine_dir} has no TensorRT plans: {build_hint(self.engine_dir)}")
        path = self.engine_dir / manifest.plans.components[component].plan
        data = path.read_bytes()
        trt = self.lib.module
        if hasattr(self.runtime, "get_engine_validity"):
            validity, diagnostics = self.runtime.get_engine_validity(data)
            if validity == trt.EngineValidity.INVALID:
                reasons = [d.name for d in trt.EngineInvalidityDiagnostics.__members__.values()
                           if int(diagnostics) & int(d)]
                raise EngineError(f"{path} cannot run here ({', '.join(reasons) or 'invalid'}); "
                                  + build_hint(self.engine_dir, f" --arch {self.arch}"))
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:  # TensorRT reports through the logger and returns None, never crashes
            errors = "; ".join(self.logger_errors()) or "no message"
            raise EngineError(f"TensorRT could not deserialize {path}: {errors}; {build_hint(self.engine_dir)}")
        io = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            io.append({"name": name, "mode": mode, "dtype": self.lib.dtype_name(engine.get_tensor_dtype(name))})
        spec = manifest.components[component]
        check_io(io, spec, path)
        loaded = TrtEngine(self, engine, spec, static=manifest.plans.limits.kind == "static",
                           refittable=manifest.plans.components[component].refittable)
        if weights:
            loaded.set_weights(weights)
        return loaded

    def create_context(self, engine: Any) -> Any:
        trt = self.lib.module
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if self.lib.rtx:
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            if self.cuda_graphs:
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            config.set_runtime_cache(self._rtx_runtime_cache(config))
            context = engine.create_execution_context(config)
        else:
            context = engine.create_execution_context(strategy)
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context: {'; '.join(self.logger_errors())}")
        return context

    def _rtx_runtime_cache(self, config: Any) -> Any:
        """TensorRT-RTX's JIT kernel cache, loaded once from the cache directory and saved at exit."""
        if self._runtime_cache is None:
            self._runtime_cache = config.create_runtime_cache()
            path = cache_path(self.lib, "runtime", self.arch)
            if path.is_file():
                self._runtime_cache.deserialize(path.read_bytes())
        return self._runtime_cache

    def save_runtime_cache(self) -> None:
        if self._runtime_cache is None:
            return
        write_atomic(cache_path(self.lib, "runtime", self.arch), bytes(memoryview(self._runtime_cache.serialize())))

    # --- memory -------------------------------------------------------------------------------

    @property
    def activation_ptr(self) -> int:
        return self._activations.ptr if self._activations is not None else 0

    @property
    def activation_bytes(self) -> int:
        return self._activations.nbytes if self._activations is not None else 0

    def activations(self, nbytes: int) -> int:
        """The shared activation block, grown (never shrunk) to at least nbytes."""
        if self._activations is None or self._activations.nbytes < nbytes:
            self.stream.synchronize()
            if self._activations is not None:
                self._activations.free()
            self._activations = DeviceMemory(nbytes)
        return self._activations.ptr

    def _staging_view(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self._staging is None or self._staging.nbytes < nbytes:
            self._staging = PinnedMemory(nbytes)
        return self._staging.view(shape, np.dtype(dtype))

    def empty(self, shape: Sequence[int], dtype: str) -> DeviceArray:
        shape = tuple(int(s) for s in shape)
        memory = DeviceMemory(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return DeviceArray(memory.ptr, shape, dtype, memory)

    def write(self, buffer: DeviceArray, array: np.ndarray) -> None:
        if tuple(array.shape) != buffer.shape or array.dtype.name != buffer.dtype:
            raise BackendError(f"write of {array.dtype}{array.shape} into a {buffer.dtype}{buffer.shape} buffer")
        staging = self._staging_view(buffer.shape, buffer.dtype)
        staging[...] = array
        self.stream.copy_to_device(buffer.ptr, self._staging.ptr, buffer.nbytes)  # type: ignore[union-attr]
        self.stream.synchronize()  # the staging buffer is reused by the next copy

    def rows(self, buffer: DeviceArray) -> list[DeviceArray]:
        row = DeviceArray(0, buffer.shape[1:], buffer.dtype)
        return [DeviceArray(buffer.ptr + i * row.nbytes, row.shape, buffer.dtype) for i in range(buffer.shape[0])]

    def download(self, buffer: DeviceArray) -> np.ndarray:
        staging = self._staging_view(buffer.shape, buffer.dtype)
        self.stream.copy_to_host(self._staging.ptr, buffer.ptr, buffer.nbytes)  # type: ignore[union-attr]
        self.stream.synchronize()
        return staging.copy()

    def synchronize(self) -> None:
        self.stream.synchronize()
