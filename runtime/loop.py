"""The denoise loop: one engine call a step on ping-pong buffers, rows dropped between steps,
stopped early on request.

Step i reads buffer set i % 2 and writes set (i + 1) % 2; every feed is bound before the loop, so a
step costs the engine call and nothing else. A callback may drop rows (a client that went away):
the state makes one round trip through the host, paid only then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from sdrt.conditioning import skip_rows
from sdrt.device import Device
from sdrt.errors import SdrtError
from sdrt.families import CONTROL_SCALES, ROW, layout_rows
from sdrt.manifest import STEP

Callback = Callable[[int, int], Sequence[int] | None]


class Cancelled(SdrtError):
    """Every row of a generation was dropped (e.g. all its clients went away)."""


class _Stop:
    def __repr__(self) -> str:
        return "STOP"


STOP: Any = _Stop()  # a step callback's answer: end the loop now, decode the latents as they are


@dataclass
class LoopInputs:
    """What the loop binds besides the sampler state: rows of per-step buffers, and the rest."""

    timesteps: list[Any]
    coeffs: list[Any]
    guidance: Any
    inputs: dict[str, Any]  # the step's inputs besides the sampler state (conditioning, image inputs) by name
    step_noise: np.ndarray | None  # (steps, B, 4, h, w) on the host, None for deterministic samplers
    skip_steps: frozenset[int] = frozenset()  # the steps of skip-layer guidance: they take skip_rows' inputs
    skip_rows: dict[str, Any] = field(default_factory=dict)  # CFG conditioning at 3B rows, by name
    control_scales: list[Any] | None = None  # rows of the ControlNets' scales per step (sdrt.control); None: none


@dataclass
class LoopEnd:
    latents: Any  # (len(in_batch), 4, h, w) on the device
    in_batch: list[int]  # the config rows the buffers hold
    alive: list[int]  # the config rows still wanted (a subset of in_batch)
    loop_s: float
    step_engine_s: list[float]


def denoise(device: Device, loop: LoopInputs, latents: np.ndarray, wanted_rows: int, min_batch: int,
            callback: Callback | None = None) -> LoopEnd:
    """Runs the plan's n steps from (B, 4, h, w) latents, with the model's sampler history slots.
    wanted_rows: the rows the caller asked for (the rest pad a static batch); rows are compacted only
    while at least min_batch stay (a static plan takes one batch size: there dropped rows run on)."""
    n = len(loop.timesteps)
    zeros = np.zeros((device.model.history,) + latents.shape, np.float32)  # 0 * uninitialized memory could be NaN
    sets, feeds = bind(device, loop, {"latents": latents, "x_history": zeros, "out_history": zeros}, 0, n)
    step = device.engines[STEP]
    in_batch = list(range(latents.shape[0]))
    alive = list(range(wanted_rows))
    step.start_timing()
    loop_start = time.perf_counter()
    done = n
    for i in range(n):
        step.run(*feeds[i])  # feeds may be rebuilt below, so indexed rather than iterated
        wanted = callback(i + 1, n) if callback is not None else None
        if wanted is STOP:
            done = i + 1
            break
        if wanted is not None:
            wanted = set(wanted)
            alive = [row for row in alive if row in wanted]
            if not alive:
                raise Cancelled(f"generation stopped after step {i + 1} of {n}: no row is wanted any more")
            if len(alive) < len(in_batch) and i + 1 < n and len(alive) >= min_batch:
                keep = [in_batch.index(row) for row in alive]
                sets, feeds = drop_rows(device, loop, sets[(i + 1) % 2], keep, len(in_batch), i + 1, n)
                in_batch = alive
    device.backend.synchronize()
    return LoopEnd(sets[done % 2]["latents"], in_batch, alive, time.perf_counter() - loop_start, step.run_times_s())


def bind(device: Device, loop: LoopInputs, state: dict[str, np.ndarray], start: int,
         n: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """Writes the loop state into set start % 2 and prebuilds the feeds of steps start..n-1."""
    buffers = device.buffers
    lat_shape = state["latents"].shape
    k = state["x_history"].shape[0]
    sets = [{name: buffers.get(f"{name}{s}", shape, "float32") for name, shape in (
        ("latents", lat_shape), ("x_history", (k,) + lat_shape), ("out_history", (k,) + lat_shape))}
        for s in range(2)]
    for name, array in state.items():
        device.backend.write(sets[start % 2][name], np.ascontiguousarray(array))
    noise = device.backend.rows(buffers.write("noise", loop.step_noise if loop.step_noise is not None
                                              else np.zeros((1,) + lat_shape, np.float32)))
    feeds: list[Any] = [None] * n
    for i in range(start, n):
        src, dst = sets[i % 2], sets[(i + 1) % 2]
        feeds[i] = (
            {"latents": src["latents"], "timestep": loop.timesteps[i], **loop.inputs,
             **(loop.skip_rows if i in loop.skip_steps else {}),
             **({CONTROL_SCALES: loop.control_scales[i]} if loop.control_scales is not None else {}),
             "guidance": loop.guidance, "step_coeffs": loop.coeffs[i], "x_history": src["x_history"],
             "out_history": src["out_history"], "noise": noise[i if loop.step_noise is not None else 0]},
            {"latents_next": dst["latents"], "x_history_next": dst["x_history"],
             "out_history_next": dst["out_history"]})
    return sets, feeds


def drop_rows(device: Device, loop: LoopInputs, current: dict[str, Any], keep: list[int], b: int, start: int,
              n: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """Shrinks the batch of b rows to rows `keep` before step `start`."""
    download = device.buffers.download
    state = {"latents": download(current["latents"])[keep],
             "x_history": download(current["x_history"])[:, keep],
             "out_history": download(current["out_history"])[:, keep]}
    model = device.model
    layouts = {c.name: c.layout for c in model.conditioning} | dict.fromkeys(
        model.image_inputs + model.control_inputs, ROW)
    for name, layout in layouts.items():
        host = download(loop.inputs[name])
        rows = layout_rows(layout, keep, b, host.shape[0])
        loop.inputs[name] = device.buffers.write(name, np.ascontiguousarray(host[rows]))
    if loop.skip_rows:  # rebuilt from the kept rows
        loop.skip_rows = skip_rows(device, loop.inputs, len(keep))
    if loop.step_noise is not None:
        loop.step_noise = np.ascontiguousarray(loop.step_noise[:, keep])
    return bind(device, loop, state, start, n)

