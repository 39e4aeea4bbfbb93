"""OpenAI's image API: `/v1/images/generations` (JSON) and `/v1/images/edits` (multipart)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from sdrt.serve.context import Answer, Server
from sdrt.serve.errors import error_response
from sdrt.serve.openai_requests import ImagesRequest, openai_config, openai_edit_config


def _answer(prompt: Any) -> Answer:
    return lambda gen, images, pngs: {"created": int(time.time()),
                                      "data": [{"b64_json": p, "revised_prompt": prompt} for p in pngs]}


def openai_router(server: Server) -> APIRouter:
    router = APIRouter(prefix="/v1/images")

    @router.post("/generations")
    async def generations(request: Request, body: ImagesRequest) -> Any:
        return await server.generate(request, lambda pipe: openai_config(body, pipe, server.config),
                                     _answer(body.prompt))

    @router.post("/edits")
    async def edits(request: Request) -> Any:
        try:
            form = await request.form(max_files=4, max_fields=64)
            fields = {k: (await v.read() if hasattr(v, "read") else v) for k, v in form.items()}
        except (AssertionError, ValueError, KeyError) as e:  # not multipart, or malformed
            return error_response(request.url.path, server.metrics, 400, f"send multipart/form-data with an `image` "
                                  f"file and a `prompt` ({type(e).__name__}: {e})")
        return await server.generate(request, lambda pipe: openai_edit_config(fields, pipe, server.config),
                                     _answer(fields.get("prompt")))

    return router
