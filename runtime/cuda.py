"""The little of CUDA the TensorRT backend needs, through `cuda-bindings` (no torch): device and
pinned memory, one stream, async copies, CUDA-graph capture and event timing. Every call is checked."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
from sdrt.errors import BackendError


def cudart() -> Any:
    """cuda.bindings.runtime, or a BackendError that says how to install it."""
    try:
        from cuda.bindings import runtime
    except ImportError as e:
        raise BackendError("the TensorRT backend needs cuda-bindings: `pip install cuda-bindings` (the CUDA major "
                           "version of your TensorRT)") from e
    return runtime


def check(result: Any) -> Any:
    """Unwraps a cuda-bindings (err, value...) tuple, raising on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed: {getattr(err, 'name', err)}. Is the NVIDIA driver loaded and the "
                           "GPU free?")
    return values[0] if len(values) == 1 else values or None


def gpu_arch(device: int = 0) -> str | None:
    """'sm86' for the GPU here, None without cuda-bindings, a driver or a GPU."""
    try:
        rt = cudart()
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0 or count <= device:
            return None
        major = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device))
        minor = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device))
    except BackendError:
        return None
    return f"sm{major}{minor}"


class _Allocation:
    """Memory from one CUDA allocator call, freed explicitly or when collected."""

    _free_name = ""

    def free(self) -> None:
        if self.ptr:
            check(getattr(cudart(), self._free_name)(self.ptr))
            self.ptr = 0

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass


class DeviceMemory(_Allocation):
    """One cudaMalloc block."""

    _free_name = "cudaFree"

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes)))


class PinnedMemory(_Allocation):
    """Page-locked host memory (fast, truly async copies), viewed as numpy arrays."""

    _free_name = "cudaFreeHost"

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMallocHost(self.nbytes)))

    def view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if count > self.nbytes:
            raise BackendError(f"pinned buffer of {self.nbytes} bytes cannot hold {count}")
        raw = (ctypes.c_char * count).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class Stream:
    def __init__(self) -> None:
        rt = cudart()
        self._cudart = rt
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self.ptr = int(self.handle)  # what TensorRT's execute_async_v3 takes

    def copy_to_device(self, dst: int, src: int, nbytes: int) -> None:
        check(self._cudart.cudaMemcpyAsync(dst, src, nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                           self.handle))

    def copy_to_host(self, dst: int, src: int, nbytes: int) -> None:
        check(self._cudart.cudaMemcpyAsync(dst, src, nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                           self.handle))

    def synchronize(self) -> None:
        check(self._cudart.cudaStreamSynchronize(self.handle))

    def capture(self, enqueue: Callable[[], None]) -> CudaGraph:
        """Records what enqueue() puts on this stream into a replayable graph (nothing runs)."""
        cudart = self._cudart
        check(cudart.cudaStreamBeginCapture(self.handle, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            enqueue()
        finally:
            graph = check(cudart.cudaStreamEndCapture(self.handle))
        try:
            executable = check(cudart.cudaGraphInstantiate(graph, 0))
        finally:
            check(cudart.cudaGraphDestroy(graph))
        return CudaGraph(executable, self)

    def timer(self) -> EventTimer:
        return EventTimer(self)


class EventTimer:
    """Device time of spans of work queued on a stream: an event pair around each, read once the stream
    has been synchronized. The host never waits between spans, so it queues step i+1 while step i runs.
    Event pairs are created once and reused by every later round of spans."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self._pairs: list[tuple[Any, Any]] = []
        self._used = 0

    def reset(self) -> None:
        self._used = 0

    def start(self) -> None:
        rt = self.stream._cudart
        if self._used == len(self._pairs):
            self._pairs.append((check(rt.cudaEventCreate()), check(rt.cudaEventCreate())))
        check(rt.cudaEventRecord(self._pairs[self._used][0], self.stream.handle))

    def stop(self) -> None:
        check(self.stream._cudart.cudaEventRecord(self._pairs[self._used][1], self.stream.handle))
        self._used += 1

    def spans_s(self) -> list[float]:
        """Seconds of each span since reset() (call after the stream is synchronized)."""
        rt = self.stream._cudart
        return [float(check(rt.cudaEventElapsedTime(start, end))) / 1e3 for start, end in self._pairs[:self._used]]

    def __del__(self) -> None:
        try:
            for pair in self._pairs:
                for event in pair:
                    self.stream._cudart.cudaEventDestroy(event)
        except Exception:
            pass


class CudaGraph:
    def __init__(self, executable: Any, stream: Stream):
        self.executable = executable
        self.stream = stream

    def launch(self) -> None:
        check(self.stream._cudart.cudaGraphLaunch(self.executable, self.stream.handle))

    def __del__(self) -> None:
        try:
            self.stream._cudart.cudaGraphExecDestroy(self.executable)
        except Exception:
            pass
