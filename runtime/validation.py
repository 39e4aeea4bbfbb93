"""A request checked against the engines, in one place: build_request returns a GenerationConfig or
raises an InputError whose message names the fix.

The arguments are diffusers' and A1111's names (Pipeline.make_config's documentation has them all).
steps, guidance and scheduler default to the model family's; the size to the engines' (or an image's,
rounded down to the latent grid); a LoRA, a sampler setting or an image the engines cannot take is
refused before anything runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sdrt.control_request import build_control
from sdrt.errors import InputError, check_text, is_integer
from sdrt.families import CONCAT
from sdrt.hires_request import build_hires, check_latents
from sdrt.images import mask_picture, picture, read_image, read_mask, resized
from sdrt.loras import TAG, LoraIndex, prompt_loras
from sdrt.manifest import ModelInfo, ShapeLimits
from sdrt.request import (IMG2IMG_STRENGTH, INPAINTING_FILLS, SEED_MAX, GenerationConfig, Guidance, ImageInput,
                          MicroConditioning, Prompts, Sampler, Size, SkipLayers, first_seed_max, random_seed)
from sdrt.schedulers import NoiseSchedule, check_sampler, strength_start

MAX_MASK_BLUR = 64
MAX_GUIDANCE = 100.0  # far past any useful scale (A1111's UI stops at 30); keeps the graph's math finite
MAX_MICRO_SIZE = 16384


@dataclass(frozen=True)
class Accepts:
    """What a set of engines accepts: the facts every check reads (Pipeline builds it)."""

    limits: ShapeLimits
    model: ModelInfo
    schedule: NoiseSchedule
    tokenizers: tuple[Any, ...]  # sdrt.tokenizer's, each with check(text, label, max_chunks) -> chunks
    lora_index: LoraIndex
    lora_dir: Path | None
    default_loras: tuple[tuple[str, float], ...]  # Pipeline.set_loras': for requests that name none
    skippable_blocks: int  # the MMDiT blocks skip-layer guidance can skip (0: none)
    step_rows: int | None  # the most rows the step's plan takes; None on ONNX Runtime
    controlnet_slots: Any = None  # sdrt.controlnet_weights.ControlNetSlots: where other ControlNets' weights go

    @property
    def where(self) -> str:
        return ("the engines' range" if self.limits.kind == "onnx"
                else "the TensorRT plans' range; widen it with `sdrt build --shapes`")

    def skip_batch(self) -> int:
        """The most images one engine call takes with skip-layer guidance (3 step rows each)."""
        top = self.limits.batch[2]
        return top if self.step_rows is None else min(top, self.step_rows // 3)

    def engine_batch(self, config: GenerationConfig) -> int:
        """The most of config's images one engine call takes (generate()'s limit; the server's batches)."""
        return self.skip_batch() if config.skip.layers else self.limits.batch[2]


def build_request(accepts: Accepts, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                  steps: int | None = None, guidance: float | None = None, scheduler: str | None = None,
                  seed: int | None = None, height: int | None = None, width: int | None = None,
                  batch: int | None = None, seeds: Sequence[int] | None = None,
                  original_size: Sequence[int] | None = None, crop_top_left: Sequence[int] | None = None,
                  target_size: Sequence[int] | None = None, image: Any = None, mask_image: Any = None,
                  strength: float | None = None, mask_blur: int | None = None, inpainting_fill: str | None = None,
                  inpainting_mask_invert: bool = False, clip_skip: int | None = None,
                  loras: Sequence[tuple[str | Path, float]] | None = None, max_rows: int | None = None,
                  skip_guidance_layers: Sequence[int] | None = None, skip_layer_guidance_scale: float | None = None,
                  skip_layer_guidance_start: float | None = None,
                  skip_layer_guidance_stop: float | None = None, image_latents: Any = None,
                  control_image: Any = None, controlnet_conditioning_scale: Any = None,
                  control_guidance_start: Any = None, control_guidance_end: Any = None, control_mode: Any = None,
                  guess_mode: bool = False, controlnet_model: Any = None, control_resize_mode: Any = None,
                  **hires: Any) -> GenerationConfig:
    """The request, checked group by group (the order decides which error a request with several gets)."""
    defaults = accepts.model.defaults
    steps = defaults.steps if steps is None else steps
    scheduler = defaults.sampler if scheduler is None else scheduler
    prompts, negatives = _rows(accepts, prompt, negative_prompt, batch, max_rows)
    prompts, negatives, applied = _loras(accepts, prompts, negatives, loras)
    guided = _guidance(defaults.guidance if guidance is None else guidance)
    check_sampler(scheduler, steps, accepts.schedule)
    chunks = _chunks(accepts, prompts, [n for n in negatives if n is not None] if guided.cfg else [])
    prompt_group = Prompts(tuple(prompts), tuple(negatives), chunks, _clip_skip(accepts, clip_skip), applied)
    sources = _input_images(accepts, image, mask_image, len(prompts))
    size = _size(accepts, height, width, sources)
    sampler = _sampler(int(steps), scheduler, seed, seeds, len(prompts))
    micro = _micro(accepts, original_size=original_size, crop_top_left=crop_top_left, target_size=target_size)
    latents = () if image_latents is None else _latents(accepts, image_latents, size, len(prompts), sources)
    images = _image_input(accepts, sources, size, strength, mask_blur, inpainting_fill, inpainting_mask_invert,
                          sampler.steps, latents)
    # one engine call's images: the server's successive calls (max_rows) take one row at least; plans pad to theirs
    call = max(1 if max_rows else len(prompts), accepts.limits.batch[0])
    skip = _skip_layers(accepts, skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start,
                        skip_layer_guidance_stop, guided, call)
    has_image = accepts.model.needs_image or images.mode != "txt2img"
    hires_fix = build_hires(size, sampler.steps, accepts.schedule, has_image, accepts.model.size_multiple,
                            lambda s: _size(accepts, s.height, s.width, []), **hires)
    control = build_control(accepts.model, control_image, controlnet_conditioning_scale, control_guidance_start,
                            control_guidance_end, size, len(prompts), hires_fix.size if hires_fix.enabled else None,
                            control_mode, guess_mode,
                            controlnet_model, accepts.controlnet_slots, control_resize_mode)
    return GenerationConfig(prompt_group, size, sampler, guided, images, micro, skip, hires_fix, control)


def _latents(accepts: Accepts, latents: Any, size: Size, batch: int, sources: list) -> tuple:
    if accepts.model.image_input == CONCAT:
        raise InputError("image_latents: these inpainting engines also encode the masked image's pixels; pass image")
    return check_latents(latents, size, accepts.model.latent_channels, accepts.model.vae_scale_factor, batch,
                         bool(sources))


def _rows(accepts: Accepts, prompt: Any, negative_prompt: Any, batch: int | None,
          max_rows: int | None) -> tuple[list[str], list[str | None]]:
    """One prompt and one negative prompt (None: none given) per row, checked."""
    if batch is None:
        batch = 1 if isinstance(prompt, str) else len(prompt)
    b_hi = max_rows or accepts.limits.batch[2]  # below the plans' minimum, generate() pads the batch
    if not is_integer(batch) or not 1 <= batch <= b_hi:
        raise InputError(f"batch must be an integer from 1 to {b_hi} ({accepts.where}), got {batch!r}")
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"prompt must be a string or a list of {batch} strings")
    given = negative_prompt is not None
    negatives = [negative_prompt] * batch if not given or isinstance(negative_prompt, str) else list(negative_prompt)
    if given and (len(negatives) != batch or not all(isinstance(p, str) for p in negatives)):
        raise InputError(f"negative_prompt must be a string or a list of {batch} strings")
    for label, texts in (("prompt", prompts), ("negative_prompt", negatives if given else [])):
        for text in texts:
            check_text(text, label)
    return prompts, negatives


def _loras(accepts: Accepts, prompts: list[str], negatives: list[str | None],
           loras: Sequence[tuple[str | Path, float]] | None) -> tuple[list[str], list[str | None], tuple]:
    """The LoRAs applied (given, else the pipeline's, plus the prompts' <lora:NAME:WEIGHT> tags) and
    the prompts without their tags (as A1111: a negative's tags apply nothing)."""
    applied = accepts.default_loras if loras is None else accepts.lora_index.check(loras)
    prompts, tagged = prompt_loras(prompts, accepts.lora_dir)
    negatives = [None if n is None else TAG.sub("", n) for n in negatives]
    if tagged:
        applied += accepts.lora_index.check(tagged)
        named = [path for path, _ in applied]
        if len(set(named)) != len(named):
            raise InputError("a LoRA is named twice (in the prompt and in loras): name it once")
    return prompts, negatives, applied


def _guidance(scale: Any) -> Guidance:
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise InputError(f"guidance must be a number, got {scale!r}") from None
    if not (math.isfinite(scale) and abs(scale) <= MAX_GUIDANCE):  # 1e308 would be inf in fp32
        raise InputError(f"guidance must be finite, from -{MAX_GUIDANCE:g} to {MAX_GUIDANCE:g}, got {scale}: "
                         "use e.g. 7.5 (≤ 1 disables CFG)")
    return Guidance(scale)


def _chunks(accepts: Accepts, prompts: list[str], negatives: list[str]) -> int:
    """The most 75-token chunks any encoded prompt takes; over the engines' limit is an error."""
    most = 1
    for label, texts in (("prompt", prompts), ("negative_prompt", negatives)):
        for text in dict.fromkeys(texts):
            for tokenizer in accepts.tokenizers:
                most = max(most, tokenizer.check(text, label, accepts.limits.max_chunks))
    return most


def _clip_skip(accepts: Accepts, clip_skip: Any) -> int:
    """1 when None; refused above the text encoder's layers, or where the family has no clip skip."""
    top = accepts.model.clip_skip_max
    if clip_skip is None:
        return 1
    if not is_integer(clip_skip) or not 1 <= clip_skip <= max(top, 1):
        if top == 1:
            raise InputError(f"clip_skip applies to SD 1.x/2.x; these {accepts.model.family} engines use their "
                             f"text encoders' fixed layers: leave it out (or 1), got {clip_skip!r}")
        raise InputError(f"clip_skip must be an integer from 1 (the last layer) to {top}, got {clip_skip!r}")
    return int(clip_skip)


def _input_images(accepts: Accepts, image: Any, mask_image: Any, batch: int) -> list[tuple[Any, Any]]:
    """(image, mask or None) per row as PIL images, each mask the size of its image; [] without."""
    if accepts.model.needs_image and (image is None or mask_image is None):
        raise InputError(f"these {accepts.model.family} engines are an inpainting model (a 9-channel U-Net): "
                         "pass an image and a mask_image as well")
    if image is None:
        if mask_image is not None:
            raise InputError("mask_image needs the image it masks: pass image as well")
        return []

    def per_row(value: Any, what: str) -> list[Any]:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * batch
        if len(values) != batch:
            raise InputError(f"{what} must be one image or a list of {batch} (one per row), got {len(values)}")
        return values

    images = [read_image(v, "image") for v in per_row(image, "image")]
    if mask_image is None:
        return [(im, None) for im in images]
    masks = [read_mask(v, "mask_image") for v in per_row(mask_image, "mask_image")]
    for im, m in zip(images, masks):
        if im.size != m.size:
            raise InputError(f"the mask is {m.width}x{m.height} pixels but the image is {im.width}x{im.height}: "
                             "the mask must cover the image pixel for pixel")
    return list(zip(images, masks))


def _size(accepts: Accepts, height: Any, width: Any, sources: list[tuple[Any, Any]]) -> Size:
    """The asked size; else an image's, rounded down to the latent grid; else the engines' optimum."""
    limits, m = accepts.limits, accepts.model.size_multiple  # pixels per latent cell (a transformer's: per patch)
    if sources and (height is None or width is None):
        first = sources[0][0]
        for v, (lo, _, hi) in ((first.height, limits.height), (first.width, limits.width)):
            if not lo <= v // m * m <= hi:
                raise InputError(f"the image is {first.width}x{first.height} pixels; {accepts.where} is {lo} to {hi} "
                                 f"a side: pass width and height (the image is resized to them)")
        height = first.height // m * m if height is None else height
        width = first.width // m * m if width is None else width
    height = limits.height[1] if height is None else height
    width = limits.width[1] if width is None else width
    for label, v, (lo, _, hi) in (("height", height, limits.height), ("width", width, limits.width)):
        if not is_integer(v) or v % m or not lo <= v <= hi:
            raise InputError(f"{label} must be a multiple of {m} from {lo} to {hi} ({accepts.where}), got {v!r}")
    return Size(int(height), int(width))


def _sampler(steps: int, scheduler: str, seed: Any, seeds: Sequence[int] | None, batch: int) -> Sampler:
    """Row i's seed is seeds[i], else seed + i (a random seed when none is given)."""
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != batch or not all(is_integer(x) and 0 <= x <= SEED_MAX for x in seeds):
            raise InputError(f"seeds must be {batch} integers from 0 to {SEED_MAX}, got {seeds!r}")
        seed = seeds[0]
    if seed is None:
        seed = random_seed(batch)
    if not is_integer(seed) or not 0 <= seed <= first_seed_max(batch):
        raise InputError(f"seed must be an integer from 0 to {first_seed_max(batch)}, got {seed!r}")
    return Sampler(steps, scheduler, int(seed), tuple(int(x) for x in seeds) if seeds is not None else ())


def _micro(accepts: Accepts, **given: Any) -> MicroConditioning:
    """SDXL's original_size, crop_top_left, target_size as (height, width) pixels; refused elsewhere."""
    micro = {}
    for label, value in given.items():
        if value is None:
            continue
        if not any(c.name == "time_ids" for c in accepts.model.conditioning):
            raise InputError(f"{label} is SDXL micro-conditioning; these {accepts.model.family} engines take none")
        low = 0 if label == "crop_top_left" else 1
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(is_integer(v) and low <= v <= MAX_MICRO_SIZE for v in value)):
            raise InputError(f"{label} must be (height, width): two integers from {low} to {MAX_MICRO_SIZE}, "
                             f"got {value!r}")
        micro[label] = tuple(int(v) for v in value)
    return MicroConditioning(**micro)


def _image_input(accepts: Accepts, sources: list[tuple[Any, Any]], size: Size, strength: Any, mask_blur: Any,
                 fill: Any, invert: bool, steps: int, latents: tuple = ()) -> ImageInput:
    """The images and masks resized to the request's size (or the latents given instead), and how they are used."""
    images = tuple(picture(resized(im, size.width, size.height)) for im, _ in sources)
    masks = tuple(mask_picture(resized(m, size.width, size.height), bool(invert)) for _, m in sources if m is not None)
    if strength is None:
        strength = 1.0 if accepts.model.needs_image or not (images or latents) else IMG2IMG_STRENGTH
    if not (images or latents) and strength != 1.0:
        raise InputError("strength applies to img2img and inpainting: pass an image, or leave strength out")
    strength_start(steps, strength, accepts.schedule.flow)  # refuses a strength outside (0, 1] or one that runs no step
    mask_blur = ImageInput.mask_blur if mask_blur is None else mask_blur
    if not is_integer(mask_blur) or not 0 <= mask_blur <= MAX_MASK_BLUR:
        raise InputError(f"mask_blur must be an integer from 0 to {MAX_MASK_BLUR} pixels, got {mask_blur!r}")
    fill = ImageInput.inpainting_fill if fill is None else fill
    if fill not in INPAINTING_FILLS.values():
        raise InputError(f"inpainting_fill must be one of {', '.join(INPAINTING_FILLS.values())}, got {fill!r}")
    return ImageInput(images, latents, masks, float(strength), int(mask_blur), fill)


def _skip_layers(accepts: Accepts, layers: Sequence[int] | None, scale: Any, start: Any, stop: Any,
                 guidance: Guidance, rows: int) -> SkipLayers:
    """SD 3.5's skip-layer guidance checked against the engines (their blocks, the plans' rows)."""
    if not layers:
        return SkipLayers()
    count = accepts.skippable_blocks
    if not count:
        raise InputError(f"skip-layer guidance is SD 3.5's (an MMDiT's blocks); these {accepts.model.family} engines "
                         "take none (SD3 engines exported before sdrt had it: re-export them with `sdrt export`)")
    if (isinstance(layers, (str, bytes)) or not all(is_integer(v) and 0 <= v < count for v in layers)
            or len(set(layers)) != len(layers)):
        raise InputError(f"skip_guidance_layers must be distinct block indices from 0 to {count - 1} (SD 3.5 "
                         f"Medium's recommended: 7, 8, 9), got {layers!r}")
    if not guidance.cfg:
        raise InputError("skip-layer guidance runs alongside classifier-free guidance: set guidance above 1")
    scale, start, stop = (SkipLayers.scale if scale is None else scale, SkipLayers.start if start is None else start,
                          SkipLayers.stop if stop is None else stop)
    try:
        scale, start, stop = float(scale), float(start), float(stop)
    except (TypeError, ValueError):
        raise InputError("skip_layer_guidance_scale, _start and _stop must be numbers") from None
    if not (math.isfinite(scale) and abs(scale) <= MAX_GUIDANCE):
        raise InputError(f"skip_layer_guidance_scale must be finite, within ±{MAX_GUIDANCE:g} (2.8 is "
                         f"diffusers' default), got {scale}")
    if not 0.0 <= start < stop <= 1.0:
        raise InputError(f"skip-layer guidance runs on the steps between start and stop, fractions with "
                         f"0 ≤ start < stop ≤ 1 (diffusers: 0.01, 0.2), got {start} and {stop}")
    top = accepts.skip_batch()
    if top < rows:
        raise InputError(f"skip-layer guidance runs 3 step rows per image; these TensorRT plans take at most "
                         f"{accepts.step_rows}, {top} image(s) at once, {rows} asked: rebuild them with `sdrt build "
                         "--skip-layer-guidance` (the default), or generate fewer images at once")
    return SkipLayers(tuple(int(v) for v in layers), scale, start, stop)
