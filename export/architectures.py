"""The real architectures' configs, as their model repositories ship them: the checkpoint reader
(sdrt.export.checkpoints) writes a single file's diffusers config folder from these, and the test-model
builder (sdrt.export.testmodel) gives its real-size models these shapes with random weights."""

from __future__ import annotations

from typing import Any

# SD 3.5's scheduler_config.json.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

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

# SDXL base 1.0's scheduler_config.json.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", vocab_size=49408)
KL_F8 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
# OpenCLIP ViT-bigG/14 text tower (SDXL's and SD 3.5's second text encoder)
BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
             max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", vocab_size=49408)
# OpenCLIP ViT-H/14 text tower as SD 2.x uses it: 23 of its 24 layers (the penultimate's output)
OPEN_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                   max_position_embeddings=77, projection_dim=512, hidden_act="gelu", vocab_size=49408)

SD15_UNET = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(sample_size=512, **KL_F8)
SD2_UNET = {**SD15_UNET, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
            "use_linear_projection": True, "sample_size": 96}
SD2_VAE = dict(sample_size=768, **KL_F8)
SD2_SCHEDULER_CONFIG = {**SD15_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True, **KL_F8)  # its fp16-overflowing VAE

SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD3M_TRANSFORMER = dict(  # SD 3 Medium
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
SD35L_TRANSFORMER = {**SD3M_TRANSFORMER, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                     "qk_norm": "rms_norm"}
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, feed_forward_proj="gated-gelu", vocab_size=32128,
              layer_norm_epsilon=1e-6, dropout_rate=0.0)
SD35M_VAE = dict(sample_size=1024, **{**KL_F8, "latent_channels": 16}, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False)
