"""Another ControlNet's weights swapped into exported engines (sdrt.controlnet_weights): every ControlNet
parameter is its own named initializer in the step graph, a ControlNet of the same architecture swapped in
gives the images of engines exported with it (folder, cldm file, with a LoRA), and what does not fit is
refused naming why, before anything runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.controlnet_weights import available_controlnets, read_controlnet  # noqa: E402
from sdrt.errors import InputError  # noqa: E402
from sdrt.export.exporter import ExportConfig, export  # noqa: E402
from sdrt.export.original_layout import controlnet_original_names, write_controlnet_file  # noqa: E402
from sdrt.export.testmodel import write_test_controlnet, write_test_lora  # noqa: E402
from sdrt.loras import base_weight  # noqa: E402
from sdrt.manifest import STEP, read_manifest  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402
from tests.test_controlnet import PROMPT, SIZE, hint  # noqa: E402

KW = dict(negative_prompt="blurry", steps=3, seed=7, height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def nets(tiny_model, tmp_path_factory):
    """Two random ControlNets of the tiny model's architecture (folders), and the second as a cldm file."""
    root = tmp_path_factory.mktemp("swap")
    canny, depth = (write_test_controlnet(tiny_model, root / name, seed) for seed, name in ((1, "canny"), (2, "depth")))
    return canny, depth, write_controlnet_file(depth, root / "control_depth.safetensors")


@pytest.fixture(scope="module")
def engines(tiny_model, nets, tmp_path_factory):
    """Engines exported with each ControlNet alone: canny's (swapped into) and depth's (the reference)."""
    root = tmp_path_factory.mktemp("swap-engines")
    for net in nets[:2]:
        export(ExportConfig(tiny_model, root / net.name, precision="fp32", controlnets=(net,)), progress=False)
    return root / "canny", root / "depth"


def images(pipe, **kwargs):
    return pipe.generate(pipe.make_config(PROMPT, control_image=hint(3), **KW, **kwargs)).images


def test_every_controlnet_parameter_is_a_named_initializer_holding_its_value(engines, nets):
    manifest = read_manifest(engines[0])
    spec = manifest.components[STEP]
    net = diffusers.ControlNetModel.from_pretrained(nets[0])
    originals = controlnet_original_names(net)
    params = dict(net.named_parameters())
    assert set(spec.control_weights) == {f"controlnets.0.{k}" for k in params} and not spec.control_unnamed
    assert not set(spec.control_weights) & set(spec.weights)  # a LoRA never reaches a ControlNet's weights
    for key, value in params.items():
        slot = spec.control_weights[f"controlnets.0.{key}"]
        assert slot.original == originals[key]
        stored = np.asarray(base_weight(engines[0], spec, f"controlnets.0.{key}"))
        want = value.detach().numpy()
        np.testing.assert_array_equal(stored, (want.T if slot.transposed else want).reshape(stored.shape), err_msg=key)


def test_a_swapped_controlnet_gives_the_images_of_engines_exported_with_it(engines, nets):
    canny, depth = (Pipeline.load(e, backend="ort-cpu") for e in engines)
    own, reference = images(canny), images(depth)
    assert int(np.abs(own.astype(int) - reference).max()) > 20  # the two ControlNets draw apart
    for model in (nets[1], nets[2], {"canny": str(nets[2])}):  # a folder, a cldm file, by the exported name
        config = canny.make_config(PROMPT, control_image=hint(3), controlnet_model=model, **KW)
        got = canny.generate(config).images
        assert int(np.abs(got.astype(int) - reference).max()) <= 1, model
        assert config.control.models == ("control_depth" if model != nets[1] else "depth",)
    np.testing.assert_array_equal(images(canny), own)  # the exported weights come back with the next request
    info = canny.generate(canny.make_config(PROMPT, control_image=hint(3), controlnet_model=nets[2], **KW)).parameters(0)
    assert "Model: control_depth," in info


def test_a_swapped_controlnet_and_a_lora_change_the_step_together(tiny_model, engines, nets, tmp_path):
    lora = write_test_lora(tiny_model, tmp_path / "style.safetensors", 1)
    canny, depth = (Pipeline.load(e, backend="ort-cpu") for e in engines)
    got = images(canny, controlnet_model=nets[1], loras=[(lora, 0.8)])
    want = images(depth, loras=[(lora, 0.8)])
    assert int(np.abs(got.astype(int) - want).max()) <= 1
    assert int(np.abs(want.astype(int) - images(depth)).max()) > 2  # the LoRA did change the picture


def test_controlnets_that_do_not_fit_are_refused_naming_why(engines, nets, tiny_model, tiny_sdxl_model, tmp_path):
    pipe = Pipeline.load(engines[0], backend="ort-cpu")
    sdxl = write_test_controlnet(tiny_sdxl_model, tmp_path / "xl", 1)
    lora = write_test_lora(tiny_model, tmp_path / "style.safetensors", 1)
    (tmp_path / "notes.txt").write_text("not a model")
    for model, match in ((sdxl, "not of the architecture of these engines' 'canny'"),
                         (lora, "is a LoRA, not a ControlNet"),
                         (tmp_path / "missing.safetensors", "does not exist"),
                         (tmp_path / "notes.txt", "sdrt reads .safetensors"),
                         (tmp_path, "a folder without diffusion_pytorch_model.safetensors"),
                         ({"depth": nets[1]}, "controlnet_model names 'depth'; these engines' ControlNets are canny"),
                         ([nets[1], nets[1]], "2 models for 1 ControlNet"), (3, "must be paths")):
        with pytest.raises(InputError, match=match):
            pipe.make_config(PROMPT, control_image=hint(3), controlnet_model=model, **KW)
    with pytest.raises(InputError, match="controlnet_model set without a control_image"):
        pipe.make_config(PROMPT, controlnet_model=nets[1], **KW)


def test_engines_exported_before_the_controlnets_were_named_ask_for_a_re_export(engines, nets, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(engines[0], old)
    doc = json.loads((old / "manifest.json").read_text())
    del doc["components"][STEP]["control_weights"]
    (old / "manifest.json").write_text(json.dumps(doc))
    pipe = Pipeline.load(old, backend="ort-cpu")
    with pytest.raises(InputError, match="re-export"):
        pipe.make_config(PROMPT, control_image=hint(3), controlnet_model=nets[1], **KW)
    doc["components"][STEP]["control_weights"] = json.loads((engines[0] / "manifest.json").read_text())[
        "components"][STEP]["control_weights"]
    doc["components"][STEP]["control_unnamed"] = ["controlnets.0.conv_in.bias"]  # as two equal weights leave it
    (old / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="cannot be swapped: 1 of its weights"):
        Pipeline.load(old, backend="ort-cpu").make_config(PROMPT, control_image=hint(3), controlnet_model=nets[1], **KW)


def test_the_controlnet_folder_lists_files_and_diffusers_folders(nets, tmp_path):
    shutil.copytree(nets[1], tmp_path / "depth")
    shutil.copy(nets[2], tmp_path / "control_depth.safetensors")
    (tmp_path / "control_depth.yaml").write_text("model: {}")  # A1111's config beside a file: not a model
    (tmp_path / "empty").mkdir()
    assert available_controlnets(tmp_path) == {"control_depth": tmp_path / "control_depth.safetensors",
                                               "depth": tmp_path / "depth"}
    a, b = read_controlnet(tmp_path / "depth"), read_controlnet(tmp_path / "control_depth.safetensors")
    assert len(a) == len(b) and set(b) == {f"control_model.{k}" for k in controlnet_original_names(
        diffusers.ControlNetModel.from_pretrained(nets[1])).values()}


def test_the_cli_and_the_a1111_api_swap_a_controlnet(engines, nets, tmp_path):
    import base64
    import io

    import httpx
    from PIL import Image

    from sdrt.bench.live_server import LiveServer
    from sdrt.serve.config import ServeConfig
    from tests.pictures import png_bytes
    from tests.test_cli import sdrt

    depth = Pipeline.load(engines[1], backend="ort-cpu")
    want = depth(PROMPT, control_image=hint(3), guidance=7.0, **{**KW, "negative_prompt": ""})[0]
    Image.fromarray(hint(3)).save(tmp_path / "hint.png")
    r = sdrt("generate", str(engines[0]), PROMPT, "--steps", "3", "--seed", "7", "--guidance", "7", "--control-image",
             str(tmp_path / "hint.png"), "--controlnet-model", f"canny={nets[2]}", "-o", str(tmp_path / "out.png"))
    assert r.returncode == 0, r.stderr
    assert np.abs(np.asarray(Image.open(tmp_path / "out.png")).astype(int) - np.asarray(want)).max() <= 1
    bad = sdrt("generate", str(engines[0]), PROMPT, "--steps", "3", "--controlnet-model", str(nets[2]),
               "-o", str(tmp_path / "bad.png"))
    assert bad.returncode != 0 and "without a control_image" in bad.stderr and not (tmp_path / "bad.png").exists()

    folder = tmp_path / "ControlNet"
    folder.mkdir()
    shutil.copy(nets[2], folder / "control_depth.safetensors")
    live = LiveServer(ServeConfig(engines[0], backend="ort-cpu", controlnet_dir=folder))
    try:
        listed = httpx.get(f"{live.url}/controlnet/model_list").json()
        assert listed == {"model_list": ["canny", "control_depth"]}
        unit = dict(module="none", model="control_depth [a1b2c3d4]", weight=1.0,
                    image=base64.b64encode(png_bytes(Image.fromarray(hint(3)))).decode())
        body = dict(prompt=PROMPT, steps=3, seed=7, width=SIZE, height=SIZE, cfg_scale=7.0,
                    alwayson_scripts={"controlnet": {"args": [unit]}})
        r = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        assert np.abs(got.astype(int) - np.asarray(want)).max() <= 1
        assert "Model: control_depth," in json.loads(r.json()["info"])["infotexts"][0]
        two = dict(body, alwayson_scripts={"controlnet": {"args": [unit, dict(unit, model="canny")]}})
        r = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=two, timeout=60)
        assert r.status_code == 400 and "at most one unit per ControlNet" in r.text
        r = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=dict(body, alwayson_scripts={"controlnet": {"args": [
            dict(unit, model="openpose")]}}), timeout=60)
        assert r.status_code == 400 and "neither in these engines nor in the ControlNet folder" in r.text
    finally:
        live.stop()


def test_a_swapped_controlnet_runs_on_the_plain_graph_where_the_optimized_one_changed_its_weights(engines, nets,
                                                                                                    tmp_path):
    from sdrt.export.optimize import OptimizeConfig, optimize
    from tests.test_parity import MAX_PIXEL_ERROR

    optimized = tmp_path / "e"
    shutil.copytree(engines[0], optimized)
    graph = optimize(OptimizeConfig(optimized, "cpu"), progress=False).optimized["cpu"][STEP]
    assert not graph.control_weights  # the ControlNet's attention q, k, v packed as the U-Net's
    pipe = Pipeline.load(optimized, backend="ort-cpu")
    got = images(pipe, controlnet_model=nets[1])
    assert pipe.backend.graphs[STEP] == "denoise_step.onnx"
    want = images(Pipeline.load(engines[1], backend="ort-cpu"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= MAX_PIXEL_ERROR
    images(pipe)
    assert pipe.backend.graphs[STEP] == "denoise_step.cpu.onnx"  # back on the optimized graph
