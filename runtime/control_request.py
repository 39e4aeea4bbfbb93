"""ControlNet settings checked against the engines: hints, scales and guidance windows -> request.Control.

Python API names are diffusers': control_image (one image per ControlNet, each an image or a list of one
per row, or None for a ControlNet left off; with one ControlNet, the image or list itself), controlnet_conditioning_scale and
control_guidance_start / _end (a number for all, or one per ControlNet), guess_mode; and control_mode
(sdrt.control: sd-webui-controlnet's control modes); controlnet_model (sdrt.controlnet_weights). A hint of
another size is fitted by control_resize_mode, sd-webui-controlnet's resize modes: "Crop and Resize" (the
default: scaled to cover the image, centre-cropped), "Just Resize", "Resize and Fill" (scaled to fit inside,
on its border's median colour).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.controlnet_weights import ControlNetSlots, controlnet_label
from sdrt.errors import InputError
from sdrt.images import Picture, picture, read_image
from sdrt.manifest import ModelInfo
from sdrt.request import CONTROL_MODES, CROP_AND_RESIZE, RESIZE_MODES, Control, Size


def crop_and_resize(image: Any, width: int, height: int) -> Any:
    """A PIL image scaled (Lanczos) to cover width x height, then centre-cropped to it."""
    from PIL import Image

    if image.size == (width, height):
        return image
    k = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * k)), max(height, round(image.height * k))
    scaled = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def resize_and_fill(image: Any, width: int, height: int) -> Any:
    """A PIL image scaled (Lanczos) to fit inside width x height, centred on the median colour of its
    border (sd-webui-controlnet's "Resize and Fill")."""
    from PIL import Image

    if image.size == (width, height):
        return image
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    out = np.tile(np.median(border, axis=0).astype(np.uint8), (height, width, 1))
    k = min(width / image.width, height / image.height)
    w, h = min(width, round(image.width * k)), min(height, round(image.height * k))
    scaled = np.asarray(image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS))
    top, left = (height - h) // 2, (width - w) // 2
    out[top:top + h, left:left + w] = scaled
    return Image.fromarray(out)


def just_resize(image: Any, width: int, height: int) -> Any:
    """A PIL image scaled (Lanczos) to width x height, its aspect ratio not kept ("Just Resize")."""
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


FITS = dict(zip(RESIZE_MODES, (just_resize, crop_and_resize, resize_and_fill)))  # sdrt.request.RESIZE_MODES


def _one_per_hint(value: Any, count: int, default: Any, what: str) -> list[Any]:
    """A setting given once for every hint, or one per hint (None: the default)."""
    values = list(value) if isinstance(value, (list, tuple)) else [default if value is None else value] * count
    if len(values) != count:
        raise InputError(f"{what}: {len(values)} values for {count} ControlNet hint(s): give one, or one per hint")
    return values


def _per_controlnet(value: Any, count: int, default: float, what: str) -> tuple[float, ...]:
    values = _one_per_hint(value, count, default, what)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise InputError(f"{what} must be finite numbers, got {value!r}")
    return tuple(float(v) for v in values)


def _hints(model: ModelInfo, control_image: Any) -> list[Any]:
    """One entry per ControlNet given a hint (an image or a per-row list)."""
    names = model.controlnets
    if not names:
        raise InputError("control_image: these engines have no ControlNet; export them with "
                         "`sdrt export MODEL -o ENGINES --controlnet CONTROLNET_FOLDER`")
    hints = list(control_image) if len(names) > 1 and isinstance(control_image, (list, tuple)) else [control_image]
    if len(hints) > len(names):
        raise InputError(f"{len(hints)} control images for {len(names)} ControlNet(s) ({', '.join(names)}): "
                         "give at most one per ControlNet, in export order")
    return hints


def _modes(mode: Any, guess_mode: bool, count: int) -> tuple[str, ...]:
    """control_mode (one for all or one per hint; sdrt.control.CONTROL_MODES), or diffusers' guess_mode."""
    if guess_mode not in (True, False):
        raise InputError(f"guess_mode must be true or false, got {guess_mode!r}")
    if guess_mode and mode is not None:
        raise InputError("guess_mode and control_mode both set: guess_mode is control_mode 'guess'; give one")
    modes = _one_per_hint(mode, count, "guess" if guess_mode else "balanced", "control_mode")
    bad = [m for m in modes if m not in CONTROL_MODES]
    if bad:
        raise InputError(f"control_mode {bad[0]!r} is not one of {', '.join(CONTROL_MODES)} (balanced: the "
                         "default; prompt / control: sd-webui-controlnet's 'My prompt is more important' / "
                         "'ControlNet is more important'; guess: diffusers' guess_mode)")
    return tuple(modes)


def _files(slots: ControlNetSlots, given: Any, count: int) -> tuple[str, ...]:
    """controlnet_model: the file (or diffusers folder) each ControlNet runs with instead of its exported
    weights: one for the first ControlNet, a list in export order (None: the exported one), or a mapping
    from the exported names; each checked to fit now."""
    names = slots.names
    if isinstance(given, dict):
        unknown = [k for k in given if k not in names]
        if unknown:
            raise InputError(f"controlnet_model names {unknown[0]!r}; these engines' ControlNets are "
                             f"{', '.join(names)}")
        given = [given.get(name) for name in names]
    values = list(given) if isinstance(given, (list, tuple)) else [given]
    if len(values) > len(names):
        raise InputError(f"controlnet_model: {len(values)} models for {len(names)} ControlNet(s): give one per "
                         "ControlNet at most, in export order")
    files = []
    for j, value in enumerate(values):
        if value is None or value == "":
            files.append("")
            continue
        if not isinstance(value, (str, Path)):
            raise InputError(f"controlnet_model must be paths (a file or a diffusers folder), got {value!r}")
        if j >= count:
            raise InputError(f"controlnet_model {value} for ControlNet {names[j]!r}, which has no control image: "
                             "give its hint as well")
        files.append(slots.check(j, value))
    return tuple(files)


def _hint_rows(hints: list[Any], size: Size, batch: int, fits: tuple[str, ...]) -> tuple[tuple[Picture, ...], ...]:
    """Per row, each ControlNet's hint fitted to size by its resize mode (a zero hint for one left off)."""
    per_row: list[list[Picture]] = [[] for _ in range(batch)]
    off = Picture(np.zeros((size.height, size.width, 3), np.uint8))
    for j, hint in enumerate(hints):
        if hint is None:  # a ControlNet left off before one that is on (A1111's units name theirs)
            for row in per_row:
                row.append(off)
            continue
        values = list(hint) if isinstance(hint, (list, tuple)) else [hint] * batch
        if len(values) != batch:
            raise InputError(f"control image {j} must be one image or a list of {batch} (one per row), got {len(values)}")
        for row, value in enumerate(values):
            per_row[row].append(picture(FITS[fits[j]](read_image(value, f"control image {j}"), size.width,
                                                      size.height)))
    return tuple(tuple(row) for row in per_row)


def build_control(model: ModelInfo, control_image: Any, scale: Any, start: Any, end: Any, size: Size, batch: int,
                  hires: Size | None = None, mode: Any = None, guess_mode: bool = False, controlnet_model: Any = None,
                  slots: Any = None, resize_mode: Any = None) -> Control:
    """The request's Control group; nothing (Control()) without a control_image. hires: the second pass's
    size with hires fix (the hints are crop-resized for it too); slots: the engines' ControlNetSlots, for
    controlnet_model."""
    if control_image is None:
        given = [n for n, v in (("controlnet_conditioning_scale", scale), ("control_guidance_start", start),
                                ("control_guidance_end", end), ("control_mode", mode),
                                ("guess_mode", guess_mode or None), ("controlnet_model", controlnet_model),
                                ("control_resize_mode", resize_mode))
                 if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} set without a control_image: pass the hint image(s) as well")
        return Control()
    hints = _hints(model, control_image)
    count = len(hints)
    fits = tuple(_one_per_hint(resize_mode, count, CROP_AND_RESIZE, "control_resize_mode"))
    bad = [m for m in fits if m not in RESIZE_MODES]
    if bad:
        raise InputError(f"control_resize_mode {bad[0]!r} is not one of {', '.join(RESIZE_MODES)} (sd-webui-controlnet's; "
                         f"default {CROP_AND_RESIZE})")
    images = _hint_rows(hints, size, batch, fits)
    hires_images = _hint_rows(hints, hires, batch, fits) if hires is not None else ()
    scales = _per_controlnet(scale, count, 1.0, "controlnet_conditioning_scale")
    scales = tuple(0.0 if h is None else v for h, v in zip(hints, scales))
    starts = _per_controlnet(start, count, 0.0, "control_guidance_start")
    ends = _per_controlnet(end, count, 1.0, "control_guidance_end")
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise InputError(f"a ControlNet's guidance window must have 0 <= start < end <= 1 (fractions of the "
                             f"steps), got start {s}, end {e}")
    files = () if controlnet_model is None else _files(slots, controlnet_model, count)
    files += ("",) * (count - len(files))
    models = tuple("" if h is None else controlnet_label(f) if f else name  # "": off
                   for h, name, f in zip(hints, model.controlnets, files))
    return Control(images, models, scales, starts, ends, _modes(mode, guess_mode, count), files if any(files) else (),
                   hires_images, fits)

