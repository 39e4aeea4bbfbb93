"""A bounded, seeded fuzzer of `sdrt serve` over loopback: both APIs, every endpoint.

    python -m sdrt.bench.serve_fuzz ENGINE_DIR [--requests 2000 --concurrency 8 --seed 0 -o report.json]

Each request starts from a valid one (txt2img, img2img, inpainting, OpenAI generations, multipart
edits, options, the discovery GETs) and is mutated: fields replaced by odd values (lone surrogates,
non-ASCII digits, NaN, booleans, huge numbers, nesting), dropped or added; bodies cut, made of raw
bytes or sent with the wrong content type; paths and methods changed. Some clients hang up while
their request runs. Every answer is checked: under 500, JSON in its API's error shape (or valid PNGs
on success). "lost" counts requests that got no answer before their timeout; after the run the server
must still answer and hold no queued work. The report tallies status classes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from sdrt.bench.live_server import LiveServer
from sdrt.bench.report import emit, server_bench_parser, server_report
from sdrt.serve.config import ServeConfig

GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/v1/images/edits")
GET_PATHS = ("/sdapi/v1/progress", "/sdapi/v1/samplers", "/sdapi/v1/schedulers", "/sdapi/v1/options",
             "/sdapi/v1/sd-models", "/sdapi/v1/scripts", "/health", "/ready", "/metrics")


@dataclass(frozen=True)
class FuzzConfig:
    url: str
    requests: int = 600
    concurrency: int = 8
    seed: int = 0
    size: int = 64  # the valid requests' image size; keep the server's max_steps small (3)
    hang_up_fraction: float = 0.05  # clients that close their connection while the request runs
    timeout_s: float = 120.0  # a request unanswered this long is lost


def _png(rng: random.Random, size: int, mode: str = "RGB") -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size, size, len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels if len(mode) > 1 else pixels[..., 0], mode).save(buf, format="PNG")
    return buf.getvalue()


def _odd_value(rng: random.Random) -> Any:
    """A JSON value a careless or hostile client might send in any field."""
    choices: list[Any] = [
        None, True, False, 0, -1, 2**31, 2**64, -(2**70), 1e308, -0.0, float("nan"), float("inf"), 0.5,
        "", " ", "\ud83d", "a\udfffb", "６４", "६४", "64x64", "٣", "x" * 5000, "DPM++ 2M", "Karras", "\x00",
        [], [1, 2, 3], ["\ud800"], {}, {"a": {"b": [None]}}, {"\ud800": 1}, "data:image/png;base64,!!",
    ]
    return rng.choice(choices)


def _valid_json_body(rng: random.Random, path: str, size: int, images: list[str]) -> dict[str, Any]:
    prompt = rng.choice(["a red cube", "a (cat:1.2) BREAK on a [mat]", "", "emoji 🐱 prompt", "x, " * 40])
    if path == "/v1/images/generations":
        return {"prompt": prompt, "n": rng.randint(1, 2), "size": f"{size}x{size}", "steps": rng.randint(1, 3),
                "response_format": "b64_json", "seed": rng.randrange(2**32)}
    body: dict[str, Any] = {"prompt": prompt, "steps": rng.randint(1, 3), "width": size, "height": size,
                            "seed": rng.randrange(-1, 2**32 - 2), "batch_size": rng.randint(1, 2),
                            "n_iter": rng.randint(1, 2), "sampler_name": rng.choice(["Euler a", "DPM++ 2M", "DDIM"]),
                            "scheduler": rng.choice(["Automatic", "Karras"]), "cfg_scale": rng.uniform(1, 9)}
    if path == "/sdapi/v1/img2img":
        body.update(init_images=[rng.choice(images[:2])], denoising_strength=rng.uniform(0.3, 1.0))
        if rng.random() < 0.5:
            body.update(mask=images[2], inpainting_fill=rng.choice([1, 2, 3]), inpaint_full_res=False)
    return body


def _mutate(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    body = dict(body)
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        action = rng.random()
        if action < 0.6 and body:
            body[rng.choice(list(body))] = _odd_value(rng)
        elif action < 0.8 and body:
            body.pop(rng.choice(list(body)))
        else:
            body[rng.choice(["enable_hr", "styles", "override_settings", "unknown_field", "mask", "size",
                             "save_images", "send_images", "alwayson_scripts"])] = _odd_value(rng)
    return body


def _encode(rng: random.Random, body: Any) -> tuple[bytes, str]:
    """The body's bytes (mostly JSON as Python writes it: NaN literals, \\u-escaped surrogates) and
    content type; sometimes cut, raw bytes or a wrong type."""
    raw = json.dumps(body).encode()
    roll = rng.random()
    if roll < 0.05:
        return raw[: rng.randrange(max(len(raw), 1))], "application/json"
    if roll < 0.08:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "application/json"
    if roll < 0.10:
        return raw, rng.choice(["text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"])
    return raw, "application/json"


def _edit_request(rng: random.Random, size: int, images: list[bytes]) -> dict[str, Any]:
    """httpx arguments for a multipart /v1/images/edits, valid or not."""
    fields: dict[str, Any] = {"prompt": rng.choice(["a hat", "", b"\xed\xa0\x80 a lone surrogate", b"\xff\xfe"]),
                              "n": str(rng.randint(1, 2)), "size": f"{size}x{size}", "steps": str(rng.randint(1, 3))}
    for _ in range(rng.choice([0, 1, 2])):
        fields[rng.choice(["n", "size", "steps", "seed", "strength", "guidance_scale", "response_format"])] = rng.choice(
            ["-1", "١", "NaN", "1e9", "", "64x", "url", "99999999999999", "0.5"])
    files = {}
    if rng.random() < 0.9:
        files["image"] = ("image.png", rng.choice(images), "image/png")
    if rng.random() < 0.4:
        files["mask"] = ("mask.png", rng.choice(images), "image/png")
    return {"data": fields, "files": files or None}


def _check(path: str, response: Any, generation: bool) -> str | None:
    """None when the answer is as promised; else what is wrong."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:200]}"
    if path == "/metrics" and response.status_code == 200:
        return None
    try:
        payload = response.json()
    except ValueError:
        return f"{response.status_code} with a body that is not JSON: {response.text[:100]!r}"
    if response.status_code >= 400:
        error = payload.get("error") if isinstance(payload, dict) else None
        shaped = isinstance(error, dict) and "message" in error if path.startswith("/v1/") else isinstance(error, str)
        return None if shaped else f"{response.status_code} error not in its API's shape: {payload!r:.200}"
    if generation and response.status_code == 200:
        encoded = payload.get("images") if "images" in payload else [d["b64_json"] for d in payload.get("data", [])]
        if encoded is None:
            return None  # send_images: false
        from PIL import Image

        try:
            for item in encoded:
                Image.open(io.BytesIO(base64.b64decode(item))).verify()
        except Exception as e:
            return f"200 with an image that is not a PNG: {e}"
    return None


async def run_fuzz(config: FuzzConfig) -> dict[str, Any]:
    import httpx

    rng = random.Random(config.seed)
    pngs = [_png(rng, config.size), _png(rng, config.size + 8), _png(rng, config.size, "L"),
            _png(rng, config.size, "RGBA"), b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a"]
    b64 = [base64.b64encode(p).decode() for p in pngs[:3]] + ["not base64", "aGVsbG8="]
    plans: list[dict[str, Any]] = []
    for i in range(config.requests):
        roll = rng.random()
        if roll < 0.72:
            path = rng.choice(GENERATION_PATHS)
            if path == "/v1/images/edits":
                plan = {"method": "POST", "path": path, **_edit_request(rng, config.size, pngs)}
            else:
                body = _valid_json_body(rng, path, config.size, b64)
                content, kind = _encode(rng, _mutate(rng, body) if rng.random() < 0.8 else body)
                plan = {"method": "POST", "path": path, "content": content, "headers": {"Content-Type": kind}}
        elif roll < 0.82:
            change = rng.choice([{"CLIP_stop_at_last_layers": rng.choice([1, 2, 0, 13, "2", None])},
                                 {"samples_format": rng.choice(["png", "jpg"])}, {"sd_model_checkpoint": "x"},
                                 {"\ud800": 1}, [], "x"])
            content, kind = _encode(rng, change)
            plan = {"method": "POST", "path": "/sdapi/v1/options", "content": content, "headers": {"Content-Type": kind}}
        elif roll < 0.95:
            plan = {"method": "GET", "path": rng.choice(GET_PATHS)}
        else:  # wrong methods and paths
            plan = rng.choice([{"method": "GET", "path": "/sdapi/v1/txt2img"}, {"method": "DELETE", "path": "/health"},
                               {"method": "GET", "path": "/sdapi/v1/nowhere"}, {"method": "PUT", "path": "/v1/images/x"},
                               {"method": "GET", "path": "/sdapi/v1/%ff%fe"}])
        plan["hang_up"] = plan["path"] in GENERATION_PATHS and rng.random() < config.hang_up_fraction
        plans.append(plan)

    tally: Counter[str] = Counter()
    failures: list[str] = []
    gate = asyncio.Semaphore(config.concurrency)

    async def one(client: httpx.AsyncClient, plan: dict[str, Any]) -> None:
        kwargs = {k: plan[k] for k in ("content", "headers", "data", "files") if plan.get(k) is not None}
        timeout = 0.05 if plan["hang_up"] else config.timeout_s
        async with gate:
            try:
                response = await client.request(plan["method"], config.url + plan["path"], timeout=timeout, **kwargs)
            except httpx.TimeoutException:
                if plan["hang_up"]:
                    tally["hung_up"] += 1
                else:
                    tally["lost"] += 1
                    failures.append(f"no answer within {timeout:g} s: {plan['method']} {plan['path']}")
                return
            except httpx.TransportError as e:
                tally["lost"] += 1
                failures.append(f"{plan['method']} {plan['path']}: {type(e).__name__}: {e}")
                return
        tally[f"{response.status_code // 100}xx"] += 1
        tally[str(response.status_code)] += 1
        problem = _check(plan["path"], response, plan["path"] in GENERATION_PATHS)
        if problem is not None:
            failures.append(f"{plan['method']} {plan['path']}: {problem}")

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=config.concurrency)) as client:
        await asyncio.gather(*(one(client, plan) for plan in plans))
        wall = time.perf_counter() - start
        # afterwards: still serving, nothing left queued or running (hung-up requests were dropped)
        deadline = time.monotonic() + 60
        while True:
            progress = (await client.get(config.url + "/sdapi/v1/progress", timeout=10)).json()
            if progress["state"]["job_count"] == 0:
                break
            if time.monotonic() > deadline:
                failures.append(f"work still queued or running after the run: {progress['state']}")
                break
            await asyncio.sleep(0.1)
        health = await client.get(config.url + "/health", timeout=10)
        if health.status_code != 200:
            failures.append(f"/health answered {health.status_code} after the run")
    classes = {k: tally[k] for k in ("2xx", "4xx", "5xx")}
    codes = {k: v for k, v in sorted(tally.items()) if k.isdigit()}
    return {"requests": config.requests, "seed": config.seed, "wall_s": round(wall, 1), "status_classes": classes,
            "status_codes": codes, "hung_up": tally["hung_up"], "lost": tally["lost"], "failures": failures[:20],
            "failure_count": len(failures)}


def main(argv: list[str] | None = None) -> int:
    ap = server_bench_parser(__doc__, requests=2000, concurrency=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    live = LiveServer(ServeConfig(Path(a.engines), backend=a.backend, max_steps=3, max_size=128))
    try:
        result = asyncio.run(run_fuzz(FuzzConfig(live.url, a.requests, a.concurrency, a.seed)))
    finally:
        live.stop()
    result["server_errors_logged"] = live.errors[:20]
    result["failure_count"] += len(live.errors)
    emit({**server_report("serve_fuzz", argv), **result}, a.output)
    return 1 if result["failure_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
