"""What every router shares: the server's config, its job scheduler, metrics and A1111 options, and
the one way a generation request runs (validate off the event loop, queue, wait while watching the
connection: a client that goes away is dropped from its batch before the next step)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from sdrt.errors import InputError
from sdrt.pipeline import Pipeline
from sdrt.request import GenerationConfig
from sdrt.serve.config import ServeConfig
from sdrt.serve.errors import error_response, refusal
from sdrt.serve.jobs import ClientGone, Image, Job, QueueFull, RequestTimeout, Scheduler, ShuttingDown
from sdrt.serve.metrics import Metrics
from sdrt.serve.options import A1111Options

# (the request's config, its images, their PNGs as base64) -> the API's answer
Answer = Callable[[GenerationConfig, list[Image], list[str]], Any]


def png_base64(image: Image) -> str:
    from PIL import Image as PILImage  # Pillow: imported with the first image, as sdrt.result does
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", image.parameters)
    buf = io.BytesIO()
    PILImage.fromarray(image.array, "RGB").save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Server:
    config: ServeConfig
    scheduler: Scheduler
    metrics: Metrics
    options: A1111Options

    @property
    def pipeline(self) -> Pipeline:
        return self.scheduler.pipeline  # type: ignore[return-value]  # set once ready

    def not_ready(self, request: Request) -> JSONResponse | None:
        """A 503 while the engines load (or after they failed to), else None."""
        path = request.url.path
        if self.scheduler.load_error is not None:
            return error_response(path, self.metrics, 503, f"engines failed to load: {self.scheduler.load_error}")
        if not self.scheduler.ready.is_set():
            return error_response(path, self.metrics, 503, "engines are still loading; retry shortly",
                                  {"Retry-After": "5"})
        return None

    async def run_job(self, request: Request,
                      make: Callable[[Pipeline], GenerationConfig]) -> tuple[GenerationConfig, list[Image]] | JSONResponse:
        if (answer := self.not_ready(request)) is not None:
            return answer
        try:
            gen = await asyncio.to_thread(make, self.pipeline)  # decoding images takes a while: off the loop
            job = Job(gen, deadline=time.monotonic() + self.config.request_timeout_s)
            future = asyncio.wrap_future(self.scheduler.submit(job))
        except (InputError, QueueFull, ShuttingDown) as e:
            return refusal(request.url.path, self.metrics, e)
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.05)
            if done:
                break
            if await request.is_disconnected():
                job.cancel()  # the worker drops its rows before the next step
                future.cancel()  # nobody will read its outcome
                return error_response(request.url.path, self.metrics, 499, "client disconnected")
        try:
            return gen, future.result()
        except (RequestTimeout, ShuttingDown, ClientGone) as e:
            return refusal(request.url.path, self.metrics, e)

    async def generate(self, request: Request, make: Callable[[Pipeline], GenerationConfig], answer: Answer,
                       send_images: bool = True) -> Any:
        """Runs the job; answer shapes the API's reply (PNGs encoded off the loop; none when send_images is false)."""
        outcome = await self.run_job(request, make)
        if isinstance(outcome, JSONResponse):
            return outcome
        gen, images = outcome
        pngs = await asyncio.to_thread(lambda: [png_base64(im) for im in images]) if send_images else []
        return answer(gen, images, pngs)
