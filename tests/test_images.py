"""Images in: img2img and inpainting (9-channel inpainting U-Nets and the blend for ordinary models)
against diffusers' own pipelines on the same weights, the same initial noise and deterministic
(mean) image latents. fp32 engines: max pixel error ≤ 2/255."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from sdrt.errors import InputError  # noqa: E402
from sdrt.export.reference import diffusers_scheduler  # noqa: E402
from sdrt.images import Picture, overlay  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402
from sdrt.schedulers import make_plan  # noqa: E402
from tests.pictures import box_mask, png_bytes  # noqa: E402
from tests.pictures import smooth_picture as picture_of  # noqa: E402
from tests.test_parity import MAX_PIXEL_ERROR, assert_parity  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry"


def diffusers_run(cls_name, model_dir, scheduler, init_noise, monkeypatch, **kwargs):
    """diffusers' `cls_name` pipeline with sdrt's initial noise and the latent distribution's mean."""
    pipe = getattr(diffusers, cls_name).from_pretrained(model_dir)
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    module = sys.modules[type(pipe).__module__]
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(init_noise).reshape(shape))
    out = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, **{"output_type": "np", **kwargs}).images
    return out if kwargs.get("output_type") == "latent" else (out * 255).round().astype(np.uint8)


def sdrt_run(engines, scheduler, steps, **kwargs):
    pipe = Pipeline.load(engines, backend="ort-cpu")
    config = pipe.make_config(PROMPT, negative_prompt=NEGATIVE, steps=steps, scheduler=scheduler, seed=42,
                              guidance=7.5, **kwargs)
    return pipe.generate(config).images, pipe.initial_noise(config)[0], config


# --- img2img ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m_karras", "heun", "unipc", "lms"])
def test_img2img_matches_diffusers(tiny_model, tiny_engines, scheduler, strength, monkeypatch):
    image = picture_of()
    ours, noise, _ = sdrt_run(tiny_engines, scheduler, 10, image=image, strength=strength)
    ref = diffusers_run("StableDiffusionImg2ImgPipeline", tiny_model, scheduler, noise, monkeypatch,
                        image=image, strength=strength, num_inference_steps=10)
    assert_parity(ours, ref, f"img2img {scheduler} strength {strength}")


@pytest.mark.parametrize("scheduler,calls_a_step", [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("strength,runs", [(0.3, 3), (0.75, 7), (1.0, 10)])
def test_img2img_runs_the_last_steps_times_strength(tiny_engines, strength, runs, scheduler, calls_a_step):
    """A two-call sampler's last step is one call: 2 × runs - 1 engine calls."""
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    result = pipe.generate(pipe.make_config("x", image=picture_of(), strength=strength, steps=10, scheduler=scheduler))
    assert len(result.timings.step_engine_s) == calls_a_step * runs - (calls_a_step - 1)


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m_karras"])
def test_sdxl_img2img_matches_diffusers(tiny_sdxl_model, tiny_sdxl_engines, scheduler, monkeypatch):
    image = picture_of(64, 64)
    ours, noise, _ = sdrt_run(tiny_sdxl_engines, scheduler, 8, image=image, strength=0.6)
    ref = diffusers_run("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_model, scheduler, noise, monkeypatch,
                        image=image, strength=0.6, num_inference_steps=8)
    assert_parity(ours, ref, f"sdxl img2img {scheduler}")


def test_img2img_size_defaults_to_the_image_rounded_down_and_resizes_when_asked(tiny_engines):
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    config = pipe.make_config("x", image=picture_of(83, 70), steps=2)
    assert (config.size.width, config.size.height) == (80, 64)
    assert config.image.images[0].pixels.shape == (64, 80, 3)
    assert pipe.make_config("x", image=picture_of(83, 70), width=64, height=72, steps=2).image.images[0].size == (64, 72)


def test_img2img_batch_rows_equal_single_images(tiny_engines):
    """Row i of a batch with its own image is the single image with seed + i (the server batches on it)."""
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    pictures = [picture_of(seed=1), picture_of(seed=2)]
    both = pipe.generate(pipe.make_config(["a", "b"], image=pictures, strength=0.7, steps=4, seed=5)).images
    for i in range(2):
        one = pipe.generate(pipe.make_config(["a", "b"][i], image=pictures[i], strength=0.7, steps=4, seed=5 + i)).images
        assert np.abs(both[i].astype(int) - one[0].astype(int)).max() <= 1


# --- inpainting ---------------------------------------------------------------------------------------

def diffusers_overlay(image: np.ndarray, original: Image.Image, mask: Image.Image) -> np.ndarray:
    """diffusers' own apply_overlay (what its pipelines do with padding_mask_crop), on uint8 arrays."""
    from diffusers.image_processor import VaeImageProcessor

    out = VaeImageProcessor().apply_overlay(mask, original, Image.fromarray(image))
    return np.asarray(out)


@pytest.mark.parametrize("scheduler,strength", [("euler", 1.0), ("ddim", 1.0), ("dpmpp_2m_karras", 0.75)])
def test_inpainting_model_matches_diffusers(tiny_inpaint_model, tiny_inpaint_engines, scheduler, strength,
                                            monkeypatch):
    image, mask = picture_of(), box_mask()
    ours, noise, _ = sdrt_run(tiny_inpaint_engines, scheduler, 8, image=image, mask_image=mask, strength=strength,
                              mask_blur=0)
    ref = diffusers_run("StableDiffusionInpaintPipeline", tiny_inpaint_model, scheduler, noise, monkeypatch,
                        image=image, mask_image=mask, strength=strength, num_inference_steps=8)
    assert_parity(ours, np.stack([diffusers_overlay(r, image, mask) for r in ref]), f"9-channel inpaint {scheduler}")


@pytest.mark.parametrize("scheduler,strength", [("euler", 1.0), ("euler", 0.8), ("dpmpp_2m_karras", 0.8),
                                                ("ddim", 1.0)])
def test_blend_inpainting_of_an_ordinary_model_matches_diffusers(tiny_model, tiny_engines, scheduler, strength,
                                                                 monkeypatch):
    """A 4-channel model in diffusers' StableDiffusionInpaintPipeline: the known region re-noised every step."""
    image, mask = picture_of(), box_mask()
    ours, noise, _ = sdrt_run(tiny_engines, scheduler, 8, image=image, mask_image=mask, strength=strength, mask_blur=0)
    ref = diffusers_run("StableDiffusionInpaintPipeline", tiny_model, scheduler, noise, monkeypatch,
                        image=image, mask_image=mask, strength=strength, num_inference_steps=8)
    assert_parity(ours, np.stack([diffusers_overlay(r, image, mask) for r in ref]), f"blend inpaint {scheduler}")


def test_blend_inpainting_keeps_outside_the_blurred_mask_and_repaints_inside(tiny_engines):
    image, mask = picture_of(), box_mask()
    ours, _, _ = sdrt_run(tiny_engines, "euler", 6, image=image, mask_image=mask, mask_blur=4)
    from PIL import ImageFilter

    reach = np.asarray(mask.filter(ImageFilter.MaxFilter(4 * 3 * 2 + 1))) > 0  # 3 σ of the blur, both ways
    diff = np.abs(ours[0].astype(int) - np.asarray(image, dtype=int))
    assert diff[~reach].max() <= MAX_PIXEL_ERROR, "pixels outside the mask must be the original's"
    inside = np.asarray(mask) > 0
    assert diff[inside].mean() > 10, "the masked area must be repainted"


def test_mask_invert_equals_the_inverted_mask(tiny_engines):
    image, mask = picture_of(), box_mask()
    inverted = Image.fromarray(255 - np.asarray(mask))
    a, _, _ = sdrt_run(tiny_engines, "euler", 4, image=image, mask_image=mask, inpainting_mask_invert=True)
    b, _, _ = sdrt_run(tiny_engines, "euler", 4, image=image, mask_image=inverted)
    np.testing.assert_array_equal(a, b)


def test_latent_noise_fill_changes_only_the_masked_start(tiny_engines):
    image, mask = picture_of(), box_mask()
    runs = {fill: sdrt_run(tiny_engines, "euler", 6, image=image, mask_image=mask, strength=0.6,
                           inpainting_fill=fill, mask_blur=0)[0][0].astype(int)
            for fill in ("original", "latent noise", "latent nothing")}
    inside = np.asarray(mask) > 0
    assert np.abs(runs["original"] - runs["latent noise"])[inside].mean() > 2
    assert np.abs(runs["original"] - runs["latent nothing"])[inside].mean() > 2
    np.testing.assert_array_equal(runs["original"][~inside], runs["latent noise"][~inside])


@pytest.mark.parametrize("blur", [0, 4])
def test_overlay_matches_diffusers_apply_overlay(blur):
    """Ours composites in float; diffusers through PIL's 8-bit premultiplied RGBa: ≤ 2/255 apart."""
    from diffusers.image_processor import VaeImageProcessor

    original, mask = picture_of(), box_mask()
    generated = np.asarray(picture_of(seed=9))[::-1].copy()
    blurred = VaeImageProcessor.blur(mask, blur) if blur else mask
    ref = diffusers_overlay(generated, original, blurred)
    binary = Picture(np.asarray(mask))
    ours = overlay(generated, Picture(np.asarray(original)), binary, blur)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


def test_fp16_img2img_and_inpainting_close_to_fp32(tiny_engines, tiny_engines_fp16):
    from sdrt.bench.stats import psnr

    for kwargs in (dict(image=picture_of(), strength=0.6), dict(image=picture_of(), mask_image=box_mask())):
        images = [sdrt_run(engines, "euler", 6, **kwargs)[0] for engines in (tiny_engines, tiny_engines_fp16)]
        assert psnr(images[1], images[0]) >= 30.0, kwargs.keys()


# --- SD 3 / 3.5 (flow matching) -------------------------------------------------------------------------

@pytest.mark.parametrize("strength,runs", [(0.35, 4), (0.75, 8)])  # ⌊10 × s⌋ would be 3 and 7 (SD 1.x / XL)
def test_sd3_img2img_matches_diffusers(tiny_sd3_model, tiny_sd3_engines, strength, runs, monkeypatch):
    """StableDiffusion3Img2ImgPipeline: σ-interpolated start (1 - σ)·x0 + σ·ε and its own step rounding."""
    image = picture_of()
    ours, noise, _ = sdrt_run(tiny_sd3_engines, "euler", 10, image=image, strength=strength)
    assert len(make_plan("euler", Pipeline.load(tiny_sd3_engines).schedule, 10, strength)) == runs
    ref = diffusers_run("StableDiffusion3Img2ImgPipeline", tiny_sd3_model, "euler", noise, monkeypatch,
                        image=image, strength=strength, num_inference_steps=10, height=64, width=64)
    assert_parity(ours, ref, f"sd3 img2img strength {strength}")


def sd3_decode(model_dir, latents) -> np.ndarray:
    """diffusers' StableDiffusion3Pipeline decode, z = latents / scaling_factor + shift_factor. Its inpainting
    pipeline (0.42) leaves out the shift (diffusers issue #13611, finding 1), though it encodes with it."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    return (VaeImageProcessor().postprocess(image, output_type="np") * 255).round().astype(np.uint8)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sd3_blend_inpainting_matches_diffusers(tiny_sd3_model, tiny_sd3_engines, strength, monkeypatch):
    """StableDiffusion3InpaintPipeline's loop with the 16-channel transformer: the known region re-noised to
    the next σ after every step, in the graph; decoded as diffusers' other SD3 pipelines decode."""
    image, mask = picture_of(), box_mask()
    ours, noise, _ = sdrt_run(tiny_sd3_engines, "euler", 8, image=image, mask_image=mask, strength=strength,
                              mask_blur=0)
    latents = diffusers_run("StableDiffusion3InpaintPipeline", tiny_sd3_model, "euler", noise, monkeypatch,
                            image=image, mask_image=mask, strength=strength, num_inference_steps=8, height=64,
                            width=64, output_type="latent")
    ref = sd3_decode(tiny_sd3_model, latents)
    assert_parity(ours, np.stack([diffusers_overlay(r, image, mask) for r in ref]), f"sd3 inpaint {strength}")


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(image=b"not an image"), "not a readable image"),
    (dict(image=png_bytes(picture_of())[:200]), "not a readable image"),  # truncated PNG
    (dict(image=picture_of(), mask_image=box_mask(48, 64)), "mask is 48x64 pixels but the image is 64x64"),
    (dict(image=picture_of(), strength=0), r"strength must be a number in \(0, 1\]"),
    (dict(image=picture_of(), strength=1.5), r"strength must be a number in \(0, 1\]"),
    (dict(image=picture_of(), strength=0.05), "runs no step"),
    (dict(image=picture_of(4000, 3000)), "pass width and height"),
    (dict(mask_image=box_mask()), "mask_image needs the image"),
    (dict(strength=0.5), "strength applies to img2img"),
    (dict(image=np.zeros((64, 64, 3), np.float32)), "must be uint8"),
    (dict(image=picture_of(), mask_image=box_mask(), mask_blur=-1), "mask_blur must be"),
    (dict(image=picture_of(), mask_image=box_mask(), inpainting_fill="fill"), "inpainting_fill must be one of"),
    (dict(image=[picture_of()] * 3), "one per row"),
])
def test_bad_image_input_is_refused_with_the_fix(tiny_engines, kwargs, match):
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    with pytest.raises(InputError, match=match):
        pipe.make_config("x", steps=10, **kwargs)


def test_inpainting_model_needs_an_image_and_a_mask(tiny_inpaint_engines):
    pipe = Pipeline.load(tiny_inpaint_engines, backend="ort-cpu")
    with pytest.raises(InputError, match="inpainting model"):
        pipe.make_config("x")
    with pytest.raises(InputError, match="mask_image as well"):
        pipe.make_config("x", image=picture_of())


def test_sdxl_blend_inpainting_matches_diffusers(tiny_sdxl_model, tiny_sdxl_engines, monkeypatch):
    image, mask = picture_of(), box_mask()
    ours, noise, _ = sdrt_run(tiny_sdxl_engines, "euler", 8, image=image, mask_image=mask, strength=0.8, mask_blur=0)
    ref = diffusers_run("StableDiffusionXLInpaintPipeline", tiny_sdxl_model, "euler", noise, monkeypatch,
                        image=image, mask_image=mask, strength=0.8, num_inference_steps=8)
    assert_parity(ours, np.stack([diffusers_overlay(r, image, mask) for r in ref]), "sdxl blend inpaint")
