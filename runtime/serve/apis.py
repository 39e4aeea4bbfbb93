"""Request bodies of the two APIs sdrt speaks, and their translation to a GenerationConfig.

AUTOMATIC1111 (`/sdapi/v1/txt2img`, `/sdapi/v1/img2img`): fields sdrt does not implement are accepted
at their defaults (clients such as webuiapi send them all) and refused with a 400 when turned on.
OpenAI (`/v1/images/generations`, multipart `/v1/images/edits`): prompt, n, size,
response_format=b64_json; seed, steps, guidance_scale, negative_prompt, scheduler (and strength for
edits) are sdrt extensions (`extra_body` in the openai client).
On both APIs, original_size, crop_top_left and target_size ([height, width] pixels) set SDXL's
micro-conditioning (sdrt extensions; refused by engines of families without it).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Strict, model_validator

from sdrt.errors import InputError, check_text, is_digits
from sdrt.manifest import Manifest, ModelInfo
from sdrt.pipeline import INPAINTING_FILLS, GenerationConfig, Pipeline, first_seed_max, random_seed
from sdrt.schedulers import A1111_SAMPLERS, SAMPLERS, a1111_labels, from_a1111
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
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2

    def skip_layer_guidance(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SkipLayerGuidance.model_fields}


class Txt2ImgRequest(MicroConditioning, SkipLayerGuidance):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: Int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated in A1111; used when sampler_name is absent
    scheduler: str | None = None  # A1111 >= 1.9: "Automatic", "Karras", ...
    steps: Int | None = None
    cfg_scale: float = 7.0
    width: Int | None = None
    height: Int | None = None
    batch_size: Int = 1
    n_iter: Int = 1
    send_images: bool = True  # false: the answer carries info and parameters, no images
    # accepted at their defaults, refused when turned on
    save_images: bool = False
    enable_hr: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0.0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    # A1111 applies any option here for the request; sdrt reads CLIP_stop_at_last_layers (clip skip)
    override_settings: dict[str, Any] | None = None

    def clip_skip(self, model: ModelInfo, server_value: int) -> dict[str, Any]:
        """make_config's clip_skip: CLIP_stop_at_last_layers (the request's override, else the server's
        option) where the model takes one (A1111 ignores it for SDXL, and so does sdrt)."""
        value = (self.override_settings or {}).get("CLIP_stop_at_last_layers")
        value = server_value if value is None else value
        return {"clip_skip": value} if model.clip_skip_max > 1 else {}

    def unsupported(self) -> list[str]:
        out = [name for name in ("save_images", "enable_hr", "restore_faces", "tiling", "styles", "script_name",
                                 "alwayson_scripts") if getattr(self, name)]
        return out + (["subseed_strength"] if self.subseed_strength else [])

    def images_in(self) -> dict[str, Any]:
        """make_config's image arguments: none for txt2img."""
        return {}

    def echoed(self) -> dict[str, Any]:
        """The `parameters` A1111 answers with: the request."""
        return self.model_dump()


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's img2img: txt2img's fields plus the images. resize_mode 0 (just resize) only; inpainting
    of the whole picture (inpaint_full_res false); inpainting_fill 1 original, 2 latent noise, 3 latent
    nothing (0, fill, and A1111's defaults of 0 and "only masked" are refused with a mask)."""

    init_images: list[str]
    mask: str | None = None
    resize_mode: Int = 0
    denoising_strength: float = 0.75
    mask_blur: Int = 4
    mask_blur_x: Int | None = None
    mask_blur_y: Int | None = None
    inpainting_fill: Int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: Int = 0
    inpainting_mask_invert: Int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False
    image_cfg_scale: float | None = None  # InstructPix2Pix only; ignored as A1111 does for other models

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.resize_mode != 0:
            out.append("resize_mode other than 0 (just resize)")
        if self.initial_noise_multiplier not in (None, 1.0):
            out.append("initial_noise_multiplier")
        if self.include_init_images:
            out.append("include_init_images")
        if any(b not in (None, self.mask_blur) for b in (self.mask_blur_x, self.mask_blur_y)):
            out.append("mask_blur_x/mask_blur_y other than mask_blur")
        if self.mask is not None and self.inpaint_full_res:
            out.append("inpaint_full_res ('only masked'; set it false to inpaint the whole picture)")
        if self.mask is not None and self.inpainting_fill not in INPAINTING_FILLS:
            out.append(f"inpainting_fill {self.inpainting_fill} (use 1 original, 2 latent noise or 3 latent nothing)")
        return out

    def images_in(self) -> dict[str, Any]:
        inits = [decode_base64(x, f"init_images[{i}]") for i, x in enumerate(self.init_images)]
        if len(inits) not in (1, self.batch_size):
            raise InputError(f"init_images must hold 1 image or batch_size ({self.batch_size}), got {len(inits)}")
        images = dict(image=inits[0] if len(inits) == 1 else inits * self.n_iter, strength=self.denoising_strength)
        if self.mask is not None:
            images.update(mask_image=decode_base64(self.mask, "mask"), mask_blur=self.mask_blur,
                          inpainting_fill=INPAINTING_FILLS[self.inpainting_fill],
                          inpainting_mask_invert=bool(self.inpainting_mask_invert))
        return images

    def echoed(self) -> dict[str, Any]:
        return self.model_dump() | {"init_images": None, "mask": None}  # as A1111 without include_init_images


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


def sampler_for(name: str | None, scheduler: str | None, default: str) -> str:
    """An A1111 sampler label and schedule type (or an sdrt sampler name) -> an sdrt sampler name."""
    automatic = (scheduler or "automatic").strip().lower() == "automatic"
    if not name:
        if automatic:
            return default
        name = A1111_SAMPLERS[default][0]  # the default sampler on the asked schedule
    if name in SAMPLERS and automatic:
        return name
    found = from_a1111(name, scheduler)
    if found is not None:
        return found
    kinds = [kind for label, kind in A1111_SAMPLERS.values() if label.lower() == name.strip().lower()]
    if kinds:
        raise InputError(f"scheduler {scheduler!r} is not available with {name!r}: use {' or '.join(kinds)} "
                         "(GET /sdapi/v1/schedulers)")
    raise InputError(f"sampler {name!r} is not available: choose one of {', '.join(a1111_labels())} "
                     "(GET /sdapi/v1/samplers)")


def _check_common(cfg: ServeConfig, prompts: list[str], steps: int, images: int, height: int | None,
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


def _seeds(seed: int | None, count: int) -> list[int]:
    if seed is None or seed == -1:
        seed = random_seed(count)
    if not 0 <= seed <= first_seed_max(count):
        raise InputError(f"seed must be -1 (random) or from 0 to {first_seed_max(count)}, got {seed}")
    return [seed + i for i in range(count)]


def a1111_config(req: Txt2ImgRequest, pipe: Pipeline, cfg: ServeConfig, clip_skip: int = 1) -> GenerationConfig:
    """clip_skip: the server's CLIP_stop_at_last_layers option (/sdapi/v1/options)."""
    bad = req.unsupported()
    if bad:
        raise InputError(f"sdrt does not implement {', '.join(bad)}: leave them unset")
    steps = _first(req.steps, cfg.default_steps, pipe.model.defaults.steps)
    images = req.batch_size * req.n_iter
    if req.batch_size < 1 or req.n_iter < 1:
        raise InputError("batch_size and n_iter must be at least 1")
    _check_common(cfg, [req.prompt, req.negative_prompt], steps, images, req.height, req.width)
    top = pipe.limits.batch[2]
    if req.batch_size > top:  # n_iter batches run one after another, as in A1111
        raise InputError(f"batch_size is at most {top} on these engines (their largest batch); for more images "
                         f"raise n_iter (batches run one after another), e.g. batch_size {top}, "
                         f"n_iter {-(-images // top)}")
    scheduler = sampler_for(req.sampler_name or req.sampler_index, req.scheduler,
                            _first(cfg.default_scheduler, pipe.model.defaults.sampler))
    # A1111 zeros an empty negative prompt where the model forces zeros (its sd_models_xl): diffusers' None
    return pipe.make_config([req.prompt] * images, negative_prompt=req.negative_prompt or None, steps=steps,
                            guidance=req.cfg_scale, scheduler=scheduler, height=req.height, width=req.width,
                            seeds=_seeds(req.seed, images), **req.micro(), **req.images_in(),
                            **req.skip_layer_guidance(),
                            **req.clip_skip(pipe.model, clip_skip), max_rows=cfg.max_images_per_request)


def decode_base64(value: str, what: str) -> bytes:
    """An image sent as base64 text, with or without a data: URL prefix (A1111's clients send both)."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not base64 image data: send the file's bytes base64-encoded") from None


def a1111_timestamp(wall_time: float) -> str:
    """A1111's job_timestamp: local time as YYYYMMDDhhmmss."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(wall_time))


def a1111_title(model: Manifest) -> str:
    """The model as A1111 names a checkpoint: NAME [short hash]."""
    return f"{model.name} [{model.model_hash}]"


def a1111_info(req: Txt2ImgRequest, config: GenerationConfig, infotexts: list[str], model: Manifest,
               started: float) -> str:
    """The `info` JSON string A1111 returns, with the fields its clients read (seed, all_seeds,
    infotexts, sd_model_hash, job_timestamp, ...); started: the job's wall-clock start (time.time())."""
    from sdrt import __version__
    from sdrt.png import a1111_sampler

    sampler, schedule_type = a1111_sampler(config.scheduler)
    return json.dumps({
        "prompt": req.prompt, "all_prompts": list(config.prompt), "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [n or "" for n in config.negative_prompt], "seed": config.row_seeds[0],
        "all_seeds": list(config.row_seeds), "subseed": -1, "all_subseeds": [-1] * config.batch,
        "subseed_strength": 0, "width": config.width, "height": config.height, "sampler_name": sampler,
        "scheduler": schedule_type, "cfg_scale": config.guidance, "steps": config.steps,
        "batch_size": req.batch_size, "n_iter": req.n_iter, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.name, "sd_model_hash": model.model_hash, **_vae_fields(model),
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": config.strength if config.images else None,
        "extra_generation_params": {"Schedule type": schedule_type}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": list(req.styles or []),
        "job_timestamp": a1111_timestamp(started), "clip_skip": config.clip_skip,
        "is_using_inpainting_conditioning": bool(config.masks), "version": f"sdrt {__version__}",
    })


def _vae_fields(model: Manifest) -> dict[str, Any]:
    """A1111's sd_vae_name / sd_vae_hash: the VAE exported with `sdrt export --vae`, else none."""
    vae = model.source.get("vae")
    if not vae:
        return {"sd_vae_name": None, "sd_vae_hash": None}
    return {"sd_vae_name": Path(vae["path"]).name, "sd_vae_hash": str(vae["sha256"])[:10]}


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
    steps = _first(req.steps, cfg.default_steps, pipe.model.defaults.steps)
    _check_common(cfg, [req.prompt, req.negative_prompt or ""], steps, req.n, height, width)
    scheduler = sampler_for(req.scheduler, None, _first(cfg.default_scheduler, pipe.model.defaults.sampler))
    return pipe.make_config([req.prompt] * req.n, negative_prompt=req.negative_prompt, steps=steps,
                            guidance=req.guidance_scale, scheduler=scheduler, height=height, width=width,
                            seeds=_seeds(req.seed, req.n), **req.micro(), **images, **req.skip_layer_guidance(),
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
    import numpy as np

    from sdrt.images import open_image, read_mask

    source = open_image(data, "mask" if required else "image")
    if "A" in source.getbands() or source.mode == "P" and "transparency" in source.info:
        alpha = np.asarray(source.convert("RGBA"))[..., 3]
        if not required and alpha.min() >= 128:
            return None  # an opaque image: no edit area of its own
        return (alpha < 128).astype(np.uint8) * 255
    return read_mask(source, "mask") if required else None


def _first(*values: Any) -> Any:
    """The first value that is set: the request's, the server's, the engines'."""
    return next(v for v in values if v is not None)
