"""The three graphs sdrt exports, as torch modules around the diffusers components.

The denoise step folds classifier-free guidance and a generic linear sampler update into the
U-Net graph (see DESIGN.md), so the runtime's loop is one engine call per step:

    out       = unet(c_in * [x; x], t, [uncond; cond])          # (2B, 4, h, w), CFG batching
    guided    = out_u + g * (out_c - out_u)                      # Ho & Salimans 2022
    x_next    = a*x + b*guided + Σk hx_k*x_{i-k} + Σk ho_k*guided_{i-k} + d*noise
"""

from __future__ import annotations

import torch
from torch import nn

from sdrt.schedulers import HISTORY


class TextEncoder(nn.Module):
    """input_ids (N, 77) int64 -> text_embeddings (N, 77, C)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class DenoiseStep(nn.Module):
    """One sampler step: U-Net with CFG batching and the per-step linear update, all in-graph.

    latents (B, 4, h, w) f32; timestep (1,) f32; text_embeddings (R*B, 77, C) with R = 2 for
    CFG ([uncond; cond]) or R = 1 without; guidance (1,) f32; step_coeffs (N_COEFFS,) f32 laid
    out as [c_in, a, b, hx_1..K, ho_1..K, d]; x_history, out_history (K, B, 4, h, w) f32,
    newest first; noise (B, 4, h, w) f32.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def forward(self, latents, timestep, text_embeddings, guidance, step_coeffs, x_history, out_history, noise):
        b = latents.shape[0]
        k = HISTORY
        c_in, a, bb, d = step_coeffs[0], step_coeffs[1], step_coeffs[2], step_coeffs[3 + 2 * k]
        hx = step_coeffs[3 : 3 + k].view(k, 1, 1, 1, 1)
        ho = step_coeffs[3 + k : 3 + 2 * k].view(k, 1, 1, 1, 1)
        rows = torch.arange(text_embeddings.shape[0], device=latents.device) % b  # (R*B,)
        x_in = (latents * c_in)[rows].to(self.dtype)  # (R*B, 4, h, w)
        out = self.unet(x_in, timestep, text_embeddings.to(self.dtype), return_dict=False)[0].float()
        out_u, out_c = out[:b], out[out.shape[0] - b :]  # equal when R = 1 (no CFG)
        guided = out_u + guidance * (out_c - out_u)  # (B, 4, h, w)
        latents_next = a * latents + bb * guided + (hx * x_history).sum(0) + (ho * out_history).sum(0) + d * noise
        x_history_next = torch.cat([latents[None], x_history[:-1]])
        out_history_next = torch.cat([guided[None], out_history[:-1]])
        return latents_next, x_history_next, out_history_next


class VaeDecoder(nn.Module):
    """latents (B, 4, h, w) f32 -> images (B, 8h, 8w, 3) uint8 RGB, diffusers' post-processing."""

    def __init__(self, vae: nn.Module, scaling_factor: float):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents / self.scaling_factor).to(self.dtype)
        image = self.vae.decode(z, return_dict=False)[0].float()  # (B, 3, H, W) in [-1, 1]
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1)  # (B, H, W, 3)
        return image.to(torch.uint8)  # last op: TensorRT takes uint8 only at graph I/O
