"""What the A1111 and OpenAI request bodies share: whole-character strings, SDXL micro-conditioning
and SD 3.5 skip-layer guidance fields (sdrt extensions on both APIs), the server's own limits, and
images sent as base64. Defaults are the request record's (sdrt.request), never a second copy."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import BaseModel, Strict, model_validator

from sdrt.errors import InputError, check_text
from sdrt.request import SkipLayers
from sdrt.serve.config import ServeConfig

Int = Annotated[int, Strict()]  # JSON integers only: `true` is not 1 step, 20.5 is not 20


def check_strings(value: Any, label: str) -> None:
    """Every string in a JSON value (keys too) is valid Unicode, else an InputError naming where."""
    if isinstance(value, str):
        check_text(value, label)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_strings(item, label)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(key, label)
            check_strings(item, f"{label}.{key}")


class Request(BaseModel):
    """Every string anywhere in a request is valid Unicode (checked before it can join a batch)."""

    @model_validator(mode="after")
    def _whole_characters(self) -> "Request":
        for name in type(self).model_fields:
            check_strings(getattr(self, name), name)
        return self


class MicroConditioning(Request):
    """SDXL micro-conditioning, [height, width] pixels (sdrt extensions on both APIs)."""

    original_size: list[Int] | None = None
    crop_top_left: list[Int] | None = None
    target_size: list[Int] | None = None

    def micro(self) -> dict[str, Any]:
        return {"original_size": self.original_size, "crop_top_left": self.crop_top_left,
                "target_size": self.target_size}


class SkipLayerGuidance(Request):
    """SD 3.5's skip-layer guidance (sdrt extensions on both APIs, diffusers' names and defaults)."""

    skip_guidance_layers: list[Int] | None = None
    skip_layer_guidance_scale: float = SkipLayers.scale
    skip_layer_guidance_start: float = SkipLayers.start
    skip_layer_guidance_stop: float = SkipLayers.stop

    def skip_layer_guidance(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SkipLayerGuidance.model_fields}


def check_common(cfg: ServeConfig, prompts: list[str], steps: int, images: int, height: int | None,
                  width: int | None) -> None:
    if any(len(p) > cfg.max_prompt_chars for p in prompts):
        raise InputError(f"prompts are limited to {cfg.max_prompt_chars} characters on this server")
    if not 1 <= steps <= cfg.max_steps:
        raise InputError(f"steps must be from 1 to {cfg.max_steps}, got {steps}")
    if not 1 <= images <= cfg.max_images_per_request:
        raise InputError(f"a request makes 1 to {cfg.max_images_per_request} images, got {images}")
    if cfg.max_size is not None:
        for label, v in (("height", height), ("width", width)):
            if v is not None and v > cfg.max_size:
                raise InputError(f"{label} is limited to {cfg.max_size} on this server, got {v}")


def decode_base64(value: str, what: str) -> bytes:
    """An image sent as base64 text, with or without a data: URL prefix (A1111's clients send both)."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not base64 image data: send the file's bytes base64-encoded") from None


def first(*values: Any) -> Any:
    """The first value that is set: the request's, the server's, the engines'."""
    return next(v for v in values if v is not None)


def random_if_unset(seed: int | None) -> int | None:
    """The request's seed for sdrt.validation: A1111's -1 (and OpenAI's unset) is a random one."""
    return None if seed is None or seed == -1 else seed
