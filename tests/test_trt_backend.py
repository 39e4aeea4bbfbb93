"""The TensorRT engine's run logic (bindings, shared activations, CUDA-graph capture and replay)
against a recording fake context and stream: what can be checked without a GPU. The real thing
runs in the gpu-marked tests of test_build.py."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import sdrt

from sdrt.backends.tensorrt import DeviceArray, TrtEngine
from sdrt.errors import BackendError


class FakeContext:
    def __init__(self, log: list, profile_max: int = 4):
        self.log = log
        self.profile_max = profile_max

    def set_input_shape(self, name, shape):
        self.log.append(("shape", name, shape))
        return shape[0] <= self.profile_max

    def set_tensor_address(self, name, ptr):
        self.log.append(("address", name, ptr))

    def update_device_memory_size_for_shapes(self):
        self.log.append(("size",))
        return 1000 * self.shape_scale

    shape_scale = 1

    def set_device_memory(self, ptr, size):
        self.log.append(("memory", ptr, size))

    def execute_async_v3(self, stream):
        self.log.append(("execute",))
        return not getattr(self, "fail", False)


class FakeGraph:
    def __init__(self, log):
        self.log = log

    def launch(self):
        self.log.append(("launch",))


class FakeStream:
    ptr = 7

    def __init__(self, log):
        self.log = log

    def capture(self, enqueue):
        self.log.append(("capture-begin",))
        enqueue()
        self.log.append(("capture-end",))
        return FakeGraph(self.log)

    def synchronize(self):
        self.log.append(("sync",))

    def timer(self):
        return FakeTimer(self.log)


class FakeTimer:
    """Records where the event pairs fall among the stream's work; each span takes 2 ms."""

    def __init__(self, log):
        self.log = log
        self.spans = 0

    def reset(self):
        self.spans = 0

    def start(self):
        self.log.append(("event-start",))

    def stop(self):
        self.log.append(("event-stop",))
        self.spans += 1

    def spans_s(self):
        return [0.002] * self.spans


class FakeBackend:
    engine_dir = "engines/x"

    def __init__(self, rtx=False, graphs=True):
        self.log: list = []
        self.lib = type("Lib", (), {"rtx": rtx})()
        self.cuda_graphs = graphs
        self.stream = FakeStream(self.log)
        self.activation_ptr = 0
        self.activation_bytes = 0
        self.context = FakeContext(self.log)

    def create_context(self, engine):
        return self.context

    def activations(self, nbytes):
        if nbytes > self.activation_bytes:
            self.activation_ptr += 4096
            self.activation_bytes = nbytes
        return self.activation_ptr

    def logger_errors(self):
        return ["boom"]


def buffers(base: int, batch: int = 1):
    return ({"latents": DeviceArray(base, (batch, 4, 8, 8), "float32")},
            {"latents_next": DeviceArray(base + 512, (batch, 4, 8, 8), "float32")})


def kinds(log):
    return [entry[0] for entry in log]


def make(backend, static=True):
    spec = type("Spec", (), {"onnx": "denoise_step.onnx"})()
    return TrtEngine(backend, engine=object(), spec=spec, static=static)


def test_static_plan_runs_plainly_then_captures_once_then_replays():
    backend = FakeBackend()
    engine = make(backend)
    engine.run(*buffers(100))
    assert kinds(backend.log) == ["shape", "address", "address", "size", "memory", "execute"]
    backend.log.clear()
    engine.run(*buffers(100))  # warm: record this binding, then launch it
    assert kinds(backend.log)[-4:] == ["capture-begin", "execute", "capture-end", "launch"]
    backend.log.clear()
    engine.run(*buffers(100))  # replay: no binding calls, no enqueue, one launch
    assert kinds(backend.log) == ["launch"]
    backend.log.clear()
    engine.run(*buffers(200))  # another step's rows: one more capture (shapes already warm)
    assert "capture-begin" in kinds(backend.log) and ("address", "latents", 200) in backend.log


def test_runs_only_queue_work_and_are_timed_by_events_around_the_launch():
    """The host never waits for the stream inside a step (it queues the next one meanwhile); timing
    events bracket the device work, never the capture, which must not record them."""
    backend = FakeBackend()
    engine = make(backend)
    engine.start_timing()
    for _ in range(3):
        engine.run(*buffers(100))
    log = kinds(backend.log)
    assert "sync" not in log
    assert log[-3:] == ["event-start", "launch", "event-stop"]
    capture = log.index("capture-begin")
    assert log[capture:capture + 5] == ["capture-begin", "execute", "capture-end", "event-start", "launch"]
    assert log.count("event-start") == log.count("event-stop") == 3
    assert engine.run_times_s() == [0.002] * 3
    backend.log.clear()
    engine.run(*buffers(100))  # timing stopped when read
    assert kinds(backend.log) == ["launch"] and engine.run_times_s() == []


def test_a_larger_shape_grows_the_shared_block_and_recaptures():
    backend = FakeBackend()
    engine = make(backend)
    for _ in range(3):
        engine.run(*buffers(100))
    first_block = backend.activation_ptr
    backend.log.clear()
    backend.context.shape_scale = 4
    engine.run(*buffers(100, batch=2))  # new shape: plain run, new (bigger) block bound
    assert ("shape", "latents", (2, 4, 8, 8)) in backend.log and "capture-begin" not in kinds(backend.log)
    assert backend.activation_ptr != first_block and ("memory", backend.activation_ptr, 4000) in backend.log


def test_dynamic_plans_and_rtx_never_capture_by_hand():
    for backend, static in ((FakeBackend(), False), (FakeBackend(rtx=True), True), (FakeBackend(graphs=False), True)):
        engine = make(backend, static=static)
        for _ in range(3):
            engine.run(*buffers(100))
        assert "capture-begin" not in kinds(backend.log) and kinds(backend.log).count("execute") == 3


def test_shape_outside_the_profile_and_failed_runs_are_errors():
    backend = FakeBackend()
    engine = make(backend)
    with pytest.raises(BackendError, match="outside the plan's profile.*sdrt build"):
        engine.run(*buffers(100, batch=8))
    backend.context.fail = True
    with pytest.raises(BackendError, match="failed to run denoise_step: boom"):
        engine.run(*buffers(100))


# --- the real libraries' API, as the GPU-only code calls it ------------------------------------
# The fakes above cannot catch a misspelt TensorRT method or a CUDA call with the wrong arguments;
# these tests read the backend's source and check every such call against the installed
# tensorrt_rtx and cuda-bindings, which import (but cannot run) without a GPU.

RUNTIME = Path(sdrt.__file__).parent
# receiver (last name of `x.y.method(...)`) -> the TensorRT class its methods belong to
TRT_RECEIVERS = {"context": "IExecutionContext", "engine": "ICudaEngine", "config": "IRuntimeConfig",
                 "runtime": "Runtime", "_runtime_cache": "IRuntimeCache"}


def _chain(node: ast.AST) -> list[str]:
    """`a.b.c` -> ['a', 'b', 'c']; a root that is not a plain name (`f().c`) reads as '<expr>'."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id if isinstance(node, ast.Name) else "<expr>", *reversed(names)]


def _calls_and_attributes(path: Path) -> tuple[list[tuple[list[str], ast.Call | None]], set[str]]:
    """Every outermost attribute chain in the file (with its call, if called) and its string literals."""
    tree = ast.parse(path.read_text())
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    chains = [(_chain(node), calls.get(id(node))) for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and id(node) not in inner]
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return chains, strings


def _resolve(root: object, names: list[str]) -> object:
    for name in names:
        assert hasattr(root, name), f"{getattr(root, '__name__', root)} has no {name!r}"
        root = getattr(root, name)
    return root


def _pybind_arities(function: object) -> list[tuple[int, int]]:
    """(required, total) positional counts, self excluded, of each overload in a pybind11 docstring."""
    arities = []
    name = getattr(function, "__name__", "")
    for line in (function.__doc__ or "").splitlines():
        match = re.match(rf"(?:\d+\. )?{name}\((.*)\) ->", line.strip())
        if not match:
            continue
        depth, params, current = 0, [], ""
        for char in match.group(1):
            depth += (char in "[(") - (char in "])")
            if char == "," and depth == 0:
                params.append(current)
                current = ""
            else:
                current += char
        params = [p.strip() for p in params + [current] if p.strip() and not p.strip().startswith("self")]
        arities.append((sum("=" not in p for p in params), len(params)))
    return arities


def test_cuda_calls_exist_in_cuda_bindings_with_these_arguments():
    runtime = pytest.importorskip("cuda.bindings.runtime")
    checked = set()
    for source in (RUNTIME / "cuda.py", RUNTIME / "backends" / "tensorrt.py"):
        chains, strings = _calls_and_attributes(source)
        for chain, call in chains:
            start = next((i for i, name in enumerate(chain) if re.match(r"cuda[A-Z]", name)), None)
            if start is None:
                continue
            target = _resolve(runtime, chain[start:])
            checked.add(chain[start])
            if call is not None and callable(target) and start == len(chain) - 1:
                inspect.signature(target).bind(*call.args)  # TypeError on a wrong argument count
        for name in strings:
            if re.fullmatch(r"cuda[A-Z]\w+", name):  # getattr(cudart(), "cudaFree")
                _resolve(runtime, [name])
                checked.add(name)
    # the calls the backend cannot work without were all seen (the scan did not silently miss them)
    assert {"cudaMalloc", "cudaFree", "cudaMallocHost", "cudaFreeHost", "cudaMemcpyAsync", "cudaStreamBeginCapture",
            "cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphLaunch", "cudaDeviceGetAttribute", "cudaEventCreate", "cudaEventRecord",
            "cudaEventElapsedTime", "cudaEventDestroy"} <= checked


def test_tensorrt_calls_exist_in_tensorrt_rtx_with_these_arguments():
    trt = pytest.importorskip("tensorrt_rtx")
    checked = set()
    for source in (RUNTIME / "backends" / "tensorrt.py", RUNTIME / "tensorrt_lib.py"):
        chains, _ = _calls_and_attributes(source)
        for chain, call in chains:
            if chain[:1] == ["trt"]:
                _resolve(trt, chain[1:])
                checked.add(".".join(chain[1:3]))
                continue
            if len(chain) < 2 or chain[-2] not in TRT_RECEIVERS:
                continue
            receiver = TRT_RECEIVERS[chain[-2]]
            method = _resolve(getattr(trt, receiver), [chain[-1]])
            checked.add(f"{receiver}.{chain[-1]}")
            if call is not None and not any(isinstance(arg, ast.Starred) for arg in call.args):
                arities = _pybind_arities(method)
                assert arities, f"{receiver}.{chain[-1]} has no signature to check"
                given = len(call.args) + len(call.keywords)
                assert any(low <= given <= high for low, high in arities), \
                    f"{receiver}.{chain[-1]} called with {given} arguments; it takes {arities}"
    assert {"IExecutionContext.execute_async_v3", "IExecutionContext.set_device_memory",
            "ICudaEngine.create_execution_context", "IRuntimeConfig.set_runtime_cache",
            "Runtime.deserialize_cuda_engine", "CudaGraphStrategy.WHOLE_GRAPH_CAPTURE"} <= checked


def test_the_fakes_mirror_the_real_execution_context():
    trt = pytest.importorskip("tensorrt_rtx")
    for name in vars(FakeContext):
        if not name.startswith("_") and callable(getattr(FakeContext, name)):
            _resolve(trt.IExecutionContext, [name])
