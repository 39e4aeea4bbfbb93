"""End-to-end parity: sdrt's image from exported engines vs diffusers' StableDiffusionPipeline on the
same weights, scheduler and initial latents. fp32 engines: max pixel error ≤ 2/255."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.bench.stats import psnr  # noqa: E402
from sdrt.errors import InputError  # noqa: E402
from sdrt.export.reference import diffusers_scheduler  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402
from sdrt.schedulers import SAMPLER_SETTINGS, SAMPLERS  # noqa: E402

MAX_PIXEL_ERROR = 2
PARITY_SCHEDULERS = ("euler", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "plms")  # deterministic ones


def diffusers_images(model_dir, scheduler, prompt, negative, steps, guidance, latents, height, width,
                     step_noise=None, monkeypatch=None, prepare=None, **extra):
    """diffusers' own pipeline for the folder (StableDiffusion[XL]Pipeline) on the same latents; an
    ancestral sampler draws `step_noise` (steps, B, 4, h, w) instead of its own; prepare(pipe) runs
    first (loading textual inversions)."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
    if prepare is not None:
        prepare(pipe)
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if not hasattr(pipe.text_encoder, "text_model"):  # diffusers' clip_skip reads text_model.final_layer_norm,
        object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)  # which transformers 5 flattened
    if step_noise is not None:
        inject_step_noise(pipe.scheduler, step_noise, monkeypatch)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               latents=torch.from_numpy(latents), height=height, width=width, output_type="np", **extra).images
    return (out * 255).round().astype(np.uint8)


def inject_step_noise(scheduler, step_noise, monkeypatch):
    """The scheduler's noise at call i (its step index from where it began) is step_noise[i]: its own draws
    (randn_tensor), or DPMSolverSDEScheduler's Brownian tree."""
    module = sys.modules[type(scheduler).__module__]

    def noise(*args, **kwargs):
        return torch.from_numpy(step_noise[scheduler.step_index - (scheduler.begin_index or 0)])

    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: noise().reshape(shape))
    if hasattr(module, "BrownianTreeNoiseSampler"):
        monkeypatch.setattr(module, "BrownianTreeNoiseSampler", lambda *args, **kwargs: noise)


def sdrt_and_reference(model_dir, engines, scheduler, steps=4, guidance=7.5, size=None, batch=1,
                       prompts=None, negative="blurry", width=None, monkeypatch=None, **extra):
    """The same request through sdrt and diffusers, the negative prompt passed to both as a user would:
    None (SDXL's zeros, force_zeros_for_empty_prompt), "" (the encoded empty string) or a text."""
    pipe = Pipeline.load(engines, backend="ort-cpu")
    config = pipe.make_config(prompts or ["a red apple on a table"] * batch, negative_prompt=negative,
                              steps=steps, guidance=guidance, scheduler=scheduler, seed=42, height=size,
                              width=width or size, batch=batch, **extra)
    from sdrt.schedulers import make_plan

    init, step_noise = pipe.initial_noise(config, make_plan(scheduler, pipe.schedule, steps))
    ours = pipe.generate(config).images
    ref = diffusers_images(model_dir, scheduler, list(config.prompts.prompt), None if negative is None else [negative] * batch,
                           steps, guidance, init, config.size.height, config.size.width, step_noise, monkeypatch,
                           **diffusers_kwargs(extra))
    return ours, ref


def diffusers_kwargs(extra: dict) -> dict:
    """sdrt's make_config arguments as diffusers names them (A1111's clip skip N is diffusers' N - 1)."""
    names = {"crop_top_left": "crops_coords_top_left"}
    return {names.get(k, k): v - 1 if k == "clip_skip" else v for k, v in extra.items()}


def assert_parity(ours, ref, label):
    assert ours.shape == ref.shape
    err = int(np.abs(ours.astype(int) - ref.astype(int)).max())
    assert err <= MAX_PIXEL_ERROR, f"{label}: max pixel error {err}/255"
    assert ref.std() > 1, "reference image is flat: the comparison would prove nothing"


@pytest.mark.parametrize("scheduler", PARITY_SCHEDULERS)
def test_tiny_fp32_matches_diffusers(tiny_model, tiny_engines, scheduler):
    assert_parity(*sdrt_and_reference(tiny_model, tiny_engines, scheduler), scheduler)


def test_tiny_fp32_euler_a_with_the_same_noise_matches_diffusers(tiny_model, tiny_engines, monkeypatch):
    ours, ref = sdrt_and_reference(tiny_model, tiny_engines, "euler_a", monkeypatch=monkeypatch)
    assert_parity(ours, ref, "euler_a")


# --- prompts: clip skip, and long weighted prompts on embeddings from a transformers reference -------

def test_tiny_fp32_clip_skip_matches_diffusers(tiny_model, tiny_engines):
    # without CFG: diffusers applies clip_skip to the prompt only, A1111 (and sdrt) to the negative too
    ours, ref = sdrt_and_reference(tiny_model, tiny_engines, "euler", guidance=1.0, clip_skip=2)
    assert_parity(ours, ref, "clip skip 2")
    plain, _ = sdrt_and_reference(tiny_model, tiny_engines, "euler", guidance=1.0)
    assert np.abs(plain.astype(int) - ours.astype(int)).max() > 2 * MAX_PIXEL_ERROR  # it changes the image


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_long_weighted_prompt_matches_diffusers_on_reference_embeddings(request, family):
    """sdrt reads a 3-chunk weighted prompt itself; diffusers gets the reference's embeddings of it
    (tests/prompt_reference.py), padded alike for the negative prompt."""
    from prompt_reference import reference_embeddings

    model_dir = request.getfixturevalue("tiny_model" if family == "sd1" else "tiny_sdxl_model")
    engines = request.getfixturevalue("tiny_engines" if family == "sd1" else "tiny_sdxl_engines")
    long = "a red apple on a wooden table in the morning light " * 6
    prompt, pieces = long + "(bright blue sky:1.3) " + long, [(long, 1.0), ("bright blue sky", 1.3), (" " + long, 1.0)]
    pipe = Pipeline.load(engines, backend="ort-cpu")
    config = pipe.make_config(prompt, negative_prompt="blurry", steps=4, guidance=7.5, scheduler="euler", seed=42,
                              height=64, width=64)
    assert config.prompts.chunks == 3
    init, _ = pipe.initial_noise(config)
    ours = pipe.generate(config).images
    slots = pipe.model.text_encoders
    embeds = {}
    for key, text in (("prompt_embeds", pieces), ("negative_prompt_embeds", [("blurry", 1.0)])):
        refs = [reference_embeddings(model_dir, s.component, s.tokenizer, s.layer, s.final_norm, text, config.prompts.chunks)
                for s in slots]
        embeds[key] = torch.from_numpy(np.concatenate([hidden for hidden, _ in refs], axis=-1))[None]
        if family == "sdxl":
            embeds[key.replace("prompt_embeds", "pooled_prompt_embeds")] = torch.from_numpy(refs[-1][1])[None]
    ref = diffusers_images(model_dir, "euler", None, None, 4, 7.5, init, 64, 64, **embeds)
    assert_parity(ours, ref, f"{family} long weighted prompt")


# --- SDXL: two text encoders, pooled embeddings, micro-conditioning, force-upcast VAE ---------------

@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "ddim", "dpmpp_2m_karras"])
def test_tiny_sdxl_fp32_matches_diffusers(tiny_sdxl_model, tiny_sdxl_engines, scheduler, monkeypatch):
    ours, ref = sdrt_and_reference(tiny_sdxl_model, tiny_sdxl_engines, scheduler, monkeypatch=monkeypatch)
    assert_parity(ours, ref, f"sdxl {scheduler}")


@pytest.mark.parametrize("case", [
    dict(negative=None),  # force_zeros_for_empty_prompt: zeros, not the encoded empty string
    dict(negative=""),  # an explicit "": the encoded empty string
    dict(guidance=1.0),  # no CFG half
    dict(size=64, width=80),  # non-square
    dict(batch=2, prompts=["a red apple on a table", "a blue car in the rain"]),
    dict(original_size=(128, 96), crop_top_left=(8, 16), target_size=(64, 64)),  # micro-conditioning
])
def test_tiny_sdxl_fp32_cases_match_diffusers(tiny_sdxl_model, tiny_sdxl_engines, case):
    ours, ref = sdrt_and_reference(tiny_sdxl_model, tiny_sdxl_engines, "euler", **case)
    assert_parity(ours, ref, f"sdxl {case}")


def test_sdxl_no_negative_differs_from_encoded_empty_string(tiny_sdxl_engines):
    """force_zeros_for_empty_prompt is honoured for no negative prompt: the engines were told, and it changes
    the image; an explicit "" is encoded."""
    pipe = Pipeline.load(tiny_sdxl_engines, backend="ort-cpu")
    assert pipe.manifest.model.zero_empty_negative
    zero = pipe.generate(pipe.make_config("a red apple", negative_prompt=None, steps=3, seed=1)).images
    empty = pipe.generate(pipe.make_config("a red apple", negative_prompt="", steps=3, seed=1)).images
    space = pipe.generate(pipe.make_config("a red apple", negative_prompt=" ", steps=3, seed=1)).images
    assert np.abs(zero.astype(int) - empty.astype(int)).max() > 0
    assert np.array_equal(empty, space)  # CLIP's tokenizer reads " " as ""


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_tiny_fp32_batch2_no_cfg_matches_diffusers(tiny_model, tiny_engines, guidance):
    # guidance <= 1 runs batch B without the unconditional half, as diffusers does (guidance ignored)
    ours, ref = sdrt_and_reference(tiny_model, tiny_engines, "euler", guidance=guidance, batch=2, size=72)
    assert int(np.abs(ours.astype(int) - ref.astype(int)).max()) <= MAX_PIXEL_ERROR


def test_tiny_fp16_close_to_fp32(tiny_engines, tiny_engines_fp16):
    images = []
    for engines in (tiny_engines, tiny_engines_fp16):
        pipe = Pipeline.load(engines, backend="ort-cpu")
        images.append(pipe.generate(pipe.make_config("a red apple", steps=4, seed=7)).images)
    assert psnr(images[1], images[0]) >= 30.0


@pytest.mark.slow
def test_sd15_fp32_256_matches_diffusers(sd15_model, tmp_path):
    from sdrt.export.exporter import ExportConfig, export

    engines = tmp_path / "sd15-fp32"
    export(ExportConfig(sd15_model, engines, precision="fp32"), progress=False)
    ours, ref = sdrt_and_reference(sd15_model, engines, "dpmpp_2m_karras", steps=4, size=256)
    err = int(np.abs(ours.astype(int) - ref.astype(int)).max())
    assert err <= MAX_PIXEL_ERROR, f"sd15 fp32: max pixel error {err}/255"


@pytest.fixture(scope="module")
def zero_snr_model_and_engines(tiny_model, tmp_path_factory):
    """The tiny model as a v-prediction, zero-terminal-SNR, trailing-spacing fine-tune (Lin et al. 2023)."""
    import json
    import shutil

    from sdrt.export.exporter import ExportConfig, export

    root = tmp_path_factory.mktemp("zero-snr")
    model = root / "model"
    shutil.copytree(tiny_model, model)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction",
                                "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    export(ExportConfig(model, root / "engines", precision="fp32"), progress=False)
    return model, root / "engines"


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m_karras"])
def test_tiny_zero_snr_v_prediction_matches_diffusers(zero_snr_model_and_engines, scheduler):
    model, engines = zero_snr_model_and_engines
    assert_parity(*sdrt_and_reference(model, engines, scheduler), f"zero-SNR v {scheduler}")


# --- models as a user builds them with diffusers: every sampler x {a negative, "", none} ---------------

ALL_SAMPLERS = tuple(SAMPLERS)
NEGATIVES = {"text": "blurry, low quality", "empty": "", "none": None}


@pytest.mark.parametrize("negative", NEGATIVES)
@pytest.mark.parametrize("scheduler", ALL_SAMPLERS)
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_plain_models_match_diffusers_for_every_sampler_and_negative(request, family, scheduler, negative,
                                                                     with_scheduler_settings, monkeypatch):
    """Default-initialised encoders, CLIP's real vocabulary, the scheduler config diffusers saves for PNDM
    (SD 1.x) or Euler (SDXL). DDIM and PLMS: that config has no clip_sample (skip_prk_steps), so diffusers'
    DDIM clamps x0 (its PNDM runs Runge-Kutta steps) and sdrt refuses them naming the key; with the key
    written in as sdrt runs it, they match."""
    prefix = "tiny_plain" if family == "sd1" else "tiny_sdxl_plain"
    model, engines = request.getfixturevalue(f"{prefix}_model"), request.getfixturevalue(f"{prefix}_engines")
    saved = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    table = SAMPLER_SETTINGS.get(scheduler, ("", {}))[1]
    settings = {key: runs for key, (default, runs) in table.items() if saved.get(key, default) != runs}
    if settings:
        with pytest.raises(InputError, match=f"no '{next(iter(settings))}' key"):
            Pipeline.load(engines, backend="ort-cpu").make_config("a red apple", scheduler=scheduler)
        model, engines = with_scheduler_settings(model, **settings)
    ours, ref = sdrt_and_reference(model, engines, scheduler, negative=NEGATIVES[negative],
                                   monkeypatch=monkeypatch)
    assert_parity(ours, ref, f"{family} {scheduler} negative={negative}")


def test_plain_sdxl_no_negative_and_empty_negative_differ(tiny_sdxl_plain_engines):
    pipe = Pipeline.load(tiny_sdxl_plain_engines, backend="ort-cpu")
    none, empty = (pipe.generate(pipe.make_config("a red apple", negative_prompt=n, steps=3, seed=1)).images
                   for n in (None, ""))
    assert np.abs(none.astype(int) - empty.astype(int)).max() > 2 * MAX_PIXEL_ERROR


@pytest.fixture(scope="module")
def with_scheduler_settings(tmp_path_factory):
    """(folder, settings) -> a copy of the folder with settings written into its scheduler config, and its
    fp32 engines; each built once per module."""
    import shutil

    from sdrt.export.exporter import ExportConfig, export

    built = {}

    def make(model, **settings):
        key = (str(model), tuple(sorted(settings.items())))
        if key not in built:
            root = tmp_path_factory.mktemp("scheduler-settings")
            shutil.copytree(model, root / "model")
            path = root / "model" / "scheduler" / "scheduler_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
            export(ExportConfig(root / "model", root / "engines", precision="fp32"), progress=False)
            built[key] = root / "model", root / "engines"
        return built[key]

    return make
