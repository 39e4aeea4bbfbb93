"""Tiled VAE decode (low-VRAM mode): overlapping latent tiles decoded one at a time and blended.

The decoder's activations grow with the image (at 1024² its mid-block attention alone is 16k×16k
per head); a tile bounds them. Tiles overlap and are blended with linear ramps so seams do not
show; the result is close to, not equal to, a full decode (group norms and attention see one tile).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` covering [0, length) with at least `overlap` between neighbours."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _ramp(size: int, ramp: int, left: bool, right: bool) -> np.ndarray:
    """1 inside, rising linearly over `ramp` pixels on the sides that have a neighbour."""
    x = np.arange(size, dtype=np.float32) + 0.5
    w = np.ones(size, np.float32)
    if left:
        w = np.minimum(w, x / ramp)
    if right:
        w = np.minimum(w, (size - x) / ramp)
    return w


def tiles(h: int, w: int, tile: int, overlap: int) -> Iterator[tuple[int, int, int, int]]:
    """(y, x, th, tw) latent tiles covering an h × w latent."""
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
            yield y, x, min(tile, h), min(tile, w)


def decode_tiled(latents: np.ndarray, decode: Callable[[np.ndarray], np.ndarray], scale: int, tile: int,
                 overlap: int) -> np.ndarray:
    """latents (B, C, h, w) -> uint8 (B, h*scale, w*scale, 3), decoding (B, C, th, tw) tiles."""
    b, _, h, w = latents.shape
    out = np.zeros((b, h * scale, w * scale, 3), np.float32)
    weight = np.zeros((h * scale, w * scale, 1), np.float32)
    ramp = overlap * scale
    for y, x, th, tw in tiles(h, w, tile, overlap):
        image = decode(np.ascontiguousarray(latents[:, :, y : y + th, x : x + tw])).astype(np.float32)
        wy = _ramp(th * scale, ramp, y > 0, y + th < h)  # ramps only where a neighbour overlaps
        wx = _ramp(tw * scale, ramp, x > 0, x + tw < w)
        tile_weight = (wy[:, None] * wx[None, :])[..., None]  # (TH, TW, 1)
        out[:, y * scale : (y + th) * scale, x * scale : (x + tw) * scale] += image * tile_weight
        weight[y * scale : (y + th) * scale, x * scale : (x + tw) * scale] += tile_weight
    return np.clip(np.rint(out / weight), 0, 255).astype(np.uint8)
