"""Request bodies of the two APIs sdrt speaks, and their translation to a GenerationConfig.

AUTOMATIC1111 (`/sdapi/v1/txt2img`): fields sdrt does not implement are accepted at their defaults
(clients such as webuiapi send them all) and refused with a 400 when turned on. OpenAI
(`/v1/images/generations`): prompt, n, size, response_format=b64_json; seed, steps,
guidance_scale, negative_prompt and scheduler are sdrt extensions (`extra_body` in the openai client).
On both APIs, original_size, crop_top_left and target_size ([height, width] pixels) set SDXL's
micro-conditioning (sdrt extensions; refused by engines of families without it).
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Strict

from sdrt.errors import InputError
from sdrt.pipeline import SEED_MAX, GenerationConfig, Pipeline
from sdrt.schedulers import A1111_NAMES, SAMPLERS
from sdrt.serve.config import ServeConfig

SAMPLER_LABELS = {v: k for k, v in A1111_NAMES.items()}
Int = Annotated[int, Strict()]  # JSON integers only: `true` is not 1 step, 20.5 is not 20


class MicroConditioning(BaseModel):
    """SDXL micro-conditioning, [height, width] pixels (sdrt extensions on both APIs)."""

    original_size: list[Int] | None = None
    crop_top_left: list[Int] | None = None
    target_size: list[Int] | None = None

    def micro(self) -> dict[str, Any]:
        return {"original_size": self.original_size, "crop_top_left": self.crop_top_left,
                "target_size": self.target_size}


class Txt2ImgRequest(MicroConditioning):
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
    # accepted at their defaults, refused when turned on
    enable_hr: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0.0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        out = [name for name in ("enable_hr", "restore_faces", "tiling", "styles", "script_name", "alwayson_scripts")
               if getattr(self, name)]
        return out + (["subseed_strength"] if self.subseed_strength else [])


class ImagesRequest(MicroConditioning):
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
    negative_prompt: str = ""
    scheduler: str | None = None


def sampler_for(name: str | None, scheduler: str | None, default: str) -> str:
    """A1111 sampler label (plus its scheduler field) or an sdrt name -> an sdrt sampler name."""
    if name is None or name == "":
        return default
    sdrt = name if name in SAMPLERS else next((v for k, v in A1111_NAMES.items() if k.lower() == name.lower()), None)
    if sdrt is None:
        raise InputError(f"sampler {name!r} is not available: choose one of "
                         f"{', '.join(A1111_NAMES)} (GET /sdapi/v1/samplers)")
    kind = (scheduler or "automatic").lower()
    if kind == "karras" and f"{sdrt}_karras" in SAMPLERS:
        return f"{sdrt}_karras"
    if kind == "automatic" or (kind == "karras" and sdrt.endswith("_karras")):
        return sdrt
    raise InputError(f"scheduler {scheduler!r} is not available with {name!r}: use Automatic"
                     + (" or Karras" if f"{sdrt}_karras" in SAMPLERS else ""))


def _check_common(cfg: ServeConfig, prompts: list[str], steps: int, images: int, height: int | None,
                  width: int | None) -> None:
    if any(len(p) > cfg.max_prompt_chars for p in prompts):
        raise InputError(f"prompts are limited to {cfg.max_prompt_chars} characters (CLIP reads 77 tokens)")
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
        seed = secrets.randbelow(SEED_MAX - count + 1)
    if not 0 <= seed <= SEED_MAX - count + 1:
        raise InputError(f"seed must be -1 (random) or from 0 to {SEED_MAX - count + 1}, got {seed}")
    return [seed + i for i in range(count)]


def a1111_config(req: Txt2ImgRequest, pipe: Pipeline, cfg: ServeConfig) -> GenerationConfig:
    bad = req.unsupported()
    if bad:
        raise InputError(f"sdrt does not implement {', '.join(bad)}: leave them unset")
    steps = _first(req.steps, cfg.default_steps, pipe.model.defaults.steps)
    images = req.batch_size * req.n_iter
    if req.batch_size < 1 or req.n_iter < 1:
        raise InputError("batch_size and n_iter must be at least 1")
    _check_common(cfg, [req.prompt, req.negative_prompt], steps, images, req.height, req.width)
    scheduler = sampler_for(req.sampler_name or req.sampler_index, req.scheduler,
                            _first(cfg.default_scheduler, pipe.model.defaults.sampler))
    return pipe.make_config([req.prompt] * images, negative_prompt=req.negative_prompt, steps=steps,
                            guidance=req.cfg_scale, scheduler=scheduler, height=req.height, width=req.width,
                            seeds=_seeds(req.seed, images), **req.micro())


def a1111_info(req: Txt2ImgRequest, config: GenerationConfig, infotexts: list[str], model: str) -> str:
    """The `info` JSON string A1111 returns (clients read seed/all_seeds/infotexts from it)."""
    return json.dumps({
        "prompt": req.prompt, "all_prompts": list(config.prompt), "negative_prompt": req.negative_prompt,
        "all_negative_prompts": list(config.negative_prompt), "seed": config.row_seeds[0],
        "all_seeds": list(config.row_seeds), "subseed": -1, "all_subseeds": [-1] * config.batch,
        "subseed_strength": 0, "width": config.width, "height": config.height,
        "sampler_name": SAMPLER_LABELS.get(config.scheduler, config.scheduler), "cfg_scale": config.guidance,
        "steps": config.steps, "batch_size": req.batch_size, "n_iter": req.n_iter, "sd_model_name": model,
        "infotexts": infotexts, "index_of_first_image": 0, "restore_faces": False,
    })


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 5 for p in parts):
        raise InputError(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512'), got {size!r}")
    return int(parts[1]), int(parts[0])


def openai_config(req: ImagesRequest, pipe: Pipeline, cfg: ServeConfig) -> GenerationConfig:
    if req.response_format not in (None, "b64_json"):
        raise InputError(f"response_format {req.response_format!r} is not supported: sdrt returns images inline, "
                         "use response_format='b64_json'")
    height, width = parse_size(req.size)
    steps = _first(req.steps, cfg.default_steps, pipe.model.defaults.steps)
    _check_common(cfg, [req.prompt, req.negative_prompt], steps, req.n, height, width)
    scheduler = sampler_for(req.scheduler, None, _first(cfg.default_scheduler, pipe.model.defaults.sampler))
    return pipe.make_config([req.prompt] * req.n, negative_prompt=req.negative_prompt, steps=steps,
                            guidance=req.guidance_scale, scheduler=scheduler, height=height, width=width,
                            seeds=_seeds(req.seed, req.n), **req.micro())


def _first(*values: Any) -> Any:
    """The first value that is set: the request's, the server's, the engines'."""
    return next(v for v in values if v is not None)
