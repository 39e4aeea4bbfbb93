"""Whether SD3's T5-XXL exports on this machine: the real encoder shape, random weights, alone.

    python -m sdrt.bench.t5_export [--tokens 256] [--work DIR] [-o DIR]

Builds T5-XXL's encoder (google/t5-v1_1-xxl, as SD 3 / 3.5 ship it: 4,762,310,656 parameters, 19 GB in
fp32) in memory, then runs the exporter's own steps for it: the fp32 torch reference on random tokens,
the ONNX export of sdrt's T5 graph (`export.components.T5Encoder`, fp32 as in every sdrt engine) and the
validation on ONNX Runtime. Reports each stage's wall time and the process' peak RSS after it. The
ONNX files (about 2 x 19 GB while the weights are gathered) go to a temporary folder under --work,
removed afterwards.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable
from sdrt.bench.machine import machine_info
from sdrt.export.architectures import T5_XXL
from sdrt.export.exporter import OPSET, dynamic_axes, text_encoder_spec, Tolerances, validate_component
from sdrt.families import SD3
from sdrt.versions import package_versions

T5_XXL_PARAMETERS = 4_762_310_656


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(tokens: int, work: Path, config: dict[str, Any] | None = None,
        parameters: int = T5_XXL_PARAMETERS) -> dict[str, Any]:
    """config: a T5 encoder's (T5-XXL's by default) and its parameter count, asserted."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from sdrt.export.onnx_io import export_onnx  # torch: loaded when the check runs

    stages: dict[str, dict[str, float]] = {}

    def stage(name: str, work_fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = work_fn()
        stages[name] = {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_gib": round(_peak_gib(), 2)}
        print(f"{name}: {stages[name]}", file=sys.stderr, flush=True)
        return result

    torch.manual_seed(0)
    config = config or T5_XXL
    t5 = stage("build", lambda: T5EncoderModel(T5Config(**config)).eval())
    counted = sum(p.numel() for p in t5.parameters())
    assert counted == parameters, f"{counted} parameters, not {parameters}"
    slot = replace(next(s for s in SD3.text_encoders if s.component == "text_encoder_3"), max_length=tokens)
    spec, wrap = text_encoder_spec(slot, t5.config, "fp32")  # the exporter's own T5 graph and contract
    module = wrap(t5)
    n = 2  # one prompt with CFG: [negative; positive]
    gen = torch.Generator().manual_seed(0)
    args = (torch.randint(0, config["vocab_size"], (n, tokens), generator=gen), 0.5 + torch.rand(n, tokens, generator=gen),
            torch.ones(n))
    with torch.no_grad():
        reference = (stage("torch reference", lambda: module(*args)),)
    with tempfile.TemporaryDirectory(prefix="sdrt-t5xxl-", dir=work) as folder:
        path = Path(folder) / spec.onnx
        names = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        stage("onnx export", lambda: export_onnx(module, args, path, *names, dynamic_axes(spec), OPSET))
        onnx_bytes = path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size
        module.to("meta")  # as the exporter frees a module once exported
        gc.collect()
        report = stage("validation on onnxruntime", lambda: validate_component(
            "text_encoder_3", path, spec, args, reference, Tolerances().of("text_encoder_3", "fp32")))
    return {"parameters": counted, "tokens": tokens, "batch": n, "onnx_bytes": onnx_bytes,
            "stages": stages, "validation": report, "peak_rss_gib": round(_peak_gib(), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.bench.t5_export", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="T5 sequence length (diffusers' default 256)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the ONNX files go while measured (needs ~40 GB free)")
    parser.add_argument("-o", "--out", type=Path, help="folder for t5xxl-export.json")
    args = parser.parse_args(argv)
    result = {"command": "python -m sdrt.bench.t5_export " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "versions": package_versions(("sdrt", "torch", "transformers", "onnx", "onnxruntime")),
              **run(args.tokens, args.work)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "t5xxl-export.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
