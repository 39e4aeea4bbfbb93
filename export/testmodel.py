"""Random-weight Stable Diffusion 1.x folders in diffusers format, built offline.

`tiny` runs in seconds on a CPU; `sd15` has the exact SD 1.5 architecture (U-Net 859.5M
parameters, CLIP ViT-L/14 text encoder, kl-f8 VAE) with random weights, for real-size export
checks and honest benchmarks. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrt.errors import InputError
from sdrt.export.bpe import BOS, EOS, write_clip_bpe

# SD 1.5's scheduler_config.json, as the original checkpoint ships it.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@dataclass(frozen=True)
class TestModelSpec:
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    max_merges: int
    description: str
    extra: dict[str, Any] = field(default_factory=dict)


SPECS: dict[str, TestModelSpec] = {
    "tiny": TestModelSpec(
        unet=dict(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8,
        ),
        vae=dict(
            sample_size=64, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
        ),
        text_encoder=dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
        ),
        max_merges=600,
        description="tiny random SD 1.x (a few MB) for CI",
    ),
    "sd15": TestModelSpec(
        unet=dict(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        ),
        vae=dict(
            sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
        ),
        text_encoder=dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            vocab_size=49408,
        ),
        max_merges=2000,
        description="exact SD 1.5 architecture, random weights",
    ),
}


def build_test_model(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Writes a diffusers folder (safetensors, tokenizer, SD 1.5 scheduler config) to out_dir."""
    if kind not in SPECS:
        raise InputError(f"unknown test model {kind!r}: choose one of {', '.join(SPECS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not empty: choose a new directory or remove it")

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = SPECS[kind]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        vocab_path, merges_path, vocab = write_clip_bpe(staging / "_bpe", spec.max_merges)
        tokenizer = CLIPTokenizer.from_pretrained(staging / "_bpe", model_max_length=77)
        te_config = dict(spec.text_encoder)
        te_config.setdefault("vocab_size", len(vocab))
        text_config = CLIPTextConfig(
            **te_config, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]
        )
        torch.manual_seed(seed)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**spec.vae),
            text_encoder=CLIPTextModel(text_config),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**spec.unet),
            scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(staging / "model", safe_serialization=True)
        (staging / "model" / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(SD15_SCHEDULER_CONFIG, indent=2)
        )
        for name in ("vocab.json", "merges.txt"):  # keep the slow-tokenizer files beside tokenizer.json
            shutil.copy(staging / "_bpe" / name, staging / "model" / "tokenizer" / name)
        if out_dir.exists():  # empty: checked above
            out_dir.rmdir()
        (staging / "model").rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir

