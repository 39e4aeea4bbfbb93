"""PNG files carrying AUTOMATIC1111-style generation parameters (the `parameters` tEXt chunk)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdrt import __version__
from sdrt.paths import replacing
from sdrt.request import A1111_CONTROL_MODES, GenerationConfig
from sdrt.schedulers import A1111_SAMPLERS


def a1111_sampler(name: str) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 >= 1.9 writes them."""
    return A1111_SAMPLERS.get(name, (name, "Automatic"))


def a1111_parameters(config: GenerationConfig, seed: int, index: int, model_name: str, model_hash: str = "") -> str:
    """The infotext A1111 >= 1.9 writes, field for field (its PNG-info readers parse it)."""
    # the LoRAs as A1111 prompts carry them, so pasting the infotext back applies them again
    prompts, image, skip, sampler = config.prompts, config.image, config.skip, config.sampler
    tags = "".join(f" <lora:{Path(path).stem}:{weight:g}>" for path, weight in prompts.loras)
    lines = [prompts.prompt[index] + tags]
    if prompts.negative_prompt[index]:
        lines.append(f"Negative prompt: {prompts.negative_prompt[index]}")
    extra = ""
    if image.images:  # A1111's img2img fields
        extra = f"Denoising strength: {image.strength:g}, "
        if image.masks:
            extra += f"Mask blur: {image.mask_blur}, "
    if config.hires.enabled:
        extra += hires_fields(config)
    if prompts.clip_skip > 1:
        extra += f"Clip skip: {prompts.clip_skip}, "
    if skip.layers:  # SD 3.5's skip-layer guidance (no A1111 field: quoted, as its parser reads values)
        layers = " ".join(map(str, skip.layers))
        extra += f'Skip layer guidance: "layers {layers}, scale {skip.scale:g}, steps {skip.start:g}-{skip.stop:g}", '
    extra += control_fields(config)
    name, schedule_type = a1111_sampler(sampler.scheduler)
    model = (f"Model hash: {model_hash}, " if model_hash else "") + f"Model: {model_name}, "
    lines.append(
        f"Steps: {sampler.steps}, Sampler: {name}, Schedule type: {schedule_type}, CFG scale: {config.guidance.scale:g}, "
        f"Seed: {seed}, Size: {config.size.width}x{config.size.height}, {model}{extra}Version: sdrt {__version__}")
    return "\n".join(lines)


def _quoted(text: str) -> str:
    """A value as A1111's infotext quotes one holding a comma, colon or quote (its `quote`)."""
    return text if not any(c in text for c in ',:"\n') else json.dumps(text, ensure_ascii=False)


def control_fields(config: GenerationConfig) -> str:
    """sd-webui-controlnet's unit fields (`ControlNet 0: "Module: none, Model: …"`), the ones sdrt has."""
    control = config.control
    return "".join(
        f'ControlNet {j}: "Module: none, Model: {model}, Weight: {scale:g}, Resize Mode: {fit}, '
        f'Guidance Start: {start:g}, Guidance End: {end:g}, {_control_mode(mode)}", '
        for j, (model, scale, start, end, mode, fit) in enumerate(zip(control.models, control.scales, control.start,
                                                                      control.end, control.modes,
                                                                      control.resize_modes)) if model)


def _control_mode(mode: str) -> str:
    """The unit's mode field; guess (no control mode of sd-webui-controlnet's) as its units' older guess_mode."""
    return f"Control Mode: {A1111_CONTROL_MODES[mode]}" if mode in A1111_CONTROL_MODES else "Guess Mode: True"


def hires_fields(config: GenerationConfig) -> str:
    """A1111's hires fix fields, in its order."""
    hires = config.hires
    size = f"Hires resize: {hires.size.width}x{hires.size.height}, " if not hires.scale else f"Hires upscale: {hires.scale:g}, "
    out = f"Denoising strength: {hires.strength:g}, {size}"
    out += f"Hires steps: {hires.steps}, " if hires.steps else ""
    out += f"Hires upscaler: {hires.upscaler}, "
    if hires.prompt:
        out += f"Hires prompt: {_quoted(hires.prompt)}, "
    if hires.negative_prompt:
        out += f"Hires negative prompt: {_quoted(hires.negative_prompt)}, "
    if hires.scheduler and hires.scheduler != config.sampler.scheduler:
        name, schedule_type = a1111_sampler(hires.scheduler)
        out += f"Hires sampler: {name}, Hires schedule type: {schedule_type}, "
    return out


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
