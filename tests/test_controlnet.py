"""ControlNet in the denoise step: parity with diffusers' ControlNet pipelines on tiny random models (one and
two ControlNets, scales, a guidance window, batch rows with different hints, img2img), fp16 against fp32,
and the refusals. The test ControlNets' zero convolutions are random, so a hint changes the picture."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.bench.stats import psnr  # noqa: E402
from sdrt.control import step_scales  # noqa: E402
from sdrt.errors import InputError, ModelError  # noqa: E402
from sdrt.export.exporter import ExportConfig, export  # noqa: E402
from sdrt.export.reference import diffusers_scheduler  # noqa: E402
from sdrt.export.testmodel import write_test_controlnet  # noqa: E402
from sdrt.manifest import read_manifest, sha256_file  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402
from sdrt.request import Control  # noqa: E402
from tests.pictures import smooth_picture  # noqa: E402
from tests.test_parity import MAX_PIXEL_ERROR, assert_parity  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry"
SIZE = 64


def hint(seed: int, size: int = SIZE) -> np.ndarray:
    """A canny-like hint: white outlines of random boxes on black, (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size, 3), np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = x0 + rng.integers(8, size // 2, 2)
        out[y0:y1, [x0, x1 - 1]] = 255
        out[[y0, y1 - 1], x0:x1] = 255
    return out


@pytest.fixture(scope="module")
def controlnets(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return [write_test_controlnet(tiny_model, root / name, seed) for seed, name in enumerate(("canny", "depth"), 1)]


@pytest.fixture(scope="module")
def one_cn_engines(tiny_model, controlnets, tmp_path_factory):
    out = tmp_path_factory.mktemp("cn") / "one"
    export(ExportConfig(tiny_model, out, precision="fp32", controlnets=(controlnets[0],)), progress=False)
    return out


@pytest.fixture(scope="module")
def two_cn_engines(tiny_model, controlnets, tmp_path_factory):
    out = tmp_path_factory.mktemp("cn") / "two"
    export(ExportConfig(tiny_model, out, precision="fp32", controlnets=tuple(controlnets)), progress=False)
    return out


PIPELINES = {"txt2img": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline",
             "inpaint": "StableDiffusionControlNetInpaintPipeline"}


def diffusers_controlnet(model_dir, controlnet_dirs, scheduler, init_noise, monkeypatch, kind="txt2img", batch=1,
                         **kwargs):
    """diffusers' StableDiffusionControlNet[Img2Img|Inpaint]Pipeline on sdrt's initial noise (the VAE's mean for
    images in).
    Hints go in as PIL images: diffusers' image processor reads a uint8 array's values as they are (0-255)."""
    from PIL import Image

    def pil(value):
        if isinstance(value, list):
            return [pil(v) for v in value]
        return Image.fromarray(value) if isinstance(value, np.ndarray) else value

    for key in ("image", "control_image"):
        if key in kwargs:
            kwargs[key] = pil(kwargs[key])
    base = diffusers.StableDiffusionPipeline.from_pretrained(model_dir)
    nets = [diffusers.ControlNetModel.from_pretrained(d) for d in controlnet_dirs]
    cls = getattr(diffusers, PIPELINES[kind])
    components = {k: v for k, v in base.components.items() if k != "image_encoder"}
    pipe = cls(**components, controlnet=nets if len(nets) > 1 else nets[0], requires_safety_checker=False)
    pipe.scheduler = diffusers_scheduler(scheduler, base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    module = sys.modules[type(pipe).__module__]
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(init_noise).reshape(shape))
    if kind != "txt2img":
        monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                            out.latent_dist.mode())
    out = pipe([PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, guidance_scale=7.5, height=SIZE, width=SIZE,
               output_type="np",
               **kwargs).images
    return (out * 255).round().astype(np.uint8)


def sdrt_controlnet(engines, scheduler, steps, batch=1, **kwargs):
    pipe = Pipeline.load(engines, backend="ort-cpu")
    config = pipe.make_config([PROMPT] * batch, negative_prompt=NEGATIVE, steps=steps, scheduler=scheduler, seed=42,
                              guidance=7.5, height=SIZE, width=SIZE, **kwargs)
    return pipe.generate(config).images, pipe.initial_noise(config)[0]


def assert_changed(ours, plain, by=20):
    """The hint moved the picture far past the parity tolerance (the comparison means something)."""
    assert int(np.abs(ours.astype(int) - plain.astype(int)).max()) > by, "the ControlNet changed nothing"


@pytest.mark.parametrize("scheduler,scale", [("dpmpp_2m_karras", 1.0), ("euler", 0.5)])
def test_one_controlnet_matches_diffusers(tiny_model, controlnets, one_cn_engines, scheduler, scale, monkeypatch):
    hints = [hint(1), hint(2)]
    ours, noise = sdrt_controlnet(one_cn_engines, scheduler, 4, batch=2, control_image=hints,
                                  controlnet_conditioning_scale=scale)
    ref = diffusers_controlnet(tiny_model, controlnets[:1], scheduler, noise, monkeypatch, num_inference_steps=4,
                               batch=2, image=hints,
                               controlnet_conditioning_scale=scale)
    assert_parity(ours, ref, f"controlnet {scheduler} x{scale}")
    plain, _ = sdrt_controlnet(one_cn_engines, scheduler, 4, batch=2)
    assert_changed(ours, plain)
    assert int(np.abs(ours[0].astype(int) - ours[1].astype(int)).max()) > 20, "rows with different hints alike"


def test_two_controlnets_with_a_window_ending_at_half_match_diffusers(tiny_model, controlnets, two_cn_engines,
                                                                      monkeypatch):
    hints = [hint(3), hint(4)]
    settings = dict(controlnet_conditioning_scale=[0.5, 1.0], control_guidance_start=[0.0, 0.0],
                    control_guidance_end=[1.0, 0.5])
    ours, noise = sdrt_controlnet(two_cn_engines, "dpmpp_2m_karras", 6, control_image=hints, **settings)
    ref = diffusers_controlnet(tiny_model, controlnets, "dpmpp_2m_karras", noise, monkeypatch, num_inference_steps=6,
                               image=hints, **settings)
    assert_parity(ours, ref, "two controlnets")
    full, _ = sdrt_controlnet(two_cn_engines, "dpmpp_2m_karras", 6, control_image=hints,
                              controlnet_conditioning_scale=[0.5, 1.0])
    assert_changed(ours, full, by=MAX_PIXEL_ERROR)  # the window's last 3 steps moved it past the tolerance (5/255)
    plain, _ = sdrt_controlnet(two_cn_engines, "dpmpp_2m_karras", 6)
    assert_changed(ours, plain)


def test_a_two_call_sampler_windows_engine_calls_as_diffusers_counts_timesteps(tiny_model, controlnets,
                                                                              one_cn_engines, monkeypatch):
    ours, noise = sdrt_controlnet(one_cn_engines, "heun", 4, control_image=hint(5), control_guidance_start=0.3)
    ref = diffusers_controlnet(tiny_model, controlnets[:1], "heun", noise, monkeypatch, num_inference_steps=4,
                               image=hint(5), control_guidance_start=0.3)
    assert_parity(ours, ref, "heun with a window")


def test_img2img_with_a_controlnet_matches_diffusers(tiny_model, controlnets, one_cn_engines, monkeypatch):
    init = np.asarray(smooth_picture(SIZE, SIZE))
    settings = dict(strength=0.6, controlnet_conditioning_scale=0.8)  # diffusers' img2img default: 0.8
    ours, noise = sdrt_controlnet(one_cn_engines, "euler", 6, image=init, control_image=hint(6), **settings)
    ref = diffusers_controlnet(tiny_model, controlnets[:1], "euler", noise, monkeypatch, kind="img2img",
                               num_inference_steps=6, image=init, control_image=hint(6), **settings)
    assert_parity(ours, ref, "controlnet img2img")


@pytest.mark.parametrize("unet", ["9-channel", "4-channel blend"])
def test_inpainting_with_a_controlnet_matches_diffusers(unet, tiny_model, tiny_inpaint_model, controlnets,
                                                        one_cn_engines, tmp_path, monkeypatch):
    """StableDiffusionControlNetInpaintPipeline: the ControlNet takes the 4 latent channels, an inpainting
    U-Net also the mask and the masked image's latents; an ordinary one re-noises the known region."""
    from tests.pictures import box_mask
    from tests.test_images import diffusers_overlay

    model, engines = tiny_model, one_cn_engines
    if unet == "9-channel":  # an SD 1.x ControlNet fits the inpainting U-Net: the same blocks, 4 latent channels
        model, engines = tiny_inpaint_model, tmp_path / "e"
        export(ExportConfig(model, engines, precision="fp32", controlnets=(controlnets[0],)), progress=False)
    image, mask = smooth_picture(SIZE, SIZE), box_mask(SIZE, SIZE)
    settings = dict(strength=1.0, controlnet_conditioning_scale=0.8)  # diffusers' inpaint default: 0.5
    ours, noise = sdrt_controlnet(engines, "euler", 6, image=image, mask_image=mask, mask_blur=0,
                                  control_image=hint(6), **settings)
    ref = diffusers_controlnet(model, controlnets[:1], "euler", noise, monkeypatch, kind="inpaint",
                               num_inference_steps=6, image=image, mask_image=mask, control_image=hint(6), **settings)
    assert_parity(ours, np.stack([diffusers_overlay(r, image, mask) for r in ref]), f"controlnet inpaint {unet}")
    plain, _ = sdrt_controlnet(engines, "euler", 6, image=image, mask_image=mask, mask_blur=0, strength=1.0)
    assert_changed(ours, plain)


def test_batch_rows_with_their_hints_equal_single_images(one_cn_engines):
    pipe = Pipeline.load(one_cn_engines, backend="ort-cpu")
    both = pipe.generate(pipe.make_config([PROMPT] * 2, steps=3, seed=9, control_image=[hint(7), hint(8)])).images
    second = pipe.generate(pipe.make_config(PROMPT, steps=3, seed=10, control_image=hint(8))).images
    np.testing.assert_allclose(both[1].astype(int), second[0].astype(int), atol=1)


@pytest.fixture(scope="module")
def one_cn_engines_fp16(tiny_model, controlnets, tmp_path_factory):
    out = tmp_path_factory.mktemp("cn") / "one-fp16"
    export(ExportConfig(tiny_model, out, precision="fp16", controlnets=(controlnets[0],)), progress=False)
    return out


def test_fp16_controlnet_engines_are_close_to_fp32(one_cn_engines, one_cn_engines_fp16):
    settings = dict(control_image=hint(1), controlnet_conditioning_scale=1.0)
    fp32, _ = sdrt_controlnet(one_cn_engines, "euler", 4, **settings)
    fp16, _ = sdrt_controlnet(one_cn_engines_fp16, "euler", 4, **settings)
    assert psnr(fp16, fp32) >= 30


def test_a_tensorrt_rtx_plan_of_the_controlnet_step_builds_on_the_cpu(one_cn_engines_fp16, tmp_path):
    """The hint and scale inputs carry through `sdrt build`: the hint profiled over the pixel range."""
    from sdrt.plans import check_plans
    from tests.test_build import _build

    pytest.importorskip("tensorrt_rtx")
    plans = _build(one_cn_engines_fp16, tmp_path / "plans", shapes="dynamic:64-128,batch=1-2", archs=("sm89",))
    manifest = read_manifest(plans)
    step = manifest.plans.components["denoise_step"].profile
    assert step["control_image_0"] == {"min": [1, 64, 64, 3], "opt": [1, 64, 64, 3], "max": [2, 128, 128, 3]}
    check_plans(plans, manifest, manifest.plans.flavour, manifest.plans.version, "sm89")


def test_engines_with_controlnets_run_plain_prompts_as_the_plain_engines(tiny_engines, one_cn_engines):
    plain = Pipeline.load(tiny_engines, backend="ort-cpu")
    with_cn = Pipeline.load(one_cn_engines, backend="ort-cpu")
    kwargs = dict(steps=3, seed=3, height=SIZE, width=SIZE)
    np.testing.assert_allclose(with_cn(PROMPT, **kwargs)[0], plain(PROMPT, **kwargs)[0], atol=1)


def test_hires_fix_runs_the_controlnet_in_both_passes_with_the_hint_resized_for_each(one_cn_engines):
    from PIL import Image

    from sdrt.control_request import crop_and_resize

    pipe = Pipeline.load(one_cn_engines, backend="ort-cpu")
    sent = hint(4, size=160)  # larger than either pass: each crop-resizes it from what was sent
    common = dict(negative_prompt=NEGATIVE, seed=3, height=SIZE, width=SIZE, scheduler="euler",
                  controlnet_conditioning_scale=0.8, control_guidance_start=0.2)
    hires = pipe.generate(pipe.make_config(PROMPT, steps=4, control_image=sent, enable_hr=True, hr_scale=1.5,
                                           hr_upscaler="Lanczos", denoising_strength=0.6, **common))
    first = pipe.generate(pipe.make_config(PROMPT, steps=4, control_image=sent, **common))
    up = np.asarray(Image.fromarray(first.images[0]).resize((96, 96), Image.Resampling.LANCZOS))
    second = {**common, "height": 96, "width": 96}
    want = pipe.generate(pipe.make_config(PROMPT, steps=4, image=up, strength=0.6, control_image=sent, **second))
    np.testing.assert_array_equal(hires.images, want.images)
    resized = np.asarray(crop_and_resize(Image.fromarray(sent), 96, 96))
    np.testing.assert_array_equal(pipe.make_config(PROMPT, control_image=sent, **second).control.images[0][0].pixels,
                                  resized)
    plain = {k: v for k, v in second.items() if not k.startswith("control")}
    without = pipe.generate(pipe.make_config(PROMPT, steps=4, image=up, strength=0.6, **plain))
    assert_changed(hires.images, without.images, by=MAX_PIXEL_ERROR)  # the second pass is guided too
    assert "ControlNet 0: " in hires.parameters(0) and "Hires upscaler: Lanczos" in hires.parameters(0)


def test_a_hint_of_another_size_is_cropped_and_resized_as_a1111(one_cn_engines):
    from PIL import Image

    from sdrt.control_request import crop_and_resize

    wide = Image.fromarray(hint(2, 128)).resize((192, 128))
    cropped = crop_and_resize(wide, SIZE, SIZE)
    assert cropped.size == (SIZE, SIZE)
    pipe = Pipeline.load(one_cn_engines, backend="ort-cpu")
    given = pipe.make_config(PROMPT, steps=2, height=SIZE, width=SIZE, control_image=wide)
    assert given.control.images[0][0].pixels.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(given.control.images[0][0].pixels, np.asarray(cropped))


def test_the_resize_modes_fit_a_hint_as_sd_webui_controlnet():
    from PIL import Image

    from sdrt.control_request import just_resize, resize_and_fill

    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :] = (10, 20, 30)  # its border's colour
    wide[10:30, 20:60] = 255
    filled = np.asarray(resize_and_fill(Image.fromarray(wide), 64, 64))
    assert filled.shape == (64, 64, 3)
    assert (filled[:16] == (10, 20, 30)).all() and (filled[48:] == (10, 20, 30)).all()  # 64x32 centred, bands above and below
    np.testing.assert_array_equal(filled[16:48], np.asarray(Image.fromarray(wide).resize((64, 32), Image.LANCZOS)))
    np.testing.assert_array_equal(np.asarray(just_resize(Image.fromarray(wide), 64, 64)),
                                  np.asarray(Image.fromarray(wide).resize((64, 64), Image.LANCZOS)))


@pytest.mark.parametrize("mode", ["Just Resize", "Resize and Fill"])
def test_a_resize_mode_reaches_the_hint_and_the_infotext(one_cn_engines, mode):
    from PIL import Image

    from sdrt.control_request import FITS

    wide = Image.fromarray(hint(2, 128)).resize((192, 128))
    pipe = Pipeline.load(one_cn_engines, backend="ort-cpu")
    config = pipe.make_config(PROMPT, steps=2, height=SIZE, width=SIZE, control_image=wide, control_resize_mode=mode)
    np.testing.assert_array_equal(config.control.images[0][0].pixels, np.asarray(FITS[mode](wide, SIZE, SIZE)))
    assert f"Resize Mode: {mode}, " in pipe.generate(config).parameters(0)
    with pytest.raises(InputError, match="control_resize_mode 'Stretch' is not one of Just Resize"):
        pipe.make_config(PROMPT, control_image=wide, control_resize_mode="Stretch")


def test_the_guidance_window_is_diffusers_controlnet_keep():
    control = Control(scales=(0.8, 1.0), start=(0.0, 0.25), end=(0.5, 1.0))
    got = step_scales(control, 3, 8, 13)
    assert got.shape == (8, 3, 2, 13) and (got == got[..., :1, :1]).all()  # balanced: one scale per call and net
    got = got[:, :, 0, 0]
    keep = [[1.0 - float(i / 8 < s or (i + 1) / 8 > e) for s, e in zip(control.start, control.end)] for i in range(8)]
    want = np.array([[k[0] * 0.8, k[1] * 1.0, 0.0] for k in keep], np.float32)
    np.testing.assert_array_equal(got, want)
    assert (got[:, 0] > 0).tolist() == [True] * 4 + [False] * 4 and got[:, 1].tolist() == [0.0] * 2 + [1.0] * 6


def test_control_modes_weigh_residuals_as_sd_webui_controlnet_and_diffusers_guess_mode():
    from sdrt.control import mode_weights

    soft = [0.825 ** (12 - r) for r in range(13)]  # sd-webui-controlnet's soft injection, SD 1.x's 13 residuals
    np.testing.assert_allclose(mode_weights("prompt", 13), [soft, soft])
    np.testing.assert_allclose(mode_weights("control", 13), [[0.0] * 13, soft])
    np.testing.assert_allclose(mode_weights("prompt", 10), [soft[:10], soft[:10]])  # SDXL: the first 10, as it does
    np.testing.assert_allclose(mode_weights("guess", 13), [[0.0] * 13, np.logspace(-1, 0, 13)])
    np.testing.assert_array_equal(mode_weights("balanced", 10), np.ones((2, 10)))
    got = step_scales(Control(scales=(0.5,), start=(0.0,), end=(0.5,), modes=("control",)), 1, 4, 13)
    np.testing.assert_allclose(got[:2, 0], [0.5 * mode_weights("control", 13)] * 2, rtol=1e-6)
    assert not got[2:].any()


def soft_weights(count):
    return torch.tensor([0.825 ** (12 - r) for r in range(count)])


@pytest.mark.parametrize("mode", ["guess", "control", "prompt"])
def test_control_modes_match_diffusers(mode, tiny_model, controlnets, one_cn_engines, monkeypatch):
    """guess: diffusers' guess_mode (the ControlNet on the prompt's rows, logspace(-1, 0) per residual).
    control: the same pipeline with sd-webui-controlnet's 0.825^(12 - r) in place of the logspace; prompt:
    those weights on every row, the ControlNet's outputs scaled by a wrapper around its forward."""
    kwargs = dict(control_image=hint(3), controlnet_conditioning_scale=0.9)
    ours, noise = sdrt_controlnet(one_cn_engines, "euler", 4, control_mode=mode, **kwargs)
    reference = {}
    if mode == "control":
        monkeypatch.setattr(torch, "logspace", lambda start, end, count, device=None: soft_weights(count).to(device))
    if mode != "prompt":
        reference["guess_mode"] = True
    else:
        forward = diffusers.ControlNetModel.forward

        def soft_forward(self, *a, **k):
            down, mid = forward(self, *a, **k)
            w = soft_weights(len(down) + 1)
            return [d * w[i] for i, d in enumerate(down)], mid * w[-1]
        monkeypatch.setattr(diffusers.ControlNetModel, "forward", soft_forward)
    ref = diffusers_controlnet(tiny_model, controlnets[:1], "euler", noise, monkeypatch, num_inference_steps=4,
                               image=hint(3), controlnet_conditioning_scale=0.9, **reference)
    assert_parity(ours, ref, f"control mode {mode}")
    balanced, _ = sdrt_controlnet(one_cn_engines, "euler", 4, **kwargs)
    assert_changed(ours, balanced, by=MAX_PIXEL_ERROR)


@pytest.mark.parametrize("kwargs,match", [
    (dict(control_image=[hint(1), hint(2), hint(3)]), "3 control images for 2 ControlNet"),
    (dict(control_image=[hint(1)], controlnet_conditioning_scale=float("nan")), "finite"),
    (dict(control_image=[hint(1)], controlnet_conditioning_scale=[1.0, 0.5]), "2 values for 1"),
    (dict(control_image=[hint(1)], control_guidance_start=0.6, control_guidance_end=0.5), "start < end"),
    (dict(controlnet_conditioning_scale=0.5), "without a control_image"),
    (dict(control_image=["not an image"]), "control image 0"),
    (dict(control_image=[hint(1)], control_mode="strong"), "'strong' is not one of balanced, prompt, control, guess"),
    (dict(control_image=[hint(1)], control_mode="prompt", guess_mode=True), "give one"),
    (dict(control_image=[hint(1)], control_mode=["prompt", "guess"]), "2 values for 1"),
    (dict(control_mode="guess"), "control_mode set without a control_image"),
])
def test_bad_controlnet_settings_are_refused_with_the_fix(two_cn_engines, kwargs, match):
    pipe = Pipeline.load(two_cn_engines, backend="ort-cpu")
    with pytest.raises(InputError, match=match):
        pipe.make_config(PROMPT, steps=2, **kwargs)


def test_a_hint_for_engines_without_controlnet_names_the_export(tiny_engines):
    with pytest.raises(InputError, match="--controlnet"):
        Pipeline.load(tiny_engines, backend="ort-cpu").make_config(PROMPT, control_image=hint(1))


def test_controlnets_that_do_not_fit_are_refused_with_nothing_written(tiny_model, tiny_sdxl_model, tiny_sd3_model,
                                                                      controlnets, tmp_path):
    sdxl_cn = write_test_controlnet(tiny_sdxl_model, tmp_path / "sdxl-canny", 1)
    with pytest.raises(ModelError, match="another architecture.*cross_attention_dim"):
        export(ExportConfig(tiny_model, tmp_path / "e", controlnets=(sdxl_cn,)), progress=False)
    with pytest.raises(InputError, match="SD3ControlNetModel"):
        export(ExportConfig(tiny_sd3_model, tmp_path / "e", controlnets=(controlnets[0],)), progress=False)
    with pytest.raises(ModelError, match="not a ControlNetModel"):
        export(ExportConfig(tiny_model, tmp_path / "e", controlnets=(tiny_model / "unet",)), progress=False)
    with pytest.raises(InputError, match="different names"):
        export(ExportConfig(tiny_model, tmp_path / "e", controlnets=(controlnets[0], controlnets[0])), progress=False)
    assert not any(p.name.startswith((".e", "e")) for p in tmp_path.iterdir())


def single_files(controlnet_dir, root):
    """One ControlNet folder as the three single-file layouts people download, each named as the folder."""
    from sdrt.export.original_layout import write_controlnet_file

    name = controlnet_dir.name
    (root / "diffusers").mkdir(parents=True)
    shutil.copy(controlnet_dir / "diffusion_pytorch_model.safetensors", root / "diffusers" / f"{name}.safetensors")
    return {"cldm": write_controlnet_file(controlnet_dir, mkdir(root / "cldm") / f"{name}.safetensors"),
            "cldm-bare": write_controlnet_file(controlnet_dir, mkdir(root / "bare") / f"{name}.safetensors", prefix=""),
            "diffusers": root / "diffusers" / f"{name}.safetensors"}


def mkdir(path):
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl_model"])
def test_single_controlnet_files_load_weight_for_weight_as_their_folder(model, tmp_path, request):
    from sdrt.export.controlnets import load_controlnet

    model_dir = request.getfixturevalue(model)
    folder = write_test_controlnet(model_dir, tmp_path / "canny", 1)
    unet = diffusers.UNet2DConditionModel.from_pretrained(model_dir / "unet")
    want = diffusers.ControlNetModel.from_pretrained(folder)
    for layout, path in single_files(folder, tmp_path / "files").items():
        got = load_controlnet(path, unet.config)
        assert got.state_dict().keys() == want.state_dict().keys(), layout
        for key, value in want.state_dict().items():
            assert torch.equal(got.state_dict()[key], value), (layout, key)
        assert {k: v for k, v in got.config.items() if not k.startswith("_") and want.config[k] != v} == {}, layout


def test_a_single_controlnet_file_exports_to_its_folders_images(tiny_model, controlnets, one_cn_engines, tmp_path):
    path = single_files(controlnets[0], tmp_path / "files")["cldm"]
    export(ExportConfig(tiny_model, tmp_path / "e", precision="fp32", controlnets=(path,)), progress=False)
    doc = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert doc["model"]["controlnets"] == ["canny"]  # the file's stem, as A1111 lists it
    assert doc["source"]["controlnets"][0] == {"name": "canny", "path": str(path.resolve()), "sha256": sha256_file(path)}
    kwargs = dict(control_image=[hint(1), hint(2)], controlnet_conditioning_scale=0.8)
    ours, _ = sdrt_controlnet(tmp_path / "e", "euler", 3, batch=2, **kwargs)
    want, _ = sdrt_controlnet(one_cn_engines, "euler", 3, batch=2, **kwargs)
    assert int(np.abs(ours.astype(int) - want.astype(int)).max()) <= 1


def test_files_that_are_not_controlnets_are_refused_naming_what_they_are(tiny_model, tiny_sdxl_model, controlnets,
                                                                        tmp_path):
    from safetensors.torch import save_file

    from sdrt.export.original_layout import vae_state

    save_file({"lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    save_file({"pos_embed_input.proj.weight": torch.zeros(2, 2)}, str(tmp_path / "sd3cn.safetensors"))
    save_file({k: v.contiguous() for k, v in vae_state(diffusers.AutoencoderKL.from_pretrained(tiny_model / "vae")).items()},
              str(tmp_path / "vae.safetensors"))
    sdxl = single_files(write_test_controlnet(tiny_sdxl_model, tmp_path / "xl", 1), tmp_path / "xl-files")["cldm"]
    for path, error, match in ((tmp_path / "lora.safetensors", ModelError, "a LoRA adapter"),
                               (tmp_path / "sd3cn.safetensors", ModelError, "SD 3 ControlNet"),
                               (tmp_path / "vae.safetensors", ModelError, "not a ControlNet .keys like"),
                               (tmp_path / "missing.safetensors", InputError, "does not exist")):
        with pytest.raises(error, match=match):
            export(ExportConfig(tiny_model, tmp_path / "e", controlnets=(path,)), progress=False)
    with pytest.raises(ModelError, match="another architecture.*cross_attention_dim"):
        export(ExportConfig(tiny_model, tmp_path / "e", controlnets=(sdxl,)), progress=False)
    with pytest.raises(InputError, match="different names"):
        export(ExportConfig(tiny_model, tmp_path / "e", controlnets=(controlnets[0], single_files(
            controlnets[0], tmp_path / "same")["cldm"])), progress=False)
    assert not (tmp_path / "e").exists()


def test_the_manifest_records_the_controlnets(two_cn_engines, controlnets):
    doc = json.loads((two_cn_engines / "manifest.json").read_text())
    assert doc["model"]["controlnets"] == ["canny", "depth"]
    assert [c["name"] for c in doc["source"]["controlnets"]] == ["canny", "depth"]
    names = [t["name"] for t in doc["components"]["denoise_step"]["inputs"]]
    assert {"control_image_0", "control_image_1", "control_scales"} <= set(names)


def test_an_sdxl_controlnet_matches_diffusers(tiny_sdxl_model, tmp_path, monkeypatch):
    net = write_test_controlnet(tiny_sdxl_model, tmp_path / "sdxl-canny", 1)
    manifest = export(ExportConfig(tiny_sdxl_model, tmp_path / "e", precision="fp32", controlnets=(net,)),
                      progress=False)
    step = manifest.components["denoise_step"]  # every parameter its own initializer: the ControlNet swaps
    params = dict(diffusers.ControlNetModel.from_pretrained(net).named_parameters())
    assert set(step.control_weights) == {f"controlnets.0.{k}" for k in params} and not step.control_unnamed
    ours, noise = sdrt_controlnet(tmp_path / "e", "euler", 4, control_image=hint(1), controlnet_conditioning_scale=0.7)
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = diffusers.StableDiffusionXLControlNetPipeline(**components, controlnet=diffusers.ControlNetModel.from_pretrained(
        net), add_watermarker=False)
    pipe.scheduler = diffusers_scheduler("euler", base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(sys.modules[type(pipe).__module__], "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    from PIL import Image

    ref = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, height=SIZE, width=SIZE, num_inference_steps=4,
               image=Image.fromarray(hint(1)), controlnet_conditioning_scale=0.7, output_type="np").images
    assert_parity(ours, (ref * 255).round().astype(np.uint8), "sdxl controlnet")
    plain, _ = sdrt_controlnet(tmp_path / "e", "euler", 4)
    assert_changed(ours, plain)


def test_the_cli_exports_and_generates_with_a_controlnet(tiny_model, controlnets, tmp_path):
    from PIL import Image

    from tests.test_cli import sdrt

    r = sdrt("export", str(tiny_model), "-o", str(tmp_path / "e"), "--precision", "fp32", "--controlnet",
             str(controlnets[0]), "--controlnet", str(controlnets[1]))
    assert r.returncode == 0, r.stderr
    for j in (0, 1):
        Image.fromarray(hint(10 + j)).save(tmp_path / f"hint{j}.png")
    args = ["generate", str(tmp_path / "e"), PROMPT, "--steps", "3", "--seed", "5", "--control-image",
            str(tmp_path / "hint0.png"), "--control-image", str(tmp_path / "hint1.png"), "--control-scale", "0.5",
            "--control-scale", "1.0", "--control-end", "0.5", "--control-mode", "balanced", "--control-mode", "control",
            "-o", str(tmp_path / "out.png")]
    r = sdrt(*args)
    assert r.returncode == 0, r.stderr
    out = Image.open(tmp_path / "out.png")
    pipe = Pipeline.load(tmp_path / "e", backend="ort-cpu")
    want = pipe(PROMPT, steps=3, seed=5, control_image=[hint(10), hint(11)], controlnet_conditioning_scale=[0.5, 1.0],
                control_guidance_end=0.5, control_mode=["balanced", "control"])[0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert ('ControlNet 1: "Module: none, Model: depth, Weight: 1, Resize Mode: Crop and Resize, Guidance Start: 0, '
            'Guidance End: 0.5, Control Mode: ControlNet is more important"') in out.info["parameters"]
    bad = sdrt(*args[:-1], str(tmp_path / "bad.png"), "--control-scale", "inf")
    assert bad.returncode != 0 and "3 values for 2" in bad.stderr and not (tmp_path / "bad.png").exists()


def test_the_a1111_api_takes_sd_webui_controlnet_units(two_cn_engines):
    import base64
    import io

    import httpx
    from PIL import Image

    from sdrt.bench.live_server import LiveServer
    from sdrt.serve.config import ServeConfig
    from tests.pictures import png_bytes

    live = LiveServer(ServeConfig(two_cn_engines, backend="ort-cpu"))
    try:
        assert httpx.get(f"{live.url}/controlnet/model_list").json() == {"model_list": ["canny", "depth"]}
        unit = dict(enabled=True, module="none", model="depth [0123abcd]", weight=0.8, guidance_start=0.0,
                    guidance_end=0.5, resize_mode="Envelope (Outer Fit)", control_mode="My prompt is more important",
                    image=base64.b64encode(
                        png_bytes(Image.fromarray(hint(12)))).decode())
        body = dict(prompt=PROMPT, steps=3, seed=5, width=SIZE, height=SIZE,
                    alwayson_scripts={"ControlNet": {"args": [unit, dict(unit, enabled=False, model="canny")]}})
        r = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        pipe = Pipeline.load(two_cn_engines, backend="ort-cpu")
        want = pipe(PROMPT, steps=3, seed=5, guidance=7.0, height=SIZE, width=SIZE, control_image=[None, hint(12)],
                    controlnet_conditioning_scale=[0.0, 0.8], control_guidance_end=[1.0, 0.5],
                    control_mode=["balanced", "prompt"])[0]
        np.testing.assert_array_equal(got, np.asarray(want))
        info = json.loads(r.json()["info"])["infotexts"][0]
        assert 'ControlNet 1: "Module: none, Model: depth, Weight: 0.8' in info and "ControlNet 0" not in info
        assert "Control Mode: My prompt is more important" in info
        assert "Resize Mode: Resize and Fill, " in info  # the extension's older name, as it reads it
        for change, match in ((dict(module="openpose_full"), "preprocessor 'openpose_full' is not implemented"),
                              (dict(model="openpose"), "model 'openpose' is neither in these engines"),
                              (dict(weight="heavy"), "finite"), (dict(image=None), "has no image"),
                              (dict(control_mode="Strong"), "control_mode 'Strong' is not one of"),
                              (dict(hr_option="Low res only"), "hr_option 'Low res only' is not implemented"),
                              (dict(resize_mode="Stretch"), "resize_mode 'Stretch' is not one of")):
            bad = dict(body, alwayson_scripts={"controlnet": {"args": [dict(unit, **change)]}})
            r = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=bad, timeout=60)
            assert r.status_code == 400 and match in r.text, (change, r.text)
        r = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=dict(body, alwayson_scripts={"adetailer": {"args": []}}))
        assert r.status_code == 400 and "adetailer" in r.text
    finally:
        live.stop()


@pytest.mark.slow
def test_sd15_controlnet_as_a_cldm_file_reads_back_weight_for_weight(sd15_model, tmp_path):
    """SD 1.5's ControlNet (control_v11's architecture, 361,279,120 parameters) written in lllyasviel's cldm
    layout and read back through the weights-derived config: every tensor, the real hint embedding."""
    from sdrt.export.controlnets import load_controlnet
    from sdrt.export.original_layout import write_controlnet_file
    from sdrt.export.testmodel import REAL_HINT_CHANNELS, SD15_CONTROLNET_PARAMETERS

    folder = write_test_controlnet(sd15_model, tmp_path / "control_v11p_sd15_canny", 1, hint_channels=REAL_HINT_CHANNELS)
    path = write_controlnet_file(folder, tmp_path / "control_v11p_sd15_canny.safetensors")
    assert sum(1 for k in safetensors_keys(path) if k.startswith("control_model.input_hint_block.")) == 16  # 8 convs
    got = load_controlnet(path, diffusers.UNet2DConditionModel.load_config(sd15_model / "unet"))
    want = diffusers.ControlNetModel.from_pretrained(folder).state_dict()
    assert sum(v.numel() for v in got.parameters()) == SD15_CONTROLNET_PARAMETERS
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.items()) and got.state_dict().keys() == want.keys()


def safetensors_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@pytest.mark.slow
def test_sd15_controlnet_fp16_export_and_tensorrt_rtx_plan(sd15_model, tmp_path):
    """SD 1.5's ControlNet architecture (361,279,120 parameters, random weights) in the sd15 test model's
    denoise step: fp16 export with validation and a static 512² sm89 plan; the figures go into the docs."""
    import time

    from sdrt.export.build import BuildConfig, build
    from sdrt.export.testmodel import REAL_HINT_CHANNELS, SD15_CONTROLNET_PARAMETERS

    net = write_test_controlnet(sd15_model, tmp_path / "control_sd15_canny", 1, hint_channels=REAL_HINT_CHANNELS)
    count = sum(p.numel() for p in diffusers.ControlNetModel.from_pretrained(net).parameters())
    assert count == SD15_CONTROLNET_PARAMETERS
    engines = tmp_path / "sd15-cn-fp16"
    start = time.perf_counter()
    manifest = export(ExportConfig(sd15_model, engines, precision="fp16", controlnets=(net,)), progress=False)
    export_s = time.perf_counter() - start
    assert all(v["error"] <= v["tolerance"] for v in manifest.validation.values())
    step_spec = manifest.components["denoise_step"]  # every parameter its own initializer: the ControlNet swaps
    named = sum(np.prod(step_spec.control_weights[f"controlnets.0.{k}"].shape) for k, _ in
                diffusers.ControlNetModel.from_pretrained(net).named_parameters())
    assert named == SD15_CONTROLNET_PARAMETERS and not step_spec.control_unnamed
    start = time.perf_counter()
    manifest = build(BuildConfig(engines, shapes="static:512x512,batch=1", archs=("sm89",)), progress=False)
    build_s = time.perf_counter() - start
    step = manifest.plans.components["denoise_step"]
    print(f"\nsd15 + ControlNet fp16: export {export_s:.0f} s (step validation error "
          f"{manifest.validation['denoise_step']['error']:.2e}), static 512x512 sm89 build {build_s:.0f} s, "
          f"step plan {step.bytes / 2**20:.0f} MiB ({step.build_s:.0f} s)")
    assert 2100 < step.bytes / 2**20 < 3300  # 860 M + 361 M fp16 weights


def test_canny_finds_thin_edges_with_hysteresis():
    from sdrt.preprocessors import canny

    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 200
    edges = canny(square)[..., 0] > 0
    assert edges[24:40, 15].all() and edges[24:40, 47].all() and edges[15, 24:40].all()
    assert edges[32].sum() == 2 and not edges[20:44, 20:44].any()  # one pixel wide, nothing inside
    faint = (square // 20).astype(np.uint8)  # |∇| = 40 per step: under the low threshold
    assert not canny(faint).any()
    assert canny(faint, 10, 30).any()
    # a weak edge (above low, under high) survives only where it touches a strong one
    ramp = np.zeros((64, 64, 3), np.uint8)
    ramp[:, 32:] = 30  # |dx|·(1+2+1) = 120: weak at (100, 200)
    ramp[:8, 32:] = 255  # its top rows: strong
    kept = canny(ramp)[..., 0] > 0
    assert kept[:, 31:33].any(1).all()
    isolated = ramp.copy()
    isolated[:8, 32:] = 30
    assert not canny(isolated).any()
    assert canny(square, 300, 300).shape == (64, 64, 3)
    with pytest.raises(InputError, match="low <= high"):
        canny(square, 200, 100)


def test_a_canny_unit_is_the_edge_map_as_the_hint(two_cn_engines):
    import base64

    from sdrt.preprocessors import canny
    from sdrt.serve.controlnet_units import controlnet_keywords
    from tests.pictures import png_bytes

    pipe = Pipeline.load(two_cn_engines, backend="ort-cpu")
    photo = smooth_picture(SIZE, SIZE)
    unit = dict(module="canny", model="canny", threshold_a=50, threshold_b=120,
                image=base64.b64encode(png_bytes(photo)).decode())
    keywords = controlnet_keywords({"controlnet": {"args": [unit]}}, pipe.model)
    np.testing.assert_array_equal(keywords["control_image"][0], canny(np.asarray(photo), 50, 120))
    assert keywords["control_image"][0].any()


def test_testmodel_writes_a_controlnet_folder_or_cldm_file_for_a_models_unet(tiny_model, tmp_path, capsys):
    from sdrt.cli import main
    from sdrt.export.controlnets import controlnet_name, load_controlnet

    assert main(["testmodel", "controlnet", str(tmp_path / "cn.safetensors"), "--of", str(tiny_model)]) == 0
    assert main(["testmodel", "controlnet", str(tmp_path / "cn"), "--of", str(tiny_model)]) == 0
    unet_config = diffusers.UNet2DConditionModel.load_config(tiny_model / "unet")
    a, b = (load_controlnet(p, unet_config).state_dict() for p in (tmp_path / "cn.safetensors", tmp_path / "cn"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same seed, two layouts
    assert controlnet_name(tmp_path / "cn.safetensors") == "cn"
    assert main(["testmodel", "controlnet", str(tmp_path / "cn2")]) == 2
    assert main(["testmodel", "controlnet", str(tmp_path / "cn"), "--of", str(tiny_model)]) == 2
    assert "--of MODEL_DIR" in capsys.readouterr().err


def test_engines_with_one_scale_per_controlnet_ask_for_a_re_export(one_cn_engines, tmp_path):
    from sdrt.errors import EngineError

    old = tmp_path / "old"
    shutil.copytree(one_cn_engines, old)
    doc = json.loads((old / "manifest.json").read_text())
    del doc["model"]["control_residuals"]  # as sdrt wrote it before the weights were per residual
    (old / "manifest.json").write_text(json.dumps(doc))
    pipe = Pipeline.load(old, backend="ort-cpu")
    with pytest.raises(EngineError, match="re-export"):
        pipe.generate(pipe.make_config(PROMPT, steps=2, control_image=hint(1)))
