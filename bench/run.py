"""`sdrt bench`: one workload on every available backend, side by side, in alternating order.

Workers are started one at a time (their first image is the cold start and a warm-up), then each
round asks every worker for one generation, the order reversed every round so drift on the
machine hits all backends alike. With one_at_a_time, each backend runs alone, one after another
(models whose backends do not fit in memory together).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.bench.machine import BENCH_PACKAGES, machine_info
from sdrt.bench.stats import psnr, summarize
from sdrt.bench.workers import Workload, worker_main
from sdrt.errors import InputError
from sdrt.versions import package_versions
from sdrt.backends.onnxruntime import OrtBackend
from sdrt.bench.report import markdown_table, plot_latency
from sdrt.manifest import read_manifest
from sdrt.pipeline import Pipeline

BENCH_BACKENDS = ("torch", "torch-compile", "ort", "ort-plain", "trt", "ort-low-vram", "trt-low-vram")
STAGES = ("text_encoder", "step", "steps", "decode", "end_to_end")


@dataclass(frozen=True)
class BenchConfig:
    workload: Workload
    backends: tuple[str, ...]
    batches: tuple[int, ...] = (1,)
    runs: int = 5
    warmup: int = 1
    output: Path = Path("bench/results/local")
    command: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    one_at_a_time: bool = False  # each backend alone in memory (SDXL fp32 on a 24 GB machine); no alternation


class Worker:
    def __init__(self, backend: str, workload: Workload):
        ctx = mp.get_context("spawn")
        self.backend = backend
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, backend, asdict(workload), time.time()),
                                   daemon=True)
        self.process.start()
        self.info = self._recv()

    def _recv(self) -> Any:
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"bench worker {self.backend} failed:\n{payload}")
        return payload

    def run(self, batch: int, latents: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
        self.conn.send(("run", batch, latents))
        return self._recv()

    def ask_info(self, batches: tuple[int, ...]) -> dict[str, Any]:
        self.conn.send(("info", batches))
        return self._recv()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        finally:
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()


def run_bench(config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    unknown = [b for b in config.backends if b not in BENCH_BACKENDS]
    if unknown:
        raise InputError(f"unknown bench backends {unknown}: choose from {', '.join(BENCH_BACKENDS)}")
    if config.runs < 1 or config.warmup < 0 or not config.batches or min(config.batches) < 1:
        raise InputError("--runs must be ≥ 1, --warmup ≥ 0 and every --batch ≥ 1")
    if "torch" not in config.backends:
        raise InputError("the `torch` baseline must be among --backends: every ratio is taken against it")

    w = config.workload
    engines = Path(w.engines)
    manifest = read_manifest(engines)
    _check_hints(w, manifest.model.controlnets)
    noise_source = Pipeline(engines, manifest, OrtBackend("cpu"))  # loads no engine
    latents = {b: noise_source.initial_noise(noise_source.make_config(
        "x", steps=w.steps, scheduler=w.scheduler, seed=w.seed, height=w.height, width=w.width, batch=b))[0]
        for b in config.batches}

    results: dict[str, Any] = {"backends": {}, "skipped": {}}
    images: dict[tuple[str, int], np.ndarray] = {}
    bar = tqdm(total=len(config.backends) * len(config.batches) * (config.runs + config.warmup), desc="bench",
               unit="run", disable=not progress)
    # side by side in alternating rounds; or one backend at a time where two do not fit in memory together
    groups = [[b] for b in config.backends] if config.one_at_a_time else [list(config.backends)]
    try:
        for group in groups:
            _measure(config, group, latents, results, images, bar)
    finally:
        bar.close()

    for backend, entry in results["backends"].items():
        for batch, per in entry["batches"].items():
            ref = images.get(("torch", int(batch)))
            per["psnr_vs_torch_db"] = psnr(images[(backend, int(batch))], ref) if ref is not None else None
            e2e = per["latency_s"]["end_to_end"]["median"]
            flops = results.get("flops", {}).get(batch)
            if flops:
                per["achieved_tflops"] = flops / e2e / 1e12
                per["pct_of_matmul_peak"] = 100 * per["achieved_tflops"] / results["device"]["matmul_peak_tflops"]
            base = results["backends"].get("torch", {}).get("batches", {}).get(batch)
            if base:
                per["ratio_vs_torch"] = {s: per["latency_s"][s]["median"] / base["latency_s"][s]["median"]
                                         for s in STAGES}
    results["artifacts"] = {  # one-off costs of the engines measured (seconds, on the machine that made them)
        "export_s": manifest.source.get("export_s"),
        "build_s": {k: v.build_s for k, v in manifest.plans.components.items()} if manifest.plans else None,
        "plans": manifest.plans.shapes if manifest.plans else None, "precision": manifest.precision}
    results.update(schema=1, machine=machine_info(), versions=package_versions(BENCH_PACKAGES), command=config.command,
                   workload=asdict(config.workload), runs=config.runs, warmup=config.warmup,
                   batches=list(config.batches), notes=config.notes, one_at_a_time=config.one_at_a_time,
                   date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return results


def _check_hints(w: Workload, controlnets: tuple[str, ...]) -> None:
    """One readable hint per ControlNet of the engines, or none (the ControlNets then run at scale 0 in
    sdrt's step, and torch runs its plain pipeline)."""
    if w.control_images and not controlnets:
        raise InputError(f"--control-image: {w.engines} has no ControlNet; export the engines with --controlnet")
    if w.control_images and len(w.control_images) != len(controlnets):
        raise InputError(f"--control-image: pass one hint per ControlNet of the engines ({len(controlnets)}: "
                         f"{', '.join(controlnets)}, in that order), got {len(w.control_images)}")
    for path in w.control_images:
        if not Path(path).is_file():
            raise InputError(f"--control-image {path} does not exist")


def _measure(config: BenchConfig, backends: list[str], latents: dict[int, np.ndarray], results: dict[str, Any],
             images: dict[tuple[str, int], np.ndarray], bar: Any) -> None:
    """Starts the backends' workers, runs the rounds (order reversed every round), reads their memory
    and, for torch, the FLOPs; then stops them. Fills results["backends"/"skipped"/"device"/"flops"]."""
    workers: dict[str, Worker] = {}
    try:
        for backend in backends:
            bar.set_postfix_str(f"starting {backend}")
            try:
                worker = Worker(backend, config.workload)
            except (RuntimeError, EOFError) as e:
                results["skipped"][backend] = str(e).strip().splitlines()[-1]
                bar.update(len(config.batches) * (config.runs + config.warmup))
                continue
            first, _ = worker.run(config.batches[0], latents[config.batches[0]])
            workers[backend] = worker
            results["backends"][backend] = {"name": worker.info["name"], "load_s": worker.info["load_s"],
                                            "compile_s": worker.info.get("compile_s"),
                                            "cold_start_s": first["cold_start"], "batches": {}}
        for batch in config.batches:
            samples: dict[str, list[dict[str, float]]] = {b: [] for b in workers}
            for r in range(config.warmup + config.runs):
                order = list(workers) if r % 2 == 0 else list(reversed(workers))
                for backend in order:
                    bar.set_postfix_str(f"{backend} batch {batch}")
                    timings, imgs = workers[backend].run(batch, latents[batch])
                    if r >= config.warmup:
                        samples[backend].append(timings)
                    images[(backend, batch)] = imgs
                    bar.update(1)
            for backend, runs in samples.items():
                stages = {s: summarize([t[s] for t in runs]) for s in runs[0]}
                results["backends"][backend]["batches"][str(batch)] = {
                    "latency_s": stages, "images_per_s": batch / stages["end_to_end"]["median"]}
        bar.set_postfix_str("memory, FLOPs")
        for backend, worker in workers.items():
            info = worker.ask_info(config.batches if backend == "torch" else ())
            results["backends"][backend].update(peak_rss_mb=info["peak_rss_mb"], peak_device_mb=info["peak_device_mb"])
            if backend == "torch":
                results["device"] = {"kind": info["device"], "baseline_dtype": info["dtype"],
                                     "matmul_peak_tflops": info["matmul_peak"] / 1e12}
                results["flops"] = {str(b): f for b, f in info["flops"].items()}
    finally:
        for worker in workers.values():
            worker.stop()


def write_results(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench-{h}x{w}-{s}steps".format(h=results["workload"]["height"], w=results["workload"]["width"],
                                           s=results["workload"]["steps"])
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(results, indent=2, default=float))
    paths[1].write_text(markdown_table(results))
    paths += plot_latency(results, out_dir, stem)
    return paths
