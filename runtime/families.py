"""Model families as data: the text encoders a family has, what its denoise step is conditioned on
and how those tensors are laid out in rows, and its defaults.

The exporter picks a family from a folder's model_index.json and writes the family's contract
into manifest.json (`sdrt.manifest.ModelInfo`); the runtime reads only the manifest. A new family
is a new entry here (and, if it needs one, a new conditioning input), not a branch in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import numpy as np

from sdrt.errors import ModelError

# Row layouts of a conditioning tensor (B images in the batch):
# (R*B, ...): [uncond rows; cond rows] with R = 2 when CFG runs, the cond rows alone otherwise, and
# [uncond; cond; cond] (R = 3) on the steps of skip-layer guidance, whose third group skips layers
CFG = "cfg"
ROW = "row"  # (B, ...): one row per image
BATCH = "batch"  # shared by the whole batch
LAYOUTS = (CFG, ROW, BATCH)
LEADING_DIM: dict[str, int | str] = {CFG: "RB", ROW: "B", BATCH: 1}  # the symbolic first dim of each layout

HOST = "host"  # conditioning computed from the request on the host (once per generation, never per step)

# How the denoise step takes an input image (img2img, inpainting); its inputs for it are ROW-layout,
# (B, C, h, w) latents or (B, 1, h, w) masks, 1 = repaint (diffusers' and A1111's white):
BLEND = "blend"  # a 4-channel U-Net: after every step the mask's known region is set to the image latents
#                  re-noised to the next step's level (diffusers' and A1111's inpainting with ordinary models)
CONCAT = "concat"  # an inpainting U-Net (9 = 4 + 1 + 4 input channels): [latents, mask, masked image latents]
IMAGE_INPUTS: dict[str, tuple[str, ...]] = {
    BLEND: ("image_latents", "image_noise", "mask"),
    CONCAT: ("mask", "masked_image_latents"),
}

# ControlNets (Zhang et al. 2023) in the denoise step: one ROW-layout (B, H, W, 3) uint8 hint each, and
# (J,) f32 conditioning scales, set per step (0 outside a ControlNet's guidance window)
CONTROL_SCALES = "control_scales"


def control_image_names(count: int) -> tuple[str, ...]:
    """The step's hint inputs of `count` ControlNets, in export order."""
    return tuple(f"control_image_{j}" for j in range(count))


@dataclass(frozen=True)
class Conditioning:
    """A named input of the denoise step besides the sampler state."""

    name: str
    layout: str  # one of LAYOUTS
    source: str  # the text-encoder component that writes it, or HOST
    row_shape: tuple[int, ...] = ()  # per row, for HOST conditioning (float32); text encoders' come from their graphs


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder: its component (also its subfolder), tokenizer and what it writes."""

    component: str  # "text_encoder", "text_encoder_2"
    tokenizer: str  # tokenizer subfolder
    layer: int  # the hidden layer it writes, counted from the output: 1 the last, 2 the penultimate
    final_norm: bool  # the final layer norm applies to that layer (diffusers' last_hidden_state is layer 1 + norm)
    hidden: str  # conditioning name of its (N, S, C) hidden states
    pooled: str | None = None  # conditioning name of its (N, P) pooled, projected output, if used
    clip_skip: bool = False  # the layer is chosen per generation (A1111's clip skip, `layer` by default)
    kind: str = "clip"  # CLIP (chunks of 77 tokens) or T5 (one sequence of `max_length` tokens)
    optional: bool = False  # the pipeline runs without it (SD3's T5): its conditioning is zeros then
    max_length: int = 0  # T5: the tokens of its one sequence, set at export (diffusers' max_sequence_length)


@dataclass(frozen=True)
class Defaults:
    sampler: str
    steps: int
    guidance: float


# Denoisers: which diffusers model the step wraps and how it is called.
UNET = "unet"  # UNet2DConditionModel: cross-attention on the channel-concatenated text states
MMDIT = "mmdit"  # SD3Transformer2DModel (Esser et al. 2024): joint attention on [CLIP states padded; T5 states]
DENOISER_FOLDERS = {UNET: "unet", MMDIT: "transformer"}
CLIP, T5 = "clip", "t5"


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s of this family
    text_encoders: tuple[TextEncoderSlot, ...]
    conditioning: tuple[Conditioning, ...]  # the step's inputs besides the sampler state, in graph order
    cross_attention: tuple[str, ...]  # concatenated on the channel axis into the U-Net's encoder_hidden_states
    # the denoiser's other inputs: key <- conditioning name; names under one key are concatenated on the last axis
    added_cond: tuple[tuple[str, str], ...] = ()
    denoiser: str = UNET
    # appended to the cross-attention states on the sequence axis, after zero-padding their channels to its width
    sequence: tuple[str, ...] = ()
    defaults: Defaults = Defaults("dpmpp_2m_karras", 25, 7.5)
    vae_upcast: bool = False  # follow the VAE's force_upcast (an fp32 VAE in fp16 engines), as diffusers does
    controlnet_pipeline: str | None = None  # diffusers' text-to-image ControlNet pipeline (the bench's baseline)


SD1 = Family(
    name="sd1",
    label="Stable Diffusion 1.x / 2.x",
    pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    controlnet_pipeline="StableDiffusionControlNetPipeline",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", 1, True, "text_embeddings", clip_skip=True),),
    conditioning=(Conditioning("text_embeddings", CFG, "text_encoder"),),
    cross_attention=("text_embeddings",),
)

# Podell et al. 2023: two text encoders (CLIP ViT-L and OpenCLIP bigG, penultimate layers concatenated),
# bigG's pooled projection and the size/crop micro-conditioning added to the time embedding.
SDXL = Family(
    name="sdxl",
    label="Stable Diffusion XL",
    pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    controlnet_pipeline="StableDiffusionXLControlNetPipeline",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", 2, False, "text_embeddings"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", 2, False, "text_embeddings_2", pooled="pooled_embeds"),
    ),
    conditioning=(
        Conditioning("text_embeddings", CFG, "text_encoder"),
        Conditioning("text_embeddings_2", CFG, "text_encoder_2"),
        Conditioning("pooled_embeds", CFG, "text_encoder_2"),
        Conditioning("time_ids", CFG, HOST, (6,)),  # (original H, W, crop top, left, target H, W)
    ),
    cross_attention=("text_embeddings", "text_embeddings_2"),
    added_cond=(("text_embeds", "pooled_embeds"), ("time_ids", "time_ids")),
    defaults=Defaults("dpmpp_2m_karras", 30, 5.0),
    vae_upcast=True,
)

# Esser et al. 2024: an MMDiT on [CLIP-L ‖ bigG penultimate states, zero-padded to T5's width; T5-XXL states],
# the two pooled outputs concatenated; rectified flow (the step's output is a velocity).
SD3 = Family(
    name="sd3",
    label="Stable Diffusion 3 / 3.5",
    pipelines=("StableDiffusion3Pipeline",),
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", 2, False, "text_embeddings", pooled="pooled_embeds"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", 2, False, "text_embeddings_2", pooled="pooled_embeds_2"),
        TextEncoderSlot("text_encoder_3", "tokenizer_3", 1, True, "t5_embeddings", kind=T5, optional=True),
    ),
    conditioning=(
        Conditioning("text_embeddings", CFG, "text_encoder"),
        Conditioning("text_embeddings_2", CFG, "text_encoder_2"),
        Conditioning("t5_embeddings", CFG, "text_encoder_3"),
        Conditioning("pooled_embeds", CFG, "text_encoder"),
        Conditioning("pooled_embeds_2", CFG, "text_encoder_2"),
    ),
    cross_attention=("text_embeddings", "text_embeddings_2"),
    sequence=("t5_embeddings",),
    added_cond=(("pooled_projections", "pooled_embeds"), ("pooled_projections", "pooled_embeds_2")),
    denoiser=MMDIT,
    defaults=Defaults("euler", 28, 7.0),  # diffusers' StableDiffusion3Pipeline defaults
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SDXL, SD3)}


def layout_rows(layout: str, keep: list[int], batch: int, total: int) -> list[int]:
    """The rows of a tensor with `total` rows in `layout` that belong to images `keep` of `batch`."""
    if layout == BATCH:
        return list(range(total))
    if layout == ROW:
        return list(keep)
    return [half * batch + j for half in range(total // batch) for j in keep]  # CFG: each half alike


def stack_rows(layout: str, per_image: "np.ndarray", cfg: bool) -> "np.ndarray":
    """(B, ...) per-image values -> the tensor of `layout`; the uncond half repeats the cond one."""
    import numpy as np

    if layout == CFG and cfg:
        return np.concatenate([per_image, per_image])
    if layout == BATCH:
        return per_image[:1]
    return per_image


def family_for(model_index: Mapping[str, object], where: str) -> Family:
    """The family of a diffusers folder, from its model_index.json; refuses the others by name."""
    pipeline = str(model_index.get("_class_name", "?"))
    for family in FAMILIES.values():
        if pipeline in family.pipelines:
            return family
    supported = "; ".join(f"{f.label} ({', '.join(f.pipelines)})" for f in FAMILIES.values())
    raise ModelError(f"{where} is a {pipeline} folder, which sdrt does not export. Supported: {supported}")
