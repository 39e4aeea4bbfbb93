"""Single-file checkpoints (`.safetensors`, `.ckpt`) in the original Stable Diffusion key layout, as
model pages ship them, loaded offline: SD 1.x / 2.x / XL U-Nets and SD 3 / 3.5 MMDiTs.

diffusers converts the keys given a diffusers config folder (and downloads one without it); sdrt
writes that folder itself from the architectures below and CLIP's real vocabulary, or takes the
user's (`--config DIR`). T5's SentencePiece vocabulary cannot be written offline: an SD 3 file's T5
needs `--config` (or is left out with `--no-t5`). SD 3 files shipped without their text encoders take
Stability's separate files (`--text-encoders DIR`: clip_l, clip_g, t5xxl .safetensors). `.ckpt`
pickles are read with torch's weights-only unpickler: a file that needs code execution to load is
refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping

from sdrt.errors import InputError, ModelError
from sdrt.export.checkpoint_files import SAFETENSORS, describe_keys, read_checkpoint
from sdrt.export.components_io import (DENOISER, DENOISER_CLASSES, assemble_parts, load_strict, load_vae, model_index,
                                       text_encoder_class, tokenizer_class, vae_from_original)
from sdrt.export.original_layout import CLIP_PREFIXES, OPEN_CLIP_PREFIXES, SD3_TEXT_PREFIXES, UNET_PREFIX
from sdrt.export.architectures import (BIG_G, CLIP_L, OPEN_CLIP_H, SD2_SCHEDULER_CONFIG, SD2_UNET, SD2_VAE,
                                       SD3_SCHEDULER_CONFIG, SD3M_TRANSFORMER, SD15_SCHEDULER_CONFIG, SD15_UNET,
                                       SD15_VAE, SD35L_TRANSFORMER, SD35M_TRANSFORMER, SD35M_VAE, SDXL_SCHEDULER_CONFIG,
                                       SDXL_UNET, SDXL_VAE)
from sdrt.families import DENOISER_FOLDERS, MMDIT, UNET, family_for
from sdrt.schedulers import FLOW, NoiseSchedule
from sdrt.export.bpe import BOS, EOS, real_clip_merges, write_vocab_files

PREDICTION_TYPES = ("epsilon", "v_prediction")
UNET_KEY = f"{UNET_PREFIX}input_blocks.0.0.weight"
MMDIT_KEY = f"{UNET_PREFIX}joint_blocks.0.context_block.adaLN_modulation.1.bias"
DENOISER_KEYS = {UNET: UNET_KEY, MMDIT: MMDIT_KEY}  # the key that tells a file's denoiser

# Where each text-encoder component sits in a checkpoint: key prefix -> "transformers" (transformers'
# own keys under the prefix) or "open_clip" (OpenCLIP's text tower); the first prefix present is used.
TEXT_ENCODER_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "text_encoder": ((CLIP_PREFIXES["sd1"], "transformers"), (OPEN_CLIP_PREFIXES["sd2"], "open_clip"),
                     (CLIP_PREFIXES["sdxl"], "transformers"), (SD3_TEXT_PREFIXES["text_encoder"], "transformers")),
    "text_encoder_2": ((OPEN_CLIP_PREFIXES["sdxl"], "open_clip"), (SD3_TEXT_PREFIXES["text_encoder_2"], "transformers")),
    "text_encoder_3": ((SD3_TEXT_PREFIXES["text_encoder_3"], "transformers"),),
}
# Stability's separate SD 3 text-encoder files (text_encoders/ beside sd3.5_*.safetensors): name stem
STABILITY_TEXT_FILES = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}

@dataclass(frozen=True)
class CheckpointKind:
    """An architecture sdrt can export from a single file, named by diffusers' model type for it."""

    model_type: str  # diffusers.loaders.single_file_utils.infer_diffusers_model_type
    label: str
    pipeline: str  # model_index.json _class_name
    denoiser: dict[str, Any]  # the U-Net's or transformer's config
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoders: tuple[tuple[str, str, dict[str, Any], str], ...]  # CLIP: (component, transformers class, config, pad)
    extra_index: dict[str, Any] = field(default_factory=dict)
    probe_prediction: bool = False  # SD 2.x: epsilon (512 base) or v (768) is not in the keys


def _inpaint(kind: CheckpointKind, model_type: str, label: str, pipeline: str) -> CheckpointKind:
    """The same architecture with a 9-channel U-Net input (latents, mask, masked image latents)."""
    unet = {**kind.denoiser, "in_channels": 9}
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
_SD3_CLIPS = (("text_encoder", "CLIPTextModelWithProjection", CLIP_L, "<|endoftext|>"),
              ("text_encoder_2", "CLIPTextModelWithProjection", BIG_G, "!"))
_SD3_INDEX = {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}  # T5: from --config only


def _sd3(model_type: str, label: str, transformer: dict[str, Any]) -> CheckpointKind:
    return CheckpointKind(model_type, label, "StableDiffusion3Pipeline", transformer, SD35M_VAE, SD3_SCHEDULER_CONFIG,
                          _SD3_CLIPS, _SD3_INDEX)


KINDS: dict[str, CheckpointKind] = {k.model_type: k for k in (
    _SD1, _inpaint(_SD1, "inpainting", "SD 1.x inpainting", "StableDiffusionInpaintPipeline"),
    _SD2, _inpaint(_SD2, "inpainting_v2", "SD 2.x inpainting", "StableDiffusionInpaintPipeline"),
    _SDXL, _inpaint(_SDXL, "xl_inpaint", "SDXL inpainting", "StableDiffusionXLInpaintPipeline"),
    _sd3("sd3", "SD 3 Medium", SD3M_TRANSFORMER), _sd3("sd35_medium", "SD 3.5 Medium", SD35M_TRANSFORMER),
    _sd3("sd35_large", "SD 3.5 Large", SD35L_TRANSFORMER),
)}
SUPPORTED = ", ".join(k.label for k in KINDS.values())


def kind_of(checkpoint: Mapping[str, Any], path: Path, denoiser: str = UNET) -> CheckpointKind:
    """The architecture of a Stable Diffusion checkpoint's keys; other model types refused by name."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    model_type = infer_diffusers_model_type(checkpoint)
    found = KINDS.get(model_type)
    if denoiser == MMDIT and (found is None or found.pipeline != "StableDiffusion3Pipeline"):
        raise ModelError(f"{path} holds an SD 3 transformer (MMDiT) of a size sdrt does not bundle (it knows SD 3 "
                         "Medium, SD 3.5 Medium and SD 3.5 Large): pass --config DIR, a diffusers folder of its "
                         "architecture (configs and tokenizers; weights not needed)")
    if model_type not in KINDS:
        raise ModelError(f"{path} is a {model_type!r} checkpoint (as diffusers names it), which sdrt does not "
                         f"export. Single files sdrt exports: {SUPPORTED}")
    return KINDS[model_type]


def write_config_folder(kind: CheckpointKind, out: Path) -> Path:
    """The diffusers config folder of `kind` (no weights): model_index, component configs, scheduler,
    tokenizers with CLIP's real vocabulary."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    merges = real_clip_merges()
    denoiser = family_for({"_class_name": kind.pipeline}, kind.label).denoiser
    folder, cls = DENOISER_FOLDERS[denoiser], DENOISER_CLASSES[denoiser]
    index: dict[str, Any] = {"_class_name": kind.pipeline, folder: ["diffusers", cls],
                             "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", kind.scheduler["_class_name"]], **kind.extra_index}
    configs = {folder: {"_class_name": cls, **kind.denoiser}, "vae": {"_class_name": "AutoencoderKL", **kind.vae}}
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
    import torch
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
    if "text_projection.weight" in wants and "text_projection.weight" not in state:
        # SD 3 files store CLIP-L without its projection; diffusers reads it as the identity, as does sdrt
        state["text_projection.weight"] = torch.eye(model.config.hidden_size)
    if "encoder.embed_tokens.weight" in wants and "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # T5's tied input embedding
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


class TextEncoderFiles(Mapping[str, Any]):
    """A checkpoint with Stability's separate SD 3 text-encoder files laid over it, under the prefixes
    of a file that holds them; read lazily, as the checkpoint is. Of several t5xxl files the first by
    name is read (t5xxl_fp16 before t5xxl_fp8_e4m3fn)."""

    def __init__(self, checkpoint: Mapping[str, Any], folder: Path):
        if not folder.is_dir():
            raise InputError(f"--text-encoders {folder} is not a folder: pass the text_encoders/ folder Stability "
                             "ships beside the model (clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors)")
        self._where: dict[str, tuple[Mapping[str, Any], str]] = {k: (checkpoint, k) for k in checkpoint}
        self.files: dict[str, Path] = {}
        for component, stem in STABILITY_TEXT_FILES.items():
            found = sorted(p for p in folder.iterdir() if p.name.startswith(stem) and p.suffix in SAFETENSORS)
            if found:
                tensors = read_checkpoint(found[0], "text encoder")
                self._where.update({f"{SD3_TEXT_PREFIXES[component]}{k}": (tensors, k) for k in tensors})
                self.files[component] = found[0]
        if not self.files:
            raise InputError(f"--text-encoders {folder} holds none of {', '.join(STABILITY_TEXT_FILES.values())} "
                             ".safetensors: pass Stability's text_encoders/ folder")

    def __getitem__(self, key: str) -> Any:
        tensors, own = self._where[key]
        return tensors[own]

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def holds(checkpoint: Mapping[str, Any], component: str) -> bool:
    """Whether the checkpoint has weights of this text encoder under any prefix it may use."""
    prefixes = tuple(p for p, _ in TEXT_ENCODER_PREFIXES.get(component, ()))
    return bool(prefixes) and any(k.startswith(prefixes) for k in checkpoint)


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
    def open(cls, path: Path, config_dir: Path | None = None, prediction_type: str | None = None,
             text_encoders_dir: Path | None = None) -> "SingleFile":
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise InputError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        checkpoint = read_checkpoint(path)
        denoiser = next((d for d, key in DENOISER_KEYS.items() if key in checkpoint), None)
        if denoiser is None:
            raise ModelError(f"{path} is {describe_keys(checkpoint)}. sdrt exports single files of: {SUPPORTED}")
        if denoiser == MMDIT and prediction_type is not None:
            raise InputError("--prediction-type is for U-Net files; SD 3 is a flow-matching model: drop it")
        if text_encoders_dir is not None:
            if denoiser != MMDIT:
                raise InputError("--text-encoders is for SD 3 files shipped without their text encoders; SD 1.x, "
                                 "2.x and XL files hold theirs: drop it")
            checkpoint = TextEncoderFiles(checkpoint, Path(text_encoders_dir))
        if config_dir is not None:
            scheduler = Path(config_dir) / "scheduler" / "scheduler_config.json"
            if not (Path(config_dir) / "model_index.json").is_file() or not scheduler.is_file():
                raise ModelError(f"--config {config_dir} is not a diffusers folder (model_index.json, "
                                 "scheduler/scheduler_config.json): pass the folder of a diffusers pipeline of the "
                                 "checkpoint's architecture (weights not needed)")
            # scheduler settings sdrt cannot honour are refused here, as for folders, before minutes of export
            NoiseSchedule.from_config(json.loads(scheduler.read_text()))
            family = family_for(model_index(Path(config_dir)), str(config_dir))
            if family.denoiser != denoiser:
                held = "an SD 3 transformer (MMDiT)" if denoiser == MMDIT else "a U-Net"
                raise ModelError(f"--config {config_dir} is a {family.label} folder, but {path} holds {held}: pass "
                                 "a folder of the file's architecture")
            return cls(Path(path), checkpoint, family, None, Path(config_dir), prediction_type)
        kind = kind_of(checkpoint, Path(path), denoiser)
        family = family_for({"_class_name": kind.pipeline}, str(path))
        return cls(Path(path), checkpoint, family, kind, None, prediction_type)

    @property
    def label(self) -> str:
        return self.kind.label if self.kind else f"{self.family.label} (configs of {self.config_dir})"

    def load_parts(self, vae_override: Path | None = None, drop: tuple[str, ...] = ()) -> tuple[Any, PredictionChoice]:
        """The family's torch parts (TorchParts) and how the prediction type was chosen; drop: optional
        text encoders left out (--no-t5)."""
        import tempfile

        if self.config_dir is not None:
            return self._load(self.config_dir, vae_override, drop)
        with tempfile.TemporaryDirectory(prefix="sdrt-config-") as tmp:
            assert self.kind is not None
            return self._load(write_config_folder(self.kind, Path(tmp)), vae_override, drop)

    def _hint(self) -> str:
        return "" if self.config_dir else (". If the model has another architecture, pass --config DIR: a diffusers "
                                           "folder of it (configs and tokenizers; weights not needed)")

    def _included(self, slot: Any, index: dict[str, Any], config_dir: Path, drop: tuple[str, ...]) -> bool:
        """Whether the export takes this text encoder: a required one must be in the file; an optional one
        (T5) is taken where the file has it and it is not dropped, and needs --config for its tokenizer."""
        if not holds(self.checkpoint, slot.component):
            if slot.optional:
                return False
            extra = " (an SD 3 file without its text encoders: pass --text-encoders DIR, Stability's text_encoders/ " \
                    "folder)" if self.family.denoiser == MMDIT else ""
            raise ModelError(f"no weights for {slot.component} in {self.path}{extra}")
        if not slot.optional or slot.component in drop:
            return not slot.optional
        if (index.get(slot.component) or [None])[0] is None or not (config_dir / slot.tokenizer).is_dir():
            raise ModelError(f"{self.path} holds T5-XXL, whose tokenizer (SentencePiece) sdrt cannot write offline: "
                             "pass --config DIR, a diffusers SD 3 folder with tokenizer_3 and text_encoder_3/config.json "
                             "(weights not needed), or --no-t5 to export without T5")
        return True

    def _load(self, config_dir: Path, vae_override: Path | None, drop: tuple[str, ...]) -> tuple[Any, PredictionChoice]:
        import diffusers
        import torch

        index = model_index(config_dir)
        text_encoders, tokenizers, loaders = {}, {}, {}
        for slot in self.family.text_encoders:
            if not self._included(slot, index, config_dir, drop):
                continue
            cls = text_encoder_class(index, slot, config_dir, self.family)
            config = cls.config_class.from_pretrained(config_dir / slot.component)
            with torch.device("meta"):  # a shell: its weights load when the exporter reaches it (T5-XXL: 19 GB)
                text_encoders[slot.component] = cls(config)
            loaders[slot.component] = partial(self._text_encoder, cls, config, slot.component)
            tokenizers[slot.tokenizer] = tokenizer_class(slot).from_pretrained(config_dir / slot.tokenizer)
        denoiser_cls = getattr(diffusers, DENOISER_CLASSES[self.family.denoiser])
        denoiser_config = denoiser_cls.load_config(config_dir / DENOISER_FOLDERS[self.family.denoiser])
        if self.family.denoiser == MMDIT:
            with torch.device("meta"):
                denoiser = denoiser_cls.from_config(denoiser_config)
            loaders[DENOISER] = partial(self._transformer, denoiser_cls, denoiser_config)
        else:
            denoiser = self._unet(denoiser_cls, denoiser_config)
        if vae_override is not None:
            vae = load_vae(vae_override, config_dir / "vae", None)
        else:
            vae = vae_from_original(self.checkpoint, config_dir / "vae", f"{self.path} (VAE)",
                                    f"{self.label}'s AutoencoderKL", self._hint())
        scheduler_config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
        if self.family.denoiser == MMDIT:
            prediction = PredictionChoice(FLOW, "family")
        else:
            prediction = choose_prediction(self.checkpoint, self.prediction_type,
                                           scheduler_config.get("prediction_type", "epsilon"), denoiser,
                                           bool(self.kind and self.kind.probe_prediction))
            scheduler_config = {**scheduler_config, "prediction_type": prediction.value}
            if self.kind is not None and self.kind.probe_prediction and prediction.value == "epsilon":
                denoiser.register_to_config(sample_size=64)  # SD 2.x base: trained at 512, the v model at 768
        parts = assemble_parts(self.family, self.path, index, text_encoders, tokenizers, denoiser, vae.eval(),
                               scheduler_config)
        parts.loaders = loaders
        return parts, prediction

    def _text_encoder(self, cls: Any, config: Any, component: str) -> Any:
        import torch

        model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
        load_strict(model, text_encoder_state(self.checkpoint, component, model), f"{self.path} ({component})",
                    f"{self.label}'s {cls.__name__}", self._hint())
        return model.eval()

    def _unet(self, cls: Any, config: Any) -> Any:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        unet = cls.from_config(config)
        load_strict(unet, convert_ldm_unet_checkpoint(self.checkpoint, config), f"{self.path} (U-Net)",
                    f"{self.label}'s UNet2DConditionModel", self._hint())
        return unet.eval()

    def _transformer(self, cls: Any, config: Any) -> Any:
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        model = cls.from_config(config)
        own = {k: self.checkpoint[k] for k in self.checkpoint if k.startswith(UNET_PREFIX)}  # the conversion pops
        load_strict(model, convert_sd3_transformer_checkpoint_to_diffusers(own), f"{self.path} (transformer)",
                    f"{self.label}'s SD3Transformer2DModel", self._hint())
        return model.eval()
