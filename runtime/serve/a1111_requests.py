"""AUTOMATIC1111's request bodies (`/sdapi/v1/txt2img`, `/sdapi/v1/img2img`) and their translation
to the request (sdrt.validation), and the answers' A1111 fields.

Fields sdrt does not implement are accepted at their defaults (clients such as webuiapi send them all)
and refused with a 400 when turned on. original_size, crop_top_left and target_size ([height, width]
pixels) set SDXL's micro-conditioning (sdrt extensions; refused by engines of families without it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import ConfigDict

from sdrt import __version__
from sdrt.errors import InputError
from sdrt.manifest import Manifest, ModelInfo
from sdrt.pipeline import Pipeline
from sdrt.png import a1111_sampler
from sdrt.request import IMG2IMG_STRENGTH, INPAINTING_FILLS, GenerationConfig, ImageInput
from sdrt.schedulers import A1111_SAMPLERS, SAMPLERS, a1111_labels, from_a1111
from sdrt.serve.config import ServeConfig
from sdrt.controlnet_weights import available_controlnets
from sdrt.serve.controlnet_units import controlnet_keywords
from sdrt.serve.request_fields import (Int, MicroConditioning, SkipLayerGuidance, check_common, decode_base64, first,
                                       random_if_unset)


class Txt2ImgRequest(MicroConditioning, SkipLayerGuidance):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: Int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated in A1111; used when sampler_name is absent
    scheduler: str | None = None  # A1111 >= 1.9: "Automatic", "Karras", ...
    steps: Int | None = None
    cfg_scale: float = 7.0  # A1111's default (sdrt's own, for the Python API and the CLI, is the family's)
    width: Int | None = None
    height: Int | None = None
    batch_size: Int = 1
    n_iter: Int = 1
    send_images: bool = True  # false: the answer carries info and parameters, no images
    # hires fix (txt2img): the first pass at width x height, the upscale, then img2img at the hires size
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_resize_x: Int = 0
    hr_resize_y: Int = 0
    hr_upscaler: str | None = None  # None: "Latent"
    hr_second_pass_steps: Int = 0
    denoising_strength: float | None = None  # None: 0.7, A1111's hires default
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_sampler_name: str | None = None  # None: the first pass's
    hr_scheduler: str | None = None
    # accepted at their defaults, refused when turned on
    save_images: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0.0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None  # sd-webui-controlnet's units (sdrt.serve.controlnet_units)
    # A1111 applies any option here for the request; sdrt reads CLIP_stop_at_last_layers (clip skip)
    override_settings: dict[str, Any] | None = None

    def clip_skip(self, model: ModelInfo, server_value: int) -> dict[str, Any]:
        """make_config's clip_skip: CLIP_stop_at_last_layers (the request's override, else the server's
        option) where the model takes one (A1111 ignores it for SDXL, and so does sdrt)."""
        value = (self.override_settings or {}).get("CLIP_stop_at_last_layers")
        value = server_value if value is None else value
        return {"clip_skip": value} if model.clip_skip_max > 1 else {}

    def unsupported(self) -> list[str]:
        out = [name for name in ("save_images", "restore_faces", "tiling", "styles", "script_name")
               if getattr(self, name)]
        return out + (["subseed_strength"] if self.subseed_strength else [])

    def images_in(self) -> dict[str, Any]:
        """make_config's image arguments: none for txt2img."""
        return {}

    def hires(self, first_sampler: str) -> dict[str, Any]:
        """make_config's hires fix arguments (none unless enable_hr, as A1111 ignores the hr_ fields then)."""
        if not self.enable_hr:
            return {}
        sampler = None
        if self.hr_sampler_name and self.hr_sampler_name != "Use same sampler":  # A1111's UI value for none
            sampler = sampler_for(self.hr_sampler_name, self.hr_scheduler, first_sampler)
        return dict(enable_hr=True, hr_scale=self.hr_scale, hr_resize_x=self.hr_resize_x, hr_resize_y=self.hr_resize_y,
                    hr_upscaler=self.hr_upscaler, hr_second_pass_steps=self.hr_second_pass_steps,
                    denoising_strength=self.denoising_strength, hr_prompt=self.hr_prompt,
                    hr_negative_prompt=self.hr_negative_prompt, hr_sampler=sampler)

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
    denoising_strength: float = IMG2IMG_STRENGTH
    mask_blur: Int = ImageInput.mask_blur
    mask_blur_x: Int | None = None
    mask_blur_y: Int | None = None
    inpainting_fill: Int = next(k for k, v in INPAINTING_FILLS.items() if v == ImageInput.inpainting_fill)
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


def a1111_config(req: Txt2ImgRequest, pipe: Pipeline, cfg: ServeConfig, clip_skip: int = 1) -> GenerationConfig:
    """clip_skip: the server's CLIP_stop_at_last_layers option (/sdapi/v1/options)."""
    bad = req.unsupported()
    if bad:
        raise InputError(f"sdrt does not implement {', '.join(bad)}: leave them unset")
    steps = first(req.steps, cfg.default_steps, pipe.model.defaults.steps)
    images = req.batch_size * req.n_iter
    if req.batch_size < 1 or req.n_iter < 1:
        raise InputError("batch_size and n_iter must be at least 1")
    check_common(cfg, [req.prompt, req.negative_prompt], steps, images, req.height, req.width)
    top = pipe.limits.batch[2]
    if req.batch_size > top:  # n_iter batches run one after another, as in A1111
        raise InputError(f"batch_size is at most {top} on these engines (their largest batch); for more images "
                         f"raise n_iter (batches run one after another), e.g. batch_size {top}, "
                         f"n_iter {-(-images // top)}")
    scheduler = sampler_for(req.sampler_name or req.sampler_index, req.scheduler,
                            first(cfg.default_scheduler, pipe.model.defaults.sampler))
    # A1111 zeros an empty negative prompt where the model forces zeros (its sd_models_xl): diffusers' None
    return pipe.make_config([req.prompt] * images, negative_prompt=req.negative_prompt or None, steps=steps,
                            guidance=req.cfg_scale, scheduler=scheduler, height=req.height, width=req.width,
                            seed=random_if_unset(req.seed), **req.micro(), **req.images_in(),
                            **req.skip_layer_guidance(), **req.hires(scheduler),
                            **req.clip_skip(pipe.model, clip_skip), **controlnet_keywords(req.alwayson_scripts, pipe.model, available_controlnets(cfg.controlnet_dir)),
                            max_rows=cfg.max_images_per_request)


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
    sampler, schedule_type = a1111_sampler(config.sampler.scheduler)
    image = config.image
    return json.dumps({
        "prompt": req.prompt, "all_prompts": list(config.prompts.prompt), "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [n or "" for n in config.prompts.negative_prompt], "seed": config.row_seeds[0],
        "all_seeds": list(config.row_seeds), "subseed": -1, "all_subseeds": [-1] * config.batch,
        "subseed_strength": 0, "width": config.size.width, "height": config.size.height, "sampler_name": sampler,
        "scheduler": schedule_type, "cfg_scale": config.guidance.scale, "steps": config.sampler.steps,
        "batch_size": req.batch_size, "n_iter": req.n_iter, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.name, "sd_model_hash": model.model_hash, **vae_fields(model),
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": image.strength if image.images else config.hires.strength if config.hires.enabled else None,
        "extra_generation_params": {"Schedule type": schedule_type}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": list(req.styles or []),
        "job_timestamp": a1111_timestamp(started), "clip_skip": config.prompts.clip_skip,
        "is_using_inpainting_conditioning": bool(image.masks), "version": f"sdrt {__version__}",
    })


def vae_fields(model: Manifest) -> dict[str, Any]:
    """A1111's sd_vae_name / sd_vae_hash: the VAE exported with `sdrt export --vae`, else none."""
    vae = model.source.get("vae")
    if not vae:
        return {"sd_vae_name": None, "sd_vae_hash": None}
    return {"sd_vae_name": Path(vae["path"]).name, "sd_vae_hash": str(vae["sha256"])[:10]}
