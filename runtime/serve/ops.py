"""The operational endpoints: liveness, readiness, Prometheus metrics and A1111's progress."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sdrt.serve.a1111_requests import a1111_timestamp
from sdrt.serve.context import Server


def ops_router(server: Server) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        if (refusal := server.not_ready(request)) is not None:
            return refusal
        return JSONResponse({"status": "ready", "backend": server.pipeline.backend.describe()})

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/sdapi/v1/progress")
    async def progress() -> dict:
        p, scheduler = server.scheduler.progress, server.scheduler
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

    return router
