"""`sdrt build`: TensorRT plans from the exported ONNX, built on this CPU with TensorRT-RTX.

A plan cannot be deserialized without a GPU driver ("cudaError 35" on a CPU machine), so these tests
check what the plan was built from: the parsed network's I/O, the profiles and the manifest record,
and every load-time check the TensorRT backend runs before deserializing. GPU tests at the end run
the backend end to end and skip cleanly without a GPU.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdrt.errors import BackendError, EngineError, InputError
from sdrt.manifest import STEP, ShapeLimits, read_manifest, sha256_file
from sdrt.plans import check_plans
from sdrt.tensorrt_lib import RTX_ARCHS, TensorRT, available_flavours, import_tensorrt

pytestmark = pytest.mark.skipif(not available_flavours(), reason="no TensorRT flavour importable "
                                "(pip install tensorrt-rtx)")


def _build(src: Path, dst: Path, **kwargs) -> Path:
    from sdrt.export.build import BuildConfig, build

    shutil.copytree(src, dst)
    build(BuildConfig(dst, **kwargs), progress=False)
    return dst


@pytest.fixture(scope="module")
def static_plans(tiny_engines_fp16, tmp_path_factory) -> Path:
    return _build(tiny_engines_fp16, tmp_path_factory.mktemp("plans") / "static", shapes="static:64x64,batch=1")


@pytest.fixture(scope="module")
def dynamic_plans(tiny_engines_fp16, tmp_path_factory) -> Path:
    return _build(tiny_engines_fp16, tmp_path_factory.mktemp("plans") / "dynamic",
                  shapes="dynamic:64-128,batch=1-2", archs=("sm86", "sm89"))


def test_static_build_records_flavour_io_profiles_and_sha256(static_plans):
    manifest = read_manifest(static_plans)
    plans = manifest.plans
    lib = import_tensorrt()
    assert (plans.flavour, plans.version) == (lib.flavour, lib.version)
    if lib.rtx:
        assert plans.archs == RTX_ARCHS  # no GPU here: a plan for every RTX arch
    assert plans.limits == ShapeLimits("static", (64,) * 3, (64,) * 3, (1,) * 3, 4)
    assert set(plans.components) == set(manifest.model.components) == set(manifest.components)
    for name, spec in manifest.components.items():
        record = plans.components[name]
        path = static_plans / record.plan
        assert path.stat().st_size == record.bytes > 100_000
        assert manifest.files[record.plan] == sha256_file(path)
        assert record.onnx_sha256 == manifest.files[spec.onnx]
        # the network TensorRT built from has the manifest's names, directions and dtypes
        io = {(t["name"], t["mode"]): t["dtype"] for t in record.io}
        assert io == {**{(t.name, "input"): t.dtype for t in spec.inputs},
                      **{(t.name, "output"): t.dtype for t in spec.outputs}}
    step = plans.components["denoise_step"].profile
    assert step["latents"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [1, 4, 8, 8]}
    assert step["x_history"]["opt"] == [4, 1, 4, 8, 8]
    # CFG: 2B rows; the prompt's tokens from one chunk to the exported 4 (77 at opt)
    assert step["text_embeddings"] == {"min": [1, 77, 32], "opt": [2, 77, 32], "max": [2, 308, 32]}
    assert "timestep" not in step  # static inputs need no profile
    assert plans.components["text_encoder"].profile["input_ids"] == {"min": [1, 77], "opt": [2, 77], "max": [2, 308]}
    assert plans.components["text_encoder"].profile["token_weights"] == plans.components["text_encoder"].profile["input_ids"]
    assert plans.components["text_encoder"].profile["keep"]["opt"] == [2]
    assert plans.components["denoise_step"].io[0]["dtype"] == "float32"
    assert not list(static_plans.glob(".*tmp*")), "temporary plan files left behind"
    check_plans(static_plans, manifest, lib.flavour, lib.version, plans.archs[0])


def test_dynamic_build_profiles_cover_the_range(dynamic_plans):
    plans = read_manifest(dynamic_plans).plans
    assert plans.archs == ("sm86", "sm89") and plans.shapes == "dynamic:64-128,batch=1-2"
    step = plans.components["denoise_step"].profile
    assert step["latents"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [2, 4, 16, 16]}
    assert step["text_embeddings"] == {"min": [1, 77, 32], "opt": [2, 77, 32], "max": [4, 308, 32]}
    assert plans.components["vae_decoder"].profile["latents"]["max"] == [2, 4, 16, 16]


def test_sdxl_builds_a_plan_per_component_with_cfg_profiles_for_all_conditioning(tiny_sdxl_model, tmp_path):
    """The contract carries through `sdrt build`: two text encoders, and every CFG-stacked
    conditioning input of the step profiled from B to 2B."""
    from sdrt.export.exporter import ExportConfig, export

    export(ExportConfig(tiny_sdxl_model, tmp_path / "onnx", precision="fp16"), progress=False)
    plans = _build(tmp_path / "onnx", tmp_path / "sdxl", shapes="dynamic:64-128,batch=1-2", archs=("sm89",))
    manifest = read_manifest(plans)
    step = manifest.plans.components["denoise_step"].profile
    assert list(manifest.plans.components) == ["text_encoder", "text_encoder_2", "vae_encoder", "denoise_step",
                                               "vae_decoder"]
    encoder = manifest.plans.components["vae_encoder"].profile  # pixels in, B x H x W
    assert encoder["images"] == {"min": [1, 64, 64, 3], "opt": [1, 64, 64, 3], "max": [2, 128, 128, 3]}
    assert step["mask"]["max"] == [2, 1, 16, 16] and step["image_latents"]["max"] == [2, 4, 16, 16]
    assert step["pooled_embeds"] == {"min": [1, 32], "opt": [2, 32], "max": [4, 32]}
    assert step["time_ids"] == {"min": [1, 6], "opt": [2, 6], "max": [4, 6]}
    assert step["text_embeddings_2"]["max"] == [4, 308, 32]
    for vae in ("vae_encoder", "vae_decoder"):  # force_upcast: an fp32 VAE in fp16 engines
        assert manifest.components[vae].precision == "fp32"
    check_plans(plans, manifest, manifest.plans.flavour, manifest.plans.version, "sm89")


def test_sd3_builds_the_transformer_and_three_encoders_on_the_cpu(tiny_sd3_engines, tmp_path):
    """SD3's contract through `sdrt build` (TensorRT-RTX, no GPU): T5's fixed sequence, the joint
    conditioning profiled from B to 3B, sides in multiples of 16."""
    with pytest.raises(InputError, match="multiples of 16"):
        _build(tiny_sd3_engines, tmp_path / "bad", shapes="static:72x64,batch=1")
    plans = _build(tiny_sd3_engines, tmp_path / "sd3", shapes="dynamic:64-128,batch=1-2", archs=("sm89",))
    manifest = read_manifest(plans)
    assert list(manifest.plans.components) == ["text_encoder", "text_encoder_2", "text_encoder_3", "vae_encoder",
                                               "denoise_step", "vae_decoder"]
    step = manifest.plans.components["denoise_step"].profile
    # B to 3B: CFG's 2B at opt, skip-layer guidance's third group at most
    assert step["t5_embeddings"] == {"min": [1, 256, 96], "opt": [2, 256, 96], "max": [6, 256, 96]}
    assert step["pooled_embeds_2"] == {"min": [1, 32], "opt": [2, 32], "max": [6, 32]}
    assert step["latents"]["max"] == [2, 16, 16, 16]
    assert manifest.plans.components["text_encoder_3"].profile["input_ids"]["max"] == [4, 256]
    check_plans(plans, manifest, manifest.plans.flavour, manifest.plans.version, "sm89")


@pytest.mark.parametrize("engines", ["tiny_engines_fp16", "tiny_sdxl_engines", "tiny_sd3_engines"])
def test_every_lora_weight_is_found_and_marked_refittable_in_the_parsed_network(engines, request):
    """What a refittable build does before it builds (the build itself needs a GPU: TensorRT-RTX's JIT
    fails without CUDA): each component's LoRA weights, found by name in the parsed network, refittable."""
    from sdrt.export.build import mark_refittable, parse_network

    engine_dir = request.getfixturevalue(engines)
    lib = import_tensorrt()
    manifest = read_manifest(engine_dir)
    adapted = {name: spec for name, spec in manifest.components.items() if spec.weights}
    assert STEP in adapted and "text_encoder" in adapted
    for name, spec in adapted.items():
        _, network, _parser, _ = parse_network(lib, lib.error_logger(), engine_dir / spec.onnx, spec)
        mark_refittable(lib, network, spec, engine_dir / spec.onnx)
        assert sum(network.are_weights_marked_refittable(w) for w in spec.weights) == len(spec.weights), name


def test_every_controlnet_weight_is_found_and_marked_refittable_in_the_parsed_network(tiny_model, tmp_path):
    """A swapped ControlNet refits the step plan: each of its parameters, by initializer name, refittable."""
    from sdrt.export.build import mark_refittable, parse_network, refittable_weights
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.testmodel import write_test_controlnet

    net = write_test_controlnet(tiny_model, tmp_path / "canny", 1)
    manifest = export(ExportConfig(tiny_model, tmp_path / "e", precision="fp16", controlnets=(net,), validate=False),
                      progress=False)
    spec = manifest.components[STEP]
    import diffusers

    assert len(spec.control_weights) == len(list(diffusers.ControlNetModel.from_pretrained(net).parameters()))
    lib = import_tensorrt()
    _, network, _parser, _ = parse_network(lib, lib.error_logger(), tmp_path / "e" / spec.onnx, spec)
    mark_refittable(lib, network, spec, tmp_path / "e" / spec.onnx)
    names = refittable_weights(spec)
    assert sum(network.are_weights_marked_refittable(w) for w in names) == len(names)


def test_sd3_plans_for_skip_layer_guidance_profile_three_step_rows_per_image(tiny_sd3_engines, tiny_engines_fp16,
                                                                            tmp_path):
    """`sdrt build` profiles an SD3 step's CFG rows up to 3B by default (the text encoders' stay 2B); plans
    built with --no-skip-layer-guidance take 2·B_max/3 images per SLG call and refuse more, naming the flag."""
    from dataclasses import replace

    from sdrt.pipeline import Pipeline

    with pytest.raises(InputError, match="--skip-layer-guidance: these sd1 engines take none"):
        _build(tiny_engines_fp16, tmp_path / "sd1", skip_layer_guidance=True)
    for flag, rows in ((None, 6), (False, 4)):  # None: the default, where the engines take SLG
        plans = _build(tiny_sd3_engines, tmp_path / f"slg-{flag}", shapes="dynamic:64-64,batch=1-2", archs=("sm89",),
                       skip_layer_guidance=flag)
        profiles = read_manifest(plans).plans.components
        assert profiles[STEP].profile["text_embeddings"]["max"][0] == rows
        assert profiles["text_encoder"].profile["input_ids"]["max"][0] == 4
        pipe = Pipeline.load(plans, backend="ort-cpu")  # the run-time checks, as on TensorRT
        pipe.limits = replace(pipe.limits, kind="dynamic", batch=(1, 2, 2), height=(64,) * 3, width=(64,) * 3)
        plain = pipe.make_config("a cat", batch=2)
        assert pipe.engine_batch(plain) == 2
        if flag is None:
            assert pipe.engine_batch(pipe.make_config("a cat", batch=2, skip_guidance_layers=[0])) == 2
        else:
            with pytest.raises(InputError, match="take at most 4, 1 image.s. at once, 2 asked: rebuild them with "
                                                 "`sdrt build --skip-layer-guidance` .the default."):
                pipe.make_config("a cat", batch=2, skip_guidance_layers=[0])
            # the server's successive engine calls: one image each
            served = pipe.make_config("a cat", batch=2, skip_guidance_layers=[0], max_rows=4)
            assert pipe.engine_batch(served) == 1
            with pytest.raises(InputError, match="2 rows exceed the engines' batch of 1"):
                pipe.generate(served)


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    doc = json.loads((dst / "manifest.json").read_text())
    edit(doc)
    (dst / "manifest.json").write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["plans"].update(version="0.0.1"), "built with .* 0.0.1 .*sdrt build"),
    (lambda d: d["plans"].update(flavour="tensorrt" if d["plans"]["flavour"] != "tensorrt" else "tensorrt_rtx"),
     "plans were built with .*sdrt build .* --flavour"),
    (lambda d: d["plans"].update(archs=["sm75"]), "target sm75 but this GPU is sm86.*--arch sm86"),
    (lambda d: d["plans"]["components"]["denoise_step"].update(onnx_sha256="0" * 64), "stale.*sdrt build"),
    (lambda d: d["plans"]["components"]["vae_decoder"]["io"][1].update(dtype="float32"), "I/O differs.*sdrt build"),
    (lambda d: d.update(plans=None), "no TensorRT plans.*sdrt build"),
])
def test_stale_or_mismatched_plans_are_refused(static_plans, tmp_path, edit, match):
    engines = _edited(static_plans, tmp_path / "e", edit)
    lib = import_tensorrt()
    with pytest.raises(EngineError, match=match):
        check_plans(engines, read_manifest(engines), lib.flavour, lib.version, "sm86")


def test_corrupted_plan_is_refused_before_deserializing(static_plans, tmp_path):
    engines = tmp_path / "e"
    shutil.copytree(static_plans, engines)
    plan = engines / "denoise_step.plan"
    raw = bytearray(plan.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    plan.write_bytes(bytes(raw))
    lib = import_tensorrt()
    with pytest.raises(EngineError, match="denoise_step.plan does not match its sha256"):
        check_plans(engines, read_manifest(engines), lib.flavour, lib.version, "sm86")


def test_interrupted_build_leaves_no_plan_and_the_manifest_unchanged(tiny_engines_fp16, tmp_path, monkeypatch):
    import sdrt.export.build as build_module

    engines = tmp_path / "e"
    shutil.copytree(tiny_engines_fp16, engines)
    before = (engines / "manifest.json").read_bytes()
    real = build_module._build_plan
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "_build_plan", failing)
    with pytest.raises(KeyboardInterrupt):
        build_module.build(build_module.BuildConfig(engines), progress=False)
    assert not list(engines.glob("*.plan")) and not list(engines.glob(".*tmp*"))
    assert (engines / "manifest.json").read_bytes() == before


def test_build_refuses_a_corrupted_onnx(tiny_engines_fp16, tmp_path):
    from sdrt.export.build import BuildConfig, build

    engines = tmp_path / "e"
    shutil.copytree(tiny_engines_fp16, engines)
    (engines / "vae_decoder.onnx").write_bytes(b"garbage")
    with pytest.raises(EngineError, match="vae_decoder.onnx does not match its sha256"):
        build(BuildConfig(engines), progress=False)
    assert not list(engines.glob("*.plan"))


def test_parse_error_names_the_file(tiny_engines_fp16, tmp_path):
    """An ONNX TensorRT cannot parse (checksum made to match) fails with the parser's message."""
    from sdrt.export.build import BuildConfig, build
    from sdrt.manifest import write_manifest

    engines = tmp_path / "e"
    shutil.copytree(tiny_engines_fp16, engines)
    (engines / "text_encoder.onnx").write_bytes(b"garbage")
    manifest = read_manifest(engines)
    files = {**manifest.files, "text_encoder.onnx": sha256_file(engines / "text_encoder.onnx")}
    write_manifest(engines, replace(manifest, files=files))
    with pytest.raises(EngineError, match="could not parse .*text_encoder.onnx"):
        build(BuildConfig(engines), progress=False)


@pytest.mark.parametrize("text, match", [
    ("512", "not understood"),
    ("static:60x64", "multiples of 8"),
    ("static:4096x4096", "exported range"),
    ("dynamic:128-64", "multiples of 8 within"),
    ("static:64x64,batch=99", "batch must be within"),
])
def test_bad_shapes_are_refused(tiny_engines_fp16, text, match):
    from sdrt.export.build import parse_shapes

    with pytest.raises(InputError, match=match):
        parse_shapes(text, read_manifest(tiny_engines_fp16))


def test_arch_resolution():
    from sdrt.export.build import resolve_archs

    rtx = TensorRT(module=None, flavour="tensorrt_rtx", version="1.0")  # type: ignore[arg-type]
    full = TensorRT(module=None, flavour="tensorrt", version="10.0")  # type: ignore[arg-type]
    assert resolve_archs(rtx, ("SM86", "sm89"), None) == (["sm86", "sm89"], None)
    assert resolve_archs(rtx, (), "sm89") == (["sm89"], None)
    assert resolve_archs(rtx, (), "sm90") == (list(RTX_ARCHS), None)  # Hopper is not an RTX target
    with pytest.raises(InputError, match="TensorRT-RTX targets"):
        resolve_archs(rtx, ("sm90",), None)
    assert resolve_archs(full, (), "sm90") == (["sm90"], None)
    assert resolve_archs(full, (), "sm75", ["vae_decoder"]) == (["sm75"], None)  # full TensorRT has FP32 GEMM
    with pytest.raises(BackendError, match="--flavour tensorrt_rtx"):
        resolve_archs(full, (), None)
    with pytest.raises(InputError, match="only for this GPU"):
        resolve_archs(full, ("sm86",), "sm90")


def test_turing_is_left_out_of_builds_with_fp32_graphs():
    """TensorRT-RTX: "Cannot compile ... for Turing (SM75): FP32 GEMM is not supported" (seen with
    tensorrt-rtx 1.7 on fp32 engines and on SDXL's fp32 VAE): every-arch builds skip sm75 with a
    notice; asking for it is an error that names the fix."""
    from sdrt.export.build import resolve_archs

    rtx = TensorRT(module=None, flavour="tensorrt_rtx", version="1.0")  # type: ignore[arg-type]
    archs, notice = resolve_archs(rtx, (), None, ["vae_encoder", "vae_decoder"])
    assert archs == [a for a in RTX_ARCHS if a != "sm75"]
    assert "sm75 left out" in notice and "vae_encoder, vae_decoder are fp32" in notice
    assert resolve_archs(rtx, (), None, []) == (list(RTX_ARCHS), None)
    for requested, gpu in ((("sm75", "sm86"), None), ((), "sm75")):
        with pytest.raises(InputError, match="--precision fp16 for Turing"):
            resolve_archs(rtx, requested, gpu, ["text_encoder"])


def test_fp32_engines_build_for_every_rtx_arch_but_turing(tiny_engines, tmp_path, capsys):
    """Before the notice, this build failed on its first plan ("FP32 GEMM is not supported")."""
    from sdrt.cuda import gpu_arch
    from sdrt.export.build import BuildConfig, build

    if not import_tensorrt().rtx or gpu_arch() is not None:
        pytest.skip("the every-arch build is TensorRT-RTX's, on a machine without a GPU")
    plans = _build(tiny_engines, tmp_path / "all", shapes="static:64x64,batch=1")
    assert read_manifest(plans).plans.archs == tuple(a for a in RTX_ARCHS if a != "sm75")
    assert "sm75 left out" in capsys.readouterr().err
    engines = tmp_path / "turing"
    shutil.copytree(tiny_engines, engines)
    with pytest.raises(InputError, match="--precision fp16 for Turing"):
        build(BuildConfig(engines, archs=("sm75",)), progress=False)
    assert not list(engines.glob("*.plan"))


def test_unknown_flavour_is_refused():
    with pytest.raises(BackendError, match="unknown TensorRT flavour"):
        import_tensorrt("tensorrt_llm")


def test_cli_build_and_its_errors(tiny_engines_fp16, tmp_path, capsys):
    from sdrt.cli import main

    engines = tmp_path / "e"
    shutil.copytree(tiny_engines_fp16, engines)
    assert main(["build", str(engines), "--shapes", "static:64x64,batch=1", "--arch", "sm89"]) == 0
    out = capsys.readouterr().out
    assert "plans for sm89 (static:64x64,batch=1)" in out and "denoise_step" in out
    assert main(["build", str(tmp_path / "nowhere")]) == 2
    assert "sdrt export" in capsys.readouterr().err
    assert main(["build", str(engines), "--shapes", "huge"]) == 2


def test_trt_backend_without_a_gpu_is_a_clear_error(static_plans):
    from sdrt.cuda import gpu_arch
    from sdrt.pipeline import Pipeline

    if gpu_arch() is not None:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="needs .*GPU|cuda-bindings"):
        Pipeline.load(static_plans, backend="trt")
    # auto never picks TensorRT without a GPU: the directory still runs on ONNX Runtime
    assert Pipeline.load(static_plans, backend="auto").backend.name.startswith("ort")


@pytest.mark.slow
def test_sd15_build_time_and_plan_sizes(sd15_model, tmp_path):
    """Real-size plans on this CPU; the figures go into the README."""
    import time

    from sdrt.export.build import BuildConfig, build
    from sdrt.export.exporter import ExportConfig, export

    engines = tmp_path / "sd15-fp16"
    export(ExportConfig(sd15_model, engines, precision="fp16"), progress=False)
    start = time.perf_counter()
    manifest = build(BuildConfig(engines, shapes="static:512x512,batch=1"), progress=False)
    wall = time.perf_counter() - start
    sizes = {name: r.bytes / 2**20 for name, r in manifest.plans.components.items()}
    print(f"\nsd15 fp16 static 512x512 batch 1: build {wall:.0f} s, plans (MiB) {sizes}, "
          f"per component (s) { {n: r.build_s for n, r in manifest.plans.components.items()} }")
    assert 1500 < sizes["denoise_step"] < 2500  # 860 M fp16 weights


def _measured(*args: str) -> tuple[float, float]:
    """Runs `sdrt ARGS` as a child process; (wall seconds, its own peak RSS in GiB)."""
    import os
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "sdrt.cli", *args])
    _, status, usage = os.wait4(child.pid, 0)  # this child's own resource use
    code = os.waitstatus_to_exitcode(status)
    assert code == 0, f"sdrt {' '.join(args)} exited {code}"
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def _real_size_export_and_build(kind: str, tmp_path: Path) -> tuple[Any, dict[str, float]]:
    """`sdrt testmodel KIND`, its fp16 export with validation and a static 1024² TensorRT-RTX sm89 build,
    each measured (wall s, peak RSS GiB; printed for the README) and each within a 24 GB machine.
    Returns the manifest and the plans' sizes in MiB. Removes the model and engines (~25 GB each time:
    pytest keeps every tmp_path of a session, and `make test-slow` runs sdxl and sd35m in one)."""
    import shutil

    model, engines = tmp_path / kind, tmp_path / f"{kind}-fp16"
    try:
        figures = {"testmodel": _measured("testmodel", kind, str(model)),
                   "export": _measured("export", str(model), "-o", str(engines), "--precision", "fp16"),
                   "build": _measured("build", str(engines), "--shapes", "static:1024x1024,batch=1", "--arch", "sm89")}
        manifest = read_manifest(engines)
    finally:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(engines, ignore_errors=True)
    print(f"\n{kind} (wall s, peak RSS GiB):", {k: (round(w), round(r, 1)) for k, (w, r) in figures.items()})
    assert all(v["error"] <= v["tolerance"] for v in manifest.validation.values())
    plans = {name: r.bytes / 2**20 for name, r in manifest.plans.components.items()}
    print("plans (MiB):", {k: round(v) for k, v in plans.items()})
    assert max(rss for _, rss in figures.values()) < 20  # GiB: room left on a 24 GB machine
    return manifest, plans


@pytest.mark.slow
def test_sdxl_fp16_export_and_build_fit_this_machine(tmp_path):
    """The real SDXL base shapes (random weights)."""
    manifest, plans = _real_size_export_and_build("sdxl", tmp_path)
    assert manifest.components["vae_decoder"].precision == "fp32"  # force_upcast: the stock VAE overflows fp16
    assert 4500 < plans["denoise_step"] < 5500, plans  # 2.57 G fp16 weights


@pytest.mark.slow
def test_sd35m_fp16_export_and_build_fit_this_machine(tmp_path):
    """SD 3.5 Medium's exact transformer (random weights) with CLIP-L and bigG, without T5-XXL (4.7 B
    parameters, 19 GB in fp32, and 2 x 17.7 GiB of ONNX while exported: bench.t5_export measures it
    alone, see the README)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from sdrt.export.testmodel import SPECS
    from sdrt.export.weights import ADAPTED

    manifest, plans = _real_size_export_and_build("sd35m", tmp_path)
    assert manifest.model.omitted == ("text_encoder_3",) and manifest.model.size_multiple == 16
    with torch.device("meta"):  # every Linear and Conv of the transformer named for LoRA
        transformer = SD3Transformer2DModel(**SPECS["sd35m"].transformer)
    adapted = sum(isinstance(m, ADAPTED) for m in transformer.modules())
    assert len(manifest.components["denoise_step"].weights) == adapted, adapted
    assert 4000 < plans["denoise_step"] < 5600, plans  # 2.24 G fp16 weights


# --- on a GPU -----------------------------------------------------------------------------------

def _gpu_or_skip() -> str:
    from sdrt.cuda import gpu_arch

    arch = gpu_arch()
    if arch is None:
        pytest.skip("no NVIDIA GPU")
    return arch


def _plans_for_this_gpu(engines: Path, out: Path, shapes: str) -> Path:
    """Plans for the GPU here: TensorRT-RTX targets it by name, full TensorRT builds for it anyway."""
    arch = _gpu_or_skip()
    return _build(engines, out, shapes=shapes, archs=(arch,) if import_tensorrt().rtx and arch in RTX_ARCHS else ())


@pytest.fixture(scope="module")
def gpu_plans(tiny_engines_fp16, tmp_path_factory) -> Path:
    return _plans_for_this_gpu(tiny_engines_fp16, tmp_path_factory.mktemp("plans") / "gpu", "static:64x64,batch=1")


def _denoise_step_runs(engines: Path, cuda_graphs: bool, runs: int) -> list[dict[str, np.ndarray]]:
    """Outputs of `runs` calls of the denoise step on fixed inputs, each downloaded after its call."""
    from sdrt.backends.tensorrt import TrtBackend

    backend, manifest = TrtBackend(cuda_graphs=cuda_graphs), read_manifest(engines)
    backend.verify(engines, manifest)
    engine = backend.load(engines, manifest, "denoise_step")
    spec = manifest.components["denoise_step"]
    dims = {"B": 1, "RB": 2, "h": 8, "w": 8}  # 64x64 latents of one image, CFG doubles the embeddings

    def shape_of(t) -> tuple[int, ...]:
        return t.resolve(dims)

    rng = np.random.default_rng(0)
    inputs, outputs = {}, {}
    for t in spec.inputs:
        shape = shape_of(t)
        value = {"timestep": np.full(shape, 500.0), "guidance": np.full(shape, 7.5)}.get(t.name)
        array = (rng.standard_normal(shape) if value is None else value).astype(t.dtype)
        inputs[t.name] = backend.empty(shape, t.dtype)
        backend.write(inputs[t.name], array)
    for t in spec.outputs:
        outputs[t.name] = backend.empty(shape_of(t), t.dtype)
    results = []
    for _ in range(runs):
        engine.run(inputs, outputs)
        results.append({name: backend.download(buf) for name, buf in outputs.items()})
    return results


@pytest.mark.gpu
def test_graph_replay_gives_the_plain_calls_latents(gpu_plans):
    (plain,) = _denoise_step_runs(gpu_plans, cuda_graphs=False, runs=1)
    assert all(np.isfinite(v).all() for v in plain.values())
    # 1st call runs plainly (lazy setup), 2nd records the graph and launches it, 3rd replays it
    for run in _denoise_step_runs(gpu_plans, cuda_graphs=True, runs=3):
        for name, value in plain.items():
            np.testing.assert_array_equal(run[name], value, err_msg=name)


@pytest.mark.gpu
def test_trt_images_match_ort_and_graphs_match_plain(gpu_plans):
    from sdrt.backends.tensorrt import TrtBackend
    from sdrt.bench.stats import psnr
    from sdrt.pipeline import Pipeline

    graphs = Pipeline.load(gpu_plans, backend=TrtBackend(cuda_graphs=True))
    plain = Pipeline.load(gpu_plans, backend=TrtBackend(cuda_graphs=False))
    ort = Pipeline.load(gpu_plans, backend="ort")
    config = ort.make_config("a cat", steps=6, seed=2)
    first, replay = (graphs.generate(config).images for _ in range(2))  # the 2nd run replays graphs
    reference = plain.generate(config).images
    np.testing.assert_array_equal(first, reference)
    np.testing.assert_array_equal(replay, reference)
    assert psnr(reference, ort.generate(config).images) >= 30.0


@pytest.mark.gpu
@pytest.mark.slow
def test_sd15_fp16_trt_matches_ort(sd15_model, tmp_path):
    """The issue's bar: TensorRT vs ONNX Runtime on the real SD 1.5 shapes, same seed, fp16, >= 30 dB."""
    from sdrt.bench.stats import psnr
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.pipeline import Pipeline

    onnx = tmp_path / "sd15-fp16"
    export(ExportConfig(sd15_model, onnx, precision="fp16"), progress=False)
    engines = _plans_for_this_gpu(onnx, tmp_path / "sd15-plans", "static:512x512,batch=1")
    trt = Pipeline.load(engines, backend="trt")
    ort = Pipeline.load(engines, backend="ort")
    config = ort.make_config("a photograph of an astronaut riding a horse", steps=10, seed=3)
    ours, reference = trt.generate(config), ort.generate(config)
    assert np.isfinite(ours.images).all()
    db = psnr(ours.images, reference.images)
    print(f"\nsd15 fp16 512x512 10 steps: trt vs {ort.backend.name} PSNR {db:.1f} dB, "
          f"trt host overhead {ours.timings.host_overhead_per_step_s * 1e6:.0f} us/step")
    assert db >= 30.0


@pytest.mark.gpu
def test_lora_refit_on_tensorrt_matches_ort_and_switching_back_restores_the_plans(gpu_plans, tiny_model, tmp_path):
    """Plans built on a GPU have refittable LoRA weights: a LoRA refits base + delta (TensorRT ≈ ONNX
    Runtime with the same LoRA), and no LoRA refits the base weights back (the base image, exactly)."""
    import time

    from sdrt.bench.stats import psnr
    from sdrt.export.testmodel import write_test_lora
    from sdrt.pipeline import Pipeline

    assert read_manifest(gpu_plans).plans.components["denoise_step"].refittable
    lora = write_test_lora(tiny_model, tmp_path / "style.safetensors", 1)
    trt, ort = Pipeline.load(gpu_plans, backend="trt"), Pipeline.load(gpu_plans, backend="ort")
    plain = ort.make_config("a cat", steps=6, seed=2)
    with_lora = ort.make_config("a cat", steps=6, seed=2, loras=[(lora, 0.8)])
    base = trt.generate(plain).images
    start = time.perf_counter()
    trt.set_loras([(lora, 0.8)])
    print(f"\nTensorRT refit of the tiny LoRA: {(time.perf_counter() - start) * 1e3:.1f} ms")
    ours, reference = trt.generate(with_lora).images, ort.generate(with_lora).images
    assert np.isfinite(ours).all() and psnr(ours, reference) >= 30.0
    assert psnr(ours, base) < psnr(ours, reference), "the LoRA did not change the TensorRT image"
    np.testing.assert_array_equal(trt.generate(plain).images, base)
