"""The denoise step's ControlNet inputs: each ControlNet's hints on the device, and its conditioning scale
per engine call (its guidance window applied through the scale, so every call runs the same graph).

The hints stay (B, H, W, 3) uint8 on the device: the step graph converts them (diffusers' control image
processor, [0, 1] without normalization) and repeats them for the CFG rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdrt.device import Device
from sdrt.families import CONTROL_SCALES
from sdrt.request import Control, GenerationConfig


def step_scales(control: Control, count: int, calls: int) -> np.ndarray:
    """(calls, count) f32: ControlNet j's scale where call i of n lies in its window, else 0 (diffusers'
    controlnet_keep: off where i/n < start or (i + 1)/n > end; n counts engine calls, as diffusers' timesteps
    do for the two-call samplers); 0 for the ControlNets given no hint."""
    scales = np.zeros((calls, count), np.float32)
    i = np.arange(calls)
    for j, (scale, start, end) in enumerate(zip(control.scales, control.start, control.end)):
        inside = ~((i / calls < start) | ((i + 1) / calls > end))
        scales[:, j] = np.where(inside, np.float32(scale), np.float32(0))
    return scales


def control_inputs(device: Device, config: GenerationConfig) -> dict[str, Any]:
    """The step's hint inputs by name: the given hints, zeros for ControlNets given none."""
    given = len(config.control.scales)
    shape = (config.batch, config.size.height, config.size.width, 3)
    return {name: device.buffers.write(name, np.stack([row[j].pixels for row in config.control.images])
                                       if j < given else np.zeros(shape, np.uint8))
            for j, name in enumerate(device.model.control_inputs)}


def control_scale_rows(device: Device, config: GenerationConfig, calls: int) -> list[Any] | None:
    """Bindable (count,) scale rows, one per engine call; None for engines without ControlNets."""
    count = len(device.model.controlnets)
    if not count:
        return None
    return device.backend.rows(device.buffers.write(CONTROL_SCALES, step_scales(config.control, count, calls)))
