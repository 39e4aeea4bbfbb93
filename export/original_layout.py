"""diffusers modules -> one state dict in the original Stable Diffusion key layout (CompVis / SGM).

The inverse of diffusers' single-file conversion, for the files people download from model pages:
`sdrt testmodel KIND FILE.safetensors` writes one, and the tests check that exporting it gives
the image the diffusers folder gives. Layouts:
  U-Net   model.diffusion_model.{input_blocks,middle_block,output_blocks}.N.M....  (openaimodel.py)
  VAE     first_stage_model.{encoder,decoder}.{down,mid,up}....                    (ldm autoencoder)
  CLIP    cond_stage_model.transformer.text_model....     (SD 1.x; SDXL: conditioner.embedders.0.transformer.)
  OpenCLIP cond_stage_model.model....  (SD 2.x; SDXL: conditioner.embedders.1.model.), fused in_proj q|k|v
  MMDiT   model.diffusion_model.joint_blocks.N.{x_block,context_block}....  (SD 3 / 3.5, sd3_impl's mmditx.py)
  SD 3 text encoders  text_encoders.{clip_l,clip_g,t5xxl}.transformer.<transformers' own keys>
  ControlNet  control_model.{input_blocks,middle_block,zero_convs,middle_block_out,input_hint_block}....  (cldm.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from sdrt.families import family_for

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
SD3_TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.",
                     "text_encoder_2": "text_encoders.clip_g.transformer.",
                     "text_encoder_3": "text_encoders.t5xxl.transformer."}

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}

_MMDIT_FIXED = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_MMDIT_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
# q|k|v fused in the original: its module <- diffusers' three projections
_MMDIT_QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
              "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def _split(key: str) -> tuple[str, str]:
    """'a.b.c.weight' -> ('a.b.c', 'weight')."""
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _renamed(path: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return path


def unet_state(unet: Any) -> dict[str, Any]:
    """UNet2DConditionModel -> model.diffusion_model.* (block i of a level of L layers: 1 + level*(L+1) + i)."""
    out = {}
    for key, value in unet.state_dict().items():
        module, leaf = _split(key)
        out[f"{UNET_PREFIX}{unet_module_name(module, unet)}.{leaf}"] = value
    return out


def unet_module_name(module: str, unet: Any) -> str:
    """A U-Net module's diffusers path -> its openaimodel path ('down_blocks.1.attentions.0.proj_in' ->
    'input_blocks.4.1.proj_in'), the name kohya's SDXL LoRAs use."""
    parts = module.split(".")
    if parts[0] in ("down_blocks", "up_blocks", "mid_block"):
        return _unet_block(parts, unet.config.layers_per_block + 1, unet)
    return _renamed(module, _UNET_FIXED)


def _unet_block(parts: list[str], per_level: int, unet: Any) -> str:
    if parts[0] == "mid_block":  # resnets 0, 1 -> middle_block.0, .2; the attention -> middle_block.1
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        slot = 2 * index if kind == "resnets" else 1
        inner = _renamed(".".join(rest), _UNET_RESNET) if kind == "resnets" else ".".join(rest)
        return f"middle_block.{slot}.{inner}"
    level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # the level's last input block: input_blocks.K.0.op
            return f"input_blocks.{(level + 1) * per_level}.0.op"
        block = f"input_blocks.{1 + level * per_level + index}"
    else:
        if kind == "upsamplers":  # after the level's last resnet (and its attention, when the level has them)
            has_attention = hasattr(unet.up_blocks[level], "attentions")
            return f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attention else 1}.conv"
        block = f"output_blocks.{level * per_level + index}"
    if kind == "resnets":
        return f"{block}.0.{_renamed('.'.join(rest), _UNET_RESNET)}"
    return f"{block}.1.{'.'.join(rest)}"


def controlnet_original_names(controlnet: Any) -> dict[str, str]:
    """ControlNetModel's state keys -> cldm's (without its `control_model.` prefix): the U-Net encoder's
    names, zero_convs.i.0 (a residual's zero convolution), middle_block_out.0, and input_hint_block.{0, 2,
    4, …} (convolutions between SiLUs). A rename only: no tensor changes layout."""
    hint = len(controlnet.controlnet_cond_embedding.blocks)
    fixed = {"controlnet_mid_block": "middle_block_out.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * hint + 2}"}
    out = {}
    for key in controlnet.state_dict():
        module, leaf = _split(key)
        parts = module.split(".")
        if parts[0] == "controlnet_down_blocks":
            name = f"zero_convs.{parts[1]}.0"
        elif parts[:2] == ["controlnet_cond_embedding", "blocks"]:
            name = f"input_hint_block.{2 * int(parts[2]) + 2}"
        else:
            name = fixed.get(module) or unet_module_name(module, controlnet)
        out[key] = f"{name}.{leaf}"
    return out


def controlnet_state(controlnet: Any, prefix: str = "control_model.") -> dict[str, Any]:
    """ControlNetModel -> its state in cldm's keys (controlnet_original_names)."""
    state = controlnet.state_dict()
    return {f"{prefix}{name}": state[key] for key, name in controlnet_original_names(controlnet).items()}


def write_controlnet_file(controlnet_dir: Path, out: Path, prefix: str = "control_model.") -> Path:
    """A diffusers ControlNetModel folder -> one .safetensors in cldm's layout (lllyasviel's files;
    prefix "" as thibaud's SD 2.1 ones)."""
    from diffusers import ControlNetModel

    return _save_atomic(controlnet_state(ControlNetModel.from_pretrained(controlnet_dir), prefix), out)


def vae_state(vae: Any) -> dict[str, Any]:
    """AutoencoderKL -> first_stage_model.*; the decoder's up levels count from the bottom; attention
    projections are 1x1 convolutions."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        module, leaf = _split(key)
        parts = module.split(".")
        coder, rest = parts[0], parts[1:]
        if coder not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
            out[f"{VAE_PREFIX}{key}"] = value
            continue
        head = rest[0]
        if head in ("down_blocks", "up_blocks"):
            level = int(rest[1]) if head == "down_blocks" else levels - 1 - int(rest[1])
            name = "down" if head == "down_blocks" else "up"
            if rest[2] == "resnets":
                target = f"{name}.{level}.block.{rest[3]}.{_renamed('.'.join(rest[4:]), _VAE_RESNET)}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                target = f"{name}.{level}.{'downsample' if name == 'down' else 'upsample'}.{'.'.join(rest[4:])}"
        elif head == "mid_block" and rest[1] == "resnets":
            target = f"mid.block_{int(rest[2]) + 1}.{_renamed('.'.join(rest[3:]), _VAE_RESNET)}"
        elif head == "mid_block":
            target = f"mid.attn_1.{_renamed('.'.join(rest[3:]), _VAE_ATTENTION)}"
            if leaf == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        else:
            target = _renamed(".".join(rest), {"conv_norm_out": "norm_out"})
        out[f"{VAE_PREFIX}{coder}.{target}.{leaf}"] = value
    return out


def mmdit_state(transformer: Any) -> dict[str, Any]:
    """SD3Transformer2DModel -> model.diffusion_model.*: q|k|v fused; the final norm's and the last
    context block's (scale, shift) halves stored as (shift, scale)."""
    import torch

    state = dict(transformer.state_dict())
    last = transformer.config.num_layers - 1
    out = {}

    def swapped(value: Any) -> Any:
        shift, scale = value.chunk(2, dim=0)
        return torch.cat([scale, shift])

    out[f"{UNET_PREFIX}pos_embed"] = state.pop("pos_embed.pos_embed")
    for key in [k for k in state if k.split(".")[0] != "transformer_blocks"]:
        module, leaf = _split(key)
        value = state.pop(key)
        out[f"{UNET_PREFIX}{_MMDIT_FIXED[module]}.{leaf}"] = swapped(value) if module == "norm_out.linear" else value
    for i in range(last + 1):
        block = f"transformer_blocks.{i}."
        for fused, parts in _MMDIT_QKV.items():
            for leaf in ("weight", "bias"):
                if f"{block}{parts[0]}.{leaf}" in state:
                    out[f"{UNET_PREFIX}joint_blocks.{i}.{fused}.{leaf}"] = torch.cat(
                        [state.pop(f"{block}{p}.{leaf}") for p in parts])
        for key in [k for k in state if k.startswith(block)]:
            module, leaf = _split(key[len(block):])
            value = state.pop(key)
            if i == last and module == "norm1_context.linear":
                value = swapped(value)
            out[f"{UNET_PREFIX}joint_blocks.{i}.{_MMDIT_BLOCK[module]}.{leaf}"] = value
    return out


def _untied(state: dict[str, Any]) -> dict[str, Any]:
    """T5's input embedding is its `shared` table: stored once (safetensors refuses shared tensors)."""
    tied = "encoder.embed_tokens.weight"
    if tied in state and "shared.weight" in state and state[tied].data_ptr() == state["shared.weight"].data_ptr():
        return {k: v for k, v in state.items() if k != tied}
    return state


def sd3_text_state(text_encoder: Any, component: str) -> dict[str, Any]:
    """An SD 3 text encoder -> text_encoders.<name>.transformer. + transformers' own keys."""
    return {f"{SD3_TEXT_PREFIXES[component]}{k}": v for k, v in _untied(dict(text_encoder.state_dict())).items()}


def clip_state(text_encoder: Any, prefix: str) -> dict[str, Any]:
    """transformers CLIPTextModel -> prefix + its text_model.* keys (how SD 1.x and SDXL store CLIP ViT-L)."""
    return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in text_encoder.state_dict().items()}


def open_clip_state(text_encoder: Any, prefix: str) -> dict[str, Any]:
    """transformers CLIPTextModel[WithProjection] -> OpenCLIP's text tower: q, k, v fused into in_proj,
    text_projection stored (hidden, projection)."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        f"{prefix}token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        f"{prefix}positional_embedding": state.pop("embeddings.position_embedding.weight"),
        f"{prefix}ln_final.weight": state.pop("final_layer_norm.weight"),
        f"{prefix}ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out[f"{prefix}text_projection"] = state.pop("text_projection.weight").T.contiguous()
    state.pop("embeddings.position_ids", None)
    for i in range(text_encoder.config.num_hidden_layers):
        layer = f"encoder.layers.{i}."
        block = f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{block}attn.in_proj_{leaf}"] = torch.cat(
                [state.pop(f"{layer}self_attn.{p}_proj.{leaf}") for p in "qkv"])
        for key in [k for k in state if k.startswith(layer)]:
            module, leaf = _split(key[len(layer):])
            out[f"{block}{_renamed(module, _OPEN_CLIP_LAYER)}.{leaf}"] = state.pop(key)
    if state:
        raise ValueError(f"OpenCLIP layout has no place for {sorted(state)[:3]}")
    return out


def _save_atomic(state: dict[str, Any], out: Path) -> Path:
    """One .safetensors, fp32, written whole or not at all."""
    import os

    import torch
    from safetensors.torch import save_file

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        save_file({k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}, str(partial))
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _sd3_text_encoders(model_dir: Path) -> dict[str, Any]:
    """An SD 3 folder's text encoders present, by component (T5 absent where the folder has none)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    out = {c: CLIPTextModelWithProjection.from_pretrained(model_dir / c) for c in ("text_encoder", "text_encoder_2")}
    if (model_dir / "text_encoder_3" / "config.json").is_file():
        out["text_encoder_3"] = T5EncoderModel.from_pretrained(model_dir / "text_encoder_3")
    return out


def write_single_file(model_dir: Path, out: Path, text_encoders: bool = True) -> Path:
    """A diffusers SD 1.x, SDXL or SD 3 folder -> one .safetensors in the original layout; SD 3 without
    its text encoders where `text_encoders` is False (as Stability ships sd3.5_medium.safetensors)."""
    import json

    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = family_for(json.loads((model_dir / "model_index.json").read_text()), str(model_dir))
    state = vae_state(AutoencoderKL.from_pretrained(model_dir / "vae"))
    if family.name == "sd3":
        state.update(mmdit_state(SD3Transformer2DModel.from_pretrained(model_dir / "transformer")))
        for component, encoder in (_sd3_text_encoders(model_dir) if text_encoders else {}).items():
            state.update(sd3_text_state(encoder, component))
        return _save_atomic(state, out)
    state.update(unet_state(UNet2DConditionModel.from_pretrained(model_dir / "unet")))
    state.update(clip_state(CLIPTextModel.from_pretrained(model_dir / "text_encoder"), CLIP_PREFIXES[family.name]))
    if family.name == "sdxl":
        state.update(open_clip_state(CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2"),
                                     OPEN_CLIP_PREFIXES["sdxl"]))
    return _save_atomic(state, out)


def write_text_encoder_files(model_dir: Path, folder: Path) -> Path:
    """An SD 3 folder's text encoders as Stability ships them beside the model: text_encoders/clip_l,
    clip_g and t5xxl_fp16 .safetensors, each in transformers' own keys."""
    names = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl_fp16"}
    folder.mkdir(parents=True, exist_ok=True)
    for component, encoder in _sd3_text_encoders(model_dir).items():
        _save_atomic(_untied(dict(encoder.state_dict())), folder / f"{names[component]}.safetensors")
    return folder
