"""`sdrt serve --replicas`: the same server as Ray Serve replicas, on a local Ray instance (loopback,
this CPU): both APIs through the real clients, both replicas serving, a replica killed under load,
a replica that cannot load its engines."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
import httpx  # noqa: E402

from sdrt.serve.config import ServeConfig  # noqa: E402
from sdrt.serve.ray import PROXY_CALLBACK, PROXY_CALLBACK_ENV, RayConfig, deployment_options  # noqa: E402

TOKEN = "ray-s3cret"
BODY = {"prompt": "a cube", "steps": 2, "width": 64, "height": 64}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_engines):
    """A local Ray instance serving 2 replicas of the tiny engines; yields the URL."""
    from ray import serve

    from sdrt.serve.ray import start

    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK  # before ray.init: the proxy process inherits it
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    port = _free_port()
    try:
        start(ServeConfig(Path(tiny_engines), port=port, backend="ort-cpu", token=TOKEN), RayConfig(replicas=2))
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(PROXY_CALLBACK_ENV, None)


def _replicas() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::sdrt#")]


def _a1111(url: str, seed: int, steps: int = 2) -> tuple[int | str, str | None, str]:
    try:
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BODY, "seed": seed, "steps": steps},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=90)
    except httpx.HTTPError as e:  # a hang or a dropped connection: what must never happen
        return type(e).__name__, None, str(e)
    return r.status_code, r.headers.get("x-sdrt-replica"), r.headers.get("content-type", "")


def test_100_requests_through_both_apis_are_all_answered_by_both_replicas(cluster):
    import openai

    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key=TOKEN, max_retries=0, timeout=90)

    def openai_one(seed: int) -> tuple[int, str | None, str]:
        raw = client.images.with_raw_response.generate(prompt="a cube", n=1, size="64x64", response_format="b64_json",
                                                       extra_body={"seed": seed, "steps": 2})
        assert raw.parse().data[0].b64_json
        return raw.status_code, raw.headers.get("x-sdrt-replica"), raw.headers.get("content-type", "")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(openai_one, range(50))) + list(pool.map(lambda s: _a1111(cluster, s), range(50)))
    assert [a[0] for a in answers] == [200] * 100, Counter(a[0] for a in answers)
    served = Counter(a[1] for a in answers)
    print(f"\nrequests per replica: {dict(served)}")
    assert len(served) == 2 and None not in served and min(served.values()) >= 10
    wrong_method = httpx.get(f"{cluster}/sdapi/v1/txt2img", headers={"Authorization": f"Bearer {TOKEN}"})
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"  # the app's own
    assert httpx.post(f"{cluster}/sdapi/v1/txt2img", json=BODY).status_code == 401  # auth holds in every replica


def test_a_replica_killed_under_load_costs_json_503s_at_most_and_the_service_recovers(cluster):
    """Every request is answered (an image, or a JSON 503 for the ones on the killed replica; none hangs);
    Ray Serve starts a new replica and both serve again."""
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_a1111, cluster, seed, 20) for seed in range(40)]
        deadline = time.monotonic() + 30
        while not any(f.done() for f in futures):  # the load is running on both replicas
            assert time.monotonic() < deadline
            time.sleep(0.05)
        victim = _replicas()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        answers = [f.result() for f in futures]
    statuses = Counter(a[0] for a in answers)
    print(f"\nwith {victim} killed: {dict(statuses)}")
    assert set(statuses) <= {200, 503}, answers
    assert all(a[2].startswith("application/json") for a in answers)
    assert statuses[200] >= 20
    deadline = time.monotonic() + 90
    while True:  # a replacement comes up; both replicas answer again
        served = Counter(_a1111(cluster, seed)[1] for seed in range(8))
        if len(served) == 2 and None not in served and victim.rsplit("#", 1)[1] not in served:
            break
        assert time.monotonic() < deadline, f"the service did not recover: {served}, replicas {_replicas()}"
        time.sleep(0.5)


def test_a_replica_that_cannot_load_its_engines_never_becomes_ready(cluster, tiny_engines, tmp_path):
    from ray import serve

    from sdrt.serve.ray import build_app

    broken = tmp_path / "broken"
    shutil.copytree(tiny_engines, broken)
    (broken / "vae_decoder.onnx").write_bytes(b"not a graph")
    application = build_app(ServeConfig(broken, backend="ort-cpu"), RayConfig(replicas=1))
    with pytest.raises(RuntimeError, match="Deploying application broken failed"):
        serve.run(application, name="broken", route_prefix="/broken")
    status = serve.status().applications["broken"]
    assert "vae_decoder.onnx does not match its sha256" in status.deployments["sdrt"].message  # `serve status` shows it
    serve.delete("broken")
    assert _a1111(cluster, 1)[0] == 200  # the healthy application is untouched


def test_deployment_options_follow_the_cluster_and_the_server_config(tiny_engines):
    config = ServeConfig(Path(tiny_engines), max_queue=32, shutdown_drain_s=10)
    fixed = deployment_options(config, RayConfig(replicas=3), gpus=True)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"]["num_gpus"] == 1
    assert fixed["max_ongoing_requests"] == 32 and fixed["graceful_shutdown_timeout_s"] == 15
    scaling = deployment_options(config, RayConfig(replicas=None, min_replicas=1, max_replicas=4), gpus=False)
    assert "num_replicas" not in scaling and scaling["ray_actor_options"]["num_gpus"] == 0
    assert scaling["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4.0}
    with pytest.raises(ValueError, match="min-replicas"):
        RayConfig(replicas=None, min_replicas=3, max_replicas=2)
    from sdrt.serve.ray import app, app_config

    with pytest.raises(ValueError, match="engines=DIR"):
        app({"replicas": "2"})
    built = app_config({"engines": str(tiny_engines), "lora_dir": "/l", "embeddings_dir": "/e"})
    assert (built.lora_dir, built.embeddings_dir) == (Path("/l"), Path("/e"))
    assert app_config({"engines": str(tiny_engines)}).embeddings_dir is None


def test_the_single_process_server_never_imports_ray(tiny_engines):
    code = ("import sys; from sdrt.serve.app import create_app; from sdrt.serve.config import ServeConfig; "
            f"create_app(ServeConfig({str(tiny_engines)!r})); print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", str(tiny_engines), "--replicas", "2",
                        "--min-replicas", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--replicas is a fixed count" in r.stderr
