"""OpenAI's image request bodies (`/v1/images/generations`, multipart `/v1/images/edits`) and their
translation to the request (sdrt.validation).

prompt, n, size, response_format=b64_json; seed, steps, guidance_scale, negative_prompt, scheduler
(and strength for edits) are sdrt extensions (`extra_body` in the openai client), as are SDXL's
micro-conditioning and SD 3.5's skip-layer guidance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import ConfigDict

from sdrt.errors import InputError, is_digits
from sdrt.images import open_image, read_mask
from sdrt.pipeline import Pipeline
from sdrt.request import GenerationConfig
from sdrt.serve.a1111_requests import sampler_for
from sdrt.serve.config import ServeConfig
from sdrt.serve.request_fields import Int, MicroConditioning, SkipLayerGuidance, check_common, first, random_if_unset


class ImagesRequest(MicroConditioning, SkipLayerGuidance):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    n: Int = 1
    size: str | None = None  # "WxH"; None or "auto": the engines' default size
    response_format: str | None = None  # b64_json (url is refused: sdrt stores nothing)
    model: str | None = None
    # sdrt extensions
    seed: Int | None = None
    steps: Int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None  # diffusers' meaning: unset is no negative, "" the encoded empty string
    scheduler: str | None = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(is_digits(p) and len(p) <= 5 for p in parts):
        raise InputError(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512'), got {size!r}")
    return int(parts[1]), int(parts[0])


def openai_config(req: ImagesRequest, pipe: Pipeline, cfg: ServeConfig, **images: Any) -> GenerationConfig:
    if req.response_format not in (None, "b64_json"):
        raise InputError(f"response_format {req.response_format!r} is not supported: sdrt returns images inline, "
                         "use response_format='b64_json'")
    height, width = parse_size(req.size)
    steps = first(req.steps, cfg.default_steps, pipe.model.defaults.steps)
    check_common(cfg, [req.prompt, req.negative_prompt or ""], steps, req.n, height, width)
    scheduler = sampler_for(req.scheduler, None, first(cfg.default_scheduler, pipe.model.defaults.sampler))
    return pipe.make_config([req.prompt] * req.n, negative_prompt=req.negative_prompt, steps=steps,
                            guidance=req.guidance_scale, scheduler=scheduler, height=height, width=width,
                            seed=random_if_unset(req.seed), **req.micro(), **images, **req.skip_layer_guidance(),
                            max_rows=cfg.max_images_per_request)


def openai_edit_config(form: dict[str, Any], pipe: Pipeline, cfg: ServeConfig) -> GenerationConfig:
    """/v1/images/edits from its multipart fields: `image` (file; `image[]` too), optional `mask` (a PNG
    whose transparent pixels are edited, OpenAI's rule; without alpha, white = edit), prompt, n, size;
    sdrt extensions as in generations plus strength (default 1 with a mask, else 0.75). Without a mask,
    the image's own transparent pixels are the mask when it has any; with none, it is img2img."""
    image = form.get("image", form.get("image[]"))
    if not isinstance(image, bytes):
        raise InputError("the edit needs an `image` file (multipart/form-data)")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    numbers: dict[str, Any] = {}
    for name in ("n", "seed", "steps"):
        if name in fields:
            if not is_digits(fields[name]) or len(fields[name]) > 10:
                raise InputError(f"{name} must be a non-negative integer, got {fields[name]!r}")
            numbers[name] = int(fields[name])
    for name in ("guidance_scale", "strength"):
        if name in fields:
            try:
                numbers[name] = float(fields[name])
            except ValueError:
                raise InputError(f"{name} must be a number, got {fields[name]!r}") from None
    strength = numbers.pop("strength", None)
    try:
        req = ImagesRequest(**{k: v for k, v in fields.items() if k in ImagesRequest.model_fields and k not in numbers},
                            **numbers)
    except ValueError as e:
        raise InputError(f"invalid edit request: {e}") from None
    mask = form.get("mask")
    mask_image = openai_mask(mask if isinstance(mask, bytes) else image, required=isinstance(mask, bytes))
    return openai_config(req, pipe, cfg, image=image, mask_image=mask_image,
                         strength=strength if strength is not None else (1.0 if mask_image is not None else None))


def openai_mask(data: bytes, required: bool) -> Any:
    """A white = repaint mask from OpenAI's: the transparent pixels of a PNG with alpha. A mask file
    without alpha is read as sdrt's own (white = repaint); an image without transparency gives None."""
    source = open_image(data, "mask" if required else "image")
    if "A" in source.getbands() or source.mode == "P" and "transparency" in source.info:
        alpha = np.asarray(source.convert("RGBA"))[..., 3]
        if not required and alpha.min() >= 128:
            return None  # an opaque image: no edit area of its own
        return (alpha < 128).astype(np.uint8) * 255
    return read_mask(source, "mask") if required else None
