"""Hires fix's upscalers: A1111's "Latent" family on the latents, and the plain resamplers on pixels.

The latent modes are torch.nn.functional.interpolate's (size given, align_corners=False), as A1111 calls
it, written as one (out, in) weight matrix per axis: latents' = W_h · latents · W_wᵀ.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# A1111's hr_upscaler name -> (interpolate mode, antialias) on latents
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("Lanczos", "Nearest")  # PIL's resamplers, as A1111's of those names
UPSCALERS = tuple(LATENT_UPSCALERS) + PIXEL_UPSCALERS


def _cubic(a: float) -> Callable[[float], float]:
    """Keys' cubic convolution kernel (torch: a = -0.75; its antialiased path, as PIL: a = -0.5)."""
    def kernel(x: float) -> float:
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0
    return kernel


def _antialiased(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """torch's antialiased interpolation (PIL's): the filter stretched by the downscale, weights normalised."""
    scale = n_in / n_out
    support, kernel = (1.0, lambda x: max(0.0, 1 - abs(x))) if mode == "bilinear" else (2.0, _cubic(-0.5))
    stretch = max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for d in range(n_out):
        center = scale * (d + 0.5)
        lo, hi = max(int(center - support * stretch + 0.5), 0), min(int(center + support * stretch + 0.5), n_in)
        for j in range(lo, hi):
            w[d, j] = kernel((j - center + 0.5) / stretch)
        w[d] /= w[d].sum()
    return w


def _plain(n_in: int, n_out: int, mode: str) -> np.ndarray:
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    for d in range(n_out):
        if mode in ("nearest", "nearest-exact"):
            w[d, min(int(math.floor((d + (0.5 if mode == "nearest-exact" else 0.0)) * scale)), n_in - 1)] = 1.0
            continue
        src = scale * (d + 0.5) - 0.5
        if mode == "bilinear":
            src = max(src, 0.0)
            i = min(int(math.floor(src)), n_in - 1)
            t = src - i
            w[d, i] += 1 - t
            w[d, min(i + 1, n_in - 1)] += t
        else:  # bicubic: four taps, clamped at the borders
            i = int(math.floor(src))
            t = src - i
            for k, x in zip(range(i - 1, i + 3), (1 + t, t, 1 - t, 2 - t)):
                w[d, min(max(k, 0), n_in - 1)] += _cubic(-0.75)(x)
    return w


def interpolation_matrix(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    """(n_out, n_in) weights of one axis."""
    return (_antialiased if antialias and mode in ("bilinear", "bicubic") else _plain)(n_in, n_out, mode)


def upscale_latents(latents: np.ndarray, height: int, width: int, upscaler: str) -> np.ndarray:
    """(B, C, h, w) -> (B, C, height, width) with A1111's latent upscaler of that name."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    w_h = interpolation_matrix(latents.shape[2], height, mode, antialias)
    w_w = interpolation_matrix(latents.shape[3], width, mode, antialias)
    out = np.einsum("hi,bcij,wj->bchw", w_h, latents.astype(np.float64), w_w)
    return np.ascontiguousarray(out, dtype=np.float32)


def upscale_pixels(images: np.ndarray, height: int, width: int, upscaler: str) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, height, width, 3) with PIL's resampler of that name."""
    from PIL import Image  # a runtime dependency; imported here to keep `import sdrt` cheap

    method = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}[upscaler]
    return np.stack([np.asarray(Image.fromarray(image).resize((width, height), method)) for image in images])
