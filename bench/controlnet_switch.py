"""What swapping a ControlNet's weights costs on exported engines (ONNX Runtime), and that the step costs the
same after.

    python -m sdrt.bench.controlnet_switch ENGINE_DIR CONTROLNET HINT.png [--rounds 3 --size 256 --steps 4 -o DIR]

ENGINE_DIR holds one ControlNet; CONTROLNET is another of its architecture (a file or a diffusers folder;
`sdrt testmodel controlnet OUT --of MODEL --seed 2` writes one). Each round goes exported -> CONTROLNET ->
exported. A switch is timed in its two parts: make_config, which reads and checks the file (cached after
the first read), and Pipeline.apply_weights, which opens the step's new session with those initializers;
then one generation runs in each state.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from sdrt.bench.machine import machine_info
from sdrt.bench.stats import summarize
from sdrt.controlnet_weights import controlnet_file
from sdrt.pipeline import Pipeline
from sdrt.versions import package_versions


def run(engines: Path, controlnet: Path, hint: Path, rounds: int, size: int, steps: int,
        backend: str) -> dict[str, Any]:
    pipe = Pipeline.load(engines, backend=backend)
    request = dict(steps=steps, height=size, width=size, seed=0, scheduler="euler", control_image=hint.read_bytes())
    exported = pipe.model.controlnets[0]
    transitions = ((exported, "swapped", controlnet), ("swapped", exported, None))
    check_s: list[float] = []
    switch_s: dict[str, list[float]] = {f"{a} -> {b}": [] for a, b, _ in transitions}
    step_ms: dict[str, list[float]] = {exported: [], "swapped": []}
    pipe.generate(pipe.make_config("a photograph of a house", **request))  # warm: the exported weights
    for _ in range(rounds):
        for before, label, model in transitions:
            start = time.perf_counter()
            config = pipe.make_config("a photograph of a house", controlnet_model=model, **request)
            if model is not None:
                check_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            pipe.apply_weights(config)
            switch_s[f"{before} -> {label}"].append(time.perf_counter() - start)
            result = pipe.generate(config)
            step_ms[label].extend(t * 1e3 for t in result.timings.step_engine_s)
    return {"engines": str(engines), "backend": pipe.backend.describe(), "precision": pipe.manifest.precision,
            "controlnet": {"path": str(controlnet), "bytes": controlnet_file(controlnet).stat().st_size,
                           "parameters": len(pipe.manifest.components["denoise_step"].control_weights)},
            "read_and_check_s": summarize(check_s), "switch_s": {k: summarize(v) for k, v in switch_s.items()},
            "step_ms": {k: summarize(v) for k, v in step_ms.items()},
            "machine": machine_info(), "versions": package_versions(("sdrt", "onnxruntime", "numpy"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engines", type=Path, help="engines exported with one ControlNet")
    p.add_argument("controlnet", type=Path, help="another ControlNet of its architecture (file or folder)")
    p.add_argument("hint", type=Path, help="the hint image")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--backend", default="auto")
    p.add_argument("-o", "--out", type=Path, default=Path("bench/results/local"))
    args = p.parse_args(argv)
    results = run(args.engines, args.controlnet, args.hint, args.rounds, args.size, args.steps, args.backend)
    results["command"] = ("python -m sdrt.bench.controlnet_switch "
                          + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"controlnet-switch-{args.engines.name}.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    print(f"read and check {results['read_and_check_s']['median'] * 1e3:8.0f} ms (median)")
    for label, stats in results["switch_s"].items():
        print(f"switch {label:24s} {stats['median'] * 1e3:8.0f} ms (median of {stats['n']})")
    for label, stats in results["step_ms"].items():
        print(f"step with {label:10s} {stats['median']:8.1f} ms")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
