"""Hires fix: the second pass is sdrt's own img2img on the upscaled first pass, bit for bit (that img2img is
checked against diffusers in test_images, and from latents here); the upscalers against torch and PIL."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from sdrt.errors import InputError  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402
from sdrt.upscale import LATENT_UPSCALERS, upscale_latents  # noqa: E402
from tests.test_images import diffusers_run, sdrt_run  # noqa: E402
from tests.test_parity import assert_parity  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry"
FIRST = dict(negative_prompt=NEGATIVE, steps=4, seed=7, guidance=7.5, height=64, width=64, batch=2)


@pytest.mark.parametrize("upscaler", LATENT_UPSCALERS)
@pytest.mark.parametrize("size", [(16, 24), (13, 17), (6, 9)])
def test_latent_upscalers_are_torch_interpolate(upscaler, size):
    """A1111's latent modes: torch.nn.functional.interpolate(size, mode, antialias), align_corners False."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=mode, antialias=antialias).numpy()
    np.testing.assert_allclose(upscale_latents(x, *size, upscaler), ref, atol=1e-5, rtol=0)


def _reference_second_pass(pipe, first, upscaler, strength, steps, height, width, **kwargs):
    """sdrt's img2img at (height, width) on the first pass's result upscaled: the latents by sdrt.upscale (torch's
    interpolate to 1e-5, test above; its last bits can move a pixel), the images by PIL."""
    if upscaler in LATENT_UPSCALERS:
        image = {"image_latents": list(upscale_latents(first.latents, height // 8, width // 8, upscaler))}
    else:
        method = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}[upscaler]
        image = {"image": [np.asarray(Image.fromarray(im).resize((width, height), method)) for im in first.images]}
    config = pipe.make_config(PROMPT, **{**FIRST, "steps": steps, "height": height, "width": width, **kwargs},
                              strength=strength, **image)
    return pipe.generate(config).images


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos", "Nearest"])
def test_hires_second_pass_is_img2img_on_the_upscaled_first_pass_bit_for_bit(tiny_engines, upscaler):
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    hires = pipe.generate(pipe.make_config(PROMPT, **FIRST, enable_hr=True, hr_upscaler=upscaler, hr_scale=1.5,
                                           denoising_strength=0.6))
    assert hires.images.shape == (2, 96, 96, 3)
    first = pipe.generate(pipe.make_config(PROMPT, **FIRST), keep_latents=True)
    want = _reference_second_pass(pipe, first, upscaler, 0.6, 4, 96, 96)
    np.testing.assert_array_equal(hires.images, want)
    plain = np.asarray(Image.fromarray(first.images[0]).resize((96, 96), Image.Resampling.LANCZOS))
    assert np.abs(hires.images[0].astype(int) - plain.astype(int)).max() > 10, "the second pass changed nothing"
    assert len(hires.timings.step_engine_s) == 4 + int(4 * 0.6)
    assert hires.seeds == [7, 8]


def test_hires_second_pass_steps_prompt_sampler_and_resize(tiny_engines):
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    config = pipe.make_config(PROMPT, **FIRST, enable_hr=True, hr_upscaler="Lanczos", hr_resize_x=80,
                              hr_second_pass_steps=6, denoising_strength=0.5, hr_prompt="a green pear, (dark:1.2)",
                              hr_negative_prompt="noisy", hr_sampler="heun")
    assert (config.hires.size.width, config.hires.size.height) == (80, 80)
    hires = pipe.generate(config)
    first = pipe.generate(pipe.make_config(PROMPT, **FIRST))
    up = [np.asarray(Image.fromarray(im).resize((80, 80), Image.Resampling.LANCZOS)) for im in first.images]
    second = pipe.make_config("a green pear, (dark:1.2)", **{**FIRST, "negative_prompt": "noisy", "steps": 6,
                                                             "height": 80, "width": 80}, scheduler="heun",
                              image=up, strength=0.5)
    np.testing.assert_array_equal(hires.images, pipe.generate(second).images)
    text = hires.parameters(1)
    assert "Steps: 4, " in text and "Size: 64x64, " in text and "Seed: 8, " in text
    assert ('Denoising strength: 0.5, Hires resize: 80x80, Hires steps: 6, Hires upscaler: Lanczos, '
            'Hires prompt: "a green pear, (dark:1.2)", Hires negative prompt: noisy, Hires sampler: Heun, '
            'Hires schedule type: Automatic, ') in text


def test_hires_infotext_as_a1111_writes_it(tiny_engines):
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    config = pipe.make_config(PROMPT, **FIRST, enable_hr=True, hr_scale=1.5)
    assert "Denoising strength: 0.7, Hires upscale: 1.5, Hires upscaler: Latent, Version" in \
        pipe.generate(config).parameters(0)


def test_img2img_from_latents_matches_diffusers(tiny_model, tiny_engines, monkeypatch):
    """diffusers' img2img takes 4-channel latents as its image (no VAE encode): the Latent upscalers' second pass."""
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ours, noise, _ = sdrt_run(tiny_engines, "euler", 10, image_latents=list(latents), strength=0.6, height=64,
                              width=64)
    ref = diffusers_run("StableDiffusionImg2ImgPipeline", tiny_model, "euler", noise, monkeypatch,
                        image=torch.from_numpy(latents), strength=0.6, num_inference_steps=10)
    assert_parity(ours, ref, "img2img from latents")


@pytest.mark.parametrize("kwargs, match", [
    (dict(enable_hr=True, hr_upscaler="ESRGAN_4x"), "hr_upscaler 'ESRGAN_4x' is not available: choose one of Latent"),
    (dict(enable_hr=True, hr_resize_x=2048), r"second pass is 2048x2048: height must be a multiple of 8 from .* got 2048"),
    (dict(enable_hr=True, hr_scale=0.5), "hr_scale must be a number from 1"),
    (dict(enable_hr=True, hr_resize_x=96, hr_resize_y=64), "sdrt does not crop"),
    (dict(enable_hr=True, hr_second_pass_steps=-1), "hr_second_pass_steps must be"),
    (dict(enable_hr=True, denoising_strength=0.1), "runs no step"),
    (dict(enable_hr=True, hr_sampler="dpm_fast"), "unknown scheduler 'dpm_fast'"),
    (dict(hr_upscaler="Latent"), "pass enable_hr=True too"),
])
def test_bad_hires_settings_are_refused_naming_the_fix(tiny_engines, kwargs, match):
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    with pytest.raises(InputError, match=match):
        pipe.make_config(PROMPT, **FIRST, **kwargs)


def test_hires_on_an_image_is_refused(tiny_engines):
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    with pytest.raises(InputError, match="leave image out"):
        pipe.make_config(PROMPT, **FIRST, image=np.zeros((64, 64, 3), np.uint8), enable_hr=True)


def test_sdxl_hires_fix_runs_both_passes(tiny_sdxl_engines):
    pipe = Pipeline.load(tiny_sdxl_engines, backend="ort-cpu")
    config = pipe.make_config(PROMPT, steps=3, seed=1, height=64, width=64, enable_hr=True, hr_scale=1.5)
    result = pipe.generate(config)
    assert result.images.shape == (1, 96, 96, 3) and result.images.std() > 1
    assert len(result.timings.step_engine_s) == 3 + int(3 * 0.7)
