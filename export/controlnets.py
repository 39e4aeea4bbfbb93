"""ControlNets (Zhang et al. 2023) for the denoise step: diffusers ControlNetModel folders or single
files (controlnet_files.py), checked against the U-Net they guide before anything is traced, and
loaded in fp32 for the step graph.

A ControlNet is a copy of the U-Net's encoder whose outputs are added to the U-Net's skip connections,
so it fits a U-Net when those outputs have the U-Net's shapes (block widths, layers per block) and it
reads the same conditioning (cross-attention width, SDXL's text-time embedding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from sdrt.errors import InputError, ModelError
from sdrt.export.controlnet_files import check_controlnet_file, read_controlnet_file
from sdrt.families import UNET, Family

CONTROLNET_CLASS = "ControlNetModel"
# the U-Net's config keys a ControlNet must share (its residuals' shapes and its conditioning)
FITS_UNET = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
             "addition_time_embed_dim", "projection_class_embeddings_input_dim")
DIFFUSERS_DEFAULTS = {"layers_per_block": 2, "addition_embed_type": None, "addition_time_embed_dim": None,
                      "projection_class_embeddings_input_dim": None}


def controlnet_config(path: Path) -> dict[str, Any]:
    """A ControlNet folder's config.json, once the folder holds a ControlNetModel's config and weights."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelError(f"--controlnet {path} has no config.json: pass a diffusers ControlNetModel folder, as "
                         "`save_pretrained` writes it") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path / 'config.json'} is not valid JSON ({e}): restore it from the original") from e
    if config.get("_class_name") != CONTROLNET_CLASS:
        raise ModelError(f"--controlnet {path} holds a {config.get('_class_name', '?')}, not a {CONTROLNET_CLASS} "
                         "(SD 1.x / 2.x and SDXL ControlNets; SD 3's SD3ControlNetModel is not exported yet)")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"--controlnet {path} has no .safetensors weights: save it with "
                         "`save_pretrained(..., safe_serialization=True)`")
    return config


def check_controlnets(paths: Sequence[Path], family: Family) -> tuple[str, ...]:
    """The ControlNets' names (their folder names, as A1111 lists models), refused before any work where
    the family has no U-Net, two share a name or a folder is not a ControlNet."""
    if not paths:
        return ()
    if family.denoiser != UNET:
        raise InputError(f"--controlnet: {family.label} is a transformer model; sdrt exports ControlNets for SD 1.x, "
                         "2.x and SDXL U-Nets (SD 3's SD3ControlNetModel is not supported yet)")
    names = tuple(controlnet_name(Path(p)) for p in paths)
    if len(set(names)) != len(names):
        raise InputError(f"--controlnet folders and files must have different names (they name the ControlNets, "
                         f"as A1111 lists them), got {names}")
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"--controlnet {path} does not exist")
        check_controlnet_file(path) if path.is_file() else controlnet_config(path)
    return names


def controlnet_name(path: Path) -> str:
    """A folder's name, a file's stem ('control_v11p_sd15_canny'): the model names A1111 lists."""
    path = path.resolve()
    return path.stem if path.is_file() else path.name


def check_fit(path: Path, config: Mapping[str, Any], unet_config: Mapping[str, Any]) -> None:
    """Refuses a ControlNet whose residuals or conditioning do not fit the U-Net, naming what differs."""
    def value(c: Mapping[str, Any], key: str) -> Any:
        v = c.get(key, DIFFUSERS_DEFAULTS.get(key))
        return list(v) if isinstance(v, (list, tuple)) else v

    differ = [f"{k} {value(config, k)} vs the U-Net's {value(unet_config, k)}" for k in FITS_UNET
              if value(config, k) != value(unet_config, k)]
    if config.get("in_channels", 4) != unet_config.get("out_channels", 4):
        differ.append(f"in_channels {config.get('in_channels')} vs the model's {unet_config.get('out_channels')} "
                      "latent channels")
    if differ:
        raise ModelError(f"--controlnet {path} is for another architecture than this model's U-Net: "
                         f"{'; '.join(differ)}. Pass a ControlNet trained for this model's family (an SD 1.5 "
                         "ControlNet for SD 1.x, an SDXL one for SDXL)")


def control_residuals(unet: Any) -> int:
    """The residuals a ControlNet adds to this U-Net: conv_in's, each down block's resnets' and
    downsampler's, then the mid block's (SD 1.x: 13, SDXL: 10)."""
    return 1 + sum(len(b.resnets) + len(getattr(b, "downsamplers", None) or ()) for b in unet.down_blocks) + 1


def load_controlnet(path: Path, unet_config: Mapping[str, Any]) -> Any:
    """The fp32 ControlNetModel of a folder that fits the U-Net."""
    import torch
    from diffusers import ControlNetModel

    if not Path(path).is_file():
        check_fit(path, controlnet_config(path), unet_config)
        return ControlNetModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    config, state = read_controlnet_file(path, unet_config)
    check_fit(path, config, unet_config)
    controlnet = ControlNetModel(**config)
    try:
        missing, unexpected = controlnet.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise ModelError(f"--controlnet {path}: its weights do not fit a ControlNet of this model's U-Net "
                         f"({str(e).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise ModelError(f"--controlnet {path}: its weights do not make a ControlNet of this model's U-Net "
                         f"({len(missing)} missing, e.g. {sorted(missing)[:2]}; {len(unexpected)} unexpected, e.g. "
                         f"{sorted(unexpected)[:2]}); convert it with diffusers and pass the folder")
    return controlnet.eval()
