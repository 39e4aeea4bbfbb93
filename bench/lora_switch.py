"""What switching LoRAs costs on exported engines (ONNX Runtime), and that the step costs the same after.

    python -m sdrt.bench.lora_switch ENGINE_DIR MODEL_DIR [--rank 32 --rounds 3 --size 256 --steps 4 -o DIR]

Two random kohya LoRAs (export.testmodel.write_test_lora: every attention / feed-forward Linear,
proj_in/out and resnet convolution of the U-Net, every text-encoder Linear) of the given rank for
MODEL_DIR's model. Each round switches none -> A -> B -> none (set_loras: deltas against the engine
files' base weights, then new sessions), timing each switch, and generates once per state.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sdrt.bench.stats import summarize
from sdrt.bench.machine import machine_info
from sdrt.export.testmodel import write_test_lora
from sdrt.loras import read_lora
from sdrt.pipeline import Pipeline
from sdrt.versions import package_versions


def run(engines: Path, model_dir: Path, rank: int, rounds: int, size: int, steps: int, backend: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sdrt-loras-") as folder:  # two files of ~130 MB at rank 32
        files = [write_test_lora(model_dir, Path(folder) / f"{name}.safetensors", seed, rank=rank)
                 for seed, name in enumerate(("a", "b"))]
        return _measure(engines, files, rank, rounds, size, steps, backend)


def _measure(engines: Path, files: list[Path], rank: int, rounds: int, size: int, steps: int,
             backend: str) -> dict[str, Any]:
    start = time.perf_counter()
    layers = len(read_lora(files[0]).layers)
    parse_s = time.perf_counter() - start
    pipe = Pipeline.load(engines, backend=backend)
    request = dict(steps=steps, height=size, width=size, seed=0, scheduler="euler")
    switches: dict[str, list[float]] = {"none -> A": [], "A -> B": [], "B -> none": []}
    step_ms: dict[str, list[float]] = {"none": [], "A": [], "B": []}
    for _ in range(rounds):
        for (label, target), state in zip(((None, []), ("none -> A", [(files[0], 0.8)]), ("A -> B", [(files[1], 0.8)]),
                                           ("B -> none", [])), ("none", "A", "B", "none")):
            if label is not None:
                start = time.perf_counter()
                pipe.set_loras(target)
                switches[label].append(time.perf_counter() - start)
            result = pipe.generate(pipe.make_config("a photograph of a cat", **request))
            step_ms[state].extend(t * 1e3 for t in result.timings.step_engine_s)
    return {"engines": str(engines), "backend": pipe.backend.describe(), "precision": pipe.manifest.precision,
            "lora": {"rank": rank, "layers": layers, "bytes": files[0].stat().st_size, "parse_s": parse_s},
            "switch_s": {k: summarize(v) for k, v in switches.items()},
            "step_ms": {k: summarize(v) for k, v in step_ms.items()},
            "machine": machine_info(), "versions": package_versions(("sdrt", "onnxruntime", "numpy"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engines", type=Path)
    p.add_argument("model_dir", type=Path, help="the diffusers folder the engines were exported from")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--backend", default="auto")
    p.add_argument("-o", "--out", type=Path, default=Path("bench/results/local"))
    args = p.parse_args(argv)
    results = run(args.engines, args.model_dir, args.rank, args.rounds, args.size, args.steps, args.backend)
    results["command"] = "python -m sdrt.bench.lora_switch " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lora-switch-{args.engines.name}-rank{args.rank}.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    for label, stats in results["switch_s"].items():
        print(f"switch {label:10s} {stats['median'] * 1e3:8.0f} ms (median of {stats['n']})")
    for label, stats in results["step_ms"].items():
        print(f"step with {label:5s} {stats['median']:8.1f} ms")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
