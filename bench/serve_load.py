"""A bounded load test of `sdrt serve`: N requests, C at a time, over loopback HTTP.

    python -m sdrt.bench.serve_load ENGINE_DIR [--requests 200 --concurrency 32 --steps 3 --size 64]

starts the server twice in this process (request batching on, then --max-batch 1) and reports, for
each, images/s, latency p50/p99 and how many requests got 429.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.bench.stats import summarize
from sdrt.bench.live_server import LiveServer
from sdrt.bench.report import emit, server_bench_parser, server_report
from sdrt.serve.config import ServeConfig
from sdrt.serve.ray import RayConfig, start


@dataclass(frozen=True)
class LoadConfig:
    url: str
    requests: int = 200
    concurrency: int = 32
    steps: int = 3
    size: int = 64
    token: str | None = None


def _valid_png(b64: str, size: int) -> bool:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        return image.size == (size, size) and "parameters" in image.info
    except Exception:
        return False


async def run_load(config: LoadConfig) -> dict:
    """Every request's outcome is counted: ok (a valid image), 429, or anything else."""
    import httpx

    headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
    gate = asyncio.Semaphore(config.concurrency)
    latencies: list[float] = []
    outcome = {"ok": 0, "rejected_429": 0, "other": 0, "invalid_images": 0}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": f"request {i}", "steps": config.steps, "width": config.size, "height": config.size,
                "seed": i, "cfg_scale": 7.5}
        async with gate:
            start = time.perf_counter()
            try:
                r = await client.post(f"{config.url}/sdapi/v1/txt2img", json=body, headers=headers)
            except httpx.HTTPError:
                outcome["other"] += 1
                return
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
                outcome["ok"] += 1
                if not all(_valid_png(b, config.size) for b in r.json()["images"]):
                    outcome["invalid_images"] += 1
            elif r.status_code == 429:
                outcome["rejected_429"] += 1
            else:
                outcome["other"] += 1

    limits = httpx.Limits(max_connections=config.concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(config.requests)))
        wall = time.perf_counter() - start
    latency = summarize(latencies) if latencies else {}
    return {**outcome, "wall_s": wall, "images_per_s": outcome["ok"] / wall,
            "latency_ms": {k: v * 1e3 for k, v in latency.items() if k != "n"}}


def _ray_load(a: argparse.Namespace, counts: list[int]) -> dict[str, dict]:
    """The load against `sdrt serve --replicas N` on a local Ray instance, for each N."""
    import socket

    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = {}
    try:
        for n in counts:
            start(ServeConfig(Path(a.engines).resolve(), port=port, backend=a.backend, max_queue=a.requests * 16),
                  RayConfig(replicas=n))
            out[f"replicas_{n}"] = asyncio.run(run_load(LoadConfig(f"http://127.0.0.1:{port}", a.requests,
                                                                   a.concurrency, a.steps, a.size)))
            serve.delete("sdrt")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = server_bench_parser(__doc__, requests=200, concurrency=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ray-replicas", default=None,
                    help="e.g. 1,2: the same load on Ray Serve (sdrt[ray]) with each replica count, one after another")
    a = ap.parse_args(argv)
    report: dict = {**server_report("serve_load", argv),
                    "workload": {"endpoint": "/sdapi/v1/txt2img", "requests": a.requests, "concurrency": a.concurrency,
                                 "steps": a.steps, "size": a.size, "engines": a.engines}}
    if a.ray_replicas:
        report["ray"] = _ray_load(a, [int(n) for n in a.ray_replicas.split(",")])
    for label, max_batch in (() if a.ray_replicas else (("batching", None), ("no_batching", 1))):
        live = LiveServer(ServeConfig(Path(a.engines), backend=a.backend, max_batch=max_batch,
                                      max_queue=a.requests * 16))  # measure throughput, not rejections
        try:
            report[label] = asyncio.run(run_load(LoadConfig(live.url, a.requests, a.concurrency, a.steps, a.size)))
            calls = live.metric("sdrt_batch_rows_count")
        finally:
            live.stop()
        report[label]["engine_calls"] = calls
        report[label]["mean_batch"] = float(np.round(report[label]["ok"] / max(calls, 1), 2))
    emit(report, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
