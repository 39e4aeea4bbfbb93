"""Single-file checkpoints: the original key layout read back, the bundled architectures, safe
loading and clear refusals (export/checkpoints.py, export/original_layout.py)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdrt.errors import InputError, ModelError  # noqa: E402
from sdrt.export.checkpoints import KINDS, SingleFile, choose_prediction, read_checkpoint, write_config_folder  # noqa: E402
from sdrt.export.exporter import ExportConfig, export  # noqa: E402
from sdrt.export.original_layout import write_single_file  # noqa: E402

MAX_PIXEL_ERROR = 1  # the bound for a single file against its folder


def _images(engines, **extra):
    from sdrt.pipeline import Pipeline

    pipe = Pipeline.load(engines, backend="ort-cpu")
    config = pipe.make_config(["a red apple", "a blue house"], negative_prompt="blurry", steps=3, seed=5,
                              scheduler="euler", guidance=6.0, **extra)
    return pipe.generate(config).images


def _assert_close(a, b):
    assert a.shape == b.shape and np.isfinite(a).all()
    assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= MAX_PIXEL_ERROR


@pytest.fixture(scope="module")
def tiny_file(tiny_model, tmp_path_factory):
    return write_single_file(tiny_model, tmp_path_factory.mktemp("file") / "tiny.safetensors")


def test_a_single_file_exports_to_the_folders_image(tiny_model, tiny_engines, tiny_file, tmp_path):
    """The tiny SD 1.x folder written in the original layout (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.transformer.*) and exported with the folder's configs: the same image, batch 2 with CFG."""
    manifest = export(ExportConfig(tiny_file, tmp_path / "e", precision="fp32", config_dir=tiny_model), progress=False)
    assert manifest.source["format"] == "single file"
    assert manifest.source["sha256"] == hashlib.sha256(tiny_file.read_bytes()).hexdigest()  # A1111's model hash
    assert manifest.model_hash == manifest.source["sha256"][:10]
    _assert_close(_images(tmp_path / "e"), _images(tiny_engines))


def test_an_sdxl_single_file_exports_to_the_folders_image(tiny_sdxl_model, tiny_sdxl_engines, tmp_path):
    """SDXL's layout: conditioner.embedders.0 (CLIP ViT-L) and .1 (OpenCLIP, q|k|v fused in in_proj)."""
    path = write_single_file(tiny_sdxl_model, tmp_path / "xl.safetensors")
    export(ExportConfig(path, tmp_path / "e", precision="fp32", config_dir=tiny_sdxl_model), progress=False)
    _assert_close(_images(tmp_path / "e"), _images(tiny_sdxl_engines))


def test_an_sd2_layout_text_encoder_exports_to_the_folders_image(tiny_model, tiny_engines, tmp_path):
    """SD 2.x stores its text encoder as OpenCLIP's text tower (cond_stage_model.model.*, in_proj q|k|v,
    one more layer than it reads): the tiny folder's encoder in that layout, plus an unused last layer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from sdrt.export import original_layout as ol

    te = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    state = {**ol.unet_state(UNet2DConditionModel.from_pretrained(tiny_model / "unet")),
             **ol.vae_state(AutoencoderKL.from_pretrained(tiny_model / "vae")),
             **ol.open_clip_state(te, ol.OPEN_CLIP_PREFIXES["sd2"])}
    last = te.config.num_hidden_layers - 1
    prefix = f"{ol.OPEN_CLIP_PREFIXES['sd2']}transformer.resblocks."
    state.update({k.replace(f"{prefix}{last}.", f"{prefix}{last + 1}."): v.clone() for k, v in state.items()
                  if k.startswith(f"{prefix}{last}.")})
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sd2.safetensors"))
    export(ExportConfig(tmp_path / "sd2.safetensors", tmp_path / "e", precision="fp32", config_dir=tiny_model),
           progress=False)
    _assert_close(_images(tmp_path / "e"), _images(tiny_engines))


def test_a_ckpt_reads_like_the_safetensors(tiny_file, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_file))
    torch.save({"state_dict": state, "global_step": 1234}, tmp_path / "tiny.ckpt")  # Lightning's nesting
    got = read_checkpoint(tmp_path / "tiny.ckpt")
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (str(_RunsCode.target),))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    _RunsCode.target = tmp_path / "pwned"
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": {"x": _RunsCode()}}))
    torch.save({"state_dict": {"x": _RunsCode()}}, tmp_path / "evil-zip.ckpt")
    for name in ("evil.ckpt", "evil-zip.ckpt"):
        with pytest.raises(ModelError, match="would run code"):
            export(ExportConfig(tmp_path / name, tmp_path / "e"), progress=False)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "e").exists()


def _truncated(tmp_path, tiny_file):
    data = tiny_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.safetensors", "truncated or damaged"


def _lora(tmp_path, tiny_file):
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(tmp_path / "l.safetensors"))
    return tmp_path / "l.safetensors", "a LoRA adapter, not a model"


def _vae_only(tmp_path, tiny_file):
    from safetensors.torch import load_file, save_file

    state = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(tiny_file)).items()
             if k.startswith("first_stage_model.")}
    save_file(state, str(tmp_path / "vae.safetensors"))
    return tmp_path / "vae.safetensors", "a VAE alone: pass it to --vae"


def _refiner(tmp_path, tiny_file):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3),
               "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(8)},
              str(tmp_path / "refiner.safetensors"))
    return tmp_path / "refiner.safetensors", "'xl_refiner' checkpoint .* Single files sdrt exports: SD 1.x, "


def _other_suffix(tmp_path, tiny_file):
    shutil.copy(tiny_file, tmp_path / "model.gguf")
    return tmp_path / "model.gguf", "unknown checkpoint format '.gguf'"


@pytest.mark.parametrize("make", [_truncated, _lora, _vae_only, _refiner, _other_suffix])
def test_files_that_are_not_a_supported_checkpoint_are_refused_with_nothing_written(make, tiny_file, tmp_path):
    path, match = make(tmp_path, tiny_file)
    with pytest.raises(ModelError, match=match):
        export(ExportConfig(path, tmp_path / "e"), progress=False)
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.*"))


def test_another_architecture_without_config_says_to_pass_one(tiny_file, tmp_path):
    """The tiny file's keys are SD 1.x's, its shapes are not SD 1.5's: refused, naming --config."""
    with pytest.raises(ModelError, match="do not fit SD 1.x's .* pass --config DIR"):
        export(ExportConfig(tiny_file, tmp_path / "e"), progress=False)
    assert not (tmp_path / "e").exists()


def test_folder_only_and_file_only_options_are_refused(tiny_model, tiny_file, tmp_path):
    with pytest.raises(InputError, match="--variant picks weights files in a diffusers folder"):
        export(ExportConfig(tiny_file, tmp_path / "e", variant="fp16", config_dir=tiny_model), progress=False)
    with pytest.raises(InputError, match="--config, --prediction-type and --text-encoders are for single-file"):
        export(ExportConfig(tiny_model, tmp_path / "e", prediction_type="v_prediction"), progress=False)
    with pytest.raises(InputError, match="--prediction-type must be one of"):
        SingleFile.open(tiny_file, tiny_model, prediction_type="x0")


def test_a_config_folder_with_scheduler_settings_sdrt_cannot_honour_is_refused_first(tiny_model, tiny_file, tmp_path):
    config = tmp_path / "config"
    shutil.copytree(tiny_model, config)
    path = config / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "timestep_spacing": "sideways"}))
    with pytest.raises(InputError, match="timestep_spacing 'sideways' is not supported"):
        export(ExportConfig(tiny_file, tmp_path / "e", config_dir=config), progress=False)
    assert not (tmp_path / "e").exists()


def test_prediction_type_flag_is_recorded_and_drives_the_schedule(tiny_model, tiny_file, tmp_path):
    manifest = export(ExportConfig(tiny_file, tmp_path / "e", precision="fp32", config_dir=tiny_model,
                                   prediction_type="v_prediction", validate=False), progress=False)
    assert manifest.source["prediction_type"] == "v_prediction"
    assert manifest.source["prediction_type_from"] == "--prediction-type"
    assert manifest.scheduler_config["prediction_type"] == "v_prediction"


def test_prediction_type_detection_order(tiny_model):
    """--prediction-type, then a v_pred marker key, then (SD 2.x) A1111's probe, else the config's. The probe
    is driven both ways by the U-Net's output bias: far below the input reads as v-prediction."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    assert choose_prediction({}, "epsilon", "v_prediction", unet, probe=True).found_by == "--prediction-type"
    assert choose_prediction({"v_pred": torch.tensor(0)}, None, "epsilon", unet, probe=False).value == "v_prediction"
    assert choose_prediction({}, None, "epsilon", unet, probe=False).found_by == "config"
    with torch.no_grad():
        for bias, expected in ((-10.0, "v_prediction"), (10.0, "epsilon")):
            unet.conv_out.bias.fill_(bias)
            choice = choose_prediction({}, None, "v_prediction", unet, probe=True)
            assert (choice.value, choice.found_by) == (expected, "probe")


def test_a_vae_file_swaps_in_like_the_vae_folder(tiny_model, tmp_path):
    """--vae FILE (a VAE alone in the original layout, as vae-ft-mse-840000 ships) gives the engines the
    same VAE as --vae DIR of it."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from sdrt.export.original_layout import vae_state
    from sdrt.export.testmodel import TINY_VAE

    torch.manual_seed(1)
    vae = AutoencoderKL(**TINY_VAE)
    vae.save_pretrained(tmp_path / "vae-dir", safe_serialization=True)
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_state(vae).items()},
              str(tmp_path / "vae.safetensors"))
    by_file = export(ExportConfig(tiny_model, tmp_path / "f", precision="fp32", vae=tmp_path / "vae.safetensors"),
                     progress=False)
    export(ExportConfig(tiny_model, tmp_path / "d", precision="fp32", vae=tmp_path / "vae-dir"), progress=False)
    assert by_file.source["vae"]["sha256"] == hashlib.sha256((tmp_path / "vae.safetensors").read_bytes()).hexdigest()
    np.testing.assert_array_equal(_images(tmp_path / "f"), _images(tmp_path / "d"))


UNET_KINDS = sorted(k for k, kind in KINDS.items() if kind.pipeline != "StableDiffusion3Pipeline")
SD3_KINDS = sorted(set(KINDS) - set(UNET_KINDS))


@pytest.mark.parametrize("model_type", UNET_KINDS)
def test_bundled_architectures_are_the_real_ones(model_type, tmp_path):
    """Parameter counts of the published models (meta tensors: no memory), and CLIP's real vocabulary."""
    import transformers
    from diffusers import UNet2DConditionModel

    expected = {"v1": (859_520_964, [123_060_480]), "inpainting": (859_535_364, [123_060_480]),
                "v2": (865_910_724, [340_387_840]), "inpainting_v2": (865_925_124, [340_387_840]),
                "xl_base": (2_567_463_684, [123_060_480, 694_659_840]),
                "xl_inpaint": (2_567_478_084, [123_060_480, 694_659_840])}[model_type]
    kind = KINDS[model_type]
    folder = write_config_folder(kind, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        encoders = [getattr(transformers, index[c][1])(transformers.CLIPTextConfig.from_pretrained(folder / c))
                    for c, *_ in kind.text_encoders]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), [count(e) for e in encoders]) == expected
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    # CLIP ViT-L/14's ids for this sentence (a=320, photograph=8853, ..., horse=4558)
    assert tokenizer("a photograph of an astronaut riding a horse").input_ids == [
        49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


# the MMDiT keys diffusers' infer_diffusers_model_type reads, at each published model's shapes
SD3_SHAPES = {"sd3": {"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), "pos_embed": (1, 36864, 1536)},
              "sd35_medium": {"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
                              "pos_embed": (1, 147456, 1536)},
              "sd35_large": {"joint_blocks.0.context_block.adaLN_modulation.1.bias": (14592,),
                             "joint_blocks.37.x_block.mlp.fc1.weight": (9728, 2432)}}


@pytest.mark.parametrize("model_type", SD3_KINDS)
def test_bundled_sd3_architectures_are_recognised_and_have_the_published_sizes(model_type, tmp_path):
    """SD 3 Medium's transformer has 2.03 B parameters, SD 3.5 Medium's 2.24 B (exactly, as the sd35m test
    model), 3.5 Large's 8.1 B (Stability's model cards); CLIP-L and bigG with their projections."""
    import transformers
    from diffusers import SD3Transformer2DModel

    from sdrt.export.checkpoints import kind_of

    keys = {f"model.diffusion_model.{k}": torch.empty(shape, device="meta") for k, shape in SD3_SHAPES[model_type].items()}
    kind = kind_of(keys, tmp_path / "x.safetensors", "mmdit")
    assert kind.model_type == model_type
    folder = write_config_folder(kind, tmp_path / "config")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"] and index["text_encoder_3"] == [None, None]
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder / "transformer"))
        encoders = [transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_pretrained(folder / c))
                    for c, *_ in kind.text_encoders]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    published = {"sd3": 2.03e9, "sd35_medium": 2_243_171_520, "sd35_large": 8.06e9}[model_type]
    assert count(transformer) == published if model_type == "sd35_medium" else abs(count(transformer) / published - 1) < 0.01
    assert [count(e) for e in encoders] == [123_650_304, 694_659_840]


def test_an_sd3_single_file_with_its_text_encoders_exports_to_the_folders_image(tiny_sd3_model, tiny_sd3_engines,
                                                                                 tmp_path):
    """Stability's layout: model.diffusion_model.joint_blocks.* (q|k|v fused, final (shift, scale)),
    first_stage_model.*, text_encoders.{clip_l,clip_g,t5xxl}.transformer.*; configs and T5's tokenizer
    from the folder (--config)."""
    path = write_single_file(tiny_sd3_model, tmp_path / "sd3.safetensors")
    manifest = export(ExportConfig(path, tmp_path / "e", precision="fp32", config_dir=tiny_sd3_model), progress=False)
    assert manifest.source["prediction_type"] == "flow" and "text_encoder_3" in manifest.components
    _assert_close(_images(tmp_path / "e"), _images(tiny_sd3_engines))


def test_an_sd3_file_without_text_encoders_takes_stabilitys_text_encoder_files(tiny_sd3_model, tiny_sd3_engines,
                                                                               tmp_path):
    from sdrt.export.original_layout import write_text_encoder_files

    path = write_single_file(tiny_sd3_model, tmp_path / "sd3.safetensors", text_encoders=False)
    with pytest.raises(ModelError, match="no weights for text_encoder .* pass --text-encoders DIR"):
        export(ExportConfig(path, tmp_path / "e", config_dir=tiny_sd3_model), progress=False)
    folder = write_text_encoder_files(tiny_sd3_model, tmp_path / "text_encoders")
    assert sorted(p.name for p in folder.iterdir()) == ["clip_g.safetensors", "clip_l.safetensors",
                                                        "t5xxl_fp16.safetensors"]
    manifest = export(ExportConfig(path, tmp_path / "e", precision="fp32", config_dir=tiny_sd3_model,
                                   text_encoders_dir=folder), progress=False)
    assert set(manifest.source["text_encoder_files"]) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    _assert_close(_images(tmp_path / "e"), _images(tiny_sd3_engines))


def test_an_sd3_file_refusals(tiny_sd3_model, tiny_model, tmp_path):
    path = write_single_file(tiny_sd3_model, tmp_path / "sd3.safetensors")
    with pytest.raises(ModelError, match="SD 3 transformer .* a size sdrt does not bundle .* --config DIR"):
        export(ExportConfig(path, tmp_path / "e"), progress=False)  # the tiny shapes are no published model's
    with pytest.raises(ModelError, match="is a Stable Diffusion 1.x.* folder, but .* holds an SD 3 transformer"):
        export(ExportConfig(path, tmp_path / "e", config_dir=tiny_model), progress=False)
    with pytest.raises(InputError, match="--prediction-type is for U-Net files"):
        export(ExportConfig(path, tmp_path / "e", config_dir=tiny_sd3_model, prediction_type="epsilon"), progress=False)
    with pytest.raises(InputError, match="--text-encoders is for SD 3 files"):
        export(ExportConfig(write_single_file(tiny_model, tmp_path / "sd1.safetensors"), tmp_path / "e",
                            config_dir=tiny_model, text_encoders_dir=tmp_path), progress=False)
    no_t5 = tmp_path / "no-t5-config"  # configs without T5's tokenizer: the file's T5 cannot be read
    shutil.copytree(tiny_sd3_model, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((no_t5 / "model_index.json").read_text())
    (no_t5 / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None],
                                                        "tokenizer_3": [None, None]}))
    with pytest.raises(ModelError, match="T5-XXL, whose tokenizer .* cannot write offline: pass --config DIR.* --no-t5"):
        export(ExportConfig(path, tmp_path / "e", config_dir=no_t5), progress=False)
    assert not (tmp_path / "e").exists()
    manifest = export(ExportConfig(path, tmp_path / "e", config_dir=no_t5, drop=("text_encoder_3",)), progress=False)
    assert "text_encoder_3" not in manifest.components


@pytest.mark.slow
def test_an_sd15_architecture_single_file_is_recognised_and_exported(tmp_path):
    """`sdrt testmodel sd15 FILE.safetensors` (random weights, the real layout) exports with sdrt's own
    configs, validated. fp32: an fp16 export traces the VAE decoder in fp16 on the CPU, which torch's
    fp16 convolutions make take over 40 minutes here (the same for a folder)."""
    from sdrt.export.testmodel import build_test_model

    path = build_test_model("sd15", tmp_path / "sd15.safetensors")
    manifest = export(ExportConfig(path, tmp_path / "e", precision="fp32", max_size=512), progress=False)
    assert manifest.source["architecture"] == "SD 1.x"
    assert all(r["error"] <= r["tolerance"] for r in manifest.validation.values())
    from sdrt.tokenizer import ClipTokenizer

    ids, _ = ClipTokenizer(tmp_path / "e" / "tokenizer")(["a photograph of an astronaut riding a horse"])
    assert ids[0][:10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]  # CLIP's own ids


@pytest.mark.slow
def test_an_sd35_medium_transformer_file_is_recognised_and_read_at_real_size(tmp_path):
    """SD 3.5 Medium's exact transformer (random weights, fp16 as Stability ships it) in the original
    layout: recognised without --config, converted by sdrt's bundled architecture, every weight back."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    from sdrt.export.architectures import SD35M_TRANSFORMER
    from sdrt.export.checkpoints import DENOISER_FOLDERS, kind_of
    from sdrt.export.original_layout import mmdit_state

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**SD35M_TRANSFORMER).to(torch.float16)
    save_file({k: v.contiguous() for k, v in mmdit_state(transformer).items()}, str(tmp_path / "sd3.5_medium.safetensors"))
    expected = {k: v.clone() for k, v in transformer.state_dict().items()}
    del transformer
    single = SingleFile.open(tmp_path / "sd3.5_medium.safetensors")
    assert single.label == "SD 3.5 Medium"
    folder = write_config_folder(kind_of(single.checkpoint, single.path, "mmdit"), tmp_path / "config")
    config = SD3Transformer2DModel.load_config(folder / DENOISER_FOLDERS["mmdit"])
    loaded = single._transformer(SD3Transformer2DModel, config)
    assert sum(p.numel() for p in loaded.parameters()) == 2_243_171_520
    got = loaded.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k].half(), v) for k, v in expected.items())
