"""Pipeline: prompt -> images on exported engines, with no torch in the process.

One text-encoder call for [negative; positive] (2B), one denoise-step call per step at 2B (B when
guidance ≤ 1), latents and sampler history in the backend's memory between steps (ping-pong
buffers), one VAE decode, one download of uint8 images.

Noise: image i of a batch uses seed + i; its initial latents are the first draw of
numpy.random.Generator(PCG64(seed + i)).standard_normal((4, h, w), float32) and, for ancestral
samplers, the per-step noise is drawn next from the same generator, (steps, 4, h, w) at once.
So image i of a batch equals the single image made with seed + i.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sdrt.backends import select_backend
from sdrt.backends.base import Backend, Engine
from sdrt.errors import InputError, SdrtError, check_text, is_integer
from sdrt.families import CFG, CONCAT, HOST, ROW, layout_rows, stack_rows
from sdrt.images import (Picture, latent_mask, mask_picture, overlay, picture, pixel_mask, read_image, read_mask,
                         resized)
from sdrt.loras import TAG, LoraIndex, prompt_loras
from sdrt.manifest import ENCODER, STEP, Manifest, read_manifest
from sdrt.schedulers import NoiseSchedule, SamplerPlan, check_sampler, make_plan, strength_start
from sdrt.tiling import decode_tiled
from sdrt.tokenizer import load_tokenizer

SEED_MAX = 2**32 - 1  # A1111's range: every row's seed (seed + i) from 0 to 2**32 - 1


def first_seed_max(count: int) -> int:
    """The largest first seed of `count` consecutive rows (seed + i ≤ SEED_MAX)."""
    return SEED_MAX - count + 1


def random_seed(count: int) -> int:
    return secrets.randbelow(first_seed_max(count) + 1)


# The fields of a GenerationConfig that hold one entry per image. Every other field is shared by the
# batch: padding a static batch, dropping a row and the server's batching key all derive from this.
ROW_FIELDS = ("prompt", "negative_prompt", "seeds", "images", "masks")
# A1111's inpainting_fill values sdrt implements (0, "fill", paints the masked area from its surroundings)
INPAINTING_FILLS = {1: "original", 2: "latent noise", 3: "latent nothing"}
MAX_MASK_BLUR = 64
MAX_GUIDANCE = 100.0  # far past any useful scale (A1111's UI stops at 30); keeps the graph's math finite


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that decides an image; validated once, then passed down."""

    prompt: tuple[str, ...]
    # None: no negative prompt given (diffusers' negative_prompt=None): zeros where the family forces them
    # (force_zeros_for_empty_prompt), else the encoded "". An explicit "" is always encoded.
    negative_prompt: tuple[str | None, ...]
    steps: int = 25
    guidance: float = 7.5
    scheduler: str = "dpmpp_2m_karras"
    seed: int = 0  # row 0's seed; row i uses seed + i unless `seeds` is set
    height: int = 512
    width: int = 512
    seeds: tuple[int, ...] = ()  # one per row when rows come from different requests
    # SDXL micro-conditioning (Podell et al. 2023, 2.2), (height, width) pixels; None: the image size
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    # image-to-image and inpainting; both empty: text-to-image
    images: tuple[Picture, ...] = ()  # one per row, already resized to width x height
    masks: tuple[Picture, ...] = ()  # one per row (inpainting), 255 = repaint, 0 = keep; empty: img2img
    strength: float = 1.0  # diffusers' strength, A1111's denoising strength: the last ⌊steps × strength⌋ run
    mask_blur: int = 4  # pixels of Gaussian blur where the original is composited back (A1111's mask_blur)
    inpainting_fill: str = "original"  # the masked area's start (inpainting only): a value of INPAINTING_FILLS
    clip_skip: int = 1  # A1111's: condition on CLIP's layer `clip_skip` from the output (1 = the last)
    chunks: int = 1  # 75-token prompt chunks every text row is encoded in (the longest prompt's)
    loras: tuple[tuple[str, float], ...] = ()  # (resolved path, weight) of each LoRA applied (sdrt.loras)
    # SD 3.5's skip-layer guidance (diffusers' skip_guidance_layers, _scale, _start, _stop): on the steps i
    # of n with start·n < i < stop·n, a third row group skips these blocks; () for none
    skip_layers: tuple[int, ...] = ()
    skip_scale: float = 2.8
    skip_start: float = 0.01
    skip_stop: float = 0.2

    @property
    def row_seeds(self) -> tuple[int, ...]:
        return self.seeds or tuple(self.seed + i for i in range(self.batch))

    @property
    def batch(self) -> int:
        return len(self.prompt)

    @property
    def mode(self) -> str:
        return "inpaint" if self.masks else "img2img" if self.images else "txt2img"

    @cached_property  # compared over and over while the server's queue waits for a batch
    def batch_key(self) -> tuple[Any, ...]:
        """What rows must share to run in one engine call: every field but the per-row ones, and the mode."""
        shared = tuple(getattr(self, f.name) for f in fields(self) if f.name not in ROW_FIELDS + ("seed",))
        return shared + (self.mode,)

    def select(self, rows: Sequence[int]) -> "GenerationConfig":
        """This config's rows `rows` (repeats allowed), as a config of its own."""
        return GenerationConfig.of_rows([(self, r) for r in rows])

    @classmethod
    def of_rows(cls, rows: Sequence[tuple["GenerationConfig", int]]) -> "GenerationConfig":
        """One config of rows taken from configs that share a batch key (the server's batches)."""
        first = rows[0][0]
        if any(config.batch_key != first.batch_key for config, _ in rows):
            raise ValueError("rows of configs with different batch keys cannot share an engine call")
        seeds = tuple(config.row_seeds[r] for config, r in rows)
        picked = {name: tuple(getattr(config, name)[r] for config, r in rows) if getattr(first, name) else ()
                  for name in ROW_FIELDS if name != "seeds"}  # images, masks: empty for the whole batch or none
        return replace(first, **picked, seeds=seeds, seed=seeds[0])

    def padded(self, extra: int) -> "GenerationConfig":
        """This config with `extra` copies of its last row appended."""
        return self.select(list(range(self.batch)) + [self.batch - 1] * extra)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance only above 1, as diffusers: at or below it, the conditional half alone."""
        return self.guidance > 1.0

    def skip_steps(self, n: int) -> frozenset[int]:
        """The steps (of n run) with skip-layer guidance: start·n < i < stop·n, as diffusers' SD3 pipeline."""
        if not self.skip_layers:
            return frozenset()
        return frozenset(i for i in range(n) if n * self.skip_start < i < n * self.skip_stop)

    def time_ids(self) -> np.ndarray:
        """(B, 6) float32 SDXL add_time_ids: original size, crop top-left, target size."""
        size = (self.height, self.width)
        row = (*(self.original_size or size), *self.crop_top_left, *(self.target_size or size))
        return np.tile(np.array(row, np.float32), (self.batch, 1))


# Conditioning the host computes from the request, once per generation (never per step): (B, ...) rows.
HOST_CONDITIONING: dict[str, Callable[[GenerationConfig], np.ndarray]] = {
    "time_ids": GenerationConfig.time_ids,
}


@dataclass
class Timings:
    text_encoder_s: float = 0.0
    image_encoder_s: float = 0.0  # the VAE encoder, image-to-image and inpainting
    steps_s: float = 0.0  # uploads of the plan and noise + the loop
    loop_s: float = 0.0  # the loop alone
    step_engine_s: list[float] = field(default_factory=list)
    decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def host_overhead_per_step_s(self) -> float:
        """Loop time not spent inside the engine call, per step."""
        n = max(len(self.step_engine_s), 1)
        return max(self.loop_s - sum(self.step_engine_s), 0.0) / n

    def line(self) -> str:
        n = max(len(self.step_engine_s), 1)
        encoder = f"image encoder {self.image_encoder_s * 1e3:.1f} ms | " if self.image_encoder_s else ""
        return (f"text encoder {self.text_encoder_s * 1e3:.1f} ms | {encoder}steps {self.steps_s * 1e3:.1f} ms "
                f"({self.steps_s / n * 1e3:.2f} ms/step, host {self.host_overhead_per_step_s * 1e6:.0f} µs/step) | "
                f"decode {self.decode_s * 1e3:.1f} ms | total {self.total_s * 1e3:.1f} ms")


@dataclass
class Result:
    images: np.ndarray  # (B, H, W, 3) uint8
    config: GenerationConfig
    seeds: list[int]
    timings: Timings
    model_name: str
    model_hash: str  # A1111's 10-hex short hash (Manifest.model_hash)
    rows: list[int]  # the config row of each image (all rows, unless some were dropped)

    def parameters(self, index: int) -> str:
        from sdrt.png import a1111_parameters

        return a1111_parameters(self.config, self.seeds[index], self.rows[index], self.model_name, self.model_hash)

    def pil_images(self) -> list[Any]:
        from PIL import Image

        out = []
        for i, array in enumerate(self.images):
            image = Image.fromarray(array, "RGB")
            image.info["parameters"] = self.parameters(i)
            out.append(image)
        return out


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
        self._engines: dict[str, Engine] = {}
        self._buffers: dict[tuple, Any] = {}
        self.loras: tuple[tuple[str, float], ...] = ()  # set_loras': applied to configs that name none
        self._applied: tuple[tuple[str, float], ...] = ()  # the LoRAs the engines run with now
        self._weights: dict[str, dict[str, np.ndarray]] = {}  # their changed weights, by component

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str | Backend = "auto", verify: bool = True,
             low_vram: bool = False, vae_tile: int = 512, lora_dir: str | Path | None = None) -> "Pipeline":
        """low_vram: one engine resident at a time, and VAE decode in vae_tile-pixel tiles above that size;
        lora_dir: the folder prompts' `<lora:NAME:WEIGHT>` tags name files in (A1111's)."""
        engine_dir = Path(engine_dir)
        manifest = read_manifest(engine_dir)
        chosen = select_backend(backend, manifest) if isinstance(backend, str) else backend
        if verify:
            chosen.verify(engine_dir, manifest)
        pipe = cls(engine_dir, manifest, chosen, low_vram=low_vram, vae_tile=vae_tile, lora_dir=lora_dir)
        if not low_vram:  # the VAE encoder loads with the first image in: text-to-image never pays its memory
            for name in manifest.model.components:
                if name != ENCODER:
                    pipe._engine(name)
        return pipe

    # --- engines and buffers ----------------------------------------------------------------

    def _engine(self, name: str) -> Engine:
        if name not in self._engines:
            if self.low_vram:  # only one engine resident
                self.backend.synchronize()  # the last one may still be running
                for engine in self._engines.values():
                    engine.release()
                self._engines.clear()
            self._engines[name] = self.backend.load(self.engine_dir, self.manifest, name, self._weights.get(name))
        return self._engines[name]

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

    def _apply_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Sets the engines' weights to base + the deltas of loras (weight-0 LoRAs change nothing)."""
        if loras == self._applied:
            return
        weights = self._lora_index.weights(loras)
        self.backend.synchronize()
        for name in set(weights) | set(self._weights):
            if name in self._engines:
                self._engines[name].set_weights(weights.get(name, {}))
        self._weights, self._applied = weights, loras

    def _buffer(self, key: str, shape: tuple[int, ...], dtype: str) -> Any:
        """Device buffers are allocated once per (key, shape) and reused."""
        full = (key, shape, dtype)
        if full not in self._buffers:
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] != key}  # shape changed
            self._buffers[full] = self.backend.empty(shape, dtype)
        return self._buffers[full]

    def _write(self, key: str, array: np.ndarray) -> Any:
        """array copied into the reused buffer `key`."""
        buffer = self._buffer(key, array.shape, array.dtype.name)
        self.backend.write(buffer, array)
        return buffer

    def _constant(self, key: str, shape: tuple[int, ...], value: float) -> Any:
        """A float32 device buffer of `value`, written when first allocated for this shape, then reused
        as is (read-only inputs: text-to-image's no-op blend, img2img's empty pixel mask)."""
        if (key, shape, "float32") not in self._buffers:
            return self._write(key, np.full(shape, value, np.float32))
        return self._buffers[(key, shape, "float32")]

    # --- inputs -----------------------------------------------------------------------------

    def make_config(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                    steps: int | None = None, guidance: float | None = None, scheduler: str | None = None,
                    seed: int | None = None, height: int | None = None, width: int | None = None,
                    batch: int | None = None, seeds: Sequence[int] | None = None,
                    original_size: Sequence[int] | None = None, crop_top_left: Sequence[int] | None = None,
                    target_size: Sequence[int] | None = None, image: Any = None, mask_image: Any = None,
                    strength: float | None = None, mask_blur: int = 4, inpainting_fill: str = "original",
                    inpainting_mask_invert: bool = False, clip_skip: int | None = None,
                    loras: Sequence[tuple[str | Path, float]] | None = None,
                    max_rows: int | None = None, skip_guidance_layers: Sequence[int] | None = None,
                    skip_layer_guidance_scale: float = 2.8, skip_layer_guidance_start: float = 0.01,
                    skip_layer_guidance_stop: float = 0.2) -> GenerationConfig:
        """Validates a request against the engines' limits. steps, guidance and scheduler default to the
        model family's; seeds: one per row (then `seed` is ignored), by default row i uses seed + i;
        batch defaults to the number of prompts. original_size, crop_top_left, target_size: SDXL's
        micro-conditioning as (height, width) pixels (diffusers' names; sizes default to the image's,
        the crop to (0, 0)).

        image (img2img) and mask_image (inpainting; white = repaint): a PIL image, a uint8 array or
        encoded bytes, or a list of one per row; the size defaults to the image's, rounded down to a
        multiple of 8, and the image and mask are resized to it. strength (0, 1]: the share of the steps
        that run (default 0.75; 1.0 for inpainting U-Nets). mask_blur: pixels of blur where the original
        is composited back; inpainting_fill: the masked area's start ("original", "latent noise",
        "latent nothing"); inpainting_mask_invert: black = repaint instead.

        Prompts are read as A1111 does (sdrt.prompts): `(emphasis:1.2)`, `[less]`, `BREAK`, and past
        75 tokens in chunks of 75, up to the engines' limit. clip_skip: condition on CLIP's layer
        `clip_skip` from the output, A1111's numbering (default 1, the last; diffusers' clip_skip + 1).
        loras: (file, weight) pairs (default: set_loras'); prompts' `<lora:NAME:WEIGHT>` tags add the
        files NAME.safetensors of lora_dir, as A1111 does, and are not encoded.
        max_rows: allow more rows than the engines' batch, for a caller that runs them as successive
        engine calls (the server's scheduler: A1111's n_iter); generate() itself takes the engines' batch.
        skip_guidance_layers, skip_layer_guidance_scale, _start, _stop: SD 3.5's skip-layer guidance, as
        diffusers' StableDiffusion3Pipeline (Medium's recommended layers: [7, 8, 9]); with CFG only."""
        defaults = self.model.defaults
        steps = defaults.steps if steps is None else steps
        guidance = defaults.guidance if guidance is None else guidance
        scheduler = defaults.sampler if scheduler is None else scheduler
        if batch is None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        limits = self.limits
        where = ("the engines' range" if limits.kind == "onnx"
                 else "the TensorRT plans' range; widen it with `sdrt build --shapes`")
        b_hi = max_rows or limits.batch[2]  # below the plans' minimum, generate() pads the batch
        if not is_integer(batch) or not 1 <= batch <= b_hi:
            raise InputError(f"batch must be an integer from 1 to {b_hi} ({where}), got {batch!r}")
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompt must be a string or a list of {batch} strings")
        given = negative_prompt is not None
        negatives = [negative_prompt] * batch if not given or isinstance(negative_prompt, str) else list(negative_prompt)
        if given and (len(negatives) != batch or not all(isinstance(p, str) for p in negatives)):
            raise InputError(f"negative_prompt must be a string or a list of {batch} strings")
        for label, texts in (("prompt", prompts), ("negative_prompt", negatives if given else [])):
            for text in texts:
                check_text(text, label)
        loras = self.loras if loras is None else self._lora_index.check(loras)
        prompts, tagged = prompt_loras(prompts, self.lora_dir)
        negatives = [None if n is None else TAG.sub("", n) for n in negatives]  # as A1111: a negative's tags apply nothing
        if tagged:
            loras += self._lora_index.check(tagged)
            named = [path for path, _ in loras]
            if len(set(named)) != len(named):
                raise InputError("a LoRA is named twice (in the prompt and in loras): name it once")
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise InputError(f"guidance must be a number, got {guidance!r}") from None
        if not (math.isfinite(guidance) and abs(guidance) <= MAX_GUIDANCE):  # 1e308 would be inf in fp32
            raise InputError(f"guidance must be finite, from -{MAX_GUIDANCE:g} to {MAX_GUIDANCE:g}, got {guidance}: "
                             "use e.g. 7.5 (≤ 1 disables CFG)")
        check_sampler(scheduler, steps, self.schedule)
        chunks = self._chunks(prompts, [n for n in negatives if n is not None] if guidance > 1.0 else [])
        clip_skip = self._clip_skip(clip_skip)
        sources = self._input_images(image, mask_image, batch)
        m = self.model.size_multiple  # pixels per latent cell (a transformer's: per patch)
        if sources and (height is None or width is None):  # the image's size, rounded down to the latent grid
            first = sources[0][0]
            for v, (lo, _, hi) in ((first.height, limits.height), (first.width, limits.width)):
                if not lo <= v // m * m <= hi:
                    raise InputError(f"the image is {first.width}x{first.height} pixels; {where} is {lo} to {hi} a "
                                     f"side: pass width and height (the image is resized to them)")
            height = first.height // m * m if height is None else height
            width = first.width // m * m if width is None else width
        height = limits.height[1] if height is None else height
        width = limits.width[1] if width is None else width
        for label, v, (lo, _, hi) in (("height", height, limits.height), ("width", width, limits.width)):
            if not is_integer(v) or v % m or not lo <= v <= hi:
                raise InputError(f"{label} must be a multiple of {m} from {lo} to {hi} ({where}), got {v!r}")
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != batch or not all(is_integer(x) and 0 <= x <= SEED_MAX for x in seeds):
                raise InputError(f"seeds must be {batch} integers from 0 to {SEED_MAX}, got {seeds!r}")
            seed = seeds[0]
        if seed is None:
            seed = random_seed(batch)
        if not is_integer(seed) or not 0 <= seed <= first_seed_max(batch):
            raise InputError(f"seed must be an integer from 0 to {first_seed_max(batch)}, got {seed!r}")
        micro = {"original_size": original_size, "crop_top_left": crop_top_left, "target_size": target_size}
        for label, value in micro.items():
            if value is None:
                continue
            if not any(c.name == "time_ids" for c in self.model.conditioning):
                raise InputError(f"{label} is SDXL micro-conditioning; these {self.model.family} engines take none")
            low = 0 if label == "crop_top_left" else 1
            if not (isinstance(value, (list, tuple)) and len(value) == 2
                    and all(is_integer(v) and low <= v <= 16384 for v in value)):
                raise InputError(f"{label} must be (height, width): two integers from {low} to 16384, got {value!r}")
            micro[label] = tuple(int(v) for v in value)
        micro["crop_top_left"] = micro["crop_top_left"] or (0, 0)
        images = tuple(picture(resized(im, int(width), int(height))) for im, _ in sources)
        masks = tuple(mask_picture(resized(m, int(width), int(height)), bool(inpainting_mask_invert))
                      for _, m in sources if m is not None)
        if strength is None:
            strength = 1.0 if self.model.needs_image or not images else 0.75
        if not images and strength != 1.0:
            raise InputError("strength applies to img2img and inpainting: pass an image, or leave strength out")
        strength_start(int(steps), strength, self.schedule.flow)  # refuses a strength outside (0, 1] or one that runs no step
        if not is_integer(mask_blur) or not 0 <= mask_blur <= MAX_MASK_BLUR:
            raise InputError(f"mask_blur must be an integer from 0 to {MAX_MASK_BLUR} pixels, got {mask_blur!r}")
        if inpainting_fill not in INPAINTING_FILLS.values():
            raise InputError(f"inpainting_fill must be one of {', '.join(INPAINTING_FILLS.values())}, "
                             f"got {inpainting_fill!r}")
        # one engine call's images: the server's successive calls (max_rows) take one row at least; plans pad to theirs
        call = max(1 if max_rows else batch, limits.batch[0])
        skip = self._skip_layer_guidance(skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start,
                                         skip_layer_guidance_stop, guidance, call)
        return GenerationConfig(tuple(prompts), tuple(negatives), int(steps), guidance, scheduler, int(seed),
                                int(height), int(width), tuple(int(x) for x in seeds) if seeds is not None else (),
                                **micro, images=images, masks=masks, strength=float(strength),
                                mask_blur=int(mask_blur), inpainting_fill=inpainting_fill, clip_skip=clip_skip,
                                chunks=chunks, loras=loras, **skip)

    def _skip_layer_guidance(self, layers: Sequence[int] | None, scale: Any, start: Any, stop: Any, guidance: float,
                             rows: int) -> dict[str, Any]:
        """GenerationConfig's skip_* fields, checked against the engines (their blocks, the plans' rows)."""
        if not layers:
            return {}
        count = self.manifest.skippable_blocks
        if not count:
            raise InputError(f"skip-layer guidance is SD 3.5's (an MMDiT's blocks); these {self.model.family} engines "
                             "take none (SD3 engines exported before sdrt had it: re-export them with `sdrt export`)")
        if (isinstance(layers, (str, bytes)) or not all(is_integer(v) and 0 <= v < count for v in layers)
                or len(set(layers)) != len(layers)):
            raise InputError(f"skip_guidance_layers must be distinct block indices from 0 to {count - 1} (SD 3.5 "
                             f"Medium's recommended: 7, 8, 9), got {layers!r}")
        if guidance <= 1.0:
            raise InputError("skip-layer guidance runs alongside classifier-free guidance: set guidance above 1")
        try:
            scale, start, stop = float(scale), float(start), float(stop)
        except (TypeError, ValueError):
            raise InputError("skip_layer_guidance_scale, _start and _stop must be numbers") from None
        if not (math.isfinite(scale) and abs(scale) <= MAX_GUIDANCE):
            raise InputError(f"skip_layer_guidance_scale must be finite, within ±{MAX_GUIDANCE:g} (2.8 is "
                             f"diffusers' default), got {scale}")
        if not 0.0 <= start < stop <= 1.0:
            raise InputError(f"skip-layer guidance runs on the steps between start and stop, fractions with "
                             f"0 ≤ start < stop ≤ 1 (diffusers: 0.01, 0.2), got {start} and {stop}")
        top = self._skip_batch()
        if top < rows:
            raise InputError(f"skip-layer guidance runs 3 step rows per image; these TensorRT plans take at most "
                             f"{self._step_rows()}, {top} image(s) at once, {rows} asked: rebuild them with `sdrt build "
                             "--skip-layer-guidance` (the default), or generate fewer images at once")
        return dict(skip_layers=tuple(int(v) for v in layers), skip_scale=scale, skip_start=start, skip_stop=stop)

    def _step_rows(self) -> int | None:
        """The most rows the step's plan takes (its CFG conditioning's profile); None on ONNX Runtime."""
        if self.limits.kind == "onnx":
            return None
        name = next(c.name for c in self.model.conditioning if c.layout == CFG)
        return self.manifest.plans.components[STEP].profile[name]["max"][0]

    def _skip_batch(self) -> int:
        """The most images one engine call takes with skip-layer guidance (3 step rows each)."""
        rows = self._step_rows()
        return self.limits.batch[2] if rows is None else min(self.limits.batch[2], rows // 3)

    def engine_batch(self, config: GenerationConfig) -> int:
        """The most of config's images one engine call takes (generate()'s limit; the server's batches)."""
        return self._skip_batch() if config.skip_layers else self.limits.batch[2]

    def _chunks(self, prompts: list[str], negatives: list[str]) -> int:
        """The most 75-token chunks any encoded prompt takes; over the engines' limit is an error."""
        limit = self.limits.max_chunks
        most = 1
        for label, texts in (("prompt", prompts), ("negative_prompt", negatives)):
            for text in dict.fromkeys(texts):
                for tokenizer in self.tokenizers.values():
                    most = max(most, tokenizer.check(text, label, limit))
        return most

    def _clip_skip(self, clip_skip: Any) -> int:
        """1 when None; refused above the text encoder's layers, or where the family has no clip skip."""
        top = self.model.clip_skip_max
        if clip_skip is None:
            return 1
        if not is_integer(clip_skip) or not 1 <= clip_skip <= max(top, 1):
            if top == 1:
                raise InputError(f"clip_skip applies to SD 1.x/2.x; these {self.model.family} engines use their "
                                 f"text encoders' fixed layers: leave it out (or 1), got {clip_skip!r}")
            raise InputError(f"clip_skip must be an integer from 1 (the last layer) to {top}, got {clip_skip!r}")
        return int(clip_skip)

    def _input_images(self, image: Any, mask_image: Any, batch: int) -> list[tuple[Any, Any]]:
        """(image, mask or None) per row as PIL images, each mask the size of its image; [] without."""
        if self.model.needs_image and (image is None or mask_image is None):
            raise InputError(f"these {self.model.family} engines are an inpainting model (a 9-channel U-Net): "
                             "pass an image and a mask_image as well")
        if image is None:
            if mask_image is not None:
                raise InputError("mask_image needs the image it masks: pass image as well")
            return []

        def per_row(value: Any, what: str) -> list[Any]:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * batch
            if len(values) != batch:
                raise InputError(f"{what} must be one image or a list of {batch} (one per row), got {len(values)}")
            return values

        images = [read_image(v, "image") for v in per_row(image, "image")]
        if mask_image is None:
            return [(im, None) for im in images]
        masks = [read_mask(v, "mask_image") for v in per_row(mask_image, "mask_image")]
        for im, m in zip(images, masks):
            if im.size != m.size:
                raise InputError(f"the mask is {m.width}x{m.height} pixels but the image is {im.width}x{im.height}: "
                                 "the mask must cover the image pixel for pixel")
        return list(zip(images, masks))

    def __call__(self, prompt: str | list[str], **kwargs: Any) -> list[Any]:
        return self.generate(self.make_config(prompt, **kwargs)).pil_images()

    # --- generation -------------------------------------------------------------------------

    def initial_noise(self, config: GenerationConfig,
                      plan: SamplerPlan | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, 4, h, w) initial noise and (steps run, B, 4, h, w) step noise (None if unused)."""
        plan = plan or make_plan(config.scheduler, self.schedule, config.steps, config.strength)
        f = self.model.vae_scale_factor
        shape = (self.model.latent_channels, config.height // f, config.width // f)
        init, step_noise = [], []
        for seed in config.row_seeds:
            rng = np.random.Generator(np.random.PCG64(seed))
            init.append(rng.standard_normal(shape, dtype=np.float32))
            if plan.uses_noise:
                step_noise.append(rng.standard_normal((len(plan),) + shape, dtype=np.float32))
        noise = np.stack(step_noise, axis=1) if plan.uses_noise else None
        return np.stack(init), noise

    def generate(self, config: GenerationConfig, latents: np.ndarray | None = None,
                 callback: Callable[[int, int], Sequence[int] | None] | None = None) -> Result:
        """Runs one generation. latents: optional (B, 4, h, w) initial noise (before σ_max scaling).

        callback(done, total) runs after every step; it may return the batch rows still wanted
        (indices into config's rows): the others are dropped before the next step, and when none
        is left the generation stops with `Cancelled`. It may return STOP: the loop ends there and
        the latents are decoded as they are (A1111's interrupt and skip; the images stay noisy).
        """
        start = time.perf_counter()
        timings = Timings()
        requested = config
        top = self.engine_batch(config)
        if config.batch > top:
            raise InputError(f"{config.batch} rows exceed the engines' batch of {top}: generate "
                             "them in parts (the server runs such requests as successive batches)")
        pad = self.limits.batch[0] - config.batch
        if pad > 0:  # plans of one batch size (static): copies of the last row run along, then are dropped
            config = config.padded(pad)
        self._apply_loras(config.loras)
        plan = make_plan(config.scheduler, self.schedule, config.steps, config.strength)
        init, step_noise = self.initial_noise(config, plan)
        if latents is not None:
            expected = (requested.batch,) + init.shape[1:]
            if latents.shape != expected:
                raise InputError(f"latents must have shape {expected}, got {latents.shape}")
            init[: requested.batch] = latents  # padding rows keep their own noise: they are discarded
        k = self.model.history

        t0 = time.perf_counter()
        inputs = self._condition(config)
        self.backend.synchronize()
        timings.text_encoder_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        start_latents, image_inputs = self._image_inputs(config, plan, init)
        inputs.update(image_inputs)
        timings.image_encoder_s = time.perf_counter() - t0 if config.images else 0.0

        # everything the loop reads, written once into reused buffers; feeds bound per step by row
        t0 = time.perf_counter()
        n = len(plan)
        inputs.update(self._skip_inputs(config))
        skip_steps = config.skip_steps(n)
        loop = _Loop(
            timesteps=self.backend.rows(self._write("timesteps", plan.timesteps.astype(np.float32).reshape(n, 1))),
            coeffs=self.backend.rows(self._write("step_coeffs", plan.coeffs.astype(np.float32))),
            guidance=self._write("guidance", np.array([config.guidance], np.float32)),
            inputs=inputs, step_noise=step_noise, skip_steps=skip_steps,
            skip_rows=self._skip_rows(inputs, config.batch) if skip_steps else {})
        zeros = np.zeros((k,) + init.shape, np.float32)  # 0 * uninitialized memory could be NaN
        sets, feeds = self._bind_loop(loop, {"latents": start_latents, "x_history": zeros, "out_history": zeros}, 0, n)
        step = self._engine(STEP)
        in_batch = list(range(config.batch))  # config rows the buffers hold
        alive = list(range(requested.batch))  # config rows still wanted
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
                # static plans take one batch size: there the dropped rows run on and are discarded
                if len(alive) < len(in_batch) and i + 1 < n and len(alive) >= self.limits.batch[0]:
                    keep = [in_batch.index(row) for row in alive]
                    sets, feeds = self._drop_rows(loop, sets[(i + 1) % 2], keep, len(in_batch), i + 1, n)
                    in_batch = alive
        self.backend.synchronize()
        timings.loop_s = time.perf_counter() - loop_start
        timings.step_engine_s = step.run_times_s()
        timings.steps_s = time.perf_counter() - t0

        # decode to uint8 in the graph; one download
        t0 = time.perf_counter()
        host_images = self._decode(sets[done % 2]["latents"], len(in_batch), config.height, config.width)
        if alive != in_batch:  # rows dropped after the last step
            host_images = host_images[[in_batch.index(row) for row in alive]]
        if config.masks:  # the kept pixels are the original's, not their VAE round trip
            host_images = np.stack([overlay(im, config.images[row], config.masks[row], config.mask_blur)
                                    for im, row in zip(host_images, alive)])
        timings.decode_s = time.perf_counter() - t0
        timings.total_s = time.perf_counter() - start
        seeds = [config.row_seeds[row] for row in alive]
        return Result(host_images, requested, seeds, timings, self.manifest.name, self.manifest.model_hash, alive)

    def encode_prompt(self, config: GenerationConfig) -> dict[str, np.ndarray]:
        """The step's conditioning for config, on the host: (R·B, 77·chunks, C) text embeddings,
        [negative; positive] rows with CFG, and the family's other conditioning (diffusers' encode_prompt)."""
        return {name: self.backend.download(buffer).copy() for name, buffer in self._condition(config).items()}

    def _condition(self, config: GenerationConfig) -> dict[str, Any]:
        """Every conditioning input of the step, in device buffers: the text encoders run once on
        [negative; positive] prompts (positive alone without CFG), host conditioning is written."""
        negatives = [negative or "" for negative in config.negative_prompt]
        texts = negatives + list(config.prompt) if config.cfg else list(config.prompt)
        keep = np.ones(len(texts), np.float32)  # 0: the row's embeddings are zeros (force_zeros_for_empty_prompt)
        if config.cfg and self.model.zero_empty_negative:
            keep[: config.batch] = [float(negative is not None) for negative in config.negative_prompt]
        keep_buffer = self._write("keep", keep)
        outputs: dict[str, Any] = {}
        for slot in self.model.text_encoders:
            spec = self.manifest.components[slot.component]
            ids, weights = self.tokenizers[slot.tokenizer](texts, config.chunks)
            feeds = {"input_ids": self._write(f"input_ids:{slot.component}", ids),
                     "token_weights": self._write(f"token_weights:{slot.component}", weights), "keep": keep_buffer}
            if slot.clip_skip:
                feeds["clip_skip"] = self._write("clip_skip", np.array([config.clip_skip], np.int64))
            dims = {"N": len(texts), "S": ids.shape[1]}
            written = {t.name: self._buffer(t.name, t.resolve(dims), t.dtype) for t in spec.outputs}
            self._engine(slot.component).run(feeds, written)
            outputs.update(written)
        step = self.manifest.components[STEP]
        for c in self.model.conditioning:
            if c.source == HOST:
                rows = stack_rows(c.layout, HOST_CONDITIONING[c.name](config), config.cfg)
                outputs[c.name] = self._write(c.name, rows.astype(step.input(c.name).dtype))
        return {c.name: outputs[c.name] for c in self.model.conditioning}

    def _skip_inputs(self, config: GenerationConfig) -> dict[str, Any]:
        """The step's skip-layer guidance inputs, where it takes them: (L,) block flags and (1,) scale."""
        count = self.manifest.skippable_blocks
        if not count:
            return {}
        flags = np.zeros(count, np.float32)
        flags[list(config.skip_layers)] = 1.0
        return {"skip_layers": self._write("skip_layers", flags),
                "skip_scale": self._write("skip_scale", np.array([config.skip_scale], np.float32))}

    def _skip_rows(self, inputs: dict[str, Any], b: int) -> dict[str, Any]:
        """The CFG conditioning at 3B rows, [uncond; cond; cond], for the steps of skip-layer guidance."""
        out = {}
        for c in self.model.conditioning:
            if c.layout == CFG:
                host = self.backend.download(inputs[c.name])  # (2B, ...)
                out[c.name] = self._write(f"{c.name}:skip", np.concatenate([host, host[b:]]))
        return out

    def _image_inputs(self, config: GenerationConfig, plan: SamplerPlan,
                      noise: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The start latents (B, 4, h, w) on the host and the step's image inputs on the device.

        noise is the initial draw: text-to-image starts from it times the sampler's σ_max; img2img from
        the scheduler's add_noise(image latents, noise, first step); inpainting at strength 1 from noise
        alone, as diffusers' inpainting pipelines. For a 4-channel U-Net the mask's known region is the
        image latents re-noised with the same noise after every step (in the graph)."""
        f32 = np.float32
        mask_shape = (noise.shape[0], 1) + noise.shape[2:]
        if not config.images:  # a mask of ones (and zero image latents and noise): the blend is an exact no-op
            return noise * f32(plan.init_noise_sigma), {
                name: self._constant("repaint_all", mask_shape, 1.0) if name == "mask"
                else self._constant("zero_latents", noise.shape, 0.0) for name in self.model.image_inputs}
        pixels = np.stack([p.pixels for p in config.images])
        latents_buffer = self._encode("image_latents", pixels,
                                      self._constant("zero_pixel_mask", pixels.shape[:3] + (1,), 0.0))
        image = self.backend.download(latents_buffer).astype(f32)
        start_image = image
        if config.masks:
            mask = latent_mask(config.masks, self.model.vae_scale_factor)
            if config.inpainting_fill == "latent noise":  # A1111: the masked area starts from the seed's noise
                start_image = image * (1 - mask) + noise * mask
            elif config.inpainting_fill == "latent nothing":
                start_image = image * (1 - mask)
            inputs = {"mask": self._write("mask", mask)}
        else:  # img2img: the whole image is repainted
            inputs = {"mask": self._constant("repaint_all", mask_shape, 1.0)}
        if config.masks and config.strength == 1.0:
            start = noise * f32(plan.init_noise_sigma)
        else:
            alpha, sigma = plan.start_level
            start = f32(alpha) * start_image + f32(sigma) * noise
        if self.model.image_input == CONCAT:
            inputs["masked_image_latents"] = self._encode("masked_image_latents", pixels,
                                                          self._write("encoder_pixel_mask", pixel_mask(config.masks)))
        else:
            inputs.update(image_latents=latents_buffer, image_noise=self._write("image_noise", noise))
        return start.astype(f32), inputs

    def _encode(self, key: str, pixels: np.ndarray, repaint: Any) -> Any:
        """(B, H, W, 3) uint8 images -> (B, 4, h, w) latents in the device buffer `key`; pixels where
        the (B, H, W, 1) device buffer repaint is 1 are encoded gray (the masked image of inpainting U-Nets)."""
        f = self.model.vae_scale_factor
        b, height, width = pixels.shape[:3]
        out = self._buffer(key, (b, self.model.latent_channels, height // f, width // f), "float32")
        self._engine(ENCODER).run({"images": self._write("encoder_images", pixels), "pixel_mask": repaint},
                                  {"image_latents": out})
        return out

    def _decode(self, latents: Any, b: int, height: int, width: int) -> np.ndarray:
        """(b, 4, h, w) latents on the device -> (b, H, W, 3) uint8 on the host; in low-VRAM mode,
        images larger than a tile are decoded tile by tile (see sdrt.tiling)."""
        f = self.model.vae_scale_factor
        tile = self.vae_tile // f
        if self._tiles_decode(height, width):
            def decode(tile_latents: np.ndarray) -> np.ndarray:
                th, tw = tile_latents.shape[2:]
                images = self._buffer("tile_images", (b, th * f, tw * f, 3), "uint8")
                self._engine("vae_decoder").run({"latents": self._write("tile_latents", tile_latents)},
                                                {"images": images})
                return self.backend.download(images)

            return decode_tiled(self.backend.download(latents), decode, f, tile, tile // 4)  # overlap: 1/4 tile
        images = self._buffer("images", (b, height, width, 3), "uint8")
        self._engine("vae_decoder").run({"latents": latents}, {"images": images})
        return self.backend.download(images).copy()

    def _tiles_decode(self, height: int, width: int) -> bool:
        """Low-VRAM mode, an image larger than a tile, and engines that accept the tile size."""
        fits = all(lo <= min(self.vae_tile, size) <= hi
                   for size, (lo, _, hi) in ((height, self.limits.height), (width, self.limits.width)))
        return self.low_vram and max(height, width) > self.vae_tile and fits

    def _bind_loop(self, loop: "_Loop", state: dict[str, np.ndarray], start: int,
                   n: int) -> tuple[list[dict[str, Any]], list[Any]]:
        """Writes the loop state into set start % 2 and prebuilds the feeds of steps start..n-1."""
        lat_shape = state["latents"].shape
        k = state["x_history"].shape[0]
        sets = [{name: self._buffer(f"{name}{s}", shape, "float32") for name, shape in (
            ("latents", lat_shape), ("x_history", (k,) + lat_shape), ("out_history", (k,) + lat_shape))}
            for s in range(2)]  # ping-pong: step i reads set i % 2 and writes set (i + 1) % 2
        for name, array in state.items():
            self.backend.write(sets[start % 2][name], np.ascontiguousarray(array))
        noise = self.backend.rows(self._write("noise", loop.step_noise if loop.step_noise is not None
                                              else np.zeros((1,) + lat_shape, np.float32)))
        feeds: list[Any] = [None] * n
        for i in range(start, n):
            src, dst = sets[i % 2], sets[(i + 1) % 2]
            feeds[i] = (
                {"latents": src["latents"], "timestep": loop.timesteps[i], **loop.inputs,
                 **(loop.skip_rows if i in loop.skip_steps else {}),
                 "guidance": loop.guidance, "step_coeffs": loop.coeffs[i], "x_history": src["x_history"],
                 "out_history": src["out_history"], "noise": noise[i if loop.step_noise is not None else 0]},
                {"latents_next": dst["latents"], "x_history_next": dst["x_history"],
                 "out_history_next": dst["out_history"]})
        return sets, feeds

    def _drop_rows(self, loop: "_Loop", current: dict[str, Any], keep: list[int], b: int, start: int,
                   n: int) -> tuple[list[dict[str, Any]], list[Any]]:
        """Shrinks the batch of b rows to rows `keep` before step `start`: one round trip through
        the host, paid only when a row is dropped."""
        state = {"latents": self.backend.download(current["latents"])[keep],
                 "x_history": self.backend.download(current["x_history"])[:, keep],
                 "out_history": self.backend.download(current["out_history"])[:, keep]}
        layouts = {c.name: c.layout for c in self.model.conditioning} | dict.fromkeys(self.model.image_inputs, ROW)
        for name, layout in layouts.items():
            host = self.backend.download(loop.inputs[name])
            rows = layout_rows(layout, keep, b, host.shape[0])
            loop.inputs[name] = self._write(name, np.ascontiguousarray(host[rows]))
        if loop.skip_rows:  # rebuilt from the kept rows
            loop.skip_rows = self._skip_rows(loop.inputs, len(keep))
        if loop.step_noise is not None:
            loop.step_noise = np.ascontiguousarray(loop.step_noise[:, keep])
        return self._bind_loop(loop, state, start, n)


class Cancelled(SdrtError):
    """Every row of a generation was dropped (e.g. all its clients went away)."""


class _Stop:
    def __repr__(self) -> str:
        return "STOP"


STOP: Any = _Stop()  # a step callback's answer: end the loop now, decode the latents as they are


@dataclass
class _Loop:
    """What the denoise loop binds besides the latents: rows of per-step buffers, and the rest."""

    timesteps: list[Any]
    coeffs: list[Any]
    guidance: Any
    inputs: dict[str, Any]  # the step's inputs besides the sampler state (conditioning, image inputs) by name
    step_noise: np.ndarray | None  # (steps, B, 4, h, w) on the host, None for deterministic samplers
    skip_steps: frozenset[int] = frozenset()  # the steps of skip-layer guidance: they take skip_rows' inputs
    skip_rows: dict[str, Any] = field(default_factory=dict)  # CFG conditioning at 3B rows, by name
