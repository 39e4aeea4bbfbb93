"""PNG files carrying AUTOMATIC1111-style generation parameters (the `parameters` tEXt chunk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdrt.paths import replacing
from sdrt.schedulers import A1111_SAMPLERS


def a1111_sampler(name: str) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 >= 1.9 writes them."""
    return A1111_SAMPLERS.get(name, (name, "Automatic"))


def a1111_parameters(config: Any, seed: int, index: int, model_name: str, model_hash: str = "") -> str:
    """The infotext A1111 >= 1.9 writes, field for field (its PNG-info readers parse it)."""
    from sdrt import __version__

    # the LoRAs as A1111 prompts carry them, so pasting the infotext back applies them again
    tags = "".join(f" <lora:{Path(path).stem}:{weight:g}>" for path, weight in config.loras)
    lines = [config.prompt[index] + tags]
    if config.negative_prompt[index]:
        lines.append(f"Negative prompt: {config.negative_prompt[index]}")
    extra = ""
    if config.images:  # A1111's img2img fields
        extra = f"Denoising strength: {config.strength:g}, "
        if config.masks:
            extra += f"Mask blur: {config.mask_blur}, "
    if config.clip_skip > 1:
        extra += f"Clip skip: {config.clip_skip}, "
    if config.skip_layers:  # SD 3.5's skip-layer guidance (no A1111 field: quoted, as its parser reads values)
        layers = " ".join(map(str, config.skip_layers))
        extra += (f'Skip layer guidance: "layers {layers}, scale {config.skip_scale:g}, '
                  f'steps {config.skip_start:g}-{config.skip_stop:g}", ')
    sampler, schedule_type = a1111_sampler(config.scheduler)
    model = (f"Model hash: {model_hash}, " if model_hash else "") + f"Model: {model_name}, "
    lines.append(
        f"Steps: {config.steps}, Sampler: {sampler}, Schedule type: {schedule_type}, CFG scale: {config.guidance:g}, "
        f"Seed: {seed}, Size: {config.width}x{config.height}, {model}{extra}Version: sdrt {__version__}")
    return "\n".join(lines)


def save_png(image: Any, path: str | Path, parameters: str | None = None) -> None:
    """Writes a PIL image with its A1111 `parameters` (default: the image's own, as Pipeline returns
    them) through a temporary file and a rename: never a half-written PNG."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    parameters = image.info.get("parameters") if parameters is None else parameters
    if parameters is not None:
        info.add_text("parameters", parameters)
    with replacing(Path(path)) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
