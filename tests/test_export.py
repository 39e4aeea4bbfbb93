"""The exporter: ONNX layout, manifest contents, validation, atomic writes and bad model folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from sdrt.errors import InputError, ModelError, ValidationError  # noqa: E402
from sdrt.export.exporter import ExportConfig, Tolerances, export  # noqa: E402
from sdrt.manifest import read_manifest, sha256_file  # noqa: E402


def test_layout_and_manifest(tiny_engines, tiny_model):
    m = read_manifest(tiny_engines)
    assert m.precision == "fp32" and m.name == tiny_engines.name
    for name, spec in m.components.items():
        graph = onnx.load(str(tiny_engines / spec.onnx), load_external_data=False)
        assert graph.opset_import[0].version >= 17
        locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {spec.onnx + ".data"}, f"{name}: weights must sit in one external-data file"
        assert [i.name for i in graph.graph.input] == [t.name for t in spec.inputs]
        assert [o.name for o in graph.graph.output] == [t.name for t in spec.outputs]
    step = m.components["denoise_step"]
    assert step.input("latents").shape == ("B", 4, "h", "w")
    assert step.input("text_embeddings").shape[0] == "RB"
    assert m.components["vae_decoder"].output("images").dtype == "uint8"
    assert [t.name for t in step.inputs if t.name in ("image_latents", "image_noise", "mask")] == [
        "image_latents", "image_noise", "mask"]  # an ordinary model blends an inpainting mask in the step
    assert m.components["vae_encoder"].input("images").shape == ("B", "H", "W", 3)
    for rel, digest in m.files.items():
        assert sha256_file(tiny_engines / rel) == digest
    assert {"denoise_step.onnx.data", "tokenizer/tokenizer.json"} <= set(m.files)
    assert len(m.source["sha256"]) == 64 and m.versions["torch"] and m.versions["onnxruntime"]
    for name in ("text_encoder", "vae_encoder", "denoise_step", "vae_decoder"):
        report = m.validation[name]
        assert 0 <= report["error"] <= report["tolerance"]
    assert m.scheduler_config["_class_name"] == "PNDMScheduler"
    assert not [p for p in tiny_engines.parent.iterdir() if p.name.startswith(".")], "staging left behind"


def test_fp16_engines_are_fp16_with_fp32_latents(tiny_engines_fp16):
    m = read_manifest(tiny_engines_fp16)
    assert m.precision == "fp16"
    assert m.components["text_encoder"].output("text_embeddings").dtype == "float16"
    assert m.components["denoise_step"].input("latents").dtype == "float32"
    graph = onnx.load(str(tiny_engines_fp16 / "denoise_step.onnx"), load_external_data=False)
    dtypes = {t.data_type for t in graph.graph.initializer if len(t.dims) >= 2}
    assert dtypes == {onnx.TensorProto.FLOAT16}, "weights of the fp16 U-Net must be fp16"


def test_existing_output_needs_force(tiny_model, tiny_engines):
    with pytest.raises(InputError, match="--force"):
        export(ExportConfig(tiny_model, tiny_engines), progress=False)


def test_interrupted_export_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    import sdrt.export.onnx_io as onnx_io

    real = onnx_io.export_onnx
    calls = []

    def fail_on_vae(module, args, path, *rest, **kw):
        calls.append(path.name)
        if path.name == "vae_decoder.onnx":
            raise KeyboardInterrupt
        return real(module, args, path, *rest, **kw)

    monkeypatch.setattr(onnx_io, "export_onnx", fail_on_vae)
    out = tmp_path / "engines" / "broken"
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(tiny_model, out, validate=False), progress=False)
    assert calls[-1] == "vae_decoder.onnx"
    assert not out.exists()
    assert list((tmp_path / "engines").iterdir()) == []


def test_replacing_with_force_is_atomic_and_valid(tiny_model, tmp_path):
    out = tmp_path / "e"
    export(ExportConfig(tiny_model, out, precision="fp32", validate=False), progress=False)
    before = read_manifest(out).files
    export(ExportConfig(tiny_model, out, precision="fp32", validate=False, force=True), progress=False)
    assert set(read_manifest(out).files) == set(before)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_validation_failure_is_an_error(tiny_model, tmp_path):
    strict = Tolerances(fp32={"text_encoder": 0.0, "denoise_step": 0.0, "vae_decoder": 0.0})
    with pytest.raises(ValidationError, match="exceeds tolerance"):
        export(ExportConfig(tiny_model, tmp_path / "e", precision="fp32", tolerances=strict), progress=False)
    assert not (tmp_path / "e").exists()


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("mutate, match", [
    # a family sdrt does not export: named, with the supported ones
    (lambda m: _edit_json(m / "model_index.json", _class_name="FluxPipeline"),
     "FluxPipeline folder.*Supported: Stable Diffusion 1.x / 2.x.*Stable Diffusion XL.*Stable Diffusion 3"),
    # a folder whose model_index.json names a family whose parts it lacks
    (lambda m: _edit_json(m / "model_index.json", _class_name="StableDiffusion3Pipeline"),
     "not a complete diffusers Stable Diffusion 3 / 3.5 folder: missing transformer/config.json"),
    # scheduler settings sdrt cannot honour: refused by key before any export work
    (lambda m: _edit_json(m / "scheduler" / "scheduler_config.json", thresholding=True), "thresholding=True"),
    (lambda m: _edit_json(m / "scheduler" / "scheduler_config.json", timestep_spacing="karras"), "timestep_spacing"),
])
def test_unsupported_families_and_settings_are_refused_by_name(tiny_model, tmp_path, mutate, match):
    model = _broken_copy(tiny_model, tmp_path, mutate)
    with pytest.raises((ModelError, InputError), match=match):
        export(ExportConfig(model, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_sdxl_folder_as_sd1_components_is_refused_clearly(tiny_sdxl_model, tmp_path):
    """An SDXL U-Net behind an SD 1.x model_index: the widths named, not a crash."""
    model = _broken_copy(tiny_sdxl_model, tmp_path, lambda m: _edit_json(
        m / "model_index.json", _class_name="StableDiffusionPipeline", text_encoder_2=None, tokenizer_2=None))
    with pytest.raises(ModelError, match="cross-attention dim 64 != 32.*do not belong together"):
        export(ExportConfig(model, tmp_path / "out"), progress=False)


def test_sdxl_manifest_carries_the_contract(tiny_sdxl_engines):
    m = read_manifest(tiny_sdxl_engines)
    assert m.model.family == "sdxl" and m.model.zero_empty_negative
    assert m.model.components == ("text_encoder", "text_encoder_2", "vae_encoder", "denoise_step", "vae_decoder")
    assert [(c.name, c.layout, c.source) for c in m.model.conditioning] == [
        ("text_embeddings", "cfg", "text_encoder"), ("text_embeddings_2", "cfg", "text_encoder_2"),
        ("pooled_embeds", "cfg", "text_encoder_2"), ("time_ids", "cfg", "host")]
    assert m.components["text_encoder_2"].output("pooled_embeds").shape == ("N", 32)
    assert m.components["denoise_step"].input("time_ids").shape == ("RB", 6)
    assert (m.model.defaults.steps, m.model.defaults.guidance) == (30, 5.0)
    assert {"tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"} <= set(m.files)
    assert json.loads((tiny_sdxl_engines / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"


def test_sdxl_fp16_export_keeps_the_force_upcast_vae_in_fp32(tiny_sdxl_model, tmp_path):
    m = export(ExportConfig(tiny_sdxl_model, tmp_path / "e", precision="fp16"), progress=False)
    assert m.components["denoise_step"].precision == "fp16" and m.components["vae_decoder"].precision == "fp32"
    graph = onnx.load(str(tmp_path / "e" / "vae_decoder.onnx"), load_external_data=False)
    assert {t.data_type for t in graph.graph.initializer if len(t.dims) >= 2} == {onnx.TensorProto.FLOAT}
    assert m.validation["vae_decoder"]["tolerance"] == Tolerances().fp32["vae_decoder"]  # judged as fp32


def test_fp16_overflow_fails_validation(tiny_model, tmp_path):
    """A U-Net whose output overflows fp16 (finite in fp32) must not export as fp16."""
    import torch
    from diffusers import UNet2DConditionModel

    def blow_up(m):
        unet = UNet2DConditionModel.from_pretrained(m / "unet")
        with torch.no_grad():
            unet.conv_out.weight.mul_(1e9)  # beyond fp16 range (65504), finite in fp32
        unet.save_pretrained(m / "unet", safe_serialization=True)

    model = _broken_copy(tiny_model, tmp_path, blow_up)
    with pytest.raises(ValidationError, match="denoise_step.*NaN/inf on ONNX Runtime \\(fp16\\)"):
        export(ExportConfig(model, tmp_path / "e", precision="fp16"), progress=False)
    assert not (tmp_path / "e").exists()
    export(ExportConfig(model, tmp_path / "e32", precision="fp32"), progress=False)  # fine in fp32


def _broken_copy(tiny_model, tmp_path, mutate):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    mutate(model)
    return model


@pytest.mark.parametrize("mutate, match", [
    (lambda m: shutil.rmtree(m / "unet"), "missing unet/config.json"),
    (lambda m: (m / "model_index.json").unlink(), "no model_index.json"),
    (lambda m: (m / "vae" / "config.json").write_text("{oops"), "not valid JSON"),
    (lambda m: [p.unlink() for p in (m / "text_encoder").glob("*.safetensors")], "no .safetensors"),
])
def test_bad_model_folders(tiny_model, tmp_path, mutate, match):
    model = _broken_copy(tiny_model, tmp_path, mutate)
    with pytest.raises(ModelError, match=match):
        export(ExportConfig(model, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelError, match="sdrt testmodel"):
        export(ExportConfig(tmp_path / "nope", tmp_path / "out"), progress=False)


def test_a_depth_like_unet_is_refused(tiny_model, tmp_path):
    def five_channels(m):
        cfg = json.loads((m / "unet" / "config.json").read_text())
        cfg["in_channels"] = 5
        (m / "unet" / "config.json").write_text(json.dumps(cfg))

    model = _broken_copy(tiny_model, tmp_path, five_channels)
    with pytest.raises(ModelError):
        export(ExportConfig(model, tmp_path / "out"), progress=False)


def test_inpainting_unet_exports_with_mask_and_masked_image_inputs(tiny_inpaint_engines):
    m = read_manifest(tiny_inpaint_engines)
    assert m.model.image_input == "concat" and m.model.needs_image
    step = m.components["denoise_step"]
    assert step.input("latents").shape == ("B", 4, "h", "w")  # the sampler state: 4 channels of the 9
    assert step.input("mask").shape == ("B", 1, "h", "w")
    assert step.input("masked_image_latents").shape == ("B", 4, "h", "w")
    assert "image_latents" not in [t.name for t in step.inputs]  # no blend: the U-Net sees the mask


def test_unknown_precision(tiny_model, tmp_path):
    with pytest.raises(InputError, match="precision"):
        export(ExportConfig(tiny_model, tmp_path / "out", precision="int8"), progress=False)


def test_testmodel_refuses_nonempty_dir_and_unknown_kind(tmp_path):
    from sdrt.export.testmodel import build_test_model

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        build_test_model("tiny", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(InputError, match="unknown test model"):
        build_test_model("sd4", tmp_path / "y")


@pytest.mark.slow
def test_sd15_testmodel_has_sd15_shapes(sd15_model):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd15_model / "unet", torch_dtype=torch.float32)
    n = sum(p.numel() for p in unet.parameters())
    assert n == 859_520_964, n


@pytest.mark.parametrize("kind, parameters", [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_real_size_test_models_have_the_real_unet(kind, parameters):
    """`sdrt testmodel sd15|sdxl` build these exact U-Nets (counted on the meta device: no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdrt.export.testmodel import SPECS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SPECS[kind].unet)
    assert sum(p.numel() for p in unet.parameters()) == SPECS[kind].unet_parameters == parameters


def test_every_artifact_is_readable_as_the_graphs_are(tiny_engines):
    """onnx writes external data through a 0600 temporary file; the engines keep one mode throughout."""
    import stat

    modes = {p.relative_to(tiny_engines).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in tiny_engines.rglob("*") if p.is_file()}
    assert any(name.endswith(".onnx.data") for name in modes)
    graph_mode = modes["denoise_step.onnx"]
    assert graph_mode & 0o044, "the graph itself is not group/other readable: check the umask"
    assert {name: mode for name, mode in modes.items() if mode != graph_mode} == {}


def test_weights_gathered_from_per_tensor_files_into_one_aligned_file(tmp_path):
    """torch writes a model over 2 GB as one file per tensor, Constant nodes' tensors included;
    gather_weights streams the initializers into one page-aligned .data file (ONNX Runtime can map it),
    puts the constants back inline, and the graph computes exactly as before."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, convert_model_to_external_data

    from sdrt.export.onnx_io import ALIGNMENT, gather_weights

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"]),
         helper.make_node("Add", ["y", "c"], ["z0"]),
         helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
             rng.standard_normal((2, 16)).astype(np.float32), "k")),
         helper.make_node("MatMul", ["z0", "k"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.array([0.5, -1], np.float32), "c")])  # c stays inline in the raw graph
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inline = model.SerializeToString()
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=64,  # sys.getsizeof
                                   convert_attribute=True)
    onnx.save_model(model, str(raw_dir / "model.onnx"))
    assert sorted(p.name for p in raw_dir.iterdir()) == ["k", "model.onnx", "w1", "w2"]  # one file per large tensor

    out = tmp_path / "out"
    out.mkdir()
    gather_weights(raw_dir / "model.onnx", out / "m.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    gathered = onnx.load(str(out / "m.onnx"), load_external_data=False)
    infos = [ExternalDataInfo(t) for t in gathered.graph.initializer]
    assert {i.location for i in infos} == {"m.onnx.data"} and all(i.offset % ALIGNMENT == 0 for i in infos)
    constant = next(n for n in gathered.graph.node if n.op_type == "Constant").attribute[0].t
    assert constant.data_location == TensorProto.DEFAULT and len(constant.raw_data) == 2 * 16 * 4
    x = rng.standard_normal((1, 3)).astype(np.float32)
    (z,) = ort.InferenceSession(str(out / "m.onnx")).run(None, {"x": x})
    (expected,) = ort.InferenceSession(inline).run(None, {"x": x})
    np.testing.assert_array_equal(z, expected)


# --- the files people have: variants, a VAE swap ---------------------------------------------------

def _generate(engines, seed=3):
    from sdrt.pipeline import Pipeline

    pipe = Pipeline.load(engines, backend="ort-cpu")
    return pipe.generate(pipe.make_config("a red apple", steps=3, seed=seed, scheduler="euler")).images


def test_a_variant_folder_exports_with_variant_and_only_with_it(tiny_model, tiny_engines, tmp_path):
    """`save_pretrained(variant="fp16")` names every weight file *.fp16.safetensors (the dtype stays
    as saved: fp32 here, so the engines must give tiny_engines' image bit for bit)."""
    import diffusers

    folder = tmp_path / "variant"
    diffusers.StableDiffusionPipeline.from_pretrained(tiny_model).save_pretrained(folder, variant="fp16")
    shutil.copy(tiny_model / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    with pytest.raises(ModelError, match="variants here: fp16: pass --variant"):
        export(ExportConfig(folder, tmp_path / "plain", precision="fp32"), progress=False)
    assert not (tmp_path / "plain").exists()
    engines = export(ExportConfig(folder, tmp_path / "e", precision="fp32", variant="fp16"), progress=False)
    assert engines.source["path"] == str(folder.resolve())
    np.testing.assert_array_equal(_generate(tmp_path / "e"), _generate(tiny_engines))


def test_vae_swap_matches_diffusers_with_that_vae(tiny_model, tiny_engines, tmp_path):
    """--vae DIR: the engines carry that VAE (parity with diffusers on a folder holding it), the
    manifest records it, and A1111's info names it."""
    import torch
    from diffusers import AutoencoderKL

    from sdrt.export.testmodel import TINY_VAE
    from tests.test_parity import assert_parity, sdrt_and_reference

    torch.manual_seed(1)
    other = tmp_path / "other-vae"
    AutoencoderKL(**TINY_VAE).save_pretrained(other, safe_serialization=True)
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_model, swapped)
    shutil.rmtree(swapped / "vae")
    shutil.copytree(other, swapped / "vae")
    manifest = export(ExportConfig(tiny_model, tmp_path / "e", precision="fp32", vae=other), progress=False)
    assert manifest.source["vae"]["path"] == str(other.resolve()) and len(manifest.source["vae"]["sha256"]) == 64
    assert_parity(*sdrt_and_reference(swapped, tmp_path / "e", "euler"), "euler with the swapped VAE")
    assert not np.array_equal(_generate(tmp_path / "e"), _generate(tiny_engines))  # the swap did something
    from sdrt.serve.a1111_requests import vae_fields as _vae_fields

    assert _vae_fields(manifest) == {"sd_vae_name": "other-vae", "sd_vae_hash": manifest.source["vae"]["sha256"][:10]}


def _junk_file(folder):
    (folder / "vae.safetensors").write_bytes(b"x")
    return folder / "vae.safetensors"


@pytest.mark.parametrize("make, match", [(_junk_file, "not a readable .safetensors file"),
                                         (lambda folder: folder, "neither a VAE file nor a diffusers AutoencoderKL")])
def test_bad_vae_arguments_are_refused_before_anything_is_written(tiny_model, tmp_path, make, match):
    with pytest.raises(ModelError, match=match):
        export(ExportConfig(tiny_model, tmp_path / "e", vae=make(tmp_path)), progress=False)
    assert not (tmp_path / "e").exists()


def test_a_folder_loads_each_text_encoder_and_the_denoiser_alone(tiny_sd3_model, tmp_path, monkeypatch):
    """Weights come in as the exporter reaches each module and go (to the meta device) once exported: SD 3.5
    with T5-XXL holds 19 GB of T5 or 9 GB of transformer, never both with the rest (31 GB in fp32)."""
    from sdrt.export import exporter

    loads, modules = [], []  # (component, the earlier ones still holding weights when it loads)
    real = exporter.load_components

    def holding(module):
        return any(not p.is_meta for p in module.parameters())

    def tracking(*args, **kwargs):
        parts = real(*args, **kwargs)
        assert not any(holding(m) for m in (parts.denoiser, *parts.text_encoders.values())), "shells hold weights"
        for component, load in list(parts.loaders.items()):
            def tracked(component=component, load=load):
                loads.append((component, [c for c, m in modules if holding(m)]))
                modules.append((component, load()))
                return modules[-1][1]
            parts.loaders[component] = tracked
        return parts

    monkeypatch.setattr(exporter, "load_components", tracking)
    export(ExportConfig(tiny_sd3_model, tmp_path / "e", precision="fp16"), progress=False)
    assert loads == [("text_encoder", []), ("text_encoder_2", []), ("text_encoder_3", []), ("denoiser", [])]
    assert not any(holding(m) for _, m in modules)


def test_a_truncated_weights_file_fails_before_any_export(tiny_model, tmp_path):
    """The U-Net loads last, but its file is checked (header only) before the first graph is exported."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        export(ExportConfig(folder, tmp_path / "e", precision="fp32"), progress=False)
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e*"))


# --- encoders as diffusers initialises them: states of mean ~0 after the final LayerNorm ---------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_emphasis_keeps_scale_one_where_the_mean_is_rounding_residue(dtype):
    import torch

    from sdrt.export.components import emphasized

    g = torch.Generator().manual_seed(0)
    states = torch.nn.functional.layer_norm(torch.randn(2, 77, 768, generator=g), (768,)).to(getattr(torch, dtype))
    weights = 0.5 + torch.rand(2, 77, generator=g)
    assert float(states.float().mean().abs()) < 1e-6 * float(states.float().abs().mean())
    got = emphasized(states, weights)
    assert torch.equal(got, (states.float() * weights[..., None]).to(states.dtype))  # scale exactly 1
    shifted = states + 0.5  # a trained encoder's states: A1111's rescale to the unweighted mean
    z = shifted.float()
    expected = z * weights[..., None] * (z.mean((1, 2), keepdim=True) / (z * weights[..., None]).mean((1, 2), keepdim=True))
    assert torch.allclose(emphasized(shifted, weights).float(), expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(emphasized(shifted, torch.ones(2, 77)), shifted)  # weights of 1: bit for bit


@pytest.mark.parametrize("kind", ["tiny-plain", "tiny-sdxl-plain"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_default_initialised_encoders_export_and_validate(kind, precision, tmp_path):
    """CLIP's real vocabulary, diffusers' default init: the text encoders validate against torch on random
    token weights, and weights ≠ 1 change the states (the check cannot pass on a constant)."""
    import onnxruntime as ort

    from sdrt.export.testmodel import build_test_model

    model = build_test_model(kind, tmp_path / "model")
    engines = tmp_path / "engines"
    export(ExportConfig(model, engines, precision=precision), progress=False)
    m = read_manifest(engines)
    for slot in m.model.text_encoders:
        report = m.validation[slot.component]
        assert 0 < report["error"] <= report["tolerance"] == Tolerances().of(slot.component, precision)
        assert np.isfinite(report["error"])
        spec = m.components[slot.component]
        session = ort.InferenceSession(str(engines / spec.onnx), providers=["CPUExecutionProvider"])
        ids = np.full((1, 77), 49407, np.int64)
        ids[0, :6] = [49406, 320, 1929, 3055, 525, 49407]  # <start> a red apple on <end>: CLIP's real ids
        feeds = {"input_ids": ids, "token_weights": np.ones((1, 77), np.float32), "keep": np.ones(1, np.float32),
                 "token_rows": np.zeros((1, spec.input("token_rows").shape[1]), np.float32)}
        if "clip_skip" in [t.name for t in spec.inputs]:
            feeds["clip_skip"] = np.array([1], np.int64)
        plain = session.run(None, feeds)[0].astype(np.float32)
        feeds["token_weights"] = feeds["token_weights"].copy()
        feeds["token_weights"][0, 2:4] = 1.4
        weighted = session.run(None, feeds)[0].astype(np.float32)
        assert np.all(np.isfinite(plain)) and np.all(np.isfinite(weighted))
        assert np.abs(weighted - plain)[0, 2:4].max() > 0.1 * np.abs(plain[0, 2:4]).max()
