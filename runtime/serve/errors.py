"""Every refusal the server answers, in the shape of the API the path belongs to: OpenAI's error
object on /v1/ (so its client raises the right exception), A1111's {"error", "detail"} elsewhere."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from sdrt.errors import InputError
from sdrt.serve.jobs import ClientGone, QueueFull, RequestTimeout, ShuttingDown
from sdrt.serve.metrics import Metrics

STATUS = {InputError: 400, QueueFull: 429, ShuttingDown: 503, RequestTimeout: 504, ClientGone: 499}
KIND = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
        413: "too_large", 422: "bad_request", 429: "queue_full", 431: "headers_too_large",
        499: "client_disconnected", 500: "internal", 503: "unavailable", 504: "timeout"}


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """A JSON error in the shape of the API the path belongs to (OpenAI's error object on /v1/)."""
    kind = KIND.get(status, "error")
    if path.startswith("/v1/"):
        kind_openai = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind_openai, "param": None, "code": kind}}
    return {"error": kind, "detail": message}


def error_response(path: str, metrics: Metrics, status: int, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """error_body as a response, counted by kind."""
    metrics.errors.labels(KIND.get(status, "error")).inc()
    return JSONResponse(error_body(path, status, message), status_code=status, headers=headers)


def refusal(path: str, metrics: Metrics, e: Exception) -> JSONResponse:
    """The answer to one of sdrt's own refusals (STATUS's kinds), with Retry-After where waiting helps."""
    status = next(code for kind, code in STATUS.items() if isinstance(e, kind))
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return error_response(path, metrics, status, str(e), headers)
