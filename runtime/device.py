"""What a generation keeps on the device: the engines (one resident in low-VRAM mode, with their
LoRA weights) and the reused I/O buffers every stage reads and writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdrt.backends.base import Backend, Engine
from sdrt.manifest import Manifest


class Buffers:
    """Device buffers allocated once per (key, shape, dtype) and reused; a new shape replaces the old."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.pool: dict[tuple, Any] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: str) -> Any:
        full = (key, shape, dtype)
        if full not in self.pool:
            self.pool = {k: v for k, v in self.pool.items() if k[0] != key}  # shape changed
            self.pool[full] = self.backend.empty(shape, dtype)
        return self.pool[full]

    def write(self, key: str, array: np.ndarray) -> Any:
        """array copied into the reused buffer `key`."""
        buffer = self.get(key, array.shape, array.dtype.name)
        self.backend.write(buffer, array)
        return buffer

    def constant(self, key: str, shape: tuple[int, ...], value: float) -> Any:
        """A float32 buffer of `value`, written when first allocated for this shape, then reused as is
        (read-only inputs: text-to-image's no-op blend, img2img's empty pixel mask)."""
        if (key, shape, "float32") not in self.pool:
            return self.write(key, np.full(shape, value, np.float32))
        return self.pool[(key, shape, "float32")]

    def download(self, buffer: Any) -> np.ndarray:
        return self.backend.download(buffer)


class Engines:
    """The loaded engines by component; in low-VRAM mode only one is resident at a time."""

    def __init__(self, backend: Backend, engine_dir: Path, manifest: Manifest, low_vram: bool = False):
        self.backend = backend
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.low_vram = low_vram
        self.loaded: dict[str, Engine] = {}
        self.adapters: tuple = ((), ())  # (LoRAs, ControlNet files) the engines run with now (Pipeline._apply_loras)
        self.weights: dict[str, dict[str, np.ndarray]] = {}  # their changed weights, by component

    def __getitem__(self, name: str) -> Engine:
        if name not in self.loaded:
            if self.low_vram:
                self.backend.synchronize()  # the last one may still be running
                for engine in self.loaded.values():
                    engine.release()
                self.loaded.clear()
            self.loaded[name] = self.backend.load(self.engine_dir, self.manifest, name, self.weights.get(name))
        return self.loaded[name]

    def set_weights(self, adapters: tuple, weights: dict[str, dict[str, np.ndarray]]) -> None:
        """The engines' changed weights become `weights` (those of `adapters`); engines loaded later get them too."""
        self.backend.synchronize()
        for name in set(weights) | set(self.weights):
            if name in self.loaded:
                self.loaded[name].set_weights(weights.get(name, {}))
        self.weights, self.adapters = weights, adapters


class Device:
    """The backend, the engines and the buffers a generation's stages share."""

    def __init__(self, backend: Backend, engine_dir: Path, manifest: Manifest, low_vram: bool = False):
        self.backend = backend
        self.manifest = manifest
        self.model = manifest.model
        self.engines = Engines(backend, engine_dir, manifest, low_vram)
        self.buffers = Buffers(backend)
