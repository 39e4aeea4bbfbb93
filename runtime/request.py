"""The request: everything that decides an image, as one frozen record of small typed groups.

Every front end builds it through one function (sdrt.validation.build_request): the Python API
(`Pipeline.make_config` / `Pipeline.__call__`, diffusers' keyword names), the CLI, the A1111 API and
the OpenAI API. A default lives here once, as the field's default; the front ends refer to it.

Some fields hold one entry per image (ROW_FIELDS): padding a static batch, dropping a row and the
server's batching key derive from that list; every other field is shared by the batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any, Sequence

from sdrt.images import Picture

SEED_MAX = 2**32 - 1  # A1111's range: every row's seed (seed + i) from 0 to 2**32 - 1
# A1111's inpainting_fill values sdrt implements (0, "fill", paints the masked area from its surroundings)
INPAINTING_FILLS = {1: "original", 2: "latent noise", 3: "latent nothing"}
IMG2IMG_STRENGTH = 0.75  # strength with an image when none is given (diffusers' img2img default, A1111's too)


def first_seed_max(count: int) -> int:
    """The largest first seed of `count` consecutive rows (seed + i ≤ SEED_MAX)."""
    return SEED_MAX - count + 1


def random_seed(count: int) -> int:
    return secrets.randbelow(first_seed_max(count) + 1)


@dataclass(frozen=True)
class Prompts:
    prompt: tuple[str, ...]  # one per row
    # one per row. None: no negative prompt given (diffusers' negative_prompt=None): zeros where the
    # family forces them (force_zeros_for_empty_prompt), else the encoded "". An explicit "" is encoded.
    negative_prompt: tuple[str | None, ...]
    chunks: int = 1  # 75-token prompt chunks every text row is encoded in (the longest prompt's)
    clip_skip: int = 1  # A1111's: condition on CLIP's layer `clip_skip` from the output (1 = the last)
    loras: tuple[tuple[str, float], ...] = ()  # (resolved path, weight) of each LoRA applied (sdrt.loras)


@dataclass(frozen=True)
class Size:
    height: int = 512
    width: int = 512


@dataclass(frozen=True)
class Sampler:
    steps: int = 25
    scheduler: str = "dpmpp_2m_karras"
    seed: int = 0  # row 0's seed; row i uses seed + i unless `seeds` is set
    seeds: tuple[int, ...] = ()  # one per row when rows come from different requests


@dataclass(frozen=True)
class Guidance:
    scale: float = 7.5  # classifier-free guidance (Ho & Salimans 2022)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance only above 1, as diffusers: at or below it, the conditional half alone."""
        return self.scale > 1.0


@dataclass(frozen=True)
class ImageInput:
    """image-to-image and inpainting; images and masks both empty: text-to-image."""

    images: tuple[Picture, ...] = ()  # one per row, already resized to width x height
    # one (C, h, w) f32 array per row instead of images: img2img from latents (hires fix's Latent upscalers)
    latents: tuple[Any, ...] = ()
    masks: tuple[Picture, ...] = ()  # one per row (inpainting), 255 = repaint, 0 = keep; empty: img2img
    strength: float = 1.0  # diffusers' strength, A1111's denoising strength: the last ⌊steps × strength⌋ run
    mask_blur: int = 4  # pixels of Gaussian blur where the original is composited back (A1111's mask_blur)
    inpainting_fill: str = "original"  # the masked area's start (inpainting only): a value of INPAINTING_FILLS

    @property
    def mode(self) -> str:
        return "inpaint" if self.masks else "img2img" if self.images or self.latents else "txt2img"


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL micro-conditioning (Podell et al. 2023, 2.2), (height, width) pixels; None: the image size."""

    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class SkipLayers:
    """SD 3.5's skip-layer guidance (diffusers' skip_guidance_layers, _scale, _start, _stop): on the
    steps i of n with start·n < i < stop·n, a third row group skips these blocks; () for none."""

    layers: tuple[int, ...] = ()
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def steps(self, n: int) -> frozenset[int]:
        """The steps (of n run) with skip-layer guidance, as diffusers' SD3 pipeline picks them."""
        if not self.layers:
            return frozenset()
        return frozenset(i for i in range(n) if n * self.start < i < n * self.stop)


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix: text-to-image at the request's size, the upscale, then image-to-image at `size`
    with `strength` (A1111's denoising strength) over `steps` (0: the first pass's), in one request."""

    enabled: bool = False
    size: Size = field(default_factory=Size)  # the second pass's
    scale: float = 2.0  # A1111's hr_scale, for the infotext (size is what runs); 0: sized by hr_resize_x / _y
    upscaler: str = "Latent"  # a name of sdrt.upscale.UPSCALERS
    steps: int = 0
    strength: float = 0.7  # A1111's denoising_strength default for hires fix
    prompt: str | None = None  # None: the first pass's (A1111's empty hr_prompt)
    negative_prompt: str | None = None
    scheduler: str | None = None  # None: the first pass's


CONTROL_MODES = ("balanced", "prompt", "control", "guess")  # their weights: sdrt.control
# how a hint of another size meets the image's, sd-webui-controlnet's names in its order (its API's indices 0-2)
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CROP_AND_RESIZE = RESIZE_MODES[1]  # the extension's default
# sd-webui-controlnet's names of the control modes it has, in its order (its API's indices 0, 1, 2)
A1111_CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                       "control": "ControlNet is more important"}


@dataclass(frozen=True)
class Control:
    """ControlNet hints (Zhang et al. 2023) for the first len(scales) of the engines' ControlNets, in their
    export order; the others are off (scale 0). Scales and windows per ControlNet: diffusers'
    controlnet_conditioning_scale and control_guidance_start / _end (fractions of the steps run); modes:
    CONTROL_MODES, one per ControlNet (sd-webui-controlnet's control modes, diffusers' guess mode)."""

    images: tuple[tuple[Picture, ...], ...] = ()  # one per row: a hint per ControlNet, at the request's size
    models: tuple[str, ...] = ()  # the names of the ControlNets given hints (the manifest's; "" for one left off)
    scales: tuple[float, ...] = ()
    start: tuple[float, ...] = ()
    end: tuple[float, ...] = ()
    modes: tuple[str, ...] = ()  # () for every hint: balanced
    files: tuple[str, ...] = ()  # per ControlNet given a hint: the resolved file whose weights it runs with instead
    # of the exported ones ("" or missing: the exported ones; sdrt.controlnet_weights)
    # hires fix: the same hints crop-resized from what was sent to the second pass's size (sdrt.hires)
    hires_images: tuple[tuple[Picture, ...], ...] = ()

    resize_modes: tuple[str, ...] = ()  # RESIZE_MODES, one per hint; () for every hint: Crop and Resize

    def __post_init__(self) -> None:
        if not self.modes:  # frozen: the defaults filled in once, so readers need no fallback
            object.__setattr__(self, "modes", ("balanced",) * len(self.scales))
        if not self.resize_modes:
            object.__setattr__(self, "resize_modes", (CROP_AND_RESIZE,) * len(self.scales))


# (group, field) of each field with one entry per row
ROW_FIELDS = (("prompts", "prompt"), ("prompts", "negative_prompt"), ("sampler", "seeds"), ("image", "images"),
              ("image", "masks"), ("image", "latents"), ("control", "images"), ("control", "hires_images"))
_NOT_SHARED = set(ROW_FIELDS) | {("sampler", "seed")}  # seed: row 0's, so a row of its own too


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that decides an image; validated once (sdrt.validation), then passed down."""

    prompts: Prompts
    size: Size = field(default_factory=Size)
    sampler: Sampler = field(default_factory=Sampler)
    guidance: Guidance = field(default_factory=Guidance)
    image: ImageInput = field(default_factory=ImageInput)
    micro: MicroConditioning = field(default_factory=MicroConditioning)
    skip: SkipLayers = field(default_factory=SkipLayers)
    hires: Hires = field(default_factory=Hires)
    control: Control = field(default_factory=Control)

    @property
    def row_seeds(self) -> tuple[int, ...]:
        return self.sampler.seeds or tuple(self.sampler.seed + i for i in range(self.batch))

    @property
    def batch(self) -> int:
        return len(self.prompts.prompt)

    @property
    def mode(self) -> str:
        return self.image.mode

    @property
    def cfg(self) -> bool:
        return self.guidance.cfg

    @cached_property  # compared over and over while the server's queue waits for a batch
    def batch_key(self) -> tuple[Any, ...]:
        """What rows must share to run in one engine call: every field but the per-row ones, and the mode."""
        shared = tuple(getattr(getattr(self, g.name), f.name) for g in fields(self) for f in fields(getattr(self, g.name))
                       if (g.name, f.name) not in _NOT_SHARED)
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
        picked: dict[str, dict[str, Any]] = {"sampler": {"seeds": seeds, "seed": seeds[0]}}
        for group, name in ROW_FIELDS:
            if (group, name) != ("sampler", "seeds"):  # images, masks: empty for the whole batch or none
                values = getattr(getattr(first, group), name)
                picked.setdefault(group, {})[name] = tuple(
                    getattr(getattr(config, group), name)[r] for config, r in rows) if values else ()
        return replace(first, **{group: replace(getattr(first, group), **changes) for group, changes in picked.items()})

    def padded(self, extra: int) -> "GenerationConfig":
        """This config with `extra` copies of its last row appended."""
        return self.select(list(range(self.batch)) + [self.batch - 1] * extra)
