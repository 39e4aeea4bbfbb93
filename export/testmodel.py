"""Random-weight Stable Diffusion folders in diffusers format, built offline.

`tiny`, `tiny-sdxl` and `tiny-sd3` (with T5; `tiny-sd3-no-t5` without) run in seconds on a CPU; `sd15`
has the exact SD 1.5 architecture (U-Net 859.5M parameters, CLIP ViT-L/14 text encoder, kl-f8 VAE),
`sdxl` the exact SDXL base 1.0 architecture (U-Net 2,567,463,684 parameters, CLIP ViT-L + OpenCLIP
bigG, fp16-overflowing VAE config) and `sd35m` SD 3.5 Medium's (MMDiT 2,243,171,520 parameters, CLIP-L
+ bigG, 16-channel VAE; without T5-XXL: 4.7 B parameters, 19 GB in fp32, more than this machine's disk
holds beside its ONNX; `python -m sdrt.bench.t5_export` checks T5-XXL alone) with random weights, for
real-size export checks and honest benchmarks. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrt.errors import InputError
from sdrt.export.architectures import (BIG_G, CLIP_L, SD3_SCHEDULER_CONFIG, SD15_SCHEDULER_CONFIG, SD15_UNET,
                                       SD15_VAE, SD35M_TRANSFORMER, SD35M_VAE, SDXL_SCHEDULER_CONFIG, SDXL_UNET, SDXL_VAE)
from sdrt.export.bpe import BOS, CORPUS, EOS, real_clip_merges, write_clip_bpe, write_vocab_files
from sdrt.export.original_layout import unet_module_name, write_controlnet_file, write_single_file

TINY_VAE = dict(sample_size=64, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4)


@dataclass(frozen=True)
class TestModelSpec:
    family: str  # sdrt.families name: which pipeline and text encoders
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    max_merges: int
    description: str
    text_encoder_2: dict[str, Any] | None = None  # SDXL: CLIPTextModelWithProjection
    scheduler_config: dict[str, Any] = field(default_factory=lambda: SD15_SCHEDULER_CONFIG)
    unet_parameters: int | None = None  # asserted for the real-size architectures
    inpainting: bool = False  # a 9-channel U-Net in a StableDiffusion[XL]InpaintPipeline folder
    transformer: dict[str, Any] | None = None  # SD3: the SD3Transformer2DModel (instead of `unet`)
    t5: dict[str, Any] | None = None  # SD3: the T5EncoderModel; None: a folder without T5 (text_encoder_3=None)
    real_vocab: bool = False  # CLIP's real 49,408-token BPE (ids 49406 / 49407 for BOS / EOS), else a small one
    offset_states: bool = True  # CLIP states of non-zero mean (_offset_states); False: diffusers' default init
    scheduler_as_saved: bool = False  # keep the config diffusers saves for the class (its own keys only)


SPECS: dict[str, TestModelSpec] = {
    "tiny": TestModelSpec(
        family="sd1",
        unet=dict(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8,
        ),
        vae=TINY_VAE,
        text_encoder=dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
        ),
        max_merges=600,
        description="tiny random SD 1.x (a few MB) for CI",
    ),
}
# the tiny model as a dedicated inpainting model: U-Net input [latents, mask, masked image latents]
SPECS["tiny-inpaint"] = TestModelSpec(**{**SPECS["tiny"].__dict__, "unet": {**SPECS["tiny"].unet, "in_channels": 9},
                                        "inpainting": True, "description": "tiny random SD 1.x inpainting model for CI"})
SPECS |= {
    "sd15": TestModelSpec(
        family="sd1",
        real_vocab=True,
        unet_parameters=859_520_964,
        unet=SD15_UNET,
        vae=SD15_VAE,
        text_encoder=CLIP_L,
        max_merges=2000,
        description="exact SD 1.5 architecture, random weights",
    ),
    # diffusers' own tiny SDXL test pipeline, smaller: two encoders, text-time embedding, force-upcast VAE
    "tiny-sdxl": TestModelSpec(
        family="sdxl",
        unet=dict(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        ),
        vae={**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
        text_encoder=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                          max_position_embeddings=77, projection_dim=32, hidden_act="gelu"),
        text_encoder_2=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                            max_position_embeddings=77, projection_dim=32, hidden_act="gelu"),
        max_merges=600,
        description="tiny random SDXL (a few MB) for CI",
        scheduler_config=SDXL_SCHEDULER_CONFIG,
    ),
    "sdxl": TestModelSpec(
        family="sdxl",
        real_vocab=True,
        unet_parameters=2_567_463_684,
        unet=SDXL_UNET,
        vae=SDXL_VAE,
        text_encoder=CLIP_L,
        text_encoder_2=BIG_G,
        max_merges=2000,
        description="exact SDXL base 1.0 architecture, random weights",
        scheduler_config=SDXL_SCHEDULER_CONFIG,
    ),
}


TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                 max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
# Tiny models as a user builds them with diffusers: default-initialised encoders (states of mean ~0 after
# the final LayerNorm), CLIP's real vocabulary and special ids, and the scheduler config diffusers writes
# for the class it was saved from (no clip_sample key from an Euler or PNDM scheduler).
PLAIN = dict(real_vocab=True, offset_states=False, scheduler_as_saved=True)
SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SPECS["tiny-plain"] = TestModelSpec(**{
    **SPECS["tiny"].__dict__, **PLAIN,
    "scheduler_config": {"_class_name": "PNDMScheduler", **SCALED_LINEAR, "skip_prk_steps": True},
    "description": "tiny random SD 1.x as diffusers builds it: default init, CLIP's real vocabulary"})
SPECS["tiny-sdxl-plain"] = TestModelSpec(**{
    **SPECS["tiny-sdxl"].__dict__, **PLAIN,
    "scheduler_config": {"_class_name": "EulerDiscreteScheduler", **SCALED_LINEAR, "timestep_spacing": "leading"},
    "description": "tiny random SDXL as diffusers builds it: default init, CLIP's real vocabulary"})
SPECS["tiny-sd3"] = TestModelSpec(
    family="sd3",
    unet={},
    # diffusers' tiny SD3 test transformer, with SD3's patch of 2, its 16 latent channels (diffusers' SD3
    # inpainting blends only those) and a joint width above the CLIP states'
    transformer=dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                     num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=96, pooled_projection_dim=64,
                     pos_embed_max_size=64, dual_attention_layers=(0,), qk_norm="rms_norm"),
    vae={**TINY_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
         "use_quant_conv": False, "use_post_quant_conv": False},
    text_encoder=TINY_CLIP,
    text_encoder_2=TINY_CLIP,
    t5=dict(d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu", dropout_rate=0.0),
    max_merges=600,
    description="tiny random SD 3.5 (MMDiT, CLIP-L, bigG, T5; a few MB) for CI",
    scheduler_config=SD3_SCHEDULER_CONFIG,
)
SPECS["tiny-sd3-no-t5"] = TestModelSpec(**{**SPECS["tiny-sd3"].__dict__, "t5": None,
                                           "description": "tiny random SD 3.5 without T5 (text_encoder_3=None) for CI"})
SPECS["sd35m"] = TestModelSpec(
    family="sd3",
    real_vocab=True,
    unet={},
    unet_parameters=2_243_171_520,
    transformer=SD35M_TRANSFORMER,
    vae=SD35M_VAE,
    text_encoder={**CLIP_L, "hidden_act": "quick_gelu"},
    text_encoder_2=BIG_G,
    max_merges=2000,
    description="exact SD 3.5 Medium architecture (no T5), random weights",
    scheduler_config=SD3_SCHEDULER_CONFIG,
)


def t5_test_tokenizer() -> Any:
    """A small SentencePiece-style (Unigram) T5 tokenizer over the BPE corpus' words: whole words beat
    their letters; `<pad>` 0, `</s>` 1, `<unk>` 2, as T5's."""
    from transformers import T5TokenizerFast

    words = sorted({w for w in CORPUS.lower().replace(",", " ").split()})
    chars = sorted(set("".join(words)) | set(",.!?'-0123456789"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -5.0) for w in words] + [(c, -10.0) for c in chars] + [(f"▁{c}", -10.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _offset_states(text_encoder: Any) -> Any:
    """Gives a random CLIP hidden states of non-zero mean, as trained ones have.

    At initialization every LayerNorm has weight 1 and bias 0, so the final layer's states average
    exactly 0 and the residual stream nearly so; A1111's emphasis rescales to that mean and would
    divide noise by noise. Offsets the token embeddings and the norms' biases (drawn from the global
    generator, seeded by the caller)."""
    import torch

    with torch.no_grad():
        for module in text_encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.5 + 0.2 * torch.randn_like(module.bias))
        text_encoder.get_input_embeddings().weight.add_(0.5)
    return text_encoder


def build_test_model(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Writes a diffusers folder (safetensors, tokenizers, the family's scheduler config) to out_dir, or,
    where out_dir ends in .safetensors, one checkpoint file in the original Stable Diffusion layout."""
    if Path(out_dir).suffix == ".safetensors":
        out = Path(out_dir)
        if out.exists():
            raise InputError(f"{out} exists: choose a new file name or remove it")
        with tempfile.TemporaryDirectory(prefix=".sdrt-testmodel-", dir=out.parent) as tmp:
            return write_single_file(build_test_model(kind, Path(tmp) / "model", seed), out)
    if kind not in SPECS:
        raise InputError(f"unknown test model {kind!r}: choose one of {', '.join(SPECS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not empty: choose a new directory or remove it")

    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = SPECS[kind]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if spec.real_vocab:
            vocab_path, merges_path, vocab = write_vocab_files(staging / "_bpe", real_clip_merges())
        else:
            vocab_path, merges_path, vocab = write_clip_bpe(staging / "_bpe", spec.max_merges)
        tokenizer = CLIPTokenizer.from_pretrained(staging / "_bpe", model_max_length=77)

        def text_config(config: dict[str, Any]) -> Any:
            return CLIPTextConfig(**{"vocab_size": len(vocab), **config}, bos_token_id=vocab[BOS],
                                  eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])

        torch.manual_seed(seed)
        sd3 = spec.family == "sd3"
        denoiser = diffusers.SD3Transformer2DModel(**spec.transformer) if sd3 else UNet2DConditionModel(**spec.unet)
        if spec.unet_parameters is not None:
            count = sum(p.numel() for p in denoiser.parameters())
            assert count == spec.unet_parameters, f"{kind} denoiser has {count} parameters, not {spec.unet_parameters}"
        clip_l = (CLIPTextModelWithProjection if sd3 else CLIPTextModel)(text_config(spec.text_encoder))
        offset = _offset_states if spec.offset_states else (lambda encoder: encoder)
        parts: dict[str, Any] = dict(vae=AutoencoderKL(**spec.vae), text_encoder=offset(clip_l),
                                     tokenizer=tokenizer,
                                     scheduler=getattr(diffusers, spec.scheduler_config["_class_name"]).from_config(
                                         spec.scheduler_config))
        if sd3:
            from transformers import T5Config, T5EncoderModel

            t5_tokenizer = t5_test_tokenizer()
            t5 = None if spec.t5 is None else T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **spec.t5)).eval()
            parts.update(transformer=denoiser, text_encoder_3=t5, tokenizer_3=t5_tokenizer if t5 is not None else None,
                         text_encoder_2=offset(CLIPTextModelWithProjection(text_config(spec.text_encoder_2 or {}))),
                         tokenizer_2=CLIPTokenizer.from_pretrained(staging / "_bpe", model_max_length=77, pad_token="!"))
            pipe = diffusers.StableDiffusion3Pipeline(**parts)
        elif spec.family == "sdxl":
            parts["unet"] = denoiser
            # SDXL's second tokenizer pads with "!" rather than the end token
            parts.update(text_encoder_2=offset(CLIPTextModelWithProjection(text_config(spec.text_encoder_2 or {}))),
                         tokenizer_2=CLIPTokenizer.from_pretrained(staging / "_bpe", model_max_length=77, pad_token="!"))
            cls = diffusers.StableDiffusionXLInpaintPipeline if spec.inpainting else diffusers.StableDiffusionXLPipeline
            pipe = cls(**parts, add_watermarker=False)
        else:
            parts["unet"] = denoiser
            cls = diffusers.StableDiffusionInpaintPipeline if spec.inpainting else diffusers.StableDiffusionPipeline
            pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(staging / "model", safe_serialization=True)
        if not spec.scheduler_as_saved:
            (staging / "model" / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(spec.scheduler_config, indent=2))
        for sub in ("tokenizer", "tokenizer_2"):  # keep the slow-tokenizer files beside tokenizer.json
            if (staging / "model" / sub).is_dir():
                for name in ("vocab.json", "merges.txt"):
                    shutil.copy(staging / "_bpe" / name, staging / "model" / sub / name)
        if out_dir.exists():  # empty: checked above
            out_dir.rmdir()
        (staging / "model").rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir



def write_test_lora(model_dir: Path, path: Path, seed: int, sgm: bool = False, rank: int = 4, alpha: float = 2.0,
                    scale: float = 0.1) -> Path:
    """A random kohya-format LoRA for a diffusers folder's model: every attention / feed-forward Linear
    and proj_in/out of the U-Net, its resnets' convolutions (LoCon), and every Linear of the text
    encoders' layers. sgm: U-Net keys in the original openaimodel naming (kohya's SDXL files)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    g = torch.Generator().manual_seed(seed)
    state = {}

    def add(key: str, weight: torch.Tensor) -> None:
        out, fan_in = weight.shape[0], weight.shape[1:]
        state[f"{key}.lora_down.weight"] = torch.randn(rank, *fan_in, generator=g) * scale
        state[f"{key}.lora_up.weight"] = torch.randn(out, rank, *([1] * (weight.ndim - 2)), generator=g) * scale
        state[f"{key}.alpha"] = torch.tensor(alpha)

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    for name, module in unet.named_modules():
        if ("transformer_blocks" in name and isinstance(module, torch.nn.Linear)) or name.endswith(
                ("proj_in", "proj_out", "conv1", "conv2")):
            add(f"lora_unet_{(unet_module_name(name, unet) if sgm else name).replace('.', '_')}", module.weight)
    encoders = sorted(p.name for p in model_dir.glob("text_encoder*"))
    for i, folder in enumerate(encoders):
        prefix = "lora_te" if len(encoders) == 1 else f"lora_te{i + 1}"
        for name, module in CLIPTextModel.from_pretrained(model_dir / folder).named_modules():
            if isinstance(module, torch.nn.Linear) and "layers" in name:
                add(f"{prefix}_text_model_{name.removeprefix('text_model.').replace('.', '_')}", module.weight)
    save_file(state, str(path))
    return path


SD15_CONTROLNET_PARAMETERS = 361_279_120  # ControlNetModel.from_unet of SD 1.5's U-Net (the control_v11 architecture)
REAL_HINT_CHANNELS = (16, 32, 96, 256)  # ControlNet's hint embedding (diffusers' default)


def write_test_controlnet(model_dir: Path, out_dir: Path, seed: int, scale: float = 0.5,
                          hint_channels: tuple[int, ...] | None = None) -> Path:
    """A random ControlNetModel (diffusers folder) of a test model's U-Net architecture. Its zero-initialised
    convolutions (the hint embedding's last, every residual's) get random weights too, so a hint changes
    the picture: a fresh ControlNet adds exactly nothing. hint_channels: the hint embedding's widths (None:
    a small one for the tiny models; REAL_HINT_CHANNELS for real-size checks)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    torch.manual_seed(seed)
    # 3 stride-2 convolutions: hints at 8x the latents
    channels = hint_channels or tuple(min(16, 4 * 2**i) for i in range(4))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels,
                                           load_weights_from_unet=False)
    zeroed = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
              controlnet.controlnet_mid_block]
    with torch.no_grad():
        for module in zeroed:
            module.weight.normal_(0, scale / module.weight[0].numel() ** 0.5)
            module.bias.normal_(0, 0.1 * scale)
        for module in controlnet.modules():  # norms as trained ones are: not ones and zeros (which ONNX shares)
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)
    controlnet.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def write_test_controlnet_as(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """`sdrt testmodel controlnet OUT --of MODEL`: write_test_controlnet with the real hint embedding, as a
    diffusers folder or, for OUT.safetensors, one file in cldm's layout; refuses to overwrite."""
    import tempfile

    out = Path(out)
    if out.exists():
        raise InputError(f"{out} already exists: choose another path")
    if out.suffix != ".safetensors":
        return write_test_controlnet(model_dir, out, seed, hint_channels=REAL_HINT_CHANNELS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_test_controlnet(model_dir, Path(tmp) / out.stem, seed, hint_channels=REAL_HINT_CHANNELS)
        return write_controlnet_file(folder, out)
