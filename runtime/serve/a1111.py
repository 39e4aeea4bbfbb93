"""AUTOMATIC1111's API (`/sdapi/v1/...`): generation, and the discovery and control endpoints its
clients call (samplers, schedulers, upscalers, models, LoRAs, options, interrupt, skip, scripts)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from sdrt.embeddings import Embedding
from sdrt.errors import InputError
from sdrt.controlnet_weights import available_controlnets
from sdrt.loras import available_loras
from sdrt.schedulers import A1111_SCHEDULE_TYPES, a1111_labels
from sdrt.serve.a1111_requests import Img2ImgRequest, Txt2ImgRequest, a1111_config, a1111_info, a1111_title
from sdrt.serve.context import Server
from sdrt.serve.errors import error_response
from sdrt.serve.request_fields import check_strings
from sdrt.upscale import LATENT_UPSCALERS, PIXEL_UPSCALERS


def a1111_router(server: Server) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")
    _generation(router, server)
    _discovery(router, server)
    _control(router, server)
    return router


def _generation(router: APIRouter, server: Server) -> None:
    async def generate(request: Request, body: Txt2ImgRequest) -> Any:
        started, clip_skip = time.time(), server.options.clip_skip
        return await server.generate(
            request, lambda pipe: a1111_config(body, pipe, server.config, clip_skip),
            lambda gen, images, pngs: {"images": pngs, "parameters": body.echoed(), "info": a1111_info(
                body, gen, [im.parameters for im in images], server.pipeline.manifest, started)},
            body.send_images)

    @router.post("/txt2img")
    async def txt2img(request: Request, body: Txt2ImgRequest) -> Any:
        return await generate(request, body)

    @router.post("/img2img")
    async def img2img(request: Request, body: Img2ImgRequest) -> Any:
        return await generate(request, body)


def _discovery(router: APIRouter, server: Server) -> None:
    @router.get("/samplers")
    async def samplers() -> list[dict]:
        """The samplers these engines run (all of sdrt's while they load)."""
        schedule = server.pipeline.schedule if server.scheduler.ready.is_set() else None
        return [{"name": label, "aliases": names, "options": {}} for label, names in a1111_labels(schedule).items()]

    @router.get("/schedulers")
    async def schedulers() -> list[dict]:
        return [{"name": kind.lower(), "label": kind, "aliases": None, "default_rho": 7.0 if kind == "Karras" else -1,
                 "need_inner_model": False} for kind in A1111_SCHEDULE_TYPES]

    @router.get("/upscalers")
    async def upscalers() -> list[dict]:
        """The pixel upscalers hires fix takes (A1111's shape; its ESRGAN-style models are not in sdrt)."""
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in PIXEL_UPSCALERS]

    @router.get("/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    @router.get("/sd-models")
    async def sd_models(request: Request) -> Any:
        if (refusal := server.not_ready(request)) is not None:
            return refusal
        manifest = server.pipeline.manifest
        sha = manifest.source.get("sha256", "")
        return [{"title": a1111_title(manifest), "model_name": manifest.name,
                 "hash": manifest.model_hash, "sha256": sha, "filename": str(server.config.engines), "config": None}]

    @router.get("/loras")
    async def loras() -> list[dict]:
        """A1111's list: the files of --lora-dir, read now (so a new file needs no refresh)."""
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in available_loras(server.config.lora_dir).items()]

    @router.get("/embeddings")
    async def embeddings(request: Request) -> Any:
        """A1111's answer: what --embeddings-dir loaded for this model and what it skipped (sdrt adds why)."""
        if (refusal := server.not_ready(request)) is not None:
            return refusal
        found = server.pipeline.embeddings
        return {"loaded": {name: _embedding_item(e) for name, e in found.loaded.items()},
                "skipped": {name: {**_embedding_item(found.unfit.get(name)), "reason": why}
                            for name, why in found.skipped.items()}}

    @router.get("/scripts")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}


def _embedding_item(e: Embedding | None) -> dict[str, Any]:
    """A1111's EmbeddingItem: shape is the width (an SDXL pair's two summed), vectors their count; None
    for a file that could not be read."""
    info = dict(e.metadata) if e else {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    return {**info, "shape": sum(e.widths) if e else None, "vectors": e.count if e else None}


def _control(router: APIRouter, server: Server) -> None:
    @router.get("/options")
    async def get_options(request: Request) -> Any:
        if (refusal := server.not_ready(request)) is not None:
            return refusal
        return server.options.report(server.pipeline.manifest)

    @router.post("/options")
    async def set_options(request: Request) -> Any:
        if (refusal := server.not_ready(request)) is not None:
            return refusal
        try:
            changes = await request.json()
            check_strings(changes, "options")
            server.options.update(changes, server.pipeline.manifest)
        except ValueError as e:  # bad JSON (JSONDecodeError, UnicodeDecodeError) or a refused option
            message = str(e) if isinstance(e, InputError) else f"send a JSON object of options ({type(e).__name__})"
            return error_response(request.url.path, server.metrics, 400, message)
        return None

    @router.post("/interrupt")
    async def interrupt() -> None:
        server.scheduler.stop_running("interrupt")

    @router.post("/skip")
    async def skip() -> None:
        server.scheduler.stop_running("skip")


def controlnet_router(server: Server) -> APIRouter:
    """sd-webui-controlnet's discovery routes: the engines' ControlNets and the preprocessors sdrt has."""
    router = APIRouter(prefix="/controlnet")

    @router.get("/model_list")
    async def model_list(request: Request) -> Any:
        if (refusal := server.not_ready(request)) is not None:
            return refusal
        return {"model_list": list(dict.fromkeys([*server.pipeline.model.controlnets,
                                                  *available_controlnets(server.config.controlnet_dir)]))}

    @router.get("/module_list")
    async def module_list() -> dict:
        return {"module_list": ["none", "canny"]}

    return router
