"""The start stage: noise, images, masks and strength -> the first latents, the step plan and the
step's image inputs.

Noise: image i of a batch uses seed + i; its initial latents are the first draw of
numpy.random.Generator(PCG64(seed + i)).standard_normal((4, h, w), float32) and, for ancestral
samplers, the per-step noise is drawn next from the same generator, (steps, 4, h, w) at once.
So image i of a batch equals the single image made with seed + i.

Text-to-image starts from the noise times the sampler's σ_max; img2img from the scheduler's
add_noise(image latents, noise, first step); inpainting at strength 1 from noise alone, as diffusers'
inpainting pipelines. For a 4-channel U-Net the mask's known region is the image latents re-noised
with the same noise after every step (in the graph); an inpainting U-Net takes the mask and the
masked image's latents as per-row conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sdrt.device import Device
from sdrt.errors import InputError
from sdrt.families import CONCAT
from sdrt.images import latent_mask, pixel_mask
from sdrt.manifest import ENCODER, ModelInfo
from sdrt.request import GenerationConfig
from sdrt.schedulers import NoiseSchedule, SamplerPlan, make_plan


@dataclass
class Start:
    """Where the loop starts: the plan, (B, 4, h, w) first latents on the host, the step's image
    inputs on the device, and the per-step noise ((steps run, B, 4, h, w); None for deterministic samplers)."""

    plan: SamplerPlan
    latents: np.ndarray
    image_inputs: dict[str, Any]
    step_noise: np.ndarray | None


def plan_for(config: GenerationConfig, schedule: NoiseSchedule) -> SamplerPlan:
    return make_plan(config.sampler.scheduler, schedule, config.sampler.steps, config.image.strength)


def initial_noise(model: ModelInfo, config: GenerationConfig, plan: SamplerPlan) -> tuple[np.ndarray, np.ndarray | None]:
    """(B, 4, h, w) initial noise and (steps run, B, 4, h, w) step noise (None if unused)."""
    f = model.vae_scale_factor
    shape = (model.latent_channels, config.size.height // f, config.size.width // f)
    init, step_noise = [], []
    for seed in config.row_seeds:
        rng = np.random.Generator(np.random.PCG64(seed))
        init.append(rng.standard_normal(shape, dtype=np.float32))
        if plan.uses_noise:
            step_noise.append(plan.mix_noise(rng.standard_normal((len(plan),) + shape, dtype=np.float32)))
    noise = np.stack(step_noise, axis=1) if plan.uses_noise else None
    return np.stack(init), noise


def start(device: Device, config: GenerationConfig, schedule: NoiseSchedule, latents: np.ndarray | None,
          given_rows: int) -> Start:
    """latents: optional (given_rows, 4, h, w) initial noise (before σ_max scaling); padding rows keep
    their own noise (they are discarded)."""
    plan = plan_for(config, schedule)
    init, step_noise = initial_noise(device.model, config, plan)
    if latents is not None:
        expected = (given_rows,) + init.shape[1:]
        if latents.shape != expected:
            raise InputError(f"latents must have shape {expected}, got {latents.shape}")
        init[:given_rows] = latents
    first, inputs = image_inputs(device, config, plan, init)
    return Start(plan, first, inputs, step_noise)


def image_inputs(device: Device, config: GenerationConfig, plan: SamplerPlan,
                 noise: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """The start latents (B, 4, h, w) on the host and the step's image inputs on the device."""
    f32, model, buffers, image = np.float32, device.model, device.buffers, config.image
    mask_shape = (noise.shape[0], 1) + noise.shape[2:]
    if not (image.images or image.latents):  # a mask of ones (and zero image latents and noise): the blend is a no-op
        return noise * f32(plan.init_noise_sigma), {
            name: buffers.constant("repaint_all", mask_shape, 1.0) if name == "mask"
            else buffers.constant("zero_latents", noise.shape, 0.0) for name in model.image_inputs}
    if image.latents:  # given (hires fix's latent upscale): no VAE encoder
        encoded = np.stack(image.latents).astype(f32)
        latents_buffer = buffers.write("image_latents", encoded)
    else:
        pixels = np.stack([p.pixels for p in image.images])
        latents_buffer = encode(device, "image_latents", pixels,
                                buffers.constant("zero_pixel_mask", pixels.shape[:3] + (1,), 0.0))
        encoded = buffers.download(latents_buffer).astype(f32)
    start_image = encoded
    if image.masks:
        mask = latent_mask(image.masks, model.vae_scale_factor)
        if image.inpainting_fill == "latent noise":  # A1111: the masked area starts from the seed's noise
            start_image = encoded * (1 - mask) + noise * mask
        elif image.inpainting_fill == "latent nothing":
            start_image = encoded * (1 - mask)
        inputs = {"mask": buffers.write("mask", mask)}
    else:  # img2img: the whole image is repainted
        inputs = {"mask": buffers.constant("repaint_all", mask_shape, 1.0)}
    if image.masks and image.strength == 1.0:
        first = noise * f32(plan.init_noise_sigma)
    else:
        alpha, sigma = plan.start_level
        first = f32(alpha) * start_image + f32(sigma) * noise
    if model.image_input == CONCAT:
        inputs["masked_image_latents"] = encode(device, "masked_image_latents", pixels,
                                                buffers.write("encoder_pixel_mask", pixel_mask(image.masks)))
    else:
        inputs.update(image_latents=latents_buffer, image_noise=buffers.write("image_noise", noise))
    return first.astype(f32), inputs


def encode(device: Device, key: str, pixels: np.ndarray, repaint: Any) -> Any:
    """(B, H, W, 3) uint8 images -> (B, 4, h, w) latents in the device buffer `key`; pixels where
    the (B, H, W, 1) device buffer repaint is 1 are encoded gray (the masked image of inpainting U-Nets)."""
    f = device.model.vae_scale_factor
    b, height, width = pixels.shape[:3]
    out = device.buffers.get(key, (b, device.model.latent_channels, height // f, width // f), "float32")
    device.engines[ENCODER].run({"images": device.buffers.write("encoder_images", pixels), "pixel_mask": repaint},
                                {"image_latents": out})
    return out
