"""sd-webui-controlnet's API units (`alwayson_scripts.controlnet.args`) -> make_config's ControlNet keywords.

A unit names its model (A1111 writes "name [hash]"; the hash is ignored), sends its hint as base64
(`image`, or the older `input_image`; a {"image": …} dict as the extension's newer clients send), and its
`weight`, `guidance_start` and `guidance_end`. Only what sdrt implements is accepted: the "none"
preprocessor (the image is the hint) and "canny" (`threshold_a` / `_b` its low / high thresholds, run at
the image's own size: `processor_res` is not applied), the three resize modes and the three control modes
(`control_mode` by name or index; sdrt.control gives their weights); anything else is refused by name.
Units are matched to the engines' ControlNets by name, so their order is free; a unit naming a model of
the server's ControlNet folder runs it in a slot no unit names (sdrt.controlnet_weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sdrt.errors import InputError
from sdrt.images import read_image
from sdrt.manifest import ModelInfo
from sdrt.preprocessors import canny
from sdrt.request import A1111_CONTROL_MODES, CROP_AND_RESIZE
from sdrt.request import RESIZE_MODES as REQUEST_RESIZE_MODES
from sdrt.serve.request_fields import decode_base64

SCRIPT = "controlnet"
NO_PREPROCESSOR = ("none", "None", None, "")
CANNY = "canny"
CANNY_THRESHOLDS = (100.0, 200.0)  # sd-webui-controlnet's defaults for threshold_a, threshold_b
# a unit's resize_mode, by name (the extension's older names too) or index -> sdrt.request.RESIZE_MODES
RESIZE_MODES: dict[Any, str] = {**{name: name for name in REQUEST_RESIZE_MODES}, **dict(enumerate(REQUEST_RESIZE_MODES)),
                                "Inner Fit (Scale to Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill",
                                "Outer Fit (Shrink to Fit)": "Resize and Fill", "Scale to Fit (Inner Fit)": "Crop and Resize"}
HR_BOTH = "Both"  # sd-webui-controlnet's hr_option default: the unit guides both passes of hires fix
# a unit's control_mode, by name or index -> sdrt's (sdrt.control)
CONTROL_MODES: dict[Any, str] = {**{name: mode for mode, name in A1111_CONTROL_MODES.items()},
                                 **dict(enumerate(A1111_CONTROL_MODES))}


def _unit_image(unit: Mapping[str, Any], i: int) -> bytes:
    value = unit.get("image") or unit.get("input_image")
    if isinstance(value, Mapping):
        value = value.get("image")
    if not isinstance(value, str) or not value:
        raise InputError(f"ControlNet unit {i} has no image: send its hint base64-encoded in `image`")
    return decode_base64(value, f"ControlNet unit {i} image")


def _plain(name: Any) -> str:
    return str(name or "").split(" [")[0].strip().lower()  # A1111 writes "name [hash]"


def _slots(units: dict[int, Any], model: ModelInfo,
           available: Mapping[str, Path]) -> tuple[dict[int, tuple[int, Any]], dict[int, Path]]:
    """The enabled units (by index) -> slot: (index, unit) of the ControlNet slot each runs in, and the file
    swapped into a slot.
    A unit naming an exported ControlNet takes its slot; one naming a file of the ControlNet folder takes
    the first slot left (its weights replace the exported ones: sdrt.controlnet_weights)."""
    exported = [have.lower() for have in model.controlnets]
    files = {name.lower(): path for name, path in available.items()}
    chosen: dict[int, Any] = {}
    swapped: dict[int, Path] = {}
    pending = []
    for i, unit in units.items():
        plain = _plain(unit.get("model"))
        if plain in exported:
            j = exported.index(plain)
            if j in chosen:
                raise InputError(f"ControlNet units {chosen[j][0]} and {i} both use {model.controlnets[j]}")
            chosen[j] = (i, unit)
        elif plain in files:
            pending.append((i, unit, files[plain]))
        else:
            listed = ", ".join([*model.controlnets, *available]) or "none (export with --controlnet)"
            raise InputError(f"ControlNet unit {i}: model {unit.get('model')!r} is neither in these engines nor "
                             f"in the ControlNet folder; there are: {listed} (GET /controlnet/model_list)")
    free = [j for j in range(len(model.controlnets)) if j not in chosen]
    if len(pending) > len(free):
        raise InputError(f"{len(units)} ControlNet units for engines with {len(model.controlnets)} ControlNet(s): "
                         "send at most one unit per ControlNet the engines were exported with")
    for j, (i, unit, path) in zip(free, pending):
        chosen[j], swapped[j] = (i, unit), path
    return chosen, swapped


def _preprocessed(unit: Mapping[str, Any], image: bytes, i: int) -> Any:
    """The unit's hint: the image itself, or its Canny edge map (an (H, W, 3) uint8 array)."""
    if unit.get("module", "none") != CANNY:
        return image
    low, high = (unit.get(k, d) for k, d in zip(("threshold_a", "threshold_b"), CANNY_THRESHOLDS))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise InputError(f"ControlNet unit {i}: canny's threshold_a and threshold_b must be numbers, got {low!r}, {high!r}")
    return canny(np.asarray(read_image(image, f"ControlNet unit {i} image")), float(low), float(high))


def _check_unit(unit: Mapping[str, Any], i: int) -> None:
    module = unit.get("module", "none")
    if module not in NO_PREPROCESSOR + (CANNY,):
        raise InputError(f"ControlNet unit {i}: preprocessor {module!r} is not implemented in sdrt (it has none and "
                         "canny); run it yourself and send its output as the image with module 'none'")
    fit = unit.get("resize_mode", CROP_AND_RESIZE)
    if isinstance(fit, bool) or not isinstance(fit, (str, int)) or fit not in RESIZE_MODES:
        raise InputError(f"ControlNet unit {i}: resize_mode {fit!r} is not one of "
                         f"{', '.join(repr(m) for m in REQUEST_RESIZE_MODES)} (or 0, 1, 2)")
    if unit.get("hr_option", HR_BOTH) not in (HR_BOTH, 0):
        raise InputError(f"ControlNet unit {i}: hr_option {unit['hr_option']!r} is not implemented; sdrt runs a unit in "
                         f"both passes of hires fix ({HR_BOTH!r}, the default)")
    mode = unit.get("control_mode", "Balanced")
    if isinstance(mode, bool) or not isinstance(mode, (str, int)) or mode not in CONTROL_MODES:
        raise InputError(f"ControlNet unit {i}: control_mode {mode!r} is not one of "
                         f"{', '.join(repr(k) for k in CONTROL_MODES if isinstance(k, str))} (or 0, 1, 2)")


def controlnet_keywords(scripts: Mapping[str, Any] | None, model: ModelInfo,
                        available: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """make_config's control_image, controlnet_conditioning_scale, control_guidance_start / _end, control_mode and
    controlnet_model for the enabled units (none: {}); ControlNets no unit names are off. available: the
    ControlNet folder's models (sdrt.controlnet_weights.available_controlnets)."""
    found = {k.lower(): v for k, v in (scripts or {}).items()}
    others = sorted(set(found) - {SCRIPT})
    if others:
        raise InputError(f"sdrt does not implement alwayson_scripts {', '.join(others)}: leave them unset")
    block = found.get(SCRIPT) or {}
    units = block.get("args", []) if isinstance(block, Mapping) else None
    if not isinstance(units, list) or not all(isinstance(u, Mapping) for u in units):
        raise InputError("alwayson_scripts.controlnet must be {\"args\": [unit, ...]}, each unit an object")
    enabled = {i: unit for i, unit in enumerate(units) if unit.get("enabled", True)}
    for i, unit in enabled.items():
        _check_unit(unit, i)
    slots, swapped = _slots(enabled, model, available or {})
    if not slots:
        return {}
    chosen = {j: dict(unit, image=_preprocessed(unit, _unit_image(unit, i), i)) for j, (i, unit) in slots.items()}
    count = max(chosen) + 1
    units_by_net = [chosen.get(j) for j in range(count)]
    files = {"controlnet_model": [swapped.get(j) for j in range(count)]} if swapped else {}
    return dict(control_image=[u["image"] if u else None for u in units_by_net] if len(model.controlnets) > 1
                else units_by_net[0]["image"],  # type: ignore[index]
                # the values as sent: build_request refuses what is not a finite number, naming the field
                controlnet_conditioning_scale=[u.get("weight", 1.0) if u else 0.0 for u in units_by_net],
                control_guidance_start=[u.get("guidance_start", 0.0) if u else 0.0 for u in units_by_net],
                control_guidance_end=[u.get("guidance_end", 1.0) if u else 1.0 for u in units_by_net],
                control_mode=[CONTROL_MODES[u.get("control_mode", "Balanced")] if u else "balanced"
                              for u in units_by_net],
                control_resize_mode=[RESIZE_MODES[u.get("resize_mode", CROP_AND_RESIZE)] if u else CROP_AND_RESIZE
                                     for u in units_by_net], **files)
