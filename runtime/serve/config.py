"""The one config `sdrt serve` passes down."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdrt.errors import InputError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    engines: Path
    host: str = "127.0.0.1"  # loopback unless the operator opens it
    port: int = 7860  # AUTOMATIC1111's port, so its clients need no change
    token: str | None = None  # bearer token (or the password of HTTP basic auth); None: no auth
    backend: str = "auto"
    max_queue: int = 64  # queued images (rows) before 429
    max_batch: int | None = None  # rows per engine call; None: the engines' max batch; 1 disables batching
    batch_window_s: float = 0.015  # how long the first request waits for others to share its engine call
    request_timeout_s: float = 300.0  # queue + generation; then 504
    max_body_bytes: int = 64 * 1024  # JSON without images
    max_image_body_bytes: int = 20 * 1024 * 1024  # img2img and edits: base64 or multipart images
    max_prompt_chars: int = 2000
    max_steps: int = 150
    max_images_per_request: int = 16
    max_size: int | None = None  # caps width/height below the engines' own limit
    default_steps: int | None = None  # None: the engines' model family default (sd1 25, sdxl 30)
    default_scheduler: str | None = None  # None: the family default (dpmpp_2m_karras)
    shutdown_drain_s: float = 30.0  # on SIGTERM, queued work this long; then 503 for what is left
    read_timeout_s: float = 30.0  # the most a client may take to send a request's headers, and its body; then 408
    max_header_bytes: int = 16 * 1024  # request line and headers; larger ones get a 431
    lora_dir: Path | None = None  # where prompts' <lora:NAME:WEIGHT> tags resolve (A1111's --lora-dir)
    embeddings_dir: Path | None = None  # textual-inversion embeddings, by file name (A1111's --embeddings-dir)
    controlnet_dir: Path | None = None  # ControlNets units may name besides the engines' (A1111's models/ControlNet)

    @staticmethod
    def token_from_env() -> str | None:
        return os.environ.get("SDRT_TOKEN") or None

    @staticmethod
    def resolve_token(flag: str | None, no_auth: bool, host: str) -> str | None:
        """The token of `sdrt serve`: --token, else $SDRT_TOKEN. An empty one (an unset shell variable)
        never means "no auth"; serving beyond loopback without one needs an explicit --no-auth."""
        env = os.environ.get("SDRT_TOKEN")
        for label, value in (("--token", flag), ("SDRT_TOKEN", env)):
            if value is not None and not value.strip():
                raise InputError(f"{label} is empty (an unset variable?): pass a token, or --no-auth to serve "
                                 "without authentication")
        token = flag or env
        if no_auth and token:
            raise InputError("--no-auth with a token: drop one of them")
        if not token and not no_auth and host not in LOOPBACK:
            raise InputError(f"serving on {host} without a token lets anyone who reaches it use the GPU: pass "
                             "--token (or SDRT_TOKEN), or --no-auth to mean it")
        return token
