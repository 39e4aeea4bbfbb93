"""LoRA on exported engines: parity with diffusers' load_lora_weights + fuse_lora, switching, formats, refusals."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402
from sdrt.bench.stats import psnr  # noqa: E402
from sdrt.errors import InputError  # noqa: E402
from sdrt.export.testmodel import write_test_lora  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402

MAX_PIXEL_ERROR = 2  # /255, the parity bound for fp32 engines
REQUEST = dict(negative_prompt="blurry", steps=4, guidance=5.0, scheduler="euler", seed=3)


def fused_reference(model_dir, loras, latents, config):
    """diffusers' image with each LoRA loaded and fused at its weight, on sdrt's initial latents."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for path, weight in loras:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=weight)
        pipe.unload_lora_weights()  # the fused weights stay
    out = pipe(list(config.prompts.prompt), negative_prompt=list(config.prompts.negative_prompt), num_inference_steps=config.sampler.steps,
               guidance_scale=config.guidance.scale, latents=torch.from_numpy(latents), height=config.size.height,
               width=config.size.width, output_type="np").images
    return (out * 255).round().astype(np.uint8)


def max_error(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def sd1_loras(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return write_test_lora(tiny_model, folder / "style.safetensors", 1), write_test_lora(tiny_model, folder / "other.safetensors", 2)


@pytest.mark.parametrize("weights", [(0.8,), (0.8, -0.5)], ids=["one at 0.8", "two at once"])
def test_kohya_lora_on_unet_and_text_encoder_matches_diffusers_fused(tiny_model, tiny_engines, sd1_loras, weights):
    loras = list(zip(sd1_loras, weights))
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    base = pipe.generate(pipe.make_config("a red apple", **REQUEST)).images
    config = pipe.make_config("a red apple", loras=loras, **REQUEST)
    ours = pipe.generate(config).images
    ref = fused_reference(tiny_model, loras, pipe.initial_noise(config)[0], config)
    assert max_error(ours, ref) <= MAX_PIXEL_ERROR
    assert max_error(ref, base) > 8, "the LoRA barely changes the image: the comparison would prove nothing"


def test_sdxl_kohya_lora_in_original_naming_matches_diffusers_fused(tiny_sdxl_model, tiny_sdxl_engines, tmp_path):
    lora = write_test_lora(tiny_sdxl_model, tmp_path / "xl.safetensors", 3, sgm=True)
    keys = json.loads(lora.read_bytes()[8:8 + struct.unpack("<Q", lora.read_bytes()[:8])[0]])
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    pipe = Pipeline.load(tiny_sdxl_engines, backend="ort-cpu")
    config = pipe.make_config("a red apple", loras=[(lora, 0.8)], **REQUEST)
    ours = pipe.generate(config).images
    ref = fused_reference(tiny_sdxl_model, [(lora, 0.8)], pipe.initial_noise(config)[0], config)
    assert max_error(ours, ref) <= MAX_PIXEL_ERROR


def test_diffusers_peft_format_gives_the_kohya_files_image(tiny_model, tiny_engines, sd1_loras, tmp_path):
    """The same LoRA saved by diffusers (PEFT keys lora_A/lora_B, alpha in the file's metadata)."""
    from peft.utils import get_peft_model_state_dict

    pipe_ref = diffusers.DiffusionPipeline.from_pretrained(tiny_model)
    pipe_ref.load_lora_weights(str(sd1_loras[0]), adapter_name="style")
    type(pipe_ref).save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe_ref.unet, adapter_name="style"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe_ref.text_encoder, adapter_name="style"),
        unet_lora_adapter_metadata=pipe_ref.unet.peft_config["style"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe_ref.text_encoder.peft_config["style"].to_dict())
    peft_file = tmp_path / "pytorch_lora_weights.safetensors"
    assert any(".lora_A." in k for k in json.loads(peft_file.read_bytes()[8:8 + struct.unpack("<Q", peft_file.read_bytes()[:8])[0]]))
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    kohya = pipe.generate(pipe.make_config("a red apple", loras=[(sd1_loras[0], 0.8)], **REQUEST)).images
    peft = pipe.generate(pipe.make_config("a red apple", loras=[(peft_file, 0.8)], **REQUEST)).images
    assert max_error(kohya, peft) <= 1


def test_weight_zero_and_switching_back_give_the_base_image_and_engine_files_never_change(tiny_engines, sd1_loras):
    def digests():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tiny_engines.rglob("*")) if p.is_file()}

    before = digests()
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    base = pipe.generate(pipe.make_config("a red apple", **REQUEST)).images
    zero = pipe.generate(pipe.make_config("a red apple", loras=[(sd1_loras[0], 0.0)], **REQUEST)).images
    pipe.set_loras([(sd1_loras[0], 0.8)])
    on = pipe.generate(pipe.make_config("a red apple", **REQUEST)).images
    pipe.set_loras([(sd1_loras[1], 0.8)])  # switching from one LoRA to another: base + the new delta only
    other = pipe.generate(pipe.make_config("a red apple", **REQUEST)).images
    fresh = Pipeline.load(tiny_engines, backend="ort-cpu")
    fresh.set_loras([(sd1_loras[1], 0.8)])
    assert np.array_equal(other, fresh.generate(fresh.make_config("a red apple", **REQUEST)).images)
    pipe.set_loras([])
    back = pipe.generate(pipe.make_config("a red apple", **REQUEST)).images
    assert np.array_equal(zero, base) and np.array_equal(back, base)
    assert max_error(on, base) > 8
    assert digests() == before


def test_fp16_engines_apply_the_lora_as_fp32_ones_do(tiny_engines, tiny_engines_fp16, sd1_loras):
    images = []
    for engines in (tiny_engines, tiny_engines_fp16):
        pipe = Pipeline.load(engines, backend="ort-cpu")
        images.append(pipe.generate(pipe.make_config("a red apple", loras=[(sd1_loras[0], 0.8)], **REQUEST)).images)
    assert psnr(images[1], images[0]) >= 30.0


def test_prompt_tags_resolve_in_the_lora_folder_as_a1111(tiny_engines, sd1_loras):
    folder = sd1_loras[0].parent
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu", lora_dir=folder)
    tagged = pipe.make_config("a red apple <lora:style:0.8>", **REQUEST)
    assert tagged.prompts.prompt == ("a red apple ",) and tagged.prompts.loras == ((str(sd1_loras[0].resolve()), 0.8),)
    explicit = pipe.make_config("a red apple ", loras=[(sd1_loras[0], 0.8)], **REQUEST)
    assert np.array_equal(pipe.generate(tagged).images, pipe.generate(explicit).images)
    assert tagged.batch_key == explicit.batch_key != pipe.make_config("a red apple ", **REQUEST).batch_key
    with pytest.raises(InputError, match="no LoRA named 'nope'.*has: other, style"):
        pipe.make_config("a <lora:nope:1>", **REQUEST)
    with pytest.raises(InputError, match="weights 0.5 and 1"):
        pipe.make_config(["a <lora:style:0.5>", "b <lora:style>"], **REQUEST)
    with pytest.raises(InputError, match="--lora-dir"):
        Pipeline.load(tiny_engines, backend="ort-cpu").make_config("a <lora:style:1>", **REQUEST)


def _loha(path):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)}, str(path))
    return path, "LoHa"


def _truncated(path):
    path.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    return path, "not a readable .safetensors"


def _other_family(path):  # an SDXL-sized text-encoder-2 layer on SD 1.x engines
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4)}, str(path))
    return path, "another model family"


def _other_size(path):  # a layer of the right name but another model's width
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(path))
    return path, "does not fit the engines' weight"


@pytest.mark.parametrize("make", [_loha, _truncated, _other_family, _other_size])
def test_bad_lora_files_are_refused_and_change_nothing(tiny_engines, tmp_path, make):
    path, message = make(tmp_path / "bad.safetensors")
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    base = pipe.generate(pipe.make_config("a red apple", **REQUEST)).images
    with pytest.raises(InputError, match=message):
        pipe.set_loras([(path, 0.8)])
    assert pipe.loras == () and np.array_equal(pipe.generate(pipe.make_config("a red apple", **REQUEST)).images, base)


def test_every_linear_and_conv_weight_is_named_with_its_bytes(tiny_model, tiny_engines):
    """The manifest's weight slots cover every Linear/Conv of the U-Net and text encoder, and each
    slot's bytes in the ONNX data are the module's weight (transposed where recorded)."""
    from diffusers import UNet2DConditionModel
    from sdrt.loras import base_weight
    from sdrt.manifest import read_manifest
    from transformers import CLIPTextModel

    manifest = read_manifest(tiny_engines)
    for component, prefix, module in (
            ("denoise_step", "unet.", UNet2DConditionModel.from_pretrained(tiny_model / "unet")),
            ("text_encoder", "text_encoder.text_model.", CLIPTextModel.from_pretrained(tiny_model / "text_encoder"))):
        spec = manifest.components[component]
        layers = {name: m for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert len(spec.weights) == len(layers) > 10
        for name, layer in layers.items():
            key = f"{prefix}{name.removeprefix('text_model.')}.weight"
            stored = base_weight(tiny_engines, spec, key)
            expected = layer.weight.detach().numpy()
            assert np.array_equal(stored, expected.T if spec.weights[key].transposed else expected), key


def test_sdxl_leaves_out_only_clip_l_s_unread_last_layer(tiny_sdxl_engines):
    """SDXL reads CLIP-L's penultimate layer: its last one is pruned from the graph, listed as unused (a
    LoRA's layers there change nothing); bigG's last layer feeds the pooled output; every U-Net weight is named."""
    from sdrt.manifest import read_manifest

    components = read_manifest(tiny_sdxl_engines).components
    assert components["denoise_step"].weights and not components["denoise_step"].unused_weights
    assert components["text_encoder_2"].weights and not components["text_encoder_2"].unused_weights
    spec = components["text_encoder"]
    layers = {int(w.split(".layers.")[1].split(".")[0]) for w in spec.weights if ".layers." in w}
    assert spec.unused_weights and all(f".layers.{max(layers) + 1}." in w for w in spec.unused_weights)


# --- the command line and the server -------------------------------------------------------------

def test_cli_lora_flag_equals_the_python_api_and_writes_the_tag_into_the_infotext(tiny_engines, sd1_loras, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "lora.png"
    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", str(tiny_engines), "a red apple", "--negative",
                        "blurry", "--steps", "4", "--guidance", "5", "--scheduler", "euler", "--seed", "3",
                        "--backend", "ort-cpu", "--lora", f"{sd1_loras[0]}:0.8", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    expected = pipe.generate(pipe.make_config("a red apple", loras=[(sd1_loras[0], 0.8)], **REQUEST)).images[0]
    image = Image.open(out)
    assert np.array_equal(np.asarray(image.convert("RGB")), expected)
    assert image.info["parameters"].startswith("a red apple <lora:style:0.8>\n")
    bad = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", str(tiny_engines), "a", "--backend", "ort-cpu",
                          "--lora", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.png")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and not (tmp_path / "x.png").exists()


def test_server_lists_loras_and_applies_prompt_tags(tiny_engines, sd1_loras):
    pytest.importorskip("fastapi")
    import base64
    import io

    import httpx
    from PIL import Image
    from sdrt.bench.live_server import LiveServer
    from sdrt.serve.config import ServeConfig

    live = LiveServer(ServeConfig(tiny_engines, backend="ort-cpu", lora_dir=sd1_loras[0].parent))
    try:
        listed = httpx.get(f"{live.url}/sdapi/v1/loras", timeout=30).json()
        assert [entry["name"] for entry in listed] == ["other", "style"]
        body = dict(prompt="a red apple <lora:style:0.8>", negative_prompt="blurry", steps=4, cfg_scale=5.0,
                    sampler_name="Euler", scheduler="Automatic", seed=3, width=64, height=64)
        response = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert response.status_code == 200, response.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
        missing = httpx.post(f"{live.url}/sdapi/v1/txt2img", json={**body, "prompt": "a <lora:nope:1>"}, timeout=60)
        assert missing.status_code in (400, 422) and "nope" in missing.text
    finally:
        live.stop()
    pipe = Pipeline.load(tiny_engines, backend="ort-cpu")
    expected = pipe.generate(pipe.make_config("a red apple ", loras=[(sd1_loras[0], 0.8)], **REQUEST)).images[0]
    assert np.array_equal(got, expected)
