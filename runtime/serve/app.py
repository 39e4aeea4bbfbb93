"""`sdrt serve`: the AUTOMATIC1111 and OpenAI image APIs over one engine set (FastAPI + uvicorn).

Handlers validate a request against the engines' limits, queue it as a job and wait for it while
watching the connection: a client that goes away is dropped from its batch before the next step.
Every refusal is a 4xx (or 429/503/504) with a JSON body; OpenAI paths answer in OpenAI's error
shape so its client raises the right exception.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.errors import InputError, is_digits
from sdrt.loras import available_loras
from sdrt.pipeline import GenerationConfig, Pipeline
from sdrt.schedulers import A1111_SCHEDULE_TYPES, a1111_labels
from sdrt.serve.apis import (ImagesRequest, Img2ImgRequest, Txt2ImgRequest, a1111_config, a1111_info, a1111_timestamp,
                             a1111_title, check_strings, openai_config, openai_edit_config)
from sdrt.serve.config import ServeConfig
from sdrt.serve.jobs import (RUNNING_GRACE_S, ClientGone, Image, Job, QueueFull, RequestTimeout, Scheduler,
                             ShuttingDown)
from sdrt.serve.metrics import Metrics
from sdrt.serve.options import A1111Options

log = logging.getLogger("sdrt.serve")
OPEN_PATHS = ("/health", "/ready", "/metrics")  # probes and scrapers need no token
IMAGE_PATHS = ("/sdapi/v1/img2img", "/v1/images/edits")  # bodies with images get the larger limit
_STATUS = {InputError: 400, QueueFull: 429, ShuttingDown: 503, RequestTimeout: 504, ClientGone: 499}
_KIND = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
         413: "too_large", 422: "bad_request", 429: "queue_full", 431: "headers_too_large",
         499: "client_disconnected", 500: "internal", 503: "unavailable", 504: "timeout"}


def png_base64(image: Image) -> str:
    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", image.parameters)
    buf = io.BytesIO()
    PILImage.fromarray(image.array, "RGB").save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """A JSON error in the shape of the API the path belongs to (OpenAI's error object on /v1/)."""
    kind = _KIND.get(status, "error")
    if path.startswith("/v1/"):
        kind_openai = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind_openai, "param": None, "code": kind}}
    return {"error": kind, "detail": message}


def error_response(path: str, metrics: Metrics, status: int, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """error_body as a response, counted by kind."""
    metrics.errors.labels(_KIND.get(status, "error")).inc()
    return JSONResponse(error_body(path, status, message), status_code=status, headers=headers)


class AuthAndAccounting:
    """ASGI middleware: the token check and per-endpoint request metrics; the replica's name on every
    answer when it is one of several (Ray Serve). (Pure ASGI rather than BaseHTTPMiddleware, which
    hides client disconnects from the handlers.)"""

    def __init__(self, app: Any, token: str | None, metrics: Metrics, replica: str | None = None):
        self.app = app
        self.token = token
        self.metrics = metrics
        self.replica_header = [(b"x-sdrt-replica", replica.encode())] if replica else []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope["path"]
        status: dict[str, int | None] = {"code": None}  # set once the response has started

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if self.replica_header:
                    message = {**message, "headers": list(message.get("headers", [])) + self.replica_header}
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token and path not in OPEN_PATHS and not _authorized(headers.get("authorization", ""), self.token):
            response = error_response(path, self.metrics, 401, "missing or wrong token: send "
                                      "'Authorization: Bearer TOKEN'", {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send_counted)
        else:
            try:
                await self.app(scope, receive, send_counted)
            except Exception:  # a bug: the details go to the log under an id, the client gets the id
                error_id = uuid.uuid4().hex[:12]
                log.exception("internal error %s on %s", error_id, path)
                if status["code"] is not None:
                    raise  # the response had started: nothing sound can be sent any more
                response = error_response(path, self.metrics, 500, f"internal error {error_id}: the server's "
                                          "log has the details; report it with this id")
                await response(scope, receive, send_counted)
        endpoint = path if path in _ENDPOINTS else "other"
        self.metrics.requests.labels(endpoint, str(status["code"] or 500)).inc()
        self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)


class RequestLimits:
    """ASGI middleware: headers over max_header_bytes get a 431; bodies over the limit a 413 before
    they are read in full (max_bytes for JSON, image_max_bytes on IMAGE_PATHS); a body that stalls
    for read_timeout_s a 408. (h11 bounds headers that arrive slowly; the protocol, their time.)"""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics):
        self.app = app
        self.max_header_bytes = config.max_header_bytes
        self.max_bytes = config.max_body_bytes
        self.image_max_bytes = config.max_image_body_bytes
        self.read_timeout_s = config.read_timeout_s
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.image_max_bytes if scope["path"] in IMAGE_PATHS else self.max_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_big = (413, f"request bodies here are limited to {limit} bytes")
        refusal = too_big if declared is not None and (not is_digits(declared) or int(declared) > limit) else None
        if sum(len(k) + len(v) + 4 for k, v in scope.get("headers", [])) > self.max_header_bytes:
            refusal = (431, f"request headers here are limited to {self.max_header_bytes} bytes")
        seen, body_done = 0, False

        async def counted() -> dict:
            nonlocal seen, body_done, refusal
            if body_done:  # later reads wait for the client to go away: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                refusal = (408, f"the request body stalled for {self.read_timeout_s:g} s")
                raise _Refused() from None
            seen += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if seen > limit:  # a chunked body declares no length: counted as it arrives
                refusal = too_big
                raise _Refused()
            return message

        async def unless_refused(message: dict) -> None:
            if refusal is None:  # else the app's own answer to the cut body (FastAPI: a 400) is dropped
                await send(message)

        if refusal is None:
            try:
                await self.app(scope, counted, unless_refused)
            except _Refused:
                pass
            if refusal is None:
                return
        status, message = refusal
        response = error_response(scope["path"], self.metrics, status, message,
                                  {"Connection": "close"} if status == 408 else None)
        await response(scope, receive, send)


class _Refused(Exception):
    pass


HEADER_BUFFER_FACTOR = 16  # h11 buffers incomplete headers up to 16x max_header_bytes (256 KB by default)


def uvicorn_config(app: Any, config: ServeConfig, **kwargs: Any) -> Any:
    """The HTTP server's settings from the ServeConfig: header size and time limits, graceful shutdown."""
    import uvicorn

    from sdrt.serve.protocol import with_header_deadline

    grace_s = math.ceil(config.shutdown_drain_s + RUNNING_GRACE_S) + 1  # the scheduler answers everyone first
    return uvicorn.Config(app, host=config.host, port=config.port, http=with_header_deadline(config.read_timeout_s),
                          # h11's cap is a memory guard well above the limit: below it the headers arrive whole
                          # and the middleware answers 431 with the connection read to the end; at the limit
                          # itself h11 would refuse (a 400) as soon as the headers came in pieces, closing with
                          # bytes unread, which the client sees as a reset (flaky under load, seen in CI)
                          h11_max_incomplete_event_size=HEADER_BUFFER_FACTOR * config.max_header_bytes,
                          timeout_graceful_shutdown=grace_s,
                          **kwargs)


def create_app(config: ServeConfig, pipeline: Pipeline | None = None, wait_until_loaded: bool = False,
               replica: str | None = None) -> FastAPI:
    """The ASGI app. pipeline: an already loaded one (tests); else loaded by the worker at startup.
    wait_until_loaded: startup completes only once the engines are loaded and warm, and fails with
    their load error (Ray Serve then never routes to it). replica: named in X-Sdrt-Replica."""

    def load() -> Pipeline:
        pipe = pipeline or Pipeline.load(config.engines, backend=config.backend, lora_dir=config.lora_dir)
        limits = pipe.limits
        pipe.generate(pipe.make_config("warm-up", steps=2, seed=0, height=limits.height[1], width=limits.width[1]))
        return pipe

    metrics = Metrics(queue_depth=lambda: scheduler.queued_rows)  # read at scrape time, after the line below
    options = A1111Options()
    scheduler = Scheduler(load, config.max_queue, config.max_batch, config.batch_window_s, metrics.observe)

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
    app.state.config = config
    app.state.scheduler = scheduler
    app.state.metrics = metrics

    # --- errors, auth, accounting --------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        return error_response(request.url.path, metrics, 400 if request.url.path.startswith("/v1/") else 422,
                              f"invalid request: {where}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, metrics, exc.status_code, str(exc.detail),
                              getattr(exc, "headers", None))

    # --- probes ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    def not_ready(request: Request) -> JSONResponse | None:
        """A 503 while the engines load (or after they failed to), else None."""
        if scheduler.load_error is not None:
            return error_response(request.url.path, metrics, 503, f"engines failed to load: {scheduler.load_error}")
        if not scheduler.ready.is_set():
            return error_response(request.url.path, metrics, 503, "engines are still loading; retry shortly",
                                  {"Retry-After": "5"})
        return None

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        if (refusal := not_ready(request)) is not None:
            return refusal
        return JSONResponse({"status": "ready", "backend": scheduler.pipeline.backend.describe()})  # type: ignore[union-attr]

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- generation -------------------------------------------------------------------------------

    async def run_job(request: Request, make: Any) -> tuple[GenerationConfig, list[Image]] | JSONResponse:
        if (refusal := not_ready(request)) is not None:
            return refusal
        try:
            gen = await asyncio.to_thread(make, scheduler.pipeline)  # decoding images takes a while: off the loop
            job = Job(gen, deadline=time.monotonic() + config.request_timeout_s)
            future = asyncio.wrap_future(scheduler.submit(job))
        except (InputError, QueueFull, ShuttingDown) as e:
            return _refusal(request, e)
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.05)
            if done:
                break
            if await request.is_disconnected():
                job.cancel()  # the worker drops its rows before the next step
                future.cancel()  # nobody will read its outcome
                return error_response(request.url.path, metrics, 499, "client disconnected")
        try:
            return gen, future.result()
        except (RequestTimeout, ShuttingDown, ClientGone) as e:
            return _refusal(request, e)

    def _refusal(request: Request, e: Exception) -> JSONResponse:
        status = next(code for kind, code in _STATUS.items() if isinstance(e, kind))
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return error_response(request.url.path, metrics, status, str(e), headers)

    async def generate(request: Request, make: Any, answer: Any, send_images: bool = True) -> Any:
        """Runs the job; answer(config, images, pngs) shapes the API's reply (PNGs encoded off the loop;
        none when send_images is false)."""
        outcome = await run_job(request, make)
        if isinstance(outcome, JSONResponse):
            return outcome
        gen, images = outcome
        pngs = await asyncio.to_thread(lambda: [png_base64(im) for im in images]) if send_images else []
        return answer(gen, images, pngs)

    async def a1111(request: Request, body: Txt2ImgRequest) -> Any:
        started, clip_skip = time.time(), options.clip_skip
        return await generate(request, lambda pipe: a1111_config(body, pipe, config, clip_skip), lambda gen, images, pngs: {
            "images": pngs, "parameters": body.echoed(),
            "info": a1111_info(body, gen, [im.parameters for im in images], scheduler.pipeline.manifest, started)},
            body.send_images)

    def openai_answer(prompt: Any) -> Any:
        return lambda gen, images, pngs: {"created": int(time.time()),
                                          "data": [{"b64_json": p, "revised_prompt": prompt} for p in pngs]}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request, body: Txt2ImgRequest) -> Any:
        return await a1111(request, body)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request, body: Img2ImgRequest) -> Any:
        return await a1111(request, body)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> Any:
        try:
            form = await request.form(max_files=4, max_fields=64)
            fields = {k: (await v.read() if hasattr(v, "read") else v) for k, v in form.items()}
        except (AssertionError, ValueError, KeyError) as e:  # not multipart, or malformed
            return error_response(request.url.path, metrics, 400, f"send multipart/form-data with an `image` file "
                                  f"and a `prompt` ({type(e).__name__}: {e})")
        return await generate(request, lambda pipe: openai_edit_config(fields, pipe, config),
                              openai_answer(fields.get("prompt")))

    @app.post("/v1/images/generations")
    async def images_generations(request: Request, body: ImagesRequest) -> Any:
        return await generate(request, lambda pipe: openai_config(body, pipe, config), openai_answer(body.prompt))

    # --- A1111 discovery ----------------------------------------------------------------------

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict]:
        return [{"name": label, "aliases": names, "options": {}} for label, names in a1111_labels().items()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict]:
        return [{"name": kind.lower(), "label": kind, "aliases": None, "default_rho": 7.0 if kind == "Karras" else -1,
                 "need_inner_model": False} for kind in A1111_SCHEDULE_TYPES]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models(request: Request) -> Any:
        if (refusal := not_ready(request)) is not None:
            return refusal
        manifest = scheduler.pipeline.manifest  # type: ignore[union-attr]
        sha = manifest.source.get("sha256", "")
        return [{"title": a1111_title(manifest), "model_name": manifest.name,
                 "hash": manifest.model_hash, "sha256": sha, "filename": str(config.engines), "config": None}]

    @app.get("/sdapi/v1/loras")
    async def loras() -> list[dict]:
        """A1111's list: the files of --lora-dir, read now (so a new file needs no refresh)."""
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in available_loras(config.lora_dir).items()]

    @app.get("/sdapi/v1/options")
    async def get_options(request: Request) -> Any:
        if (refusal := not_ready(request)) is not None:
            return refusal
        return options.report(scheduler.pipeline.manifest)  # type: ignore[union-attr]

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> Any:
        if (refusal := not_ready(request)) is not None:
            return refusal
        try:
            changes = await request.json()
            check_strings(changes, "options")
            options.update(changes, scheduler.pipeline.manifest)  # type: ignore[union-attr]
        except ValueError as e:  # bad JSON (JSONDecodeError, UnicodeDecodeError) or a refused option
            message = str(e) if isinstance(e, InputError) else f"send a JSON object of options ({type(e).__name__})"
            return error_response(request.url.path, metrics, 400, message)
        return None

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> None:
        scheduler.stop_running("interrupt")

    @app.post("/sdapi/v1/skip")
    async def skip() -> None:
        scheduler.stop_running("skip")

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/progress")
    async def progress() -> dict:
        p = scheduler.progress
        fraction = p.step / p.steps if p.running and p.steps else 0.0
        elapsed = time.monotonic() - p.started if p.running else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        jobs = scheduler.queued_jobs + (1 if p.running else 0)
        started = a1111_timestamp(time.time() - elapsed) if p.running else ""
        return {"progress": fraction, "eta_relative": eta,
                "state": {"skipped": p.running and p.stop == "skip", "interrupted": p.running and p.stop == "interrupt",
                          "job": "txt2img" if p.running else "", "job_count": jobs, "job_timestamp": started,
                          "job_no": 0, "sampling_step": p.step if p.running else 0,
                          "sampling_steps": p.steps if p.running else 0},
                "current_image": None, "textinfo": None}  # no preview: decoding one would cost a VAE call per poll

    app.add_middleware(RequestLimits, config=config, metrics=metrics)
    app.add_middleware(AuthAndAccounting, token=config.token, metrics=metrics, replica=replica)  # outermost: first
    return app


_ENDPOINTS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/v1/images/edits",
              "/sdapi/v1/progress", "/sdapi/v1/samplers", "/sdapi/v1/schedulers", "/sdapi/v1/sd-models", "/sdapi/v1/loras",
              "/sdapi/v1/options", "/sdapi/v1/interrupt", "/sdapi/v1/skip", "/health", "/ready", "/metrics")


def _authorized(header: str, token: str) -> bool:
    """Bearer TOKEN, or HTTP basic auth with TOKEN as the password (A1111's --api-auth clients)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


def serve(config: ServeConfig) -> None:
    """Runs the server until SIGINT/SIGTERM; queued work gets shutdown_drain_s to finish."""
    import uvicorn

    app = create_app(config)
    server = uvicorn.Server(uvicorn_config(app, config, log_level="info"))
    original = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:  # stop taking work at once; drain what is queued
        app.state.scheduler.begin_close(config.shutdown_drain_s)
        original(sig, frame)

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    server.run()
