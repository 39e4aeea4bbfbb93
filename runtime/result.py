"""What a generation returns: the images, the request they answer, and where the time went."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdrt.png import a1111_parameters
from sdrt.request import GenerationConfig


@dataclass
class Timings:
    text_encoder_s: float = 0.0
    image_encoder_s: float = 0.0  # the VAE encoder, image-to-image and inpainting
    steps_s: float = 0.0  # uploads of the plan and noise + the loop
    loop_s: float = 0.0  # the loop alone
    step_engine_s: list[float] = field(default_factory=list)
    decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def host_overhead_per_step_s(self) -> float:
        """Loop time not spent inside the engine call, per step."""
        n = max(len(self.step_engine_s), 1)
        return max(self.loop_s - sum(self.step_engine_s), 0.0) / n

    def line(self) -> str:
        n = max(len(self.step_engine_s), 1)
        encoder = f"image encoder {self.image_encoder_s * 1e3:.1f} ms | " if self.image_encoder_s else ""
        return (f"text encoder {self.text_encoder_s * 1e3:.1f} ms | {encoder}steps {self.steps_s * 1e3:.1f} ms "
                f"({self.steps_s / n * 1e3:.2f} ms/step, host {self.host_overhead_per_step_s * 1e6:.0f} µs/step) | "
                f"decode {self.decode_s * 1e3:.1f} ms | total {self.total_s * 1e3:.1f} ms")


@dataclass
class Result:
    images: np.ndarray  # (B, H, W, 3) uint8
    config: GenerationConfig
    seeds: list[int]
    timings: Timings
    model_name: str
    model_hash: str  # A1111's 10-hex short hash (Manifest.model_hash)
    rows: list[int]  # the config row of each image (all rows, unless some were dropped)
    latents: np.ndarray | None = None  # (B, C, h, w) f32 of the images, when generate() was asked to keep them

    def parameters(self, index: int) -> str:
        return a1111_parameters(self.config, self.seeds[index], self.rows[index], self.model_name, self.model_hash)

    def pil_images(self) -> list[Any]:
        from PIL import Image  # Pillow is a runtime dependency; imported here to keep `import sdrt` cheap

        out = []
        for i, array in enumerate(self.images):
            image = Image.fromarray(array, "RGB")
            image.info["parameters"] = self.parameters(i)
            out.append(image)
        return out
