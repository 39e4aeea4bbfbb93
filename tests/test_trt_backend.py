"""The TensorRT engine's run logic (bindings, shared activations, CUDA-graph capture and replay)
against a recording fake context and stream: what can be checked without a GPU. The real thing
runs in the gpu-marked tests of test_build.py."""

from __future__ import annotations

import pytest

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

    def create_context(self, engine, static):
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
    assert kinds(backend.log) == ["shape", "address", "address", "size", "memory", "execute", "sync"]
    backend.log.clear()
    engine.run(*buffers(100))  # warm: record this binding, then launch it
    assert kinds(backend.log)[-5:] == ["capture-begin", "execute", "capture-end", "launch", "sync"]
    backend.log.clear()
    engine.run(*buffers(100))  # replay: no binding calls, no enqueue, one launch
    assert kinds(backend.log) == ["launch", "sync"]
    backend.log.clear()
    engine.run(*buffers(200))  # another step's rows: one more capture (shapes already warm)
    assert "capture-begin" in kinds(backend.log) and ("address", "latents", 200) in backend.log
    assert engine.last_run_s > 0


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
