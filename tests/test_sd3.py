"""SD 3 / 3.5: a tiny MMDiT pipeline (CLIP-L, bigG, T5) exported and run against diffusers'
StableDiffusion3Pipeline on the same weights and initial latents, with and without T5; fp16; the CLI and
both HTTP APIs; refusals. fp32 engines: max pixel error ≤ 2/255."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.bench.stats import psnr  # noqa: E402
from sdrt.errors import InputError  # noqa: E402
from sdrt.export.exporter import ExportConfig, export  # noqa: E402
from sdrt.manifest import read_manifest  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402

MAX_PIXEL_ERROR = 2
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}


@pytest.fixture(scope="module")
def no_t5_engines(tiny_sd3_model, tmp_path_factory):
    """The same folder exported with `--no-t5`."""
    out = tmp_path_factory.mktemp("engines") / "tiny-sd3-no-t5"
    export(ExportConfig(tiny_sd3_model, out, precision="fp32", drop=("text_encoder_3",)), progress=False)
    return out


def reference(model_dir, config, latents, t5: bool = True, loras=(), **extra) -> np.ndarray:
    """diffusers' StableDiffusion3Pipeline on the config's prompts and the same initial latents, with each
    LoRA (path, weight) loaded and fused at its weight; extra: more of the pipeline's arguments."""
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(model_dir, **({} if t5 else NO_T5))
    pipe.set_progress_bar_config(disable=True)
    for path, weight in loras:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=weight)
        pipe.unload_lora_weights()  # the fused weights stay
    given = config.cfg and config.prompts.negative_prompt[0] is not None  # None: no negative, as the caller passed it
    negative = list(config.prompts.negative_prompt) if given else None
    out = pipe(list(config.prompts.prompt), negative_prompt=negative, num_inference_steps=config.sampler.steps,
               guidance_scale=config.guidance.scale, latents=torch.from_numpy(latents), height=config.size.height,
               width=config.size.width, output_type="np", **extra).images
    return (out * 255).round().astype(np.uint8)


CASES = {
    "cfg-negative-batch2-nonsquare": dict(prompt=["a red apple on a table", "a blue dog"], negative_prompt="blurry",
                                          guidance=5.0, height=128, width=192),
    "cfg-no-negative": dict(prompt="a red apple on a table", guidance=5.0, height=128, width=128),
    "cfg-empty-negative": dict(prompt="a red apple on a table", negative_prompt="", guidance=5.0, height=128, width=128),
    # SD3.5 Large Turbo's settings: guidance 0, no CFG half (4 steps, as every case here)
    "turbo-no-cfg": dict(prompt="a cute cat sitting on a wooden table", guidance=0.0, height=256, width=256),
}


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_tiny_sd3_fp32_matches_diffusers(tiny_sd3_model, tiny_sd3_engines, no_t5_engines, t5, case):
    pipe = Pipeline.load(tiny_sd3_engines if t5 else no_t5_engines, backend="ort-cpu")
    config = pipe.make_config(**CASES[case], steps=4, seed=42)
    assert config.sampler.scheduler == "euler" and pipe.schedule.flow
    init, _ = pipe.initial_noise(config)
    ours = pipe.generate(config).images
    ref = reference(tiny_sd3_model, config, init, t5)
    assert ours.shape == ref.shape == (config.batch, config.size.height, config.size.width, 3)
    assert ours.std() > 10, "a flat image would match anything"
    error = int(np.abs(ours.astype(int) - ref).max())
    assert error <= MAX_PIXEL_ERROR, f"{case} t5={t5}: max pixel error {error}/255"


def test_t5_changes_the_image_and_zeros_stand_in_without_it(tiny_sd3_engines, no_t5_engines):
    """Without T5 the step takes no T5 input and the manifest says so; the image is not the T5 one."""
    with_t5, without = read_manifest(tiny_sd3_engines), read_manifest(no_t5_engines)
    assert without.model.omitted == ("text_encoder_3",) and with_t5.model.omitted == ()
    assert "t5_embeddings" not in [t.name for t in without.components["denoise_step"].inputs]
    assert [t.max_length for t in with_t5.model.text_encoders] == [0, 0, 256]
    images = [Pipeline.load(e, backend="ort-cpu")("a red apple", steps=2, seed=1, height=64, width=64)[0]
              for e in (tiny_sd3_engines, no_t5_engines)]
    assert np.abs(np.asarray(images[0], int) - np.asarray(images[1], int)).max() > 10


def test_fp16_engines_keep_t5_in_fp32_and_stay_close_to_fp32_with_and_without_images_in(tiny_sd3_engines,
                                                                                      tiny_sd3_engines_fp16):
    manifest = read_manifest(tiny_sd3_engines_fp16)
    assert manifest.components["text_encoder_3"].precision == "fp32"  # T5 v1.1 overflows fp16
    assert manifest.components["denoise_step"].precision == "fp16"
    assert all(report["error"] <= report["tolerance"] for report in manifest.validation.values())
    kwargs = dict(prompt="a red apple on a table", negative_prompt="blurry", steps=4, seed=3, height=128, width=128)
    fp32, fp16 = (Pipeline.load(e, backend="ort-cpu") for e in (tiny_sd3_engines, tiny_sd3_engines_fp16))
    from tests.pictures import box_mask, smooth_picture

    for images in ({}, dict(image=smooth_picture(128, 128), strength=0.6),
                   dict(image=smooth_picture(128, 128), mask_image=box_mask(128, 128, (32, 24, 96, 88)))):
        a = fp32.generate(fp32.make_config(**kwargs, **images)).images
        b = fp16.generate(fp16.make_config(**kwargs, **images)).images
        assert psnr(a, b) >= 30.0, f"fp16 vs fp32 {list(images)}: {psnr(a, b):.1f} dB"


def test_a_long_weighted_prompt_reaches_clip_chunks_and_t5(tiny_sd3_engines):
    """Emphasis and a second CLIP chunk run through all three encoders; a weight of 1 is no weight."""
    pipe = Pipeline.load(tiny_sd3_engines, backend="ort-cpu")
    long = ", ".join(["a cute cat sitting on a wooden table"] * 12)
    config = pipe.make_config(long, steps=1, seed=0, height=64, width=64)
    assert config.prompts.chunks == 2
    plain = pipe.encode_prompt(pipe.make_config("a red apple", steps=1, height=64, width=64))
    same = pipe.encode_prompt(pipe.make_config("a (red:1.0) apple", steps=1, height=64, width=64))
    weighted = pipe.encode_prompt(pipe.make_config("a (red:1.5) apple", steps=1, height=64, width=64))
    for name in ("text_embeddings", "t5_embeddings"):
        np.testing.assert_array_equal(plain[name], same[name])
        assert not np.array_equal(plain[name], weighted[name])
    assert pipe.generate(config).images.std() > 10


SLG = dict(skip_layer_guidance_scale=2.8, skip_layer_guidance_stop=0.6)  # 5 steps: the third group on steps 1, 2


@pytest.mark.parametrize("layers", [[0], [0, 1]], ids=["dual-attention block", "every block, the last too"])
def test_skip_layer_guidance_matches_diffusers(tiny_sd3_model, tiny_sd3_engines, layers):
    """diffusers' skip_guidance_layers: on its steps a third row group skips the blocks, in the one step call."""
    pipe = Pipeline.load(tiny_sd3_engines, backend="ort-cpu")
    request = dict(CASES["cfg-negative-batch2-nonsquare"], steps=5, seed=7)
    config = pipe.make_config(**request, skip_guidance_layers=layers, **SLG)
    assert config.skip.steps(config.sampler.steps) == {1, 2}
    init, _ = pipe.initial_noise(config)
    ours = pipe.generate(config).images
    ref = reference(tiny_sd3_model, config, init, skip_guidance_layers=layers, **SLG)
    error = int(np.abs(ours.astype(int) - ref).max())
    assert error <= MAX_PIXEL_ERROR, f"max pixel error {error}/255"
    plain = pipe.generate(pipe.make_config(**request)).images
    assert int(np.abs(plain.astype(int) - ref).max()) > 8, "skipping changes too little to prove anything"


def test_skip_layer_guidance_rows_can_be_dropped_mid_loop(tiny_sd3_engines):
    """A row dropped during the window leaves the others' images as they were (the 3B rows shrink too)."""
    pipe = Pipeline.load(tiny_sd3_engines, backend="ort-cpu")
    config = pipe.make_config(["a", "b", "c"], negative_prompt="blurry", steps=5, seeds=[1, 2, 3], guidance=5.0,
                              height=64, width=64, skip_guidance_layers=[0], **SLG)
    result = pipe.generate(config, callback=lambda done, total: [0, 2] if done >= 1 else None)
    assert result.rows == [0, 2]
    full = pipe.generate(config).images
    assert int(np.abs(result.images.astype(int) - full[[0, 2]]).max()) <= 1


def test_cli_skip_layer_guidance_equals_the_python_api_and_is_in_the_infotext(tiny_sd3_engines, tmp_path):
    from PIL import Image

    pipe = Pipeline.load(tiny_sd3_engines, backend="ort-cpu")
    want = pipe.generate(pipe.make_config("a red cube", steps=5, seed=3, guidance=4.0, height=64, width=64,
                                          skip_guidance_layers=[0], **SLG)).images[0]
    out = tmp_path / "cube.png"
    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", str(tiny_sd3_engines), "a red cube", "--steps", "5",
                        "--seed", "3", "--guidance", "4", "--height", "64", "--width", "64", "--skip-guidance-layers", "0",
                        "--skip-layer-guidance-stop", "0.6", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    image = Image.open(out)
    np.testing.assert_array_equal(np.asarray(image), want)
    assert 'Skip layer guidance: "layers 0, scale 2.8, steps 0.01-0.6"' in image.info["parameters"]
    bad = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", str(tiny_sd3_engines), "a red cube",
                          "--skip-guidance-layers", "7-9", "-o", str(tmp_path / "no.png")], capture_output=True, text=True)
    assert bad.returncode != 0 and "e.g. 7,8,9" in bad.stderr and not (tmp_path / "no.png").exists()


def test_skip_layer_guidance_is_refused_by_engines_without_it(tiny_engines):
    sd1 = Pipeline.load(tiny_engines, backend="ort-cpu")
    with pytest.raises(InputError, match="SD 3.5's .* these sd1 engines take none"):
        sd1.make_config("a cat", skip_guidance_layers=[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=136), "multiple of 16"),
    (dict(scheduler="dpmpp_2m_karras"), "samples with euler"),
    (dict(clip_skip=2), "clip_skip"),
    (dict(original_size=(64, 64)), "micro-conditioning"),
    (dict(prompt="cat " * 300), "--max-sequence-length"),
    (dict(skip_guidance_layers=[7, 8, 9]), "distinct block indices from 0 to 1"),
    (dict(skip_guidance_layers=[0, 0]), "distinct block indices"),
    (dict(skip_guidance_layers=[0], guidance=1.0), "alongside classifier-free guidance"),
    (dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.5, skip_layer_guidance_stop=0.2), "start < stop"),
    (dict(skip_guidance_layers=[0], skip_layer_guidance_scale=float("nan")), "must be finite"),
])
def test_sd3_refusals_name_the_fix(tiny_sd3_engines, kwargs, message):
    pipe = Pipeline.load(tiny_sd3_engines, backend="ort-cpu")
    with pytest.raises(InputError, match=message):
        pipe.make_config(**{"prompt": "a cat", **kwargs})


def test_export_refusals(tiny_sd3_model, tiny_model, tmp_path):
    with pytest.raises(InputError, match="max_sequence_length"):
        export(ExportConfig(tiny_sd3_model, tmp_path / "a", max_sequence_length=513), progress=False)
    with pytest.raises(InputError, match="optional text encoders"):
        export(ExportConfig(tiny_model, tmp_path / "b", drop=("text_encoder_3",)), progress=False)
    with pytest.raises(InputError, match="multiple of 16"):
        export(ExportConfig(tiny_sd3_model, tmp_path / "c", min_size=72), progress=False)
    assert not any(tmp_path.iterdir()), "a refused export writes nothing"


def test_cli_and_both_http_apis_serve_sd3_with_img2img(tiny_sd3_engines, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from sdrt.bench.live_server import LiveServer
    from sdrt.serve.config import ServeConfig

    direct = Pipeline.load(tiny_sd3_engines, backend="ort-cpu")
    want = direct.generate(direct.make_config("a red cube", steps=2, seed=3, guidance=4.0)).images[0]
    out = tmp_path / "cube.png"
    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", str(tiny_sd3_engines), "a red cube", "--steps", "2",
                        "--seed", "3", "--guidance", "4", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    image = Image.open(out)
    np.testing.assert_array_equal(np.asarray(image), want)
    assert "Sampler: Euler" in image.info["parameters"]
    live = LiveServer(ServeConfig(tiny_sd3_engines, backend="ort-cpu"))
    try:
        a1111 = httpx.post(f"{live.url}/sdapi/v1/txt2img", timeout=60,
                           json={"prompt": "a red cube", "seed": 3, "steps": 2, "cfg_scale": 4.0, "sampler_name": "Euler"})
        assert a1111.status_code == 200, a1111.text
        import base64
        import io

        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(a1111.json()["images"][0]))).convert("RGB"))
        np.testing.assert_array_equal(got, want)
        openai = httpx.post(f"{live.url}/v1/images/generations", timeout=60,
                            json={"prompt": "a red cube", "seed": 3, "steps": 2, "guidance_scale": 4.0,
                                  "response_format": "b64_json"})
        assert openai.status_code == 200, openai.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(openai.json()["data"][0]["b64_json"]))).convert("RGB"))
        np.testing.assert_array_equal(got, want)
        from tests.pictures import b64, smooth_picture

        picture = smooth_picture()
        img2img = httpx.post(f"{live.url}/sdapi/v1/img2img", timeout=60,
                             json={"prompt": "a red cube", "seed": 3, "steps": 4, "cfg_scale": 4.0, "width": 64,
                                   "height": 64, "init_images": [b64(picture)], "denoising_strength": 0.6})
        assert img2img.status_code == 200, img2img.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(img2img.json()["images"][0]))).convert("RGB"))
        np.testing.assert_array_equal(got, direct.generate(direct.make_config(
            "a red cube", image=picture, strength=0.6, steps=4, seed=3, guidance=4.0)).images[0])
        slg = dict(skip_guidance_layers=[0], skip_layer_guidance_stop=0.6)  # sdrt extensions on both APIs
        want_slg = direct.generate(direct.make_config("a red cube", steps=5, seed=3, guidance=4.0, batch=2,
                                                      **slg)).images
        a1111 = httpx.post(f"{live.url}/sdapi/v1/txt2img", timeout=60,
                           json={"prompt": "a red cube", "seed": 3, "steps": 5, "cfg_scale": 4.0, "batch_size": 2, **slg})
        assert a1111.status_code == 200, a1111.text
        assert "Skip layer guidance" in a1111.json()["info"]
        for row, data in enumerate(a1111.json()["images"]):
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            np.testing.assert_array_equal(got, want_slg[row])
        openai = httpx.post(f"{live.url}/v1/images/generations", timeout=60,
                            json={"prompt": "a red cube", "seed": 3, "steps": 5, "guidance_scale": 4.0, "n": 2,
                                  "response_format": "b64_json", **slg})
        assert openai.status_code == 200, openai.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(openai.json()["data"][1]["b64_json"]))).convert("RGB"))
        np.testing.assert_array_equal(got, want_slg[1])
        bad = httpx.post(f"{live.url}/sdapi/v1/txt2img", timeout=60,
                         json={"prompt": "a red cube", "steps": 2, "skip_guidance_layers": [9]})
        assert bad.status_code == 400 and "block indices from 0 to 1" in bad.text
        refused = httpx.post(f"{live.url}/sdapi/v1/txt2img", timeout=60,
                             json={"prompt": "a red cube", "steps": 2, "sampler_name": "DPM++ 2M"})
        assert refused.status_code == 400 and "euler" in json.dumps(refused.json())
    finally:
        live.stop()


def write_peft_lora(model_dir, path, seed: int, rank: int = 4, alpha: float = 2.0, scale: float = 0.1):
    """A random LoRA as diffusers' SD3 training script saves it: PEFT keys (`transformer.….lora_A.weight`,
    `text_encoder_2.….lora_B.weight`) on every Linear of the transformer's blocks and of both CLIP encoders'
    layers, its LoraConfig (alpha ≠ rank) in the file's metadata."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(model_dir, **NO_T5)
    g = torch.Generator().manual_seed(seed)
    layers, metadata = {}, {}
    for name, targets in (("transformer", r".*transformer_blocks.*\.(to_[qkv]|to_out\.0|to_add_out|add_[qkv]_proj|proj|net\.2|linear)"),
                          ("text_encoder", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
                          ("text_encoder_2", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])):
        module = getattr(pipe, name)
        module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
        layers[f"{name}_lora_layers"] = {k: torch.randn(v.shape, generator=g) * scale
                                         for k, v in get_peft_model_state_dict(module).items()}
        metadata[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    diffusers.StableDiffusion3Pipeline.save_lora_weights(path.parent, weight_name=path.name, **layers, **metadata)
    return path


@pytest.fixture(scope="module")
def sd3_loras(tiny_sd3_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return tuple(write_peft_lora(tiny_sd3_model, folder / f"{name}.safetensors", seed)
                 for seed, name in ((1, "style"), (2, "other")))


LORA_REQUEST = dict(prompt="a red apple on a table", negative_prompt="blurry", steps=4, seed=3, guidance=5.0,
                    height=128, width=128)


@pytest.mark.parametrize("weights", [(0.8,), (0.8, -0.5)], ids=["one at 0.8", "two at once"])
def test_peft_lora_on_transformer_and_clip_encoders_matches_diffusers_fused(tiny_sd3_model, tiny_sd3_engines,
                                                                             sd3_loras, weights):
    loras = list(zip(sd3_loras, weights))
    pipe = Pipeline.load(tiny_sd3_engines, backend="ort-cpu")
    base = pipe.generate(pipe.make_config(**LORA_REQUEST)).images
    config = pipe.make_config(**LORA_REQUEST, loras=loras)
    ours = pipe.generate(config).images
    ref = reference(tiny_sd3_model, config, pipe.initial_noise(config)[0], loras=loras)
    assert int(np.abs(ours.astype(int) - ref).max()) <= MAX_PIXEL_ERROR
    assert int(np.abs(ref.astype(int) - base).max()) > 8, "the LoRA barely changes the image: the comparison proves nothing"


def test_a_lora_switches_back_exactly_and_fp16_engines_apply_it_as_fp32_ones(tiny_sd3_engines, tiny_sd3_engines_fp16,
                                                                             sd3_loras):
    images = []
    for engines in (tiny_sd3_engines, tiny_sd3_engines_fp16):
        pipe = Pipeline.load(engines, backend="ort-cpu")
        base = pipe.generate(pipe.make_config(**LORA_REQUEST)).images
        pipe.set_loras([(sd3_loras[0], 0.8)])
        images.append(pipe.generate(pipe.make_config(**LORA_REQUEST)).images)
        pipe.set_loras([])
        assert np.array_equal(pipe.generate(pipe.make_config(**LORA_REQUEST)).images, base)
    assert psnr(images[1], images[0]) >= 30.0


def test_kohya_named_and_other_family_loras_are_refused_naming_why(tiny_sd3_engines, tiny_model, tmp_path):
    from safetensors.numpy import save_file

    from sdrt.export.testmodel import write_test_lora

    kohya = tmp_path / "sd3-kohya.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": np.zeros((4, 32), np.float32),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": np.zeros((96, 4), np.float32)}, str(kohya))
    pipe = Pipeline.load(tiny_sd3_engines, backend="ort-cpu")
    with pytest.raises(InputError, match="kohya way .*diffusers / PEFT"):
        pipe.set_loras([(kohya, 0.8)])
    sd1 = write_test_lora(tiny_model, tmp_path / "sd1.safetensors", 1)
    with pytest.raises(InputError, match=r"(\d+) of its \1 layers name none of these sd3 engines' layers.*another model family"):
        pipe.set_loras([(sd1, 0.8)])
    assert pipe.loras == ()
