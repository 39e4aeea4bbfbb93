"""The engine interface every backend implements, and device buffers.

A backend owns device memory: `empty`/`upload` give buffers, `download` brings one back. An engine
runs with buffers bound by name (the manifest's vocabulary); `Row(buffer, i)` binds buffer[i]
without a copy, so per-step scalars and noise are uploaded once before the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdrt.manifest import ComponentSpec


@dataclass(frozen=True)
class Row:
    """buffer[index] along the first axis, bound in place."""

    buffer: Any
    index: int


class Engine(ABC):
    spec: ComponentSpec

    @abstractmethod
    def run(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Runs once; inputs and outputs are this backend's buffers (or Rows of them)."""

    def release(self) -> None:
        """Frees what the engine holds on the device (low-VRAM mode)."""


class Backend(ABC):
    name: str

    @abstractmethod
    def load(self, engine_dir: Path, component: str, spec: ComponentSpec) -> Engine: ...

    @abstractmethod
    def empty(self, shape: Sequence[int], dtype: str) -> Any: ...

    @abstractmethod
    def upload(self, array: np.ndarray) -> Any: ...

    @abstractmethod
    def download(self, buffer: Any) -> np.ndarray: ...

    def synchronize(self) -> None:
        """Waits for queued device work (a no-op where runs are synchronous)."""

    def describe(self) -> str:
        return self.name
