"""The decode stage: latents on the device -> uint8 images on the host, in one VAE call and one
download (in low-VRAM mode, tile by tile above the tile size), then inpainting's overlay."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sdrt.device import Device
from sdrt.images import overlay
from sdrt.manifest import ShapeLimits
from sdrt.request import GenerationConfig
from sdrt.tiling import decode_tiled

DECODER = "vae_decoder"


def tiles_decode(limits: ShapeLimits, low_vram: bool, tile: int, height: int, width: int) -> bool:
    """Low-VRAM mode, an image larger than a tile, and engines that accept the tile size."""
    fits = all(lo <= min(tile, size) <= hi for size, (lo, _, hi) in ((height, limits.height), (width, limits.width)))
    return low_vram and max(height, width) > tile and fits


def decode(device: Device, latents: Any, b: int, height: int, width: int, tile: int | None) -> np.ndarray:
    """(b, 4, h, w) latents -> (b, H, W, 3) uint8; tile: pixels of a tile, None for one call."""
    f, buffers = device.model.vae_scale_factor, device.buffers
    if tile is not None:
        def decode_tile(tile_latents: np.ndarray) -> np.ndarray:
            th, tw = tile_latents.shape[2:]
            images = buffers.get("tile_images", (b, th * f, tw * f, 3), "uint8")
            device.engines[DECODER].run({"latents": buffers.write("tile_latents", tile_latents)}, {"images": images})
            return buffers.download(images)

        return decode_tiled(buffers.download(latents), decode_tile, f, tile // f, tile // f // 4)  # overlap: 1/4 tile
    images = buffers.get("images", (b, height, width, 3), "uint8")
    device.engines[DECODER].run({"latents": latents}, {"images": images})
    return buffers.download(images).copy()


def finish(images: np.ndarray, config: GenerationConfig, in_batch: Sequence[int], alive: Sequence[int]) -> np.ndarray:
    """The wanted rows' images; inpainting's kept pixels are the original's, not their VAE round trip."""
    if list(alive) != list(in_batch):  # rows dropped after the last step
        images = images[[list(in_batch).index(row) for row in alive]]
    image = config.image
    if image.masks:
        images = np.stack([overlay(im, image.images[row], image.masks[row], image.mask_blur)
                           for im, row in zip(images, alive)])
    return images
