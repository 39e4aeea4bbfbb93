"""Markdown table and matplotlib plots from a bench result; the header and output of the server
benches' JSON reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from sdrt.bench.machine import BENCH_PACKAGES, machine_info
from sdrt.versions import package_versions

STAGE_LABELS = {"text_encoder": "text enc", "step": "1 step", "steps": "all steps", "decode": "VAE decode",
                "end_to_end": "end to end"}


def _ms(x: float) -> str:
    return f"{x * 1e3:,.1f}"


def markdown_table(r: dict[str, Any]) -> str:
    w = r["workload"]
    hints = f", ControlNet hints {', '.join(Path(h).name for h in w['control_images'])}" if w.get("control_images") else ""
    lines = [f"# sdrt bench — {w['width']}x{w['height']}, {w['steps']} steps, {w['scheduler']}, CFG {w['guidance']}{hints}",
             "", f"Machine: {r['machine'].get('cpu_model') or r['machine']['processor']}, "
             f"{r['machine']['cpus']} CPUs, {r['machine'].get('memory_gb')} GB; device: {r['device']['kind']} "
             f"(baseline {r['device']['baseline_dtype']}, measured matmul peak "
             f"{r['device']['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s).",
             f"Runs: {r['runs']} (+{r['warmup']} warm-up) per backend and batch, "
             f"{'each backend alone, one after another' if r.get('one_at_a_time') else 'alternating order'}. "
             f"Command: `{r['command']}`", ""]
    head = "| backend | batch | " + " | ".join(f"{v} ms (median)" for v in STAGE_LABELS.values()) + \
        " | e2e p90 / p99 ms | vs torch (e2e) | images/s | host µs/step | TFLOP/s (% peak) | PSNR vs torch |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, entry in r["backends"].items():
        for batch, per in entry["batches"].items():
            lat = per["latency_s"]
            ratio = per.get("ratio_vs_torch", {}).get("end_to_end")
            host = lat.get("host_overhead_per_step", {}).get("median")
            tf = per.get("achieved_tflops")
            p = per.get("psnr_vs_torch_db")
            lines.append(
                f"| {entry['name']} | {batch} | " + " | ".join(_ms(lat[s]["median"]) for s in STAGE_LABELS) +
                f" | {_ms(lat['end_to_end']['p90'])} / {_ms(lat['end_to_end']['p99'])} | "
                f"{'%.2f×' % ratio if ratio else '—'} | {per['images_per_s']:.3f} | "
                f"{'%.0f' % (host * 1e6) if host is not None else '—'} | "
                f"{'%.4f (%.0f%%)' % (tf, per['pct_of_matmul_peak']) if tf else '—'} | "
                f"{'identical' if p == float('inf') else ('%.1f dB' % p if p is not None else '—')} |")
    lines += ["", "| backend | load s | compile s | cold start s (new process → first image) | peak host RSS MB | "
              "peak device MB |", "|---|---|---|---|---|---|"]
    for name, e in r["backends"].items():
        dev, comp = e.get("peak_device_mb"), e.get("compile_s")
        lines.append(f"| {e['name']} | {e['load_s']:.1f} | {'%.1f' % comp if comp else '—'} | {e['cold_start_s']:.1f} | "
                     f"{e['peak_rss_mb']:,.0f} | {'%.0f' % dev if dev is not None else 'n/a (no GPU)'} |")
    for name, why in r.get("skipped", {}).items():
        lines.append(f"\nSkipped `{name}`: {why}")
    return "\n".join(lines) + "\n"


def plot_latency(r: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    backends = list(r["backends"])
    batch = str(r["batches"][0])
    stages = ["text_encoder", "steps", "decode", "end_to_end"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(backends), 1)
    for i, b in enumerate(backends):
        lat = r["backends"][b]["batches"][batch]["latency_s"]
        ax.bar(np.arange(len(stages)) + i * width, [lat[s]["median"] * 1e3 for s in stages], width, label=b)
    ax.set_xticks(np.arange(len(stages)) + width * (len(backends) - 1) / 2, [STAGE_LABELS[s] for s in stages])
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"latency per stage, batch {batch}")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-stages.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for b in backends:
        xs = [int(k) for k in r["backends"][b]["batches"]]
        ys = [r["backends"][b]["batches"][str(x)]["latency_s"]["end_to_end"]["median"] * 1e3 for x in xs]
        ax.plot(xs, ys, marker="o", label=b)
    ax.set_xlabel("batch size")
    ax.set_ylabel("median end-to-end latency (ms)")
    ax.set_xticks(r["batches"])
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-batch.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def server_bench_parser(doc: str, requests: int, concurrency: int) -> Any:
    """The arguments the server benches share: ENGINES, --requests, --concurrency, --backend, -o."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("engines")
    ap.add_argument("--requests", type=int, default=requests)
    ap.add_argument("--concurrency", type=int, default=concurrency)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("-o", "--output", default=None, help="write the JSON report here too")
    return ap


def server_report(module: str, argv: list[str] | None) -> dict[str, Any]:
    """The start of a server bench's report: the exact command, the machine, the versions."""
    args = argv if argv is not None else sys.argv[1:]
    return {"command": " ".join([f"python -m sdrt.bench.{module}", *args]), "machine": machine_info(),
            "versions": package_versions(BENCH_PACKAGES + ("fastapi", "uvicorn"))}


def emit(report: dict[str, Any], output: str | None) -> None:
    """Prints the JSON report, and writes it to output when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
