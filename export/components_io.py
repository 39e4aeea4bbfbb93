"""Loads the torch components of a diffusers SD 1.x folder for export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrt.errors import ModelError


@dataclass
class TorchParts:
    text_encoder: Any
    unet: Any
    vae: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    vae_scale_factor: int
    scaling_factor: float


def load_components(model_dir: Path) -> TorchParts:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32).eval()
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).eval()
        text_encoder = CLIPTextModel.from_pretrained(
            model_dir / "text_encoder", torch_dtype=torch.float32, attn_implementation="eager").eval()
        tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load {model_dir}: {e}. Check that the folder is a complete diffusers "
                         "SD 1.x pipeline with safetensors weights") from e
    if unet.config.in_channels != 4 or unet.config.out_channels != 4:
        raise ModelError(f"{model_dir}: U-Net has {unet.config.in_channels} input channels; sdrt exports "
                         "text-to-image SD 1.x (4 channels), not inpainting or depth models")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ModelError(f"{model_dir}: U-Net cross-attention dim {unet.config.cross_attention_dim} != text "
                         f"encoder width {text_encoder.config.hidden_size}: the components do not belong together")
    scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return TorchParts(text_encoder, unet, vae, tokenizer, scheduler_config, vae_scale_factor,
                      float(vae.config.scaling_factor))
