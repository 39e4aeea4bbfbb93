"""Hires fix's settings checked against the engines: the second pass's size, upscaler, steps, strength,
prompts and sampler (A1111's enable_hr, hr_scale, hr_resize_x / _y, hr_upscaler, hr_second_pass_steps,
denoising_strength, hr_prompt, hr_negative_prompt, hr_sampler_name)."""

from __future__ import annotations

from typing import Any, Callable

from sdrt.errors import InputError, check_text, is_integer
from sdrt.request import Hires, Size
from sdrt.schedulers import check_sampler, strength_start
from sdrt.upscale import LATENT_UPSCALERS, UPSCALERS

MAX_SCALE = 8.0


def hires_size(first: Size, scale: Any, resize_x: Any, resize_y: Any, multiple: int) -> Size:
    """A1111's target: resize_x × resize_y where given (one of them: the other keeps the aspect), else the first
    pass's size × scale; rounded down to the latent grid."""
    for label, v in (("hr_resize_x", resize_x), ("hr_resize_y", resize_y)):
        if not is_integer(v) or v < 0:
            raise InputError(f"{label} must be a whole number of pixels ≥ 0 (0: from hr_scale), got {v!r}")
    if resize_x and resize_y:
        if resize_x * first.height != resize_y * first.width:
            raise InputError(f"hr_resize_x × hr_resize_y ({resize_x}x{resize_y}) changes the aspect of the first pass "
                             f"({first.width}x{first.height}); sdrt does not crop: give one of them, or hr_scale")
        width, height = resize_x, resize_y
    elif resize_x or resize_y:
        width = resize_x or resize_y * first.width // first.height
        height = resize_y or resize_x * first.height // first.width
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale <= MAX_SCALE:
            raise InputError(f"hr_scale must be a number from 1 to {MAX_SCALE:g}, got {scale!r}")
        width, height = int(first.width * scale), int(first.height * scale)
    return Size(height // multiple * multiple, width // multiple * multiple)


def build_hires(first: Size, first_steps: int, schedule: Any, has_image: bool, multiple: int,
                check_size: Callable[[Size], Any],
                enable_hr: bool = False, hr_scale: Any = 2.0, hr_resize_x: Any = 0, hr_resize_y: Any = 0,
                hr_upscaler: Any = None, hr_second_pass_steps: Any = 0, denoising_strength: Any = None,
                hr_prompt: Any = None, hr_negative_prompt: Any = None, hr_sampler: Any = None) -> Hires:
    """The hires group; Hires() when enable_hr is false, and any hr_ setting without it refused."""
    given = {k: v for k, v in dict(hr_upscaler=hr_upscaler, hr_prompt=hr_prompt, hr_negative_prompt=hr_negative_prompt,
                                   hr_sampler=hr_sampler, denoising_strength=denoising_strength).items()
             if v not in (None, "")}
    if not enable_hr:
        if given:
            raise InputError(f"{', '.join(given)} set hires fix up: pass enable_hr=True too")
        return Hires()
    if has_image:
        raise InputError("hires fix is text-to-image then image-to-image: leave image out (inpainting engines, which "
                         "always take one, have no hires fix)")
    upscaler = hr_upscaler or Hires.upscaler
    if upscaler not in UPSCALERS:
        raise InputError(f"hr_upscaler {upscaler!r} is not available: choose one of {', '.join(UPSCALERS)} "
                         "(GET /sdapi/v1/upscalers, /sdapi/v1/latent-upscale-modes)")
    steps = hr_second_pass_steps
    if not is_integer(steps) or steps < 0:
        raise InputError(f"hr_second_pass_steps must be an integer ≥ 0 (0: the first pass's), got {steps!r}")
    strength = Hires.strength if denoising_strength is None else denoising_strength
    strength_start(steps or first_steps, strength, schedule.flow)  # (0, 1] and at least one step
    scheduler = hr_sampler or None
    if scheduler is not None:
        check_sampler(scheduler, steps or first_steps, schedule)
    for label, text in (("hr_prompt", hr_prompt), ("hr_negative_prompt", hr_negative_prompt)):
        if text:
            check_text(text, label)
    size = hires_size(first, hr_scale, hr_resize_x, hr_resize_y, multiple)
    try:
        check_size(size)
    except InputError as e:
        raise InputError(f"hires fix's second pass is {size.width}x{size.height}: {e}") from None
    scale = 0.0 if hr_resize_x or hr_resize_y else float(hr_scale)  # 0: sized by hr_resize (the infotext says which)
    return Hires(True, size, scale, upscaler, int(steps), float(strength), hr_prompt or None,
                 hr_negative_prompt or None, scheduler)


def uses_latents(hires: Hires) -> bool:
    return hires.upscaler in LATENT_UPSCALERS


def check_latents(latents: Any, size: Size, channels: int, factor: int, batch: int, has_images: bool) -> tuple:
    """image_latents: one (C, h, w) array per row at the request's size (img2img from latents)."""
    import numpy as np  # numpy is what latents are; imported here as the checks are rare

    if has_images:
        raise InputError("pass image or image_latents, not both")
    arrays = list(latents) if isinstance(latents, (list, tuple)) else list(np.asarray(latents))
    want = (channels, size.height // factor, size.width // factor)
    if len(arrays) != batch or any(np.shape(a) != want for a in arrays):
        raise InputError(f"image_latents must be {batch} arrays of shape {want} (one per row, at the request's size)")
    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
    if not all(np.isfinite(a).all() for a in arrays):
        raise InputError("image_latents must be finite")
    return tuple(arrays)
