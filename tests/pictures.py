"""Input pictures the image tests share: a smooth picture (for parity), a noise picture (large,
incompressible bodies for the server's limits), a box mask, and their encodings."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def smooth_picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """Gradients plus a disc (random pixels would make the VAE's job moot)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, 1 - x * y], -1)
    rgb[(x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.06] = (0.9, 0.2, 0.1)
    rgb += np.random.default_rng(seed).normal(0, 0.02, rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def noise_picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """Uniform noise: its PNG barely compresses, so its size is predictable."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def box_mask(width: int = 64, height: int = 64, box: tuple[int, int, int, int] = (16, 12, 48, 44)) -> Image.Image:
    """White (repaint) inside box = (left, top, right, bottom), black elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, "L")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()
