"""Single ControlNet files, as people download them: lllyasviel's `control_v11p_sd15_canny.pth` and its
safetensors re-releases (the cldm layout, `control_model.*`, also inside a whole model's checkpoint),
thibaud's SD 2.1 files (the same layout without the prefix), and diffusers-keyed files
(`diffusion_pytorch_model.safetensors` renamed, most SDXL ControlNets). Read weights-only.

A single file has no config: its architecture is read from its weights' shapes (widths, layers, which
levels attend, the hint embedding), and what weights cannot say (attention heads, the text-time
embedding's width) comes from the U-Net it guides, as diffusers' `ControlNetModel.from_unet` takes it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from sdrt.errors import ModelError
from sdrt.export.checkpoint_files import describe_keys, read_checkpoint

CLDM_PREFIX = "control_model."  # lllyasviel's ControlNet: ldm/cldm's ControlNet module, by its attribute name
CLDM_HINT = "input_hint_block.0.weight"
DIFFUSERS_HINT = "controlnet_cond_embedding.conv_in.weight"
SD3_CONTROLNET_KEY = "pos_embed_input.proj.weight"
# what a U-Net's config, not a ControlNet's weights, says
FROM_UNET = ("attention_head_dim", "num_attention_heads", "upcast_attention", "class_embed_type", "num_class_embeds",
             "addition_time_embed_dim", "only_cross_attention", "resnet_time_scale_shift", "flip_sin_to_cos",
             "freq_shift", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
             "encoder_hid_dim", "encoder_hid_dim_type")


def layout_of(checkpoint: Mapping[str, Any], path: Path) -> str:
    """'cldm', 'cldm-bare' or 'diffusers'; refuses a file that is not a U-Net ControlNet, saying what it is."""
    if CLDM_PREFIX + CLDM_HINT in checkpoint:
        return "cldm"
    if CLDM_HINT in checkpoint:
        return "cldm-bare"
    if DIFFUSERS_HINT in checkpoint:
        return "diffusers"
    if SD3_CONTROLNET_KEY in checkpoint:
        raise ModelError(f"--controlnet {path} is an SD 3 ControlNet (SD3ControlNetModel): sdrt exports ControlNets "
                         "for SD 1.x, 2.x and SDXL U-Nets only")
    what = describe_keys(checkpoint).replace("Stable Diffusion checkpoint", "ControlNet")
    raise ModelError(f"--controlnet {path} is {what}: pass a ControlNet file (control_v11p_sd15_canny.safetensors, "
                     "a diffusers ControlNet's diffusion_pytorch_model.safetensors) or a diffusers ControlNetModel "
                     "folder. T2I-Adapters and Control-LoRAs are other kinds of model")


def check_controlnet_file(path: Path) -> None:
    """Refuses, before any work, a file that is unreadable or not a ControlNet."""
    layout_of(read_checkpoint(path, "--controlnet"), path)


def diffusers_state(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The file's tensors under diffusers' ControlNetModel keys (diffusers' own cldm converter)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    layout = layout_of(checkpoint, path)
    if layout == "diffusers":
        return dict(checkpoint.items())
    prefix = CLDM_PREFIX if layout == "cldm" else ""
    # cldm numbers its input blocks 1 + level·(L+1) + i, the level's downsampler last: the first is at L+1
    downsamplers = [int(m.group(1)) for k in checkpoint if (m := re.match(rf"{re.escape(prefix)}input_blocks\.(\d+)\.0\.op\.", k))]
    if not downsamplers:
        raise ModelError(f"--controlnet {path}: a cldm ControlNet without downsampling input blocks; it is damaged")
    state = convert_controlnet_checkpoint(checkpoint, {"layers_per_block": min(downsamplers) - 1})
    # the converter leaves out SDXL's text-time embedding (label_emb): mapped with diffusers' own table
    for diffusers_key, cldm_key in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if prefix + cldm_key in checkpoint:
            state[diffusers_key] = checkpoint[prefix + cldm_key]
    return state


def _count(state: Mapping[str, Any], pattern: str) -> int:
    """How many distinct indices the first (\\d+) of a key pattern takes."""
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def config_from_weights(state: Mapping[str, Any], unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """A ControlNetModel config that these diffusers-keyed weights load into strictly."""
    levels = _count(state, r"down_blocks\.(\d+)\.")
    attends = [f"down_blocks.{i}.attentions.0.proj_in.weight" in state for i in range(levels)]
    depth = [_count(state, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1 for i in range(levels)]
    first_attention = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in state if k.endswith("attentions.0.proj_in.weight")), None)
    hint_blocks = _count(state, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
    config = {k: unet_config[k] for k in FROM_UNET if k in unet_config}
    config.update(
        in_channels=state["conv_in.weight"].shape[1],
        conditioning_channels=state[DIFFUSERS_HINT].shape[1],
        block_out_channels=[state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)],
        layers_per_block=_count(state, r"down_blocks\.0\.resnets\.(\d+)\."),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,  # as diffusers' configs say it
        mid_block_type="UNetMidBlock2DCrossAttn" if "mid_block.attentions.0.proj_in.weight" in state else "UNetMidBlock2D",
        cross_attention_dim=state[first_attention].shape[1] if first_attention else unet_config.get("cross_attention_dim"),
        use_linear_projection=bool(proj_in) and state[proj_in].ndim == 2,
        conditioning_embedding_out_channels=[state[DIFFUSERS_HINT].shape[0]] + [
            state[f"controlnet_cond_embedding.blocks.{2 * j + 1}.weight"].shape[0] for j in range(hint_blocks // 2)],
        addition_embed_type="text_time" if "add_embedding.linear_1.weight" in state else None,
        projection_class_embeddings_input_dim=(state["add_embedding.linear_1.weight"].shape[1]
                                               if "add_embedding.linear_1.weight" in state else None),
    )
    return config


def read_controlnet_file(path: Path, unet_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A single ControlNet file's (ControlNetModel config, diffusers-keyed weights)."""
    state = diffusers_state(read_checkpoint(path, "--controlnet"), path)
    return config_from_weights(state, unet_config), state
