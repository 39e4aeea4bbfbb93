"""Input images and masks on the host: reading, resizing, the latent mask and the final overlay.

Conventions (diffusers' VaeImageProcessor, AUTOMATIC1111): images are RGB uint8 (H, W, 3); a mask
is grayscale, white (≥ 128 after resizing) = repaint, black = keep; sizes are resized with Lanczos.
All of this runs once per generation, never per step.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sdrt.errors import InputError

MAX_PIXELS = 64 * 1024 * 1024  # decoded size refused above this (PIL's decompression-bomb guard is 89M)


@dataclass(frozen=True, eq=False)  # compared by identity: a config holds them, never hashes their pixels
class Picture:
    """One decoded image (H, W, 3) uint8 RGB, or one mask (H, W) uint8 with values 0 / 255."""

    pixels: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL says it."""
        return self.pixels.shape[1], self.pixels.shape[0]


def open_image(value: Any, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray)):
        try:
            image = Image.open(io.BytesIO(value))
            if image.width * image.height > MAX_PIXELS:
                raise InputError(f"{what} is {image.width}x{image.height} pixels, more than sdrt decodes "
                                 f"({MAX_PIXELS} pixels): resize it first")
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{what} is not a readable image ({type(e).__name__}: {e}): send a PNG, JPEG "
                             "or WebP file") from None
    elif isinstance(value, np.ndarray):
        array = value
        if array.dtype != np.uint8:
            raise InputError(f"{what} as an array must be uint8 (0-255), got {array.dtype}")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise InputError(f"{what} as an array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
        image = Image.fromarray(np.ascontiguousarray(array))
    else:
        raise InputError(f"{what} must be a PIL image, a uint8 array or encoded image bytes, "
                         f"got {type(value).__name__}")
    if image.width < 1 or image.height < 1:
        raise InputError(f"{what} is empty ({image.width}x{image.height})")
    return image


def read_image(value: Any, what: str = "image") -> Any:
    """A PIL RGB image from a PIL image, a uint8 array or encoded bytes; transparent pixels as stored."""
    return open_image(value, what).convert("RGB")


def read_mask(value: Any, what: str = "mask") -> Any:
    """A PIL grayscale ("L") mask (PIL's luma of a colour mask)."""
    return open_image(value, what).convert("L")


def resized(image: Any, width: int, height: int) -> Any:
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def picture(image: Any) -> Picture:
    return Picture(np.asarray(image, dtype=np.uint8).copy())


def mask_picture(mask: Any, invert: bool) -> Picture:
    """The resized mask binarized as diffusers' mask processor does (≥ 0.5 of white = repaint), 0 / 255."""
    values = np.asarray(mask, dtype=np.uint8)
    binary = values >= 128
    return Picture(np.where(binary != invert, 255, 0).astype(np.uint8))


def latent_mask(masks: Sequence[Picture], factor: int) -> np.ndarray:
    """(B, 1, H/f, W/f) float32, 1 = repaint: nearest-neighbour downsampling (torch's interpolate,
    the pixel at the top-left of each f x f block), as diffusers' inpainting pipelines."""
    return np.stack([(m.pixels[::factor, ::factor] > 0).astype(np.float32)[None] for m in masks])


def pixel_mask(masks: Sequence[Picture]) -> np.ndarray:
    """(B, H, W, 1) float32, 1 = repaint: the pixels an inpainting U-Net's masked image leaves gray."""
    return np.stack([(m.pixels > 0).astype(np.float32)[..., None] for m in masks])


def overlay(generated: np.ndarray, original: Picture, mask: Picture, blur: int) -> np.ndarray:
    """(H, W, 3) uint8: the original where the mask (Gaussian-blurred by `blur` pixels) keeps it, the
    generated image where it repaints — A1111's and diffusers' apply_overlay, without PIL's 8-bit
    premultiplication steps."""
    from PIL import Image, ImageFilter

    alpha = Image.fromarray(mask.pixels, "L")
    if blur > 0:
        alpha = alpha.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(alpha, dtype=np.float32)[..., None] / 255.0
    out = a * generated.astype(np.float32) + (1 - a) * original.pixels.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
