"""bench/ smoke test on the tiny model: every artifact written, numbers present and sane."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib")

from sdrt.bench.run import BenchConfig, run_bench, write_results  # noqa: E402
from sdrt.bench.stats import psnr, summarize  # noqa: E402
from sdrt.bench.workers import Workload  # noqa: E402
from sdrt.errors import InputError  # noqa: E402


def _nvml() -> bool:
    """NVML answers here (a GPU machine): the bench then reports device memory."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def test_summary_and_psnr():
    import numpy as np

    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    a = np.zeros((2, 2, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a + 1, a) == pytest.approx(20 * math.log10(255), rel=1e-9)


def test_bench_tiny_side_by_side(tiny_model, tiny_engines, tmp_path):
    w = Workload(str(tiny_model), str(tiny_engines), 64, 64, steps=3, guidance=7.5, scheduler="euler", seed=1)
    config = BenchConfig(w, ("torch", "ort", "ort-low-vram", "trt"), batches=(1, 2), runs=2, warmup=1,
                         output=tmp_path, command="test")
    results = run_bench(config, progress=False)
    assert set(results["backends"]) == {"torch", "ort", "ort-low-vram"}
    assert results["backends"]["ort-low-vram"]["name"] == "ort-cpu low-vram"
    assert "trt" in results["skipped"]
    assert results["artifacts"]["export_s"] > 0 and results["artifacts"]["build_s"] is None  # no plans built
    for name, entry in results["backends"].items():
        assert entry["cold_start_s"] > 0 and entry["peak_rss_mb"] > 0
        if _nvml():  # a process that never touched the GPU has no figure either; never a zero
            assert entry["peak_device_mb"] is None or entry["peak_device_mb"] > 0
        else:
            assert entry["peak_device_mb"] is None  # no GPU: no figure, never a zero
        for batch in ("1", "2"):
            per = entry["batches"][batch]
            for stage in ("text_encoder", "step", "steps", "decode", "end_to_end"):
                lat = per["latency_s"][stage]
                assert 0 < lat["min"] <= lat["median"] <= lat["max"] and lat["n"] == 2
            assert per["ratio_vs_torch"]["end_to_end"] > 0
            assert per["psnr_vs_torch_db"] >= 40, f"{name} image diverges from torch fp32"
            assert 0 < per["pct_of_matmul_peak"]
    assert results["backends"]["torch"]["batches"]["1"]["ratio_vs_torch"]["end_to_end"] == 1.0
    paths = write_results(results, tmp_path)
    assert {p.suffix for p in paths} == {".json", ".md", ".png"}
    assert json.loads(paths[0].read_text())["workload"]["steps"] == 3
    assert "vs torch" in paths[1].read_text()


def test_bench_sdxl_against_diffusers_sdxl(tiny_sdxl_model, tiny_sdxl_engines, tmp_path):
    w = Workload(str(tiny_sdxl_model), str(tiny_sdxl_engines), 64, 96, steps=2, guidance=7.5, scheduler="euler", seed=1)
    results = run_bench(BenchConfig(w, ("torch", "ort"), batches=(1,), runs=1, warmup=0, output=tmp_path,
                                    command="test", one_at_a_time=True), progress=False)
    assert "each backend alone" in write_results(results, tmp_path)[1].read_text()
    per = results["backends"]["ort"]["batches"]["1"]
    assert per["psnr_vs_torch_db"] >= 40 and results["flops"]["1"] > 0
    assert all(per["latency_s"][stage]["min"] > 0 for stage in ("text_encoder", "step", "decode"))


def test_torch_flops_are_a_whole_generations(tiny_sdxl_model, tiny_sdxl_engines):
    """The replayed calls (text encoders, one U-Net call x steps, VAE decode) count what one whole
    generation counts under torch's FLOP counter."""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from sdrt.bench.workers import TorchRunner

    runner = TorchRunner(Workload(str(tiny_sdxl_model), str(tiny_sdxl_engines), 64, 64, steps=3, guidance=7.5,
                                  scheduler="euler", seed=1))
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with FlopCounterMode(display=False) as whole:
        runner.run(2, latents)
    assert len(runner._calls_at[2]["unet"]) == 3 and len(runner._calls_at[2]["text_encoder"]) == 4  # 2 encoders x ±
    assert runner.flops(2) == whole.get_total_flops() > 0


def test_bench_sd3_with_skip_layer_guidance_against_diffusers(tiny_sd3_model, tiny_sd3_engines, tmp_path):
    """The workload's skip-layer guidance reaches both sides; torch's FLOPs count its extra B-row passes."""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from sdrt.bench.workers import TorchRunner

    w = Workload(str(tiny_sd3_model), str(tiny_sd3_engines), 64, 64, steps=8, guidance=5.0, scheduler="euler", seed=1,
                 skip_guidance_layers=(0,))
    results = run_bench(BenchConfig(w, ("torch", "ort"), batches=(1,), runs=1, warmup=0, output=tmp_path,
                                    command="test"), progress=False)
    assert results["backends"]["ort"]["batches"]["1"]["psnr_vs_torch_db"] >= 40
    assert results["workload"]["skip_guidance_layers"] == (0,)
    runner = TorchRunner(w)
    with FlopCounterMode(display=False) as whole:
        runner.run(1, np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32))
    skip_passes = [k for _, _, k in runner._calls_at[1]["unet"] if k.get("skip_layers")]
    assert len(skip_passes) == 1  # 8 steps: 0.08 < i < 1.6, step 1
    assert runner.flops(1) == whole.get_total_flops() > 0


def test_bench_needs_torch_baseline(tiny_model, tiny_engines, tmp_path):
    w = Workload(str(tiny_model), str(tiny_engines), 64, 64, steps=2, guidance=7.5, scheduler="euler", seed=1)
    with pytest.raises(InputError, match="baseline"):
        run_bench(BenchConfig(w, ("ort",), output=tmp_path), progress=False)
    with pytest.raises(InputError, match="unknown bench backends"):
        run_bench(BenchConfig(w, ("torch", "jax"), output=tmp_path), progress=False)


def test_prompt_cost_times_each_length_in_one_run(tiny_engines, tmp_path):
    from sdrt.bench.prompt_cost import PromptCostConfig, main, markdown, run_prompt_cost

    config = PromptCostConfig(str(tiny_engines), chunks=(1, 3), size=64, steps=2, runs=2, warmup=0, backend="ort-cpu")
    results = run_prompt_cost(config)
    assert list(results["results"]) == ["77", "231"]
    for row in results["results"].values():
        assert row["text_encoder"]["n"] == 2 and row["step"]["n"] == 4  # runs, runs x steps
        assert all(math.isfinite(v) and v > 0 for stage in row.values() for k, v in stage.items() if k != "n")
    table = markdown(results)
    assert "| 231 |" in table and "ort-cpu" in table
    assert main([str(tiny_engines), "--chunks", "2", "--size", "64", "--steps", "1", "--runs", "1", "--backend",
                 "ort-cpu", "-o", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "prompt-cost-tiny-fp32-64x64.json").read_text())
    assert list(written["results"]) == ["154"] and written["command"].startswith("python -m sdrt.bench.prompt_cost")


def test_t5_export_measures_each_stage_of_a_t5_encoder(tmp_path):
    """bench.t5_export's steps on a tiny T5 (the real run holds T5-XXL's 19 GB): export, validation on
    ONNX Runtime within the fp32 tolerance, and the ONNX files removed afterwards."""
    from sdrt.bench.t5_export import T5_XXL, run

    tiny = {**T5_XXL, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 100}
    with pytest.raises(AssertionError, match="parameters, not"):
        run(8, tmp_path, tiny, parameters=1)
    result = run(8, tmp_path, tiny, parameters=23_968)
    assert list(result["stages"]) == ["build", "torch reference", "onnx export", "validation on onnxruntime"]
    assert all(s["peak_rss_gib"] > 0 and s["wall_s"] >= 0 for s in result["stages"].values())
    assert result["validation"]["error"] <= 1e-4 and result["onnx_bytes"] > 4 * 23_968
    assert not any(tmp_path.iterdir())


def test_t5_xxl_config_has_sd3s_t5_parameter_count():
    """Counted on the meta device (no memory): the encoder SD 3 / 3.5 ship as text_encoder_3."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from sdrt.bench.t5_export import T5_XXL, T5_XXL_PARAMETERS

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    assert sum(p.numel() for p in t5.parameters()) == T5_XXL_PARAMETERS == 4_762_310_656


def test_t5_export_command_writes_its_figures_with_machine_and_versions(tmp_path, monkeypatch):
    from sdrt.bench import t5_export

    monkeypatch.setattr(t5_export, "run", lambda tokens, work: {"tokens": tokens, "stages": {}})
    assert t5_export.main(["--tokens", "8", "--work", str(tmp_path), "-o", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "t5xxl-export.json").read_text())
    assert written["tokens"] == 8 and written["versions"]["torch"] and written["machine"]
    assert written["command"].startswith("python -m sdrt.bench.t5_export --tokens 8")


def test_bench_runs_the_optimized_and_the_plain_graphs_side_by_side(tiny_model, tiny_engines, tmp_path):
    import shutil

    pytest.importorskip("onnxruntime.transformers")
    from sdrt.export.optimize import OptimizeConfig, optimize

    engines = tmp_path / "e"
    shutil.copytree(tiny_engines, engines)
    optimize(OptimizeConfig(engines, "cpu"), progress=False)
    w = Workload(str(tiny_model), str(engines), 64, 64, steps=3, guidance=7.5, scheduler="euler", seed=1)
    results = run_bench(BenchConfig(w, ("torch", "ort", "ort-plain"), batches=(1,), runs=1, warmup=0,
                                    output=tmp_path, command="test"), progress=False)
    names = {k: v["name"] for k, v in results["backends"].items()}
    assert names == {"torch": names["torch"], "ort": "ort-cpu optimized", "ort-plain": "ort-cpu"}
    for backend in ("ort", "ort-plain"):
        assert results["backends"][backend]["batches"]["1"]["psnr_vs_torch_db"] >= 40


def test_the_gpu_sessions_proof_runs_here_on_the_cpu(tmp_path):
    """bench/gpu_session.sh dry-run: the proof's stages (test model, export, optimize, bench) with the
    tiny model on the CPU, so a lent GPU's few minutes are never lost to a broken script."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("onnxruntime.transformers")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh"
    env = {**os.environ, "SDRT_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "SDRT": f"{sys.executable} -m sdrt.cli"}
    r = subprocess.run(["bash", str(script), "dry-run"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads(next((tmp_path / "out" / "proof-tiny").glob("*.json")).read_text())
    assert {v["name"] for v in results["backends"].values()} >= {"ort-cpu", "ort-cpu optimized"}
    assert "MultiHeadAttention" in (tmp_path / "out" / "optimize-tiny.txt").read_text()
    bad = subprocess.run(["bash", str(script), "nonsense"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "dry-run" in bad.stderr


@pytest.fixture(scope="module")
def controlnet_bench(tiny_model, tmp_path_factory):
    """Engines with one test ControlNet, and a hint PNG at another size than the workload's."""
    import numpy as np
    from PIL import Image

    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.testmodel import write_test_controlnet

    root = tmp_path_factory.mktemp("cn-bench")
    net = write_test_controlnet(tiny_model, root / "canny", 1)
    export(ExportConfig(tiny_model, root / "e", precision="fp32", controlnets=(net,)), progress=False)
    hint = np.zeros((80, 64, 3), np.uint8)
    hint[20:60, [12, 50]] = 255
    hint[[20, 59], 12:51] = 255
    Image.fromarray(hint).save(root / "edges.png")
    return root / "e", root / "edges.png"


def test_bench_with_a_hint_runs_the_controlnet_on_both_sides(tiny_model, controlnet_bench, tmp_path):
    """torch runs diffusers' ControlNet pipeline with the engines' ControlNet: its images match sdrt's, the
    hint moves both far past that tolerance, and torch's FLOPs count the ControlNet's calls."""
    import numpy as np

    from sdrt.bench.workers import SdrtRunner, TorchRunner

    engines, edges = controlnet_bench
    plain = Workload(str(tiny_model), str(engines), 64, 64, steps=3, guidance=7.5, scheduler="euler", seed=1)
    hinted = Workload(**{**plain.__dict__, "control_images": (str(edges),)})
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    runs = {(side, w.control_images): runner(w).run(1, latents) for w in (plain, hinted)
            for side, runner in (("torch", TorchRunner), ("sdrt", lambda w: SdrtRunner(w, "ort-cpu")))}
    ours, theirs = runs[("sdrt", hinted.control_images)][1], runs[("torch", hinted.control_images)][1]
    assert int(np.abs(ours.astype(int) - theirs.astype(int)).max()) <= 2
    assert int(np.abs(ours.astype(int) - runs[("sdrt", ())][1].astype(int)).max()) > 20, "the hint changed nothing"
    torch_runner = TorchRunner(hinted)
    torch_runner.run(1, latents)
    assert len(torch_runner._calls_at[1]["controlnet"]) == 3
    plain_runner = TorchRunner(plain)
    plain_runner.run(1, latents)
    assert torch_runner.flops(1) > plain_runner.flops(1) > 0
    results = run_bench(BenchConfig(hinted, ("torch", "ort"), batches=(1,), runs=1, warmup=0, output=tmp_path,
                                    command="test"), progress=False)
    assert results["backends"]["ort"]["batches"]["1"]["psnr_vs_torch_db"] >= 40
    assert results["workload"]["control_images"] == (str(edges),)
    assert "ControlNet hints edges.png" in write_results(results, tmp_path)[1].read_text()


def test_bench_hints_are_refused_unless_one_per_controlnet(tiny_model, tiny_engines, controlnet_bench, tmp_path):
    engines, edges = controlnet_bench
    for where, hints, match in ((tiny_engines, (str(edges),), "has no ControlNet; export the engines with --controlnet"),
                                (engines, (str(edges),) * 2, "one hint per ControlNet of the engines .1: canny"),
                                (engines, (str(tmp_path / "none.png"),), "does not exist")):
        w = Workload(str(tiny_model), str(where), 64, 64, steps=2, guidance=7.5, scheduler="euler", seed=1,
                     control_images=hints)
        with pytest.raises(InputError, match=match):
            run_bench(BenchConfig(w, ("torch", "ort"), output=tmp_path), progress=False)
