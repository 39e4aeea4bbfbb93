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
    last_run_s: float = 0.0  # wall time of the last call into the engine itself

    @abstractmethod
    def run(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Runs once; inputs and outputs are this backend's buffers or rows of them."""

    def release(self) -> None:
        """Frees what the engine holds on the device (low-VRAM mode)."""


class Backend(ABC):
    name: str

    def verify(self, engine_dir: Path, manifest: Manifest) -> None:
        """Checks what this backend will load (sha256, and for plans: version and GPU) before loading it."""
        verify_files(engine_dir, manifest, [rel for rel in manifest.files if not rel.endswith(".plan")])

    def limits(self, manifest: Manifest) -> ShapeLimits:
        """Sizes and batches the loaded engines accept."""
        return ShapeLimits.of_onnx(manifest.shapes)

    @abstractmethod
    def load(self, engine_dir: Path, manifest: Manifest, component: str) -> Engine: ...

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
