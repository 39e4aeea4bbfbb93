"""Pipeline: prompt -> images on exported engines, with no torch in the process.

A generation is its stages, each a module with one idea and the record it hands on:

    request (sdrt.request, checked once by sdrt.validation)
      -> conditioning (sdrt.conditioning: one text-encoder call for [negative; positive], 2B rows)
      -> start (sdrt.start: noise, images, masks, strength -> first latents and the step plan)
      -> loop (sdrt.loop: one denoise-step call a step at 2B rows, B when guidance ≤ 1)
      -> decode (sdrt.decode: one VAE call, one download of uint8 images) -> Result (sdrt.result)

Latents and sampler history stay in the backend's memory between steps. Pipeline owns the engines
and the buffers (sdrt.device) and composes the stages.
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sdrt.backends import select_backend
from sdrt.backends.base import Backend
from sdrt.conditioning import condition, skip_inputs, skip_rows
from sdrt.control import control_inputs, control_scale_rows
from sdrt.controlnet_weights import ControlNetSlots
from sdrt.decode import decode, finish, tiles_decode
from sdrt.device import Device
from sdrt.embeddings import Embeddings, use_embeddings
from sdrt.errors import InputError
from sdrt.families import CFG
from sdrt.hires import run_hires
from sdrt.loop import STOP, Callback, Cancelled, LoopInputs, denoise
from sdrt.loras import LoraIndex
from sdrt.manifest import ENCODER, STEP, Manifest, read_manifest
from sdrt.request import INPAINTING_FILLS, SEED_MAX, GenerationConfig, first_seed_max, random_seed
from sdrt.result import Result, Timings
from sdrt.schedulers import NoiseSchedule, SamplerPlan
from sdrt.start import initial_noise, plan_for, start
from sdrt.tokenizer import load_tokenizer
from sdrt.validation import Accepts, build_request

__all__ = ["Pipeline", "GenerationConfig", "Result", "Timings", "STOP", "Cancelled", "INPAINTING_FILLS", "SEED_MAX",
           "first_seed_max", "random_seed"]


class Pipeline:
    """`Pipeline.load("engines/NAME")("a prompt", steps=20)` -> list of PIL images."""

    def __init__(self, engine_dir: Path, manifest: Manifest, backend: Backend, low_vram: bool = False,
                 vae_tile: int = 512, lora_dir: Path | None = None):
        self.engine_dir = Path(engine_dir)
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None  # where prompts' <lora:NAME> resolve
        self.manifest = manifest
        self.backend = backend
        self.low_vram = low_vram
        self.vae_tile = vae_tile  # pixels; low-VRAM mode decodes larger images in tiles of this size
        self.limits = backend.limits(manifest)
        self.schedule = NoiseSchedule.from_config(manifest.scheduler_config)
        self.model = manifest.model
        self.tokenizers = {t.tokenizer: load_tokenizer(self.engine_dir / t.tokenizer, t.kind, t.max_length)
                           for t in self.model.text_encoders}
        self.device = Device(backend, self.engine_dir, manifest, low_vram)
        self.loras: tuple[tuple[str, float], ...] = ()  # set_loras': applied to configs that name none
        self.embeddings = use_embeddings(self.tokenizers, manifest, None)

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str | Backend = "auto", verify: bool = True,
             low_vram: bool = False, vae_tile: int = 512, lora_dir: str | Path | None = None,
             optimized: bool = True, embeddings_dir: str | Path | None = None) -> "Pipeline":
        """low_vram: one engine resident at a time, and VAE decode in vae_tile-pixel tiles above that size;
        lora_dir: the folder prompts' `<lora:NAME:WEIGHT>` tags name files in (A1111's); optimized: ONNX
        Runtime runs the graphs `sdrt optimize` wrote for its device, where there are some; embeddings_dir:
        A1111's embeddings/ folder (load_embeddings)."""
        engine_dir = Path(engine_dir)
        manifest = read_manifest(engine_dir)
        chosen = select_backend(backend, manifest, optimized) if isinstance(backend, str) else backend
        if verify:
            chosen.verify(engine_dir, manifest)
        pipe = cls(engine_dir, manifest, chosen, low_vram=low_vram, vae_tile=vae_tile, lora_dir=lora_dir)
        pipe.load_embeddings(embeddings_dir)
        if not low_vram:  # the VAE encoder loads with the first image in: text-to-image never pays its memory
            for name in manifest.model.components:
                if name != ENCODER:
                    pipe.device.engines[name]
        return pipe

    def load_embeddings(self, folder: str | Path | None) -> Embeddings:
        """The textual-inversion embeddings under `folder` (None: none), by file name as prompt words
        (sdrt.embeddings); replaces those loaded before. Returns what loaded and what was skipped, and why."""
        self.embeddings = use_embeddings(self.tokenizers, self.manifest, None if folder is None else Path(folder))
        return self.embeddings

    # --- LoRA ---------------------------------------------------------------------------------

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> None:
        """The LoRAs (file, weight) every later generation applies unless its config names its own;
        [] for none. Applied now: the engines' weights become base + Σ deltas (sdrt.loras)."""
        checked = self._lora_index.check(loras)
        self._apply_loras(checked)  # raises before anything changes on a LoRA that does not fit
        self.loras = checked

    @cached_property
    def _lora_index(self) -> LoraIndex:
        return LoraIndex(self.engine_dir, self.manifest)

    @cached_property
    def _controlnet_slots(self) -> ControlNetSlots:
        return ControlNetSlots(self.engine_dir, self.manifest)

    def _apply_loras(self, loras: tuple[tuple[str, float], ...], controlnets: tuple[str, ...] = ()) -> None:
        """Sets the engines' weights to base + the deltas of loras (weight-0 LoRAs change nothing), and the
        ControlNets' to those of `controlnets` (Control.files: "" keeps the exported ones)."""
        if (loras, controlnets) != self.device.engines.adapters:
            weights = self._lora_index.weights(loras)
            if any(controlnets):  # the ControlNets' parameters, apart from the U-Net's that LoRAs change
                weights[STEP] = {**weights.get(STEP, {}), **self._controlnet_slots.all_weights(controlnets)}
            self.device.engines.set_weights((loras, controlnets), weights)

    def apply_weights(self, config: GenerationConfig) -> None:
        """Puts config's LoRAs and ControlNet weights into the engines now (generate does it when they differ
        from the last request's): a caller can pay a switch before the first step."""
        self._apply_loras(config.prompts.loras, config.control.files)

    # --- the request --------------------------------------------------------------------------

    @property
    def accepts(self) -> Accepts:
        """What these engines accept, for sdrt.validation (read anew: limits and LoRAs may be set after load)."""
        step_rows = None
        if self.limits.kind != "onnx":  # the step plan's CFG conditioning profile
            name = next(c.name for c in self.model.conditioning if c.layout == CFG)
            step_rows = self.manifest.plans.components[STEP].profile[name]["max"][0]
        return Accepts(self.limits, self.model, self.schedule, tuple(self.tokenizers.values()), self._lora_index,
                       self.lora_dir, self.loras, self.manifest.skippable_blocks, step_rows, self._controlnet_slots)

    def make_config(self, prompt: str | list[str], **keywords: Any) -> GenerationConfig:
        """The request, validated against the engines' limits (sdrt.validation.build_request).

        Keywords, diffusers' names: negative_prompt, steps, guidance, scheduler, seed (row i uses seed + i),
        seeds (one per row), height, width, batch (default: the number of prompts); SDXL's micro-conditioning
        original_size, crop_top_left, target_size ((height, width) pixels; sizes default to the image's);
        image (img2img) and mask_image (inpainting; white = repaint): a PIL image, a uint8 array or encoded
        bytes, or a list of one per row; the size defaults to the image's, rounded down to the latent grid.
        strength (0, 1] (default 0.75; 1.0 for inpainting U-Nets), mask_blur, inpainting_fill ("original",
        "latent noise", "latent nothing"), inpainting_mask_invert; clip_skip (A1111's numbering, 1 = the
        last layer); loras: (file, weight) pairs (default: set_loras'), and prompts' `<lora:NAME:WEIGHT>`
        tags add lora_dir's NAME.safetensors; max_rows: more rows than the engines' batch, for a caller that
        runs them as successive engine calls (the server: A1111's n_iter); skip_guidance_layers,
        skip_layer_guidance_scale, _start, _stop: SD 3.5's skip-layer guidance (Medium's layers: [7, 8, 9]).
        image_latents: img2img from (C, h, w) latents per row; enable_hr and A1111's hr_ fields: hires fix (sdrt.hires).
        control_image (one per ControlNet, each an image or one per row), controlnet_conditioning_scale,
        control_guidance_start, _end, guess_mode, control_mode: engines exported with ControlNets
        (sdrt.control_request, sdrt.control); control_resize_mode (sd-webui-controlnet's: "Crop and Resize",
        "Just Resize", "Resize and Fill"); controlnet_model: other ControlNets of the same architecture
        to run instead of the exported ones (a path, one per ControlNet, or {exported name: path};
        sdrt.controlnet_weights).
        Prompts are read as A1111 does (sdrt.prompts): `(emphasis:1.2)`, `[less]`, `BREAK`, 75-token chunks."""
        return build_request(self.accepts, prompt, **keywords)

    def engine_batch(self, config: GenerationConfig) -> int:
        """The most of config's images one engine call takes (generate()'s limit; the server's batches)."""
        return self.accepts.engine_batch(config)

    def __call__(self, prompt: str | list[str], **kwargs: Any) -> list[Any]:
        return self.generate(self.make_config(prompt, **kwargs)).pil_images()

    # --- generation -------------------------------------------------------------------------

    def initial_noise(self, config: GenerationConfig,
                      plan: SamplerPlan | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, 4, h, w) initial noise and (steps run, B, 4, h, w) step noise (None if unused)."""
        return initial_noise(self.model, config, plan or plan_for(config, self.schedule))

    def encode_prompt(self, config: GenerationConfig) -> dict[str, np.ndarray]:
        """The step's conditioning for config, on the host: (R·B, 77·chunks, C) text embeddings,
        [negative; positive] rows with CFG, and the family's other conditioning (diffusers' encode_prompt)."""
        return {name: self.backend.download(buffer).copy()
                for name, buffer in condition(self.device, self.tokenizers, config).items()}

    def generate(self, config: GenerationConfig, latents: np.ndarray | None = None,
                 callback: Callback | None = None, keep_latents: bool = False) -> Result:
        """Runs one generation (hires fix: both passes). latents: optional (B, 4, h, w) initial noise (before σ_max
        scaling). keep_latents: the result carries the final latents too (one download).

        callback(done, total) runs after every step; it may return the batch rows still wanted
        (indices into config's rows): the others are dropped before the next step, and when none
        is left the generation stops with `Cancelled`. It may return STOP: the loop ends there and
        the latents are decoded as they are (A1111's interrupt and skip; the images stay noisy).
        """
        if config.hires.enabled:
            return run_hires(self, config, latents, callback)
        started, timings, requested = time.perf_counter(), Timings(), config
        top = self.engine_batch(config)
        if config.batch > top:
            raise InputError(f"{config.batch} rows exceed the engines' batch of {top}: generate "
                             "them in parts (the server runs such requests as successive batches)")
        if self.limits.batch[0] > config.batch:  # plans of one batch size: copies of the last row run, then go
            config = config.padded(self.limits.batch[0] - config.batch)
        self.apply_weights(config)

        t0 = time.perf_counter()
        inputs = condition(self.device, self.tokenizers, config)
        self.backend.synchronize()
        timings.text_encoder_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = start(self.device, config, self.schedule, latents, requested.batch)
        timings.image_encoder_s = time.perf_counter() - t0 if config.image.images else 0.0

        t0 = time.perf_counter()
        end = denoise(self.device, self._loop_inputs(config, first.plan, inputs | first.image_inputs, first.step_noise),
                      first.latents, requested.batch, self.limits.batch[0], callback)
        timings.loop_s, timings.step_engine_s = end.loop_s, end.step_engine_s
        timings.steps_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        height, width = config.size.height, config.size.width
        tile = self.vae_tile if tiles_decode(self.limits, self.low_vram, self.vae_tile, height, width) else None
        images = finish(decode(self.device, end.latents, len(end.in_batch), height, width, tile), config,
                        end.in_batch, end.alive)
        timings.decode_s = time.perf_counter() - t0
        timings.total_s = time.perf_counter() - started
        seeds = [config.row_seeds[row] for row in end.alive]
        kept = self.backend.download(end.latents)[[end.in_batch.index(r) for r in end.alive]] if keep_latents else None
        return Result(images, requested, seeds, timings, self.manifest.name, self.manifest.model_hash, end.alive, kept)

    def _loop_inputs(self, config: GenerationConfig, plan: SamplerPlan, inputs: dict[str, Any],
                     step_noise: np.ndarray | None) -> LoopInputs:
        """Everything the loop reads besides its state, written once into reused buffers."""
        n, write = len(plan), self.device.buffers.write
        inputs = inputs | skip_inputs(self.device, config) | control_inputs(self.device, config)
        skip_steps = config.skip.steps(n)
        return LoopInputs(
            timesteps=self.backend.rows(write("timesteps", plan.timesteps.astype(np.float32).reshape(n, 1))),
            coeffs=self.backend.rows(write("step_coeffs", plan.coeffs.astype(np.float32))),
            guidance=write("guidance", np.array([config.guidance.scale], np.float32)),
            inputs=inputs, step_noise=step_noise, skip_steps=skip_steps,
            skip_rows=skip_rows(self.device, inputs, config.batch) if skip_steps else {},
            control_scales=control_scale_rows(self.device, config, n))
