"""Loads the torch components of a diffusers folder of a supported family for export."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from sdrt.errors import ModelError
from sdrt.export.checkpoint_files import read_checkpoint
from sdrt.families import BLEND, CONCAT, DENOISER_FOLDERS, MMDIT, T5, UNET, Family, TextEncoderSlot

# transformers classes a text-encoder slot may hold; a pooled slot needs the projection
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
DENOISER_CLASSES = {UNET: "UNet2DConditionModel", MMDIT: "SD3Transformer2DModel"}
DENOISER, VAE = "denoiser", "vae"  # TorchParts.load's names besides the text encoders'


@dataclass
class TorchParts:
    family: Family
    text_encoders: dict[str, Any]  # component -> transformers module (omitted optional ones absent)
    tokenizers: dict[str, Any]  # tokenizer subfolder -> transformers tokenizer
    denoiser: Any  # the family's U-Net or transformer
    vae: Any
    scheduler_config: dict[str, Any]
    vae_scale_factor: int
    scaling_factor: float
    vae_needs_fp32: bool  # force_upcast where the family follows it: the VAE overflows in fp16 (SDXL's stock VAE)
    zero_empty_negative: bool  # the pipeline's force_zeros_for_empty_prompt
    image_input: str  # families.BLEND (4-channel U-Net) or CONCAT (inpainting U-Net)
    shift_factor: float = 0.0  # SD3's VAE: latents = (z - shift) * scale
    # component -> loads its weights. A folder's text encoders and denoiser are held above as weightless
    # shells (meta device: config and structure) and loaded one at a time as the exporter reaches them:
    # SD 3.5 with T5-XXL is 19 + 9 + 3 GB in fp32 at once. Absent: the module held above is the real one.
    loaders: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def load(self, component: str) -> Any:
        """A text encoder (by its folder name), DENOISER or VAE, with its weights."""
        if component in self.loaders:
            return self.loaders[component]()
        held = {DENOISER: self.denoiser, VAE: self.vae}
        return held[component] if component in held else self.text_encoders[component]

    @property
    def slots(self) -> tuple[TextEncoderSlot, ...]:
        """The family's text encoders this model has."""
        return tuple(s for s in self.family.text_encoders if s.component in self.text_encoders)

    @property
    def omitted(self) -> tuple[str, ...]:
        """The family's optional text encoders this model goes without (SD3 without T5)."""
        return tuple(s.component for s in self.family.text_encoders if s.component not in self.text_encoders)

    @property
    def patch_size(self) -> int:
        """Latent pixels per denoiser token: a transformer's patches; 1 for a U-Net."""
        return int(getattr(self.denoiser.config, "patch_size", 1))


def model_index(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "model_index.json").read_text())


def file_variant(name: str) -> str | None:
    """The variant in a weights file's name: "fp16" for model.fp16.safetensors, None for model.safetensors."""
    parts = name.split(".")
    return parts[-2] if len(parts) > 2 else None


def weights_variant(folder: Path) -> str | None:
    """The variant a model folder's safetensors are saved as (None: plain names)."""
    variants = {file_variant(p.name) for p in folder.glob("*.safetensors")}
    return None if None in variants or not variants else sorted(variants)[0]


def present_slot(index: dict[str, Any], model_dir: Path, slot: TextEncoderSlot, drop: tuple[str, ...]) -> bool:
    """Whether the export includes a text encoder: a required one always; an optional one unless dropped
    (`--no-t5`) or absent from the folder (model_index.json [null, null], as diffusers saves
    `text_encoder_3=None`)."""
    if not slot.optional:
        return True
    listed = (index.get(slot.component) or [None, None])[0] is not None
    return slot.component not in drop and listed and (model_dir / slot.component).is_dir()


def text_encoder_class(index: dict[str, Any], slot: Any, where: Path, family: Family) -> Any:
    """The transformers class model_index.json names for a text-encoder slot, checked against the slot."""
    import transformers

    cls_name = (index.get(slot.component) or [None, None])[1]
    wanted = ("T5EncoderModel",) if slot.kind == T5 else TEXT_ENCODER_CLASSES[1:] if slot.pooled else TEXT_ENCODER_CLASSES
    if cls_name not in wanted:
        raise ModelError(f"{where}: {slot.component} is {cls_name}; {family.label} needs {' or '.join(wanted)}")
    return getattr(transformers, cls_name)


def tokenizer_class(slot: TextEncoderSlot) -> Any:
    import transformers

    return transformers.T5TokenizerFast if slot.kind == T5 else transformers.CLIPTokenizer


def load_components(model_dir: Path, family: Family, variant: str | None = None,
                    vae_override: Path | None = None, drop: tuple[str, ...] = ()) -> TorchParts:
    """family: the folder's, as `check_model_dir` found it; variant: of the weights' file names; vae: an
    AutoencoderKL folder or single file that replaces the model's; drop: optional text encoders left out."""
    import diffusers
    import torch

    index = model_index(model_dir)
    text_encoders, tokenizers, loaders = {}, {}, {}

    def loading(load: Callable[[], Any]) -> Any:
        try:
            return load()
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"could not load {model_dir}: {e}. Check that the folder is a complete diffusers "
                             f"{family.label} pipeline with safetensors weights") from e

    def on_demand(component: str, cls: Any, folder: Path, shell: Callable[[], Any], **kwargs: Any) -> Any:
        """The weightless shell now (its config read); the module when loaded (check_model_dir: its files)."""
        loaders[component] = lambda: loading(lambda: cls.from_pretrained(
            folder, torch_dtype=torch.float32, variant=variant, **kwargs).eval())
        with torch.device("meta"):
            return loading(shell)

    for slot in family.text_encoders:
        if not present_slot(index, model_dir, slot, drop):
            continue
        cls, folder = text_encoder_class(index, slot, model_dir, family), model_dir / slot.component
        text_encoders[slot.component] = on_demand(slot.component, cls, folder,
                                                  lambda: cls(cls.config_class.from_pretrained(folder)),
                                                  attn_implementation="eager")
        tokenizers[slot.tokenizer] = loading(lambda: tokenizer_class(slot).from_pretrained(model_dir / slot.tokenizer))
    denoiser_cls = getattr(diffusers, DENOISER_CLASSES[family.denoiser])
    folder = model_dir / DENOISER_FOLDERS[family.denoiser]
    denoiser = on_demand(DENOISER, denoiser_cls, folder,
                         lambda: denoiser_cls.from_config(denoiser_cls.load_config(folder)))
    vae = loading(lambda: load_vae(vae_override, model_dir / "vae", variant))  # small, and shared by two graphs
    scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    parts = assemble_parts(family, model_dir, index, text_encoders, tokenizers, denoiser, vae, scheduler_config)
    parts.loaders = loaders
    return parts


def load_vae(override: Path | None, vae_dir: Path, variant: str | None) -> Any:
    """The model's VAE (vae_dir), or the override: a diffusers AutoencoderKL folder, or a single file in
    the original layout converted with vae_dir's config."""
    import torch
    from diffusers import AutoencoderKL

    if override is None:
        return AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32, variant=variant).eval()
    override = Path(override)
    if override.is_dir():
        return AutoencoderKL.from_pretrained(override, torch_dtype=torch.float32,
                                             variant=weights_variant(override)).eval()
    return vae_from_original(read_checkpoint(override, "VAE"), vae_dir, f"--vae {override}", "the model's AutoencoderKL")


def vae_from_original(checkpoint: Mapping[str, Any], vae_dir: Path, what: str, architecture: str,
                      hint: str = "") -> Any:
    """An AutoencoderKL of vae_dir's config with every weight from an original-layout checkpoint
    (a VAE alone, or a full model's first_stage_model.*)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = AutoencoderKL.load_config(vae_dir)
    vae = AutoencoderKL.from_config(config)
    load_strict(vae, convert_ldm_vae_checkpoint(checkpoint, config), what, architecture, hint)
    return vae.eval()


def load_strict(module: Any, state: dict[str, Any], what: str, architecture: str, hint: str = "") -> None:
    """Loads every weight of module from state, or says what does not fit."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ModelError(f"{what}: the weights do not fit {architecture} ({detail}){hint}") from None


def assemble_parts(family: Family, where: Path, index: dict[str, Any], text_encoders: dict[str, Any],
                   tokenizers: dict[str, Any], denoiser: Any, vae: Any, scheduler_config: dict[str, Any]) -> TorchParts:
    """Checks that the loaded modules belong together as the family's pipeline."""
    latent = vae.config.latent_channels
    config = denoiser.config
    what = "transformer" if family.denoiser == MMDIT else "U-Net"
    image_input = {latent: BLEND, 2 * latent + 1: CONCAT}.get(config.in_channels)
    if family.denoiser == MMDIT and image_input == CONCAT:
        image_input = None  # no SD3 inpainting transformer exists to check against
    if config.out_channels != latent or image_input is None:
        raise ModelError(f"{where}: {what} has {config.in_channels} input and {config.out_channels} output "
                         f"channels for a {latent}-channel VAE; sdrt exports {family.label} models with {latent} "
                         f"(ordinary) or {2 * latent + 1} (inpainting, U-Net only) inputs, not depth or other "
                         "conditioned models")
    _check_text_widths(family, where, text_encoders, config)
    if getattr(vae.config, "latents_mean", None) is not None:
        raise ModelError(f"{where}: the VAE has latents_mean/latents_std (a Playground-style VAE); sdrt "
                         "supports VAEs normalized by scaling_factor (and shift_factor) alone")
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return TorchParts(family, text_encoders, tokenizers, denoiser, vae, scheduler_config, vae_scale_factor,
                      float(vae.config.scaling_factor), family.vae_upcast and bool(getattr(vae.config, "force_upcast", False)),
                      bool(index.get("force_zeros_for_empty_prompt", False)), image_input,
                      float(getattr(vae.config, "shift_factor", None) or 0.0))


def _check_text_widths(family: Family, where: Path, text_encoders: dict[str, Any], config: Any) -> None:
    """The text encoders' widths against what the denoiser reads: the U-Net's cross-attention dim; the
    transformer's joint-attention dim (T5's width, at least the CLIP states') and pooled projection."""
    by_output = {}
    for slot in family.text_encoders:
        if slot.component in text_encoders:
            te = text_encoders[slot.component].config
            by_output[slot.hidden] = te.d_model if slot.kind == T5 else te.hidden_size
            if slot.pooled:
                by_output[slot.pooled] = te.projection_dim
    width = sum(by_output[name] for name in family.cross_attention)
    if family.denoiser != MMDIT:
        if config.cross_attention_dim != width:
            raise ModelError(f"{where}: U-Net cross-attention dim {config.cross_attention_dim} != {width}, the "
                             f"width of {' + '.join(family.cross_attention)} from the {family.label} text encoders: the "
                             "components do not belong together")
        return
    joint = [by_output[name] for name in family.sequence if name in by_output]
    pooled = sum(by_output[name] for key, name in family.added_cond if key == "pooled_projections")
    if width > config.joint_attention_dim or any(w != config.joint_attention_dim for w in joint) \
            or pooled != config.pooled_projection_dim:
        raise ModelError(f"{where}: the transformer's joint-attention dim {config.joint_attention_dim} and pooled "
                         f"projection dim {config.pooled_projection_dim} do not fit the text encoders (CLIP states "
                         f"{width} wide, T5 {joint or 'absent'}, pooled {pooled}): the components do not belong together")
