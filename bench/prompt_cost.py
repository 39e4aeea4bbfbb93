"""What a longer prompt costs: text-encoder time and denoise-step time at 77, 154, 231... tokens.

    python -m sdrt.bench.prompt_cost ENGINE_DIR [--chunks 1,2,3 --size 256 --steps 4 --runs 5 -o DIR]

One pipeline, one backend; every round runs one generation per prompt length, the order reversed
every round so drift on the machine hits every length alike. A prompt of K chunks is K copies of a
sentence joined by BREAK (so exactly K chunks of 77 tokens reach the encoders and the step), with an
equally long negative prompt (CFG rows at 2B).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdrt.bench.stats import summarize
from sdrt.prompts import CHUNK_LENGTH
from sdrt.bench.machine import machine_info
from sdrt.pipeline import Pipeline
from sdrt.versions import package_versions

SENTENCE = "a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus"


@dataclass(frozen=True)
class PromptCostConfig:
    engines: str
    chunks: tuple[int, ...] = (1, 2, 3)
    size: int = 256
    steps: int = 4
    runs: int = 5
    warmup: int = 1
    backend: str = "auto"
    scheduler: str = "euler"


def prompt_of(chunks: int) -> str:
    return " BREAK ".join([SENTENCE] * chunks)


def run_prompt_cost(config: PromptCostConfig) -> dict[str, Any]:
    from tqdm import tqdm

    pipe = Pipeline.load(config.engines, backend=config.backend)
    configs = {k: pipe.make_config(prompt_of(k), negative_prompt=prompt_of(k), steps=config.steps, seed=0,
                                   height=config.size, width=config.size, scheduler=config.scheduler)
               for k in config.chunks}
    for k, c in configs.items():
        assert c.prompts.chunks == k, f"the bench prompt of {k} chunks reads as {c.prompts.chunks}"
    samples: dict[int, dict[str, list[float]]] = {k: {"text_encoder": [], "step": []} for k in config.chunks}
    order = list(config.chunks)
    for run in tqdm(range(config.warmup + config.runs), desc="prompt cost", unit="round"):
        for k in order:
            timings = pipe.generate(configs[k]).timings
            if run >= config.warmup:
                samples[k]["text_encoder"].append(timings.text_encoder_s)
                samples[k]["step"].extend(timings.step_engine_s)
        order.reverse()
    rows = {str(CHUNK_LENGTH * k): {stage: summarize(values) for stage, values in stages.items()}
            for k, stages in samples.items()}  # by prompt tokens
    return {"config": asdict(config), "backend": pipe.backend.describe(), "model": pipe.manifest.name,
            "precision": pipe.manifest.precision, "machine": machine_info(),
            "versions": package_versions(("sdrt", "onnxruntime", "numpy")), "results": rows}


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    base = next(iter(results["results"].values()))
    lines = [f"Prompt length cost: {results['model']} ({results['precision']}), {results['backend']}, "
             f"{c['size']}x{c['size']}, CFG (2 rows), {c['runs']} runs; median ms (p90)", "",
             "| tokens | text encoder | × | denoise step | × |", "|---:|---:|---:|---:|---:|"]
    for tokens, row in results["results"].items():
        te, step = row["text_encoder"], row["step"]
        lines.append(f"| {tokens} | {te['median'] * 1e3:.1f} ({te['p90'] * 1e3:.1f}) | "
                     f"{te['median'] / base['text_encoder']['median']:.2f} | {step['median'] * 1e3:.1f} "
                     f"({step['p90'] * 1e3:.1f}) | {step['median'] / base['step']['median']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engines")
    p.add_argument("--chunks", default="1,2,3", help="prompt lengths in chunks of 77 tokens")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("-o", "--output", default="bench/results/local")
    args = p.parse_args(argv)
    config = PromptCostConfig(args.engines, tuple(int(k) for k in args.chunks.split(",")), args.size, args.steps,
                              args.runs, args.warmup, args.backend)
    results = run_prompt_cost(config)
    results["command"] = "python -m sdrt.bench.prompt_cost " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"prompt-cost-{results['model']}-{config.size}x{config.size}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=float))
    (out / f"{stem}.md").write_text(markdown(results))
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
