"""`sdrt optimize`: ONNX Runtime's fused graphs beside the exported ones, used by the ORT backend."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime.transformers")

import onnx  # noqa: E402

from sdrt.errors import EngineError  # noqa: E402
from sdrt.export.optimize import OptimizeConfig, optimize  # noqa: E402
from sdrt.manifest import STEP, read_manifest  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402

# ops onnxruntime registers in the ONNX domain itself (SD3's q/k RMSNorm): onnx.checker does not know them,
# so the check sees them as the contrib ops they are; everything else it checks as written
ORT_OPS_IN_ONNX_DOMAIN = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
MAX_PIXEL_ERROR = 2  # of 255: optimized vs plain graphs, the parity tests' bound
SAMPLERS = {"sd1": ("euler", "euler_a", "dpmpp_2m_karras", "ddim", "plms", "lcm"),
            "sdxl": ("euler", "euler_a", "dpmpp_2m_karras", "ddim"), "sd3": ("euler",)}


@pytest.fixture(scope="module", params=["tiny_engines", "tiny_sdxl_engines", "tiny_sd3_engines"])
def optimized(request, tmp_path_factory):
    """A copy of fp32 engines with graphs optimized for both providers."""
    engines = tmp_path_factory.mktemp("optimized") / "e"
    shutil.copytree(request.getfixturevalue(request.param), engines)
    for provider in ("cpu", "cuda"):
        optimize(OptimizeConfig(engines, provider), progress=False)
    return engines


def _images(engines, optimized_graphs, scheduler, negative):
    pipe = Pipeline.load(engines, backend="ort-cpu", optimized=optimized_graphs)
    m = pipe.model.size_multiple
    config = pipe.make_config(["a red cube", "a blue sphere"], negative_prompt=negative, steps=4, guidance=6.0,
                              scheduler=scheduler, seed=3, height=8 * m, width=8 * m)
    return pipe.generate(config).images, pipe.backend.describe()


def test_cpu_optimized_graphs_give_the_plain_graphs_images(optimized):
    family = read_manifest(optimized).model.family
    for scheduler in SAMPLERS[family]:
        for negative in ("blurry", "", None):
            plain, plain_name = _images(optimized, False, scheduler, negative)
            fused, fused_name = _images(optimized, True, scheduler, negative)
            assert "optimized graphs" in fused_name and "optimized" not in plain_name
            assert np.isfinite(fused).all() and plain.std() > 0
            error = np.abs(fused.astype(int) - plain.astype(int)).max()
            assert error <= MAX_PIXEL_ERROR, f"{family} {scheduler} negative={negative!r}: {error}/255"


def test_every_denoise_attention_is_fused_and_what_is_not_is_named(optimized):
    manifest = read_manifest(optimized)
    for provider, graphs in manifest.optimized.items():
        assert set(graphs) == set(manifest.model.components)
        for name, graph in graphs.items():
            plain = onnx.load(str(optimized / manifest.components[name].onnx), load_external_data=False)
            softmax = [n.name for n in plain.graph.node if n.op_type == "Softmax"]
            fused = onnx.load(str(optimized / graph.onnx))
            _check(fused)
            ops = collections.Counter(n.op_type for n in fused.graph.node)
            assert {op: ops[op] for op in graph.fused} == graph.fused
            left = [n.name for n in fused.graph.node if n.op_type == "Softmax"]
            assert list(graph.unfused_attention) == left and set(left) <= set(softmax)
            if name == STEP:  # every attention block of the U-Net / MMDiT
                assert softmax and not left
                assert ops["MultiHeadAttention"] + ops["Attention"] == len(softmax)
        if provider == "cuda":  # the fusions with CUDA kernels only
            assert graphs[STEP].fused.get("SkipGroupNorm", 0) + graphs[STEP].fused.get("GroupNorm", 0) > 0 or \
                manifest.model.family == "sd3"
            assert graphs["vae_decoder"].fused.get("GroupNorm", 0) > 0
        else:
            assert not {"GroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"} & set(graphs[STEP].fused)


def _check(model: onnx.ModelProto) -> None:
    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    for node in checked.graph.node:
        if node.op_type in ORT_OPS_IN_ONNX_DOMAIN and not node.domain:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in checked.opset_import):
        checked.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(checked)


def test_the_optimized_files_are_checksummed_and_a_damaged_one_is_refused(optimized, tmp_path):
    engines = tmp_path / "e"
    shutil.copytree(optimized, engines)
    manifest = read_manifest(engines)
    rel = manifest.optimized["cpu"][STEP].onnx + ".data"
    assert manifest.files[rel]
    with open(engines / rel, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(EngineError, match=rel.replace(".", r"\.")):
        Pipeline.load(engines, backend="ort-cpu")


def test_fp16_engines_are_refused_for_the_cpu_naming_the_fix(tiny_engines_fp16, tmp_path):
    engines = tmp_path / "e"
    shutil.copytree(tiny_engines_fp16, engines)
    before = (engines / "manifest.json").read_text()
    with pytest.raises(NotImplementedError, match="--precision fp32"):
        optimize(OptimizeConfig(engines, "cpu"), progress=False)
    assert (engines / "manifest.json").read_text() == before
    assert not [p for p in engines.iterdir() if ".cpu." in p.name or p.name.startswith(".optimize")]


@pytest.fixture(params=["tiny_engines_fp16", "tiny_sdxl_engines_fp16", "tiny_sd3_engines_fp16"])
def fp16_engines(request):
    return request.getfixturevalue(request.param)


def test_fp16_cuda_graphs_fuse_every_denoise_attention_and_pass_the_checker(fp16_engines, tmp_path):
    engines = tmp_path / "e"
    shutil.copytree(fp16_engines, engines)
    manifest = optimize(OptimizeConfig(engines, "cuda"), progress=False)
    step = manifest.optimized["cuda"][STEP]
    plain = onnx.load(str(engines / manifest.components[STEP].onnx), load_external_data=False)
    blocks = sum(n.op_type == "Softmax" for n in plain.graph.node)
    assert blocks and not step.unfused_attention
    assert step.fused.get("MultiHeadAttention", 0) + step.fused.get("Attention", 0) == blocks
    for graph in manifest.optimized["cuda"].values():
        _check(onnx.load(str(engines / graph.onnx)))


def test_the_fp16_scale_rewrite_keeps_the_images(tiny_engines_fp16, tmp_path):
    """The fusion needs fp16 exports' attention scale rewritten (export.optimize.fp16_attention_scale);
    the rewritten, unfused graph must give the exported graph's images on the CPU."""
    from sdrt.export.optimize import fp16_attention_scale

    engines = tmp_path / "e"
    shutil.copytree(tiny_engines_fp16, engines)
    path = engines / "denoise_step.onnx"
    model = onnx.load(str(path))
    blocks = sum(n.op_type == "Softmax" for n in model.graph.node)
    assert fp16_attention_scale(model.graph) == blocks
    (engines / "denoise_step.onnx.data").unlink()
    onnx.save(model, str(path))  # weights inside: the tiny model is small
    config = dict(negative_prompt="blurry", steps=4, seed=3, height=64, width=64, scheduler="euler_a")
    want = Pipeline.load(tiny_engines_fp16, backend="ort-cpu")
    got = Pipeline.load(engines, backend="ort-cpu", verify=False)
    a = got.generate(got.make_config(["a red cube", "a cat"], **config)).images
    b = want.generate(want.make_config(["a red cube", "a cat"], **config)).images
    assert np.abs(a.astype(int) - b.astype(int)).max() <= MAX_PIXEL_ERROR


def test_a_lora_runs_on_the_plain_graph_where_the_optimized_one_packed_its_weights(tiny_model, tiny_engines,
                                                                                   tmp_path):
    from sdrt.export.testmodel import write_test_lora

    lora = write_test_lora(tiny_model, tmp_path / "style.safetensors", 1)
    engines = tmp_path / "e"
    shutil.copytree(tiny_engines, engines)
    optimize(OptimizeConfig(engines, "cpu"), progress=False)
    assert not read_manifest(engines).optimized["cpu"][STEP].lora_weights  # self-attention's q, k, v packed
    request = dict(steps=3, seed=2, height=64, width=64, scheduler="euler")
    images = {}
    for label, optimized_graphs in (("plain", False), ("optimized", True)):
        pipe = Pipeline.load(engines, backend="ort-cpu", optimized=optimized_graphs)
        images[label] = pipe.generate(pipe.make_config("a red apple", loras=[(lora, 0.8)], **request)).images
        base = pipe.generate(pipe.make_config("a red apple", loras=[], **request)).images
        assert not np.array_equal(images[label], base)  # the LoRA did something
    assert np.abs(images["plain"].astype(int) - images["optimized"].astype(int)).max() <= MAX_PIXEL_ERROR
    assert pipe.backend.graphs[STEP] == "denoise_step.cpu.onnx"  # back on the optimized graph without LoRAs


def test_cli_optimize_and_generate_with_and_without_the_optimized_graphs(tiny_engines, tmp_path):
    engines = tmp_path / "e"
    shutil.copytree(tiny_engines, engines)
    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "optimize", str(engines), "--provider", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "MultiHeadAttention" in r.stdout and "attention left unfused: /text_encoder" in r.stdout
    assert json.loads((engines / "manifest.json").read_text())["optimized"]["cpu"]["denoise_step"]["fused"]
    for flag, expected in (([], "optimized graphs"), (["--no-optimized"], "ort-cpu (onnxruntime")):
        r = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", str(engines), "a cat", "--steps", "2",
                            "--backend", "ort-cpu", "-o", str(tmp_path / "x.png"), *flag], capture_output=True, text=True)
        assert r.returncode == 0 and expected in r.stdout, r.stderr
    assert "optimized" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "optimize", str(engines), "--provider", "tpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.gpu
def test_fp16_cuda_graphs_are_close_to_the_plain_fp16_graphs_on_a_gpu(tiny_engines_fp16, tmp_path):
    from sdrt.backends.onnxruntime import cuda_available
    from sdrt.bench.stats import psnr

    if not cuda_available():
        pytest.skip("onnxruntime-gpu is not installed")
    engines = tmp_path / "e"
    shutil.copytree(tiny_engines_fp16, engines)
    optimize(OptimizeConfig(engines, "cuda"), progress=False)
    pipe = Pipeline.load(engines, backend="ort-cuda", optimized=False)
    config = pipe.make_config("a red cube", steps=4, seed=3, scheduler="euler")
    plain = pipe.generate(config).images
    fused = Pipeline.load(engines, backend="ort-cuda").generate(config).images
    assert np.isfinite(fused).all() and psnr(fused, plain) >= 30


@pytest.mark.gpu
def test_cuda_optimized_graphs_match_the_plain_graphs_on_a_gpu(optimized):
    from sdrt.backends.onnxruntime import cuda_available

    if not cuda_available():
        pytest.skip("onnxruntime-gpu is not installed")
    pipe = Pipeline.load(optimized, backend="ort-cuda", optimized=False)
    config = pipe.make_config("a red cube", steps=4, seed=3, scheduler="euler")
    plain = pipe.generate(config).images
    fused = Pipeline.load(optimized, backend="ort-cuda").generate(config).images
    assert np.isfinite(fused).all()
    assert np.abs(fused.astype(int) - plain.astype(int)).max() <= MAX_PIXEL_ERROR
