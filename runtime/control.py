"""The denoise step's ControlNet inputs: each ControlNet's hints on the device, and its weights per engine
call (its guidance window applied through them, so every call runs the same graph).

The hints stay (B, H, W, 3) uint8 on the device: the step graph converts them (diffusers' control image
processor, [0, 1] without normalization) and repeats them for the CFG rows. The weights are
(J, 2, R) per call: ControlNet j's multiplier of its residual r (R: the down-block residuals, then the
mid block's) on the negative rows (0) and on the prompt's rows (1; all rows without CFG). The control
modes are those weights:
  balanced   the scale everywhere (diffusers' default, sd-webui-controlnet's "Balanced")
  prompt     scale · 0.825^(12 − r) on every row ("My prompt is more important": its soft injection;
             SDXL's 10 residuals take the first 10 of SD 1.x's 13 weights, as the extension does)
  control    the same on the prompt's rows, 0 on the negative rows ("ControlNet is more important":
             soft plus CFG injection)
  guess      scale · logspace(−1, 0, R) on the prompt's rows, 0 on the negative rows (diffusers' guess_mode)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdrt.device import Device
from sdrt.errors import EngineError
from sdrt.families import CONTROL_SCALES
from sdrt.request import Control, GenerationConfig


SOFT_INJECTION = 0.825  # sd-webui-controlnet's per-residual decay, 0.825^(12 - r)


def mode_weights(mode: str, residuals: int) -> np.ndarray:
    """(2, residuals) f64: a control mode's multipliers of the scale on the negative rows and the prompt's."""
    r = np.arange(residuals)
    per_residual = {"balanced": np.ones(residuals), "prompt": SOFT_INJECTION ** (12.0 - r),
                    "control": SOFT_INJECTION ** (12.0 - r), "guess": np.logspace(-1, 0, residuals)}[mode]
    negative = per_residual if mode in ("balanced", "prompt") else np.zeros(residuals)
    return np.stack([negative, per_residual])


def step_scales(control: Control, count: int, calls: int, residuals: int) -> np.ndarray:
    """(calls, count, 2, residuals) f32: ControlNet j's weights where call i of n lies in its window, else 0
    (diffusers' controlnet_keep: off where i/n < start or (i + 1)/n > end; n counts engine calls, as
    diffusers' timesteps do for the two-call samplers); 0 for the ControlNets given no hint."""
    scales = np.zeros((calls, count, 2, residuals), np.float32)
    i = np.arange(calls)
    for j, (scale, start, end, mode) in enumerate(zip(control.scales, control.start, control.end, control.modes)):
        inside = ~((i / calls < start) | ((i + 1) / calls > end))
        scales[:, j] = (inside[:, None, None] * scale * mode_weights(mode, residuals)).astype(np.float32)
    return scales


def control_inputs(device: Device, config: GenerationConfig) -> dict[str, Any]:
    """The step's hint inputs by name: the given hints, zeros for ControlNets given none."""
    given = len(config.control.scales)
    shape = (config.batch, config.size.height, config.size.width, 3)
    return {name: device.buffers.write(name, np.stack([row[j].pixels for row in config.control.images])
                                       if j < given else np.zeros(shape, np.uint8))
            for j, name in enumerate(device.model.control_inputs)}


def control_scale_rows(device: Device, config: GenerationConfig, calls: int) -> list[Any] | None:
    """Bindable (count, 2, R) weight rows, one per engine call; None for engines without ControlNets."""
    model = device.model
    if not model.controlnets:
        return None
    if not model.control_residuals:  # engines exported before the weights were per residual: (J,) scales
        raise EngineError("these engines' ControlNet step takes one scale per ControlNet (an older sdrt export); "
                          "re-export them with `sdrt export ... --controlnet`")
    scales = step_scales(config.control, len(model.controlnets), calls, model.control_residuals)
    return device.backend.rows(device.buffers.write(CONTROL_SCALES, scales))
