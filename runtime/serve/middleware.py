"""The server's ASGI middleware (pure ASGI rather than BaseHTTPMiddleware, which hides client
disconnects from the handlers): the token check and per-endpoint metrics; size and time limits on
what a client sends."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import time
import uuid
from typing import Any

from sdrt.errors import is_digits
from sdrt.serve.config import ServeConfig
from sdrt.serve.errors import error_response
from sdrt.serve.metrics import Metrics

log = logging.getLogger("sdrt.serve")
OPEN_PATHS = ("/health", "/ready", "/metrics")  # probes and scrapers need no token
IMAGE_PATHS = ("/sdapi/v1/img2img", "/v1/images/edits")  # bodies with images get the larger limit


class AuthAndAccounting:
    """The token check and per-endpoint request metrics; the replica's name on every answer when it is
    one of several (Ray Serve)."""

    def __init__(self, app: Any, token: str | None, metrics: Metrics, endpoints: frozenset[str],
                 replica: str | None = None):
        self.app = app
        self.endpoints = endpoints  # the app's routes: metrics label any other path "other"
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
        if self.token and path not in OPEN_PATHS and not authorized(headers.get("authorization", ""), self.token):
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
        endpoint = path if path in self.endpoints else "other"
        self.metrics.requests.labels(endpoint, str(status["code"] or 500)).inc()
        self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)


class RequestLimits:
    """Headers over max_header_bytes get a 431; bodies over the limit a 413 before
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


def authorized(header: str, token: str) -> bool:
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
