"""`sdrt serve`: the AUTOMATIC1111 and OpenAI image APIs over one engine set (FastAPI + uvicorn).

create_app assembles the routers (sdrt.serve.a1111, sdrt.serve.openai_api, sdrt.serve.ops) over one
Server (sdrt.serve.context: the config, the job scheduler, metrics, A1111 options), with the error
handlers and middleware (sdrt.serve.errors, sdrt.serve.middleware). Every refusal is a 4xx (or
429/503/504) with a JSON body in its API's shape.
"""

from __future__ import annotations

import asyncio
import math
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.pipeline import Pipeline
from sdrt.serve.a1111 import a1111_router, controlnet_router
from sdrt.serve.config import ServeConfig
from sdrt.serve.context import Server
from sdrt.serve.errors import error_response
from sdrt.serve.jobs import RUNNING_GRACE_S, Scheduler
from sdrt.serve.metrics import Metrics
from sdrt.serve.middleware import AuthAndAccounting, RequestLimits
from sdrt.serve.openai_api import openai_router
from sdrt.serve.ops import ops_router
from sdrt.serve.options import A1111Options
from sdrt.serve.protocol import with_header_deadline


HEADER_BUFFER_FACTOR = 16  # h11 buffers incomplete headers up to 16x max_header_bytes (256 KB by default)


def uvicorn_config(app: Any, config: ServeConfig, **kwargs: Any) -> Any:
    """The HTTP server's settings from the ServeConfig: header size and time limits, graceful shutdown."""
    grace_s = math.ceil(config.shutdown_drain_s + RUNNING_GRACE_S) + 1  # the scheduler answers everyone first
    return uvicorn.Config(app, host=config.host, port=config.port, http=with_header_deadline(config.read_timeout_s),
                          # h11's cap is a memory guard well above the limit: below it the headers arrive whole
                          # and the middleware answers 431 with the connection read to the end; at the limit
                          # itself h11 would refuse (a 400) as soon as the headers came in pieces, closing with
                          # bytes unread, which the client sees as a reset (flaky under load, seen in CI)
                          h11_max_incomplete_event_size=HEADER_BUFFER_FACTOR * config.max_header_bytes,
                          timeout_graceful_shutdown=grace_s,
                          **kwargs)


def load_pipeline(config: ServeConfig) -> Pipeline:
    """The engines the server runs, with its LoRA folder and embeddings."""
    return Pipeline.load(config.engines, backend=config.backend, lora_dir=config.lora_dir,
                         embeddings_dir=config.embeddings_dir)


def create_app(config: ServeConfig, pipeline: Pipeline | None = None, wait_until_loaded: bool = False,
               replica: str | None = None) -> FastAPI:
    """The ASGI app. pipeline: an already loaded one (tests); else loaded by the worker at startup.
    wait_until_loaded: startup completes only once the engines are loaded and warm, and fails with
    their load error (Ray Serve then never routes to it). replica: named in X-Sdrt-Replica."""
    def load() -> Pipeline:
        pipe = pipeline or load_pipeline(config)
        limits = pipe.limits
        pipe.generate(pipe.make_config("warm-up", steps=2, seed=0, height=limits.height[1], width=limits.width[1]))
        return pipe

    metrics = Metrics(queue_depth=lambda: scheduler.queued_rows)  # read at scrape time, after the line below
    scheduler = Scheduler(load, config.max_queue, config.max_batch, config.batch_window_s, metrics.observe)
    server = Server(config, scheduler, metrics, A1111Options())

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        scheduler.start()
        if wait_until_loaded:
            await asyncio.to_thread(scheduler.wait_loaded)
            if scheduler.load_error is not None:
                raise RuntimeError(f"engines failed to load: {scheduler.load_error}") from scheduler.load_error
        yield
        await asyncio.to_thread(scheduler.close, config.shutdown_drain_s)  # after uvicorn's own drain

    app = FastAPI(title="sdrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.scheduler, app.state.metrics = config, scheduler, metrics
    routers = (ops_router(server), a1111_router(server), controlnet_router(server), openai_router(server))
    for router in routers:
        app.include_router(router)
    _error_handlers(app, metrics)
    app.add_middleware(RequestLimits, config=config, metrics=metrics)
    endpoints = frozenset(route.path for router in routers for route in router.routes)  # others: "other"
    app.add_middleware(AuthAndAccounting, token=config.token, metrics=metrics, endpoints=endpoints,
                       replica=replica)  # outermost: first
    return app


def _error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """FastAPI's own refusals (a body that does not parse, an unknown path) in sdrt's error shape."""
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        return error_response(request.url.path, metrics, 400 if request.url.path.startswith("/v1/") else 422,
                              f"invalid request: {where}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, metrics, exc.status_code, str(exc.detail),
                              getattr(exc, "headers", None))


def serve(config: ServeConfig) -> None:
    """Runs the server until SIGINT/SIGTERM; queued work gets shutdown_drain_s to finish."""
    app = create_app(config)
    server = uvicorn.Server(uvicorn_config(app, config, log_level="info"))
    original = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:  # stop taking work at once; drain what is queued
        app.state.scheduler.begin_close(config.shutdown_drain_s)
        original(sig, frame)

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    server.run()
