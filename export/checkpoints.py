"""Single-file checkpoints (`.safetensors`, `.ckpt`) in the original Stable Diffusion key layout, as
model pages ship them, loaded offline.

diffusers converts the keys given a diffusers config folder (and downloads one without it); sdrt
writes that folder itself from the architectures below and CLIP's real vocabulary, or takes the
user's (`--config DIR`). `.ckpt` pickles are read with torch's weights-only unpickler: a file that
needs code execution to load is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sdrt.errors import InputError, ModelError
from sdrt.export.checkpoint_files import describe_keys, read_checkpoint
from sdrt.export.components_io import (assemble_parts, load_strict, load_vae, model_index, text_encoder_class,
                                       vae_from_original)
from sdrt.export.original_layout import CLIP_PREFIXES, OPEN_CLIP_PREFIXES, UNET_PREFIX
from sdrt.export.architectures import (BIG_G, CLIP_L, OPEN_CLIP_H, SD2_SCHEDULER_CONFIG, SD2_UNET, SD2_VAE,
                                       SD15_SCHEDULER_CONFIG, SD15_UNET, SD15_VAE, SDXL_SCHEDULER_CONFIG, SDXL_UNET,
                                       SDXL_VAE)
from sdrt.families import UNET, family_for
from sdrt.schedulers import NoiseSchedule
from sdrt.export.bpe import BOS, EOS, real_clip_merges, write_vocab_files

PREDICTION_TYPES = ("epsilon", "v_prediction")
UNET_KEY = f"{UNET_PREFIX}input_blocks.0.0.weight"

# Where each text-encoder component sits in a checkpoint: key prefix -> "clip" (transformers' layout
# under the prefix) or "open_clip" (OpenCLIP's text tower); the first prefix present is used.
TEXT_ENCODER_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "text_encoder": ((CLIP_PREFIXES["sd1"], "clip"), (OPEN_CLIP_PREFIXES["sd2"], "open_clip"),
                     (CLIP_PREFIXES["sdxl"], "clip")),
    "text_encoder_2": ((OPEN_CLIP_PREFIXES["sdxl"], "open_clip"),),
}

@dataclass(frozen=True)
class CheckpointKind:
    """An architecture sdrt can export from a single file, named by diffusers' model type for it."""

    model_type: str  # diffusers.loaders.single_file_utils.infer_diffusers_model_type
    label: str
    pipeline: str  # model_index.json _class_name
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoders: tuple[tuple[str, str, dict[str, Any], str], ...]  # (component, transformers class, config, pad)
    extra_index: dict[str, Any] = field(default_factory=dict)
    probe_prediction: bool = False  # SD 2.x: epsilon (512 base) or v (768) is not in the keys


def _inpaint(kind: CheckpointKind, model_type: str, label: str, pipeline: str) -> CheckpointKind:
    """The same architecture with a 9-channel U-Net input (latents, mask, masked image latents)."""
    unet = {**kind.unet, "in_channels": 9}
    scheduler = {**kind.scheduler, "prediction_type": "epsilon"}
    return CheckpointKind(model_type, label, pipeline, unet, kind.vae, scheduler, kind.text_encoders,
                          kind.extra_index)


_SD1 = CheckpointKind("v1", "SD 1.x", "StableDiffusionPipeline", SD15_UNET, SD15_VAE, SD15_SCHEDULER_CONFIG,
                      (("text_encoder", "CLIPTextModel", CLIP_L, "<|endoftext|>"),))
_SD2 = CheckpointKind("v2", "SD 2.x", "StableDiffusionPipeline", SD2_UNET, SD2_VAE,
                      SD2_SCHEDULER_CONFIG, (("text_encoder", "CLIPTextModel", OPEN_CLIP_H, "!"),),
                      probe_prediction=True)
_SDXL = CheckpointKind("xl_base", "SDXL base", "StableDiffusionXLPipeline", SDXL_UNET, SDXL_VAE,
                       SDXL_SCHEDULER_CONFIG,
                       (("text_encoder", "CLIPTextModel", CLIP_L, "<|endoftext|>"),
                        ("text_encoder_2", "CLIPTextModelWithProjection", BIG_G, "!")),
                       {"force_zeros_for_empty_prompt": True})
KINDS: dict[str, CheckpointKind] = {k.model_type: k for k in (
    _SD1, _inpaint(_SD1, "inpainting", "SD 1.x inpainting", "StableDiffusionInpaintPipeline"),
    _SD2, _inpaint(_SD2, "inpainting_v2", "SD 2.x inpainting", "StableDiffusionInpaintPipeline"),
    _SDXL, _inpaint(_SDXL, "xl_inpaint", "SDXL inpainting", "StableDiffusionXLInpaintPipeline"),
)}
SUPPORTED = ", ".join(k.label for k in KINDS.values())


def kind_of(checkpoint: Mapping[str, Any], path: Path) -> CheckpointKind:
    """The architecture of a Stable Diffusion checkpoint's keys; other model types refused by name."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    model_type = infer_diffusers_model_type(checkpoint)
    if model_type not in KINDS:
        raise ModelError(f"{path} is a {model_type!r} checkpoint (as diffusers names it), which sdrt does not "
                         f"export. Single files sdrt exports: {SUPPORTED}")
    return KINDS[model_type]


def write_config_folder(kind: CheckpointKind, out: Path) -> Path:
    """The diffusers config folder of `kind` (no weights): model_index, component configs, scheduler,
    tokenizers with CLIP's real vocabulary."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    merges = real_clip_merges()
    index: dict[str, Any] = {"_class_name": kind.pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
                             "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", kind.scheduler["_class_name"]], **kind.extra_index}
    configs = {"unet": {"_class_name": "UNet2DConditionModel", **kind.unet},
               "vae": {"_class_name": "AutoencoderKL", **kind.vae}}
    for sub, config in configs.items():
        (out / sub).mkdir(parents=True)
        (out / sub / "config.json").write_text(json.dumps(config, indent=2))
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(kind.scheduler, indent=2))
    for component, cls, config, pad in kind.text_encoders:
        tokenizer = component.replace("text_encoder", "tokenizer")
        index[component], index[tokenizer] = ["transformers", cls], ["transformers", "CLIPTokenizer"]
        *_, vocab = write_vocab_files(out / tokenizer, merges)
        CLIPTextConfig(**config, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                       pad_token_id=vocab[EOS]).save_pretrained(out / component)
        CLIPTokenizer.from_pretrained(out / tokenizer, pad_token=pad, model_max_length=77).save_pretrained(out / tokenizer)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def text_encoder_state(checkpoint: Mapping[str, Any], component: str, model: Any) -> dict[str, Any]:
    """The checkpoint's weights of one text encoder, in `model`'s (transformers') key names."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    for prefix, layout in TEXT_ENCODER_PREFIXES.get(component, ()):
        if not any(k.startswith(prefix) for k in checkpoint):
            continue
        if layout == "open_clip":
            state = convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
        else:
            state = {k[len(prefix):]: checkpoint[k] for k in checkpoint if k.startswith(prefix)}
        break
    else:
        raise ModelError(f"no weights for {component} in the checkpoint (looked for keys under "
                         f"{', '.join(p for p, _ in TEXT_ENCODER_PREFIXES.get(component, ()))})")
    wants = set(model.state_dict())
    wrapped = any(k.startswith("text_model.") for k in wants)
    state = {("text_model." + k.removeprefix("text_model.") if wrapped and k != "text_projection.weight"
              else k.removeprefix("text_model.")): v for k, v in state.items()}
    # OpenCLIP's last layer(s) past the one SD 2.x reads, and position_ids buffers, have no place
    layers = model.config.num_hidden_layers
    return {k: v for k, v in state.items() if k in wants or not _beyond_layer(k, layers)}


def _beyond_layer(key: str, layers: int) -> bool:
    parts = key.split(".")
    if "position_ids" in parts[-1]:
        return True
    return "layers" in parts and int(parts[parts.index("layers") + 1]) >= layers


@dataclass(frozen=True)
class PredictionChoice:
    value: str
    found_by: str  # "--prediction-type", "checkpoint key", "probe", "config"


def probe_v_prediction(unet: Any) -> bool:
    """A1111's test for SD 2.x checkpoints (modules/sd_models_config.py): on a constant input at
    t = 999, a v-prediction model's output lies far below its input, an epsilon model's does not."""
    import torch

    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
    cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
    with torch.no_grad():
        out = unet(x, torch.tensor([999]), encoder_hidden_states=cond).sample
    return float((out - x[:, : out.shape[1]]).mean()) < -1


def choose_prediction(checkpoint: Mapping[str, Any], requested: str | None, config_value: str, unet: Any,
                      probe: bool) -> PredictionChoice:
    """requested: --prediction-type, already checked by SingleFile.open."""
    if requested is not None:
        return PredictionChoice(requested, "--prediction-type")
    if "v_pred" in checkpoint:  # the marker key some trainers (and ComfyUI) write
        return PredictionChoice("v_prediction", "checkpoint key")
    if probe:
        return PredictionChoice("v_prediction" if probe_v_prediction(unet) else "epsilon", "probe")
    return PredictionChoice(config_value, "config")


@dataclass
class SingleFile:
    """A checkpoint file read and recognised, ready to load as a family's torch parts."""

    path: Path
    checkpoint: Mapping[str, Any]
    family: Any  # sdrt.families.Family
    kind: CheckpointKind | None  # None with a user's config folder
    config_dir: Path | None  # the user's --config folder
    prediction_type: str | None  # --prediction-type

    @classmethod
    def open(cls, path: Path, config_dir: Path | None = None, prediction_type: str | None = None) -> "SingleFile":
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise InputError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        checkpoint = read_checkpoint(path)
        if UNET_KEY not in checkpoint:
            raise ModelError(f"{path} is {describe_keys(checkpoint)}. sdrt exports single files of: {SUPPORTED}")
        if config_dir is not None:
            scheduler = Path(config_dir) / "scheduler" / "scheduler_config.json"
            if not (Path(config_dir) / "model_index.json").is_file() or not scheduler.is_file():
                raise ModelError(f"--config {config_dir} is not a diffusers folder (model_index.json, "
                                 "scheduler/scheduler_config.json): pass the folder of a diffusers pipeline of the "
                                 "checkpoint's architecture (weights not needed)")
            # scheduler settings sdrt cannot honour are refused here, as for folders, before minutes of export
            NoiseSchedule.from_config(json.loads(scheduler.read_text()))
            family = family_for(model_index(Path(config_dir)), str(config_dir))
            if family.denoiser != UNET:
                raise ModelError(f"--config {config_dir} is a {family.label} folder; single files are read for U-Net "
                                 f"models only ({SUPPORTED}): export the {family.label} diffusers folder itself")
            return cls(Path(path), checkpoint, family, None, Path(config_dir), prediction_type)
        kind = kind_of(checkpoint, Path(path))
        family = family_for({"_class_name": kind.pipeline}, str(path))
        return cls(Path(path), checkpoint, family, kind, None, prediction_type)

    @property
    def label(self) -> str:
        return self.kind.label if self.kind else f"{self.family.label} (configs of {self.config_dir})"

    def load_parts(self, vae_override: Path | None = None) -> tuple[Any, PredictionChoice]:
        """The family's torch parts (TorchParts) and how the prediction type was chosen."""
        import tempfile

        if self.config_dir is not None:
            return self._load(self.config_dir, vae_override)
        with tempfile.TemporaryDirectory(prefix="sdrt-config-") as tmp:
            assert self.kind is not None
            return self._load(write_config_folder(self.kind, Path(tmp)), vae_override)

    def _load(self, config_dir: Path, vae_override: Path | None) -> tuple[Any, PredictionChoice]:
        import torch
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
        from transformers import CLIPTokenizer

        index = model_index(config_dir)
        hint = "" if self.config_dir else (". If the model has another architecture, pass --config DIR: a diffusers "
                                           "folder of it (configs and tokenizers; weights not needed)")
        text_encoders, tokenizers = {}, {}
        for slot in self.family.text_encoders:
            cls = text_encoder_class(index, slot, config_dir, self.family)
            model = cls._from_config(cls.config_class.from_pretrained(config_dir / slot.component),
                                     attn_implementation="eager", dtype=torch.float32)
            load_strict(model, text_encoder_state(self.checkpoint, slot.component, model),
                        f"{self.path} ({slot.component})", f"{self.label}'s {cls.__name__}", hint)
            text_encoders[slot.component] = model.eval()
            tokenizers[slot.tokenizer] = CLIPTokenizer.from_pretrained(config_dir / slot.tokenizer)
        unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
        unet = UNet2DConditionModel.from_config(unet_config)
        load_strict(unet, convert_ldm_unet_checkpoint(self.checkpoint, unet_config), f"{self.path} (U-Net)",
                    f"{self.label}'s UNet2DConditionModel", hint)
        if vae_override is not None:
            vae = load_vae(vae_override, config_dir / "vae", None)
        else:
            vae = vae_from_original(self.checkpoint, config_dir / "vae", f"{self.path} (VAE)",
                                    f"{self.label}'s AutoencoderKL", hint)
        scheduler_config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
        prediction = choose_prediction(self.checkpoint, self.prediction_type,
                                       scheduler_config.get("prediction_type", "epsilon"), unet.eval(),
                                       bool(self.kind and self.kind.probe_prediction))
        scheduler_config = {**scheduler_config, "prediction_type": prediction.value}
        if self.kind is not None and self.kind.probe_prediction and prediction.value == "epsilon":
            unet.register_to_config(sample_size=64)  # SD 2.x base: trained at 512, the v model at 768
        parts = assemble_parts(self.family, self.path, index, text_encoders, tokenizers, unet.eval(), vae.eval(),
                               scheduler_config)
        return parts, prediction
