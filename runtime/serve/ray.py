"""`sdrt serve --replicas N` on Ray Serve: N copies of the same server behind Ray Serve's HTTP proxy,
each owning its engines (on its own GPU where the cluster has GPUs), across one machine or many.

Each replica runs `create_app` (the A1111 and OpenAI APIs, per-replica request batching, limits,
auth) and becomes ready only once its engines have loaded and warmed: a replica that cannot load them
(a GPU the plans were not built for, a damaged file) fails to start with the error that names the
fix, and Ray Serve reports it and retries. Answers carry `X-Sdrt-Replica`. `/metrics` is per
replica (a scrape reaches one; the header says which).

A replica that dies mid-request leaves Ray's proxy with no answer to send (its uvicorn would write a
plain-text 500): `proxy_middlewares`, loaded in the proxy through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH,
answers such requests with a JSON 503 and Retry-After instead, as the single-process server does.

    sdrt serve engines/sd15 --replicas 2                       # a local Ray instance
    sdrt serve engines/sd15 --min-replicas 1 --max-replicas 4 --ray-address auto
    serve run sdrt.serve.ray:app engines=engines/sd15 replicas=2   # Ray's own CLI / a RayService
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse

from sdrt.errors import InputError
from sdrt.serve.app import create_app, load_pipeline
from sdrt.serve.config import ServeConfig
from sdrt.serve.errors import error_body

REPLICA_HEADER = "x-sdrt-replica"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "sdrt.serve.ray:proxy_middlewares"
DEPLOYMENT = "sdrt"


@dataclass(frozen=True)
class RayConfig:
    replicas: int | None = 1  # a fixed count; None: autoscaling between min_replicas and max_replicas
    min_replicas: int = 1
    max_replicas: int = 1
    address: str | None = None  # an existing cluster ("auto", "ray://HOST:10001"); None: start a local one
    target_ongoing_requests: float = 4.0  # per replica, what autoscaling aims for (Ray Serve's setting)

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise InputError(f"--replicas must be at least 1, got {self.replicas}")
        if self.replicas is None and not 1 <= self.min_replicas <= self.max_replicas:
            raise InputError(f"need 1 <= --min-replicas <= --max-replicas, got {self.min_replicas} and "
                             f"{self.max_replicas}")


def deployment_options(serve_config: ServeConfig, ray_config: RayConfig, gpus: bool) -> dict[str, Any]:
    """Ray Serve's settings for the replicas: one GPU each where there are GPUs; enough concurrent
    requests per replica for its own batching; a shutdown as long as the server's drain."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_gpus": 1 if gpus else 0, "num_cpus": 0 if not gpus else 1},
        "max_ongoing_requests": serve_config.max_queue,  # Ray's default (5) would starve request batching
        "graceful_shutdown_timeout_s": serve_config.shutdown_drain_s + 5.0,
        "health_check_period_s": 5.0,
    }
    if ray_config.replicas is None:
        options["autoscaling_config"] = {"min_replicas": ray_config.min_replicas,
                                         "max_replicas": ray_config.max_replicas,
                                         "target_ongoing_requests": ray_config.target_ongoing_requests}
    else:
        options["num_replicas"] = ray_config.replicas
    return options


def build_app(serve_config: ServeConfig, ray_config: RayConfig, gpus: bool = False) -> Any:
    from ray import serve  # ray: optional (the `ray` extra), and only for --replicas

    @serve.ingress()
    class SdrtReplica:
        """One server: its engines, its worker, its queue."""

        def __init__(self, config: ServeConfig):
            self.config = config
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.server: Any = None  # (Ray's wrapper owns the name `app`)

        def __serve_build_asgi_app__(self) -> Any:
            # the engines load here, so a failure (with the fix it names) is what `serve status` shows;
            # startup then waits for the warm-up: ready means ready to generate
            self.server = create_app(self.config, load_pipeline(self.config), wait_until_loaded=True, replica=self.replica)
            return self.server

        def check_health(self) -> None:
            scheduler = self.server.state.scheduler if self.server is not None else None
            if scheduler is not None and (scheduler.load_error is not None or not scheduler.alive):
                raise RuntimeError(f"replica {self.replica}: its engine worker stopped")

    return serve.deployment(SdrtReplica).options(**deployment_options(serve_config, ray_config, gpus)).bind(serve_config)


def app_config(args: dict[str, str]) -> ServeConfig:
    """The server config of the application builder's args (below)."""
    if "engines" not in args:
        raise InputError("pass engines=DIR (an engine directory on every node)")
    token = args.get("token") or os.environ.get("SDRT_TOKEN") or None
    return ServeConfig(Path(args["engines"]), backend=args.get("backend", "auto"), token=token,
                       **{key: Path(args[key]) for key in ("lora_dir", "embeddings_dir", "controlnet_dir")
                          if args.get(key)})


def app(args: dict[str, str]) -> Any:
    """Ray Serve's application builder: `serve run sdrt.serve.ray:app engines=DIR [replicas=N |
    min_replicas=A max_replicas=B] [backend=... token=... lora_dir=... embeddings_dir=... controlnet_dir=... num_gpus=0|1]`
    or a RayService's import_path with args. num_gpus: a GPU per replica (default: whether the connected
    cluster has GPUs)."""
    import ray

    config = app_config(args)
    fixed = "min_replicas" not in args
    ray_config = RayConfig(replicas=int(args.get("replicas", 1)) if fixed else None,
                           min_replicas=int(args.get("min_replicas", 1)), max_replicas=int(args.get("max_replicas", 1)))
    detected = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return build_app(config, ray_config, gpus=args["num_gpus"] == "1" if "num_gpus" in args else detected)


def start(serve_config: ServeConfig, ray_config: RayConfig) -> Any:
    """Joins (or starts) the cluster and deploys the replicas; returns when they are all ready."""
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # a local instance's proxy inherits it
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=ray_config.address, include_dashboard=False, logging_level="warning")
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    serve.start(http_options={"host": serve_config.host, "port": serve_config.port})
    return serve.run(build_app(serve_config, ray_config, gpus), name=DEPLOYMENT, route_prefix="/")


def serve_forever(serve_config: ServeConfig, ray_config: RayConfig) -> None:
    """`sdrt serve --replicas`: deploys, then waits for SIGINT/SIGTERM and takes the application down
    (each replica drains as the single-process server does)."""
    from ray import serve

    start(serve_config, ray_config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"sdrt on Ray Serve: http://{serve_config.host}:{serve_config.port} "
          f"({'autoscaling' if ray_config.replicas is None else ray_config.replicas} replicas)", flush=True)
    stop.wait()
    serve.delete(DEPLOYMENT)
    serve.shutdown()


class AnswerEveryRequest:
    """ASGI middleware for Ray's HTTP proxy: a request whose replica died (or failed) before answering
    gets a JSON 503 with Retry-After rather than the proxy's plain-text 500."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:
                raise
        if not started:
            response = JSONResponse(error_body(scope["path"], 503, "the replica serving this request stopped before "
                                               "answering; retry (the service restarts replicas)"),
                                    status_code=503, headers={"Retry-After": "1"})
            await response(scope, receive, send)


def proxy_middlewares() -> list[Any]:
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH points Ray's proxy at."""
    from starlette.middleware import Middleware

    return [Middleware(AnswerEveryRequest)]


__all__ = ["AnswerEveryRequest", "RayConfig", "app", "build_app", "deployment_options", "proxy_middlewares",
           "serve_forever", "start"]
