"""The conditioning stage: prompts -> encoder feeds -> the step's named conditioning inputs.

The text encoders run once on [negative; positive] prompts (positive alone without classifier-free
guidance); the family's contract (sdrt.families) says which inputs the step takes and in which row
layout, and the host computes the rest (SDXL's time_ids) once per generation, never per step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from sdrt.device import Device
from sdrt.embeddings import TOKEN_ROWS, compact_rows
from sdrt.errors import EngineError
from sdrt.families import CFG, HOST, stack_rows
from sdrt.manifest import STEP
from sdrt.request import GenerationConfig


def time_ids(config: GenerationConfig) -> np.ndarray:
    """(B, 6) float32 SDXL add_time_ids: original size, crop top-left, target size."""
    size, micro = (config.size.height, config.size.width), config.micro
    row = (*(micro.original_size or size), *micro.crop_top_left, *(micro.target_size or size))
    return np.tile(np.array(row, np.float32), (config.batch, 1))


# Conditioning the host computes from the request: (B, ...) rows, by step input name.
HOST_CONDITIONING: dict[str, Callable[[GenerationConfig], np.ndarray]] = {"time_ids": time_ids}


def text_rows(config: GenerationConfig, zero_empty_negative: bool) -> tuple[list[str], np.ndarray]:
    """The encoders' rows, [negative; positive] with CFG, and per row 1, or 0 where its embeddings are
    zeros (no negative given, on a family that forces zeros: force_zeros_for_empty_prompt)."""
    prompts = config.prompts
    negatives = [negative or "" for negative in prompts.negative_prompt]
    texts = negatives + list(prompts.prompt) if config.cfg else list(prompts.prompt)
    keep = np.ones(len(texts), np.float32)
    if config.cfg and zero_empty_negative:
        keep[: config.batch] = [float(negative is not None) for negative in prompts.negative_prompt]
    return texts, keep


def condition(device: Device, tokenizers: Mapping[str, Any], config: GenerationConfig) -> dict[str, Any]:
    """Every conditioning input of the step, in device buffers, by name."""
    model, buffers = device.model, device.buffers
    texts, keep = text_rows(config, model.zero_empty_negative)
    keep_buffer = buffers.write("keep", keep)
    outputs: dict[str, Any] = {}
    for slot in model.text_encoders:
        spec = device.manifest.components[slot.component]
        tokenizer = tokenizers[slot.tokenizer]
        ids, weights = tokenizer(texts, config.prompts.chunks)
        feeds = {"keep": keep_buffer}
        if any(t.name == TOKEN_ROWS for t in spec.inputs):
            ids, rows = compact_rows(ids, tokenizer.rows, spec.input(TOKEN_ROWS).shape[1])
            feeds[TOKEN_ROWS] = buffers.write(f"{TOKEN_ROWS}:{slot.component}", rows)
        elif (ids < 0).any():
            raise EngineError(f"{slot.component} was exported before sdrt took textual-inversion embeddings: "
                              "re-export the engines with `sdrt export` to use them")
        feeds["input_ids"] = buffers.write(f"input_ids:{slot.component}", ids)
        feeds["token_weights"] = buffers.write(f"token_weights:{slot.component}", weights)
        if slot.clip_skip:
            feeds["clip_skip"] = buffers.write("clip_skip", np.array([config.prompts.clip_skip], np.int64))
        dims = {"N": len(texts), "S": ids.shape[1]}
        written = {t.name: buffers.get(t.name, t.resolve(dims), t.dtype) for t in spec.outputs}
        device.engines[slot.component].run(feeds, written)
        outputs.update(written)
    step = device.manifest.components[STEP]
    for c in model.conditioning:
        if c.source == HOST:
            rows = stack_rows(c.layout, HOST_CONDITIONING[c.name](config), config.cfg)
            outputs[c.name] = buffers.write(c.name, rows.astype(step.input(c.name).dtype))
    return {c.name: outputs[c.name] for c in model.conditioning}


def skip_inputs(device: Device, config: GenerationConfig) -> dict[str, Any]:
    """The step's skip-layer guidance inputs, where it takes them: (L,) block flags and (1,) scale."""
    count = device.manifest.skippable_blocks
    if not count:
        return {}
    flags = np.zeros(count, np.float32)
    flags[list(config.skip.layers)] = 1.0
    return {"skip_layers": device.buffers.write("skip_layers", flags),
            "skip_scale": device.buffers.write("skip_scale", np.array([config.skip.scale], np.float32))}


def skip_rows(device: Device, inputs: Mapping[str, Any], b: int) -> dict[str, Any]:
    """The CFG conditioning at 3B rows, [uncond; cond; cond], for the steps of skip-layer guidance."""
    out = {}
    for c in device.model.conditioning:
        if c.layout == CFG:
            host = device.buffers.download(inputs[c.name])  # (2B, ...)
            out[c.name] = device.buffers.write(f"{c.name}:skip", np.concatenate([host, host[b:]]))
    return out
