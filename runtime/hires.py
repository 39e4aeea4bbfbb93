"""Hires fix (A1111's enable_hr): text-to-image at the request's size, the upscale, then sdrt's own
image-to-image at the hires size from the upscaled result, with the same seeds, in one generation.

The second pass is exactly Pipeline.generate of an img2img request (tested bit for bit): from the upscaled
images (the pixel upscalers), or from the upscaled latents (A1111's "Latent" family, no VAE round trip).
ControlNets guide both passes (sd-webui-controlnet's default hr_option "Both"), each with the hints
crop-resized from the images sent to its own size.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from sdrt.hires_request import uses_latents
from sdrt.loop import STOP, Callback
from sdrt.request import GenerationConfig, Hires
from sdrt.result import Result, Timings
from sdrt.upscale import upscale_latents, upscale_pixels

if TYPE_CHECKING:
    from sdrt.pipeline import Pipeline  # its type only: the pipeline imports this module


def second_pass_input(pipe: "Pipeline", config: GenerationConfig, first: Result) -> dict[str, Any]:
    """The image-to-image input of the second pass: the first pass's images or latents, upscaled."""
    hires, f = config.hires, pipe.model.vae_scale_factor
    height, width = hires.size.height, hires.size.width
    if uses_latents(hires):
        return {"image_latents": list(upscale_latents(first.latents, height // f, width // f, hires.upscaler))}
    return {"image": list(upscale_pixels(first.images, height, width, hires.upscaler))}


def second_pass(pipe: "Pipeline", config: GenerationConfig, rows: list[int], image: dict[str, Any]) -> GenerationConfig:
    """The img2img request of the second pass for config's rows `rows` (those the first pass finished)."""
    hires, sub = config.hires, config.select(rows)
    prompts, skip = sub.prompts, sub.skip
    negatives = [n if n is not None else "" for n in prompts.negative_prompt]
    second = pipe.make_config(
        [hires.prompt] * len(rows) if hires.prompt else list(prompts.prompt),
        negative_prompt=[hires.negative_prompt] * len(rows) if hires.negative_prompt else negatives,
        steps=hires.steps or sub.sampler.steps, scheduler=hires.scheduler or sub.sampler.scheduler,
        guidance=sub.guidance.scale, seeds=list(sub.row_seeds), height=hires.size.height, width=hires.size.width,
        strength=hires.strength, clip_skip=prompts.clip_skip, loras=list(prompts.loras),
        skip_guidance_layers=list(skip.layers) or None, skip_layer_guidance_scale=skip.scale,
        skip_layer_guidance_start=skip.start, skip_layer_guidance_stop=skip.stop, **image)
    if sub.control.images:  # the hints at this pass's size, the first pass's ControlNet settings and weights
        second = replace(second, control=replace(sub.control, images=sub.control.hires_images, hires_images=()))
    if not hires.prompt:  # the first pass's prompts as they were read (their LoRA tags already applied)
        second = replace(second, prompts=replace(second.prompts, prompt=prompts.prompt, chunks=prompts.chunks))
    if not hires.negative_prompt:  # None stays None (no negative: SDXL's zeros), not the encoded ""
        second = replace(second, prompts=replace(second.prompts, negative_prompt=prompts.negative_prompt))
    return second


def run_hires(pipe: "Pipeline", config: GenerationConfig, noise: np.ndarray | None,
              callback: Callback | None) -> Result:
    """Both passes; the callback sees each pass's steps, and the rows it drops stay dropped."""
    first = pipe.generate(replace(config, hires=Hires()), noise, callback, keep_latents=uses_latents(config.hires))
    rows = first.rows
    second_config = second_pass(pipe, config, rows, second_pass_input(pipe, config, first))

    def second_callback(done: int, total: int) -> Any:
        wanted = callback(done, total) if callback is not None else None
        if wanted is None or wanted is STOP:
            return wanted
        return [rows.index(r) for r in wanted if r in rows]

    second = pipe.generate(second_config, callback=second_callback if callback is not None else None)
    timings = Timings(**{f.name: getattr(first.timings, f.name) + getattr(second.timings, f.name)
                         for f in fields(Timings)})
    alive = [rows[r] for r in second.rows]
    return Result(second.images, config, [config.row_seeds[r] for r in alive], timings, second.model_name,
                  second.model_hash, alive)
