"""The engine interface every backend implements, and device buffers.

A backend owns device memory: `empty` allocates, `write` copies host data into a buffer (so buffers
are allocated once and refilled), `download` brings one back. An engine runs with buffers bound by
name (the manifest's vocabulary); `rows(buffer)` gives views of buffer[i] that bind without a copy,
so per-step scalars and noise are written once before the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sdrt.manifest import ComponentSpec, Manifest, ShapeLimits, verify_files


class Engine(ABC):
    spec: ComponentSpec
    _run_times: list[float] | None = None  # synchronous backends: wall time of each timed run

    @abstractmethod
    def run(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Runs once; inputs and outputs are this backend's buffers or rows of them. On an asynchronous
        backend it only queues the run (Backend.synchronize waits for it)."""

    def start_timing(self) -> None:
        """Times each run from now on, as the device sees it (read with run_times_s)."""
        self._run_times = []

    def run_times_s(self) -> list[float]:
        """Seconds of each run since start_timing, after Backend.synchronize; stops timing."""
        times, self._run_times = self._run_times or [], None
        return times

    def release(self) -> None:
        """Frees what the engine holds on the device (low-VRAM mode)."""

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Runs from now on with these named weights (spec.weights, stored layout and dtype) and every
        other weight as in the engine file (LoRA: base + delta, never delta on delta)."""
        raise NotImplementedError(f"{type(self).__name__} cannot change its weights")


class Backend(ABC):
    name: str

    def verify(self, engine_dir: Path, manifest: Manifest) -> None:
        """Checks what this backend will load (sha256, and for plans: version and GPU) before loading it."""
        verify_files(engine_dir, manifest, [rel for rel in manifest.files if not rel.endswith(".plan")])

    def limits(self, manifest: Manifest) -> ShapeLimits:
        """Sizes and batches the loaded engines accept."""
        return ShapeLimits.of_onnx(manifest.shapes)

    @abstractmethod
    def load(self, engine_dir: Path, manifest: Manifest, component: str,
             weights: Mapping[str, np.ndarray] | None = None) -> Engine:
        """The component's engine, running with `weights` in place of the file's (Engine.set_weights)."""

    @abstractmethod
    def empty(self, shape: Sequence[int], dtype: str) -> Any: ...

    @abstractmethod
    def write(self, buffer: Any, array: np.ndarray) -> None:
        """Copies a host array of the buffer's shape and dtype into it."""

    @abstractmethod
    def rows(self, buffer: Any) -> list[Any]:
        """Bindable views of buffer[i] along the first axis, computed once."""

    @abstractmethod
    def download(self, buffer: Any) -> np.ndarray: ...

    def synchronize(self) -> None:
        """Waits for queued device work (a no-op where runs are synchronous)."""

    def describe(self) -> str:
        return self.name
