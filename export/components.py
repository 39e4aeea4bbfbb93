"""The graphs sdrt exports, as torch modules around the diffusers components.

The text encoders write the conditioning the family names; the VAE encoder turns input images into
latents; the denoise step folds classifier-free guidance, a generic linear sampler update and the
inpainting blend into the U-Net graph (see DESIGN.md), so the runtime's loop is one engine call per step:

    out       = unet(c_in * [x; x], t, [uncond; cond])          # (2B, 4, h, w), CFG batching
    guided    = out_u + g * (out_c - out_u)                      # Ho & Salimans 2022
    x_next    = a*x + b*guided + Σk hx_k*x_{i-k} + Σk ho_k*guided_{i-k} + d*noise
    x_next    = m * x_next + (1 - m) * (ka*image + kn*image_noise)   # 4-channel inpainting; m = 1: no-op

With ControlNets (Zhang et al. 2023) the same call first runs each on [x; x] and its hint, and adds
Σ_j scale_j · residuals_j to the U-Net's skip connections (diffusers' MultiControlNetModel).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sdrt.families import BLEND, CONCAT, MMDIT, UNET, TextEncoderSlot
from sdrt.prompts import CHUNK_LENGTH
from sdrt.schedulers import A, B, C_IN, D, HISTORY, HO, HX, KA, KN
from sdrt.export.original_layout import controlnet_original_names, unet_module_name
from sdrt.export.weights import parameter_digests

CONTROLNET_WEIGHTS = "controlnets."  # ControlNet j's parameters in the step graph: controlnets.j.<state key>


class TextEncoder(nn.Module):
    """Chunked, weighted prompts -> the family's text conditioning (A1111's prompt encoding):

    input_ids (N, S) int64 and token_weights (N, S) f32, S = 77·K: K chunks of 77 per row, each encoded
    on its own; keep (N,) f32 (0 zeroes a row: force_zeros_for_empty_prompt); token_rows (E, C) f32, the
    token embeddings of the ids below 0 (id -1 - e takes row e: textual-inversion vectors, sdrt.embeddings);
    clip_skip (1,) int64 where the slot takes one (1 = the last layer) -> hidden states (N, S, C)[, pooled
    (N, P) of chunk 0].

    An id below 0 reaches CLIP as id 0 (A1111's placeholder), so positions, the causal mask and the pooled
    token (the EOS, found by id) are those of a plain prompt; only that position's token embedding changes.

    Emphasis (A1111's "Original"): each chunk's hidden states times its token weights, rescaled to
    the chunk's unweighted mean. Weights of 1 leave the states bit for bit as they were.
    """

    def __init__(self, text_encoder: nn.Module, slot: TextEncoderSlot):
        super().__init__()
        self.text_encoder = text_encoder
        self.slot = slot
        self.final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # WithProjection wraps one
        self.layers = text_encoder.config.num_hidden_layers
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, token_rows) while forward runs
        embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings
        embeddings.token_embedding.register_forward_hook(self._placed_rows)

    def _placed_rows(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """The token embeddings (N·K, 77, C) with token_rows in place at the ids below 0."""
        if self._rows is None:
            return out
        ids, rows = self._rows
        extra = rows.to(out.dtype).index_select(0, (-1 - ids).clamp(min=0).reshape(-1)).reshape(out.shape)
        return torch.where((ids < 0)[..., None], extra, out)

    @property
    def adapted(self) -> tuple[nn.Module, Callable[[str], tuple[str, str]]]:
        """The module whose weights a LoRA changes, and a module path's weight name and original-layout
        path: `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight` (the name PEFT and
        kohya files use, also where transformers ≥ 5 drops the `text_model.` level)."""

        def names(path: str) -> tuple[str, str]:
            if path.split(".")[0] in ("embeddings", "encoder", "final_layer_norm"):
                path = f"text_model.{path}"
            return f"{self.slot.component}.{path}.weight", ""

        return self.text_encoder, names

    def forward(self, input_ids: torch.Tensor, token_weights: torch.Tensor, keep: torch.Tensor,
                token_rows: torch.Tensor, *clip_skip: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, s = input_ids.shape
        ids = input_ids.reshape(-1, CHUNK_LENGTH)
        self._rows = (ids, token_rows)
        try:
            out = self.text_encoder(ids.clamp(min=0), output_hidden_states=True, return_dict=True)
        finally:
            self._rows = None
        if self.slot.clip_skip:  # hidden_states[-clip_skip]: a gather over the stacked layer outputs
            layers = torch.stack(out.hidden_states[1:])  # (L, N·K, 77, C)
            hidden = layers.index_select(0, self.layers - clip_skip[0]).squeeze(0)
        else:
            hidden = out.hidden_states[-self.slot.layer]
        if self.slot.final_norm:
            hidden = self.final_norm(hidden)
        keep = keep.to(hidden.dtype)
        hidden = emphasized(hidden, token_weights.reshape(-1, CHUNK_LENGTH)).reshape(n, s, -1) * keep[:, None, None]
        if self.slot.pooled is None:
            return (hidden,)
        pooled = out.text_embeds.reshape(n, -1, out.text_embeds.shape[-1])[:, 0]  # A1111: the first chunk's
        return hidden, pooled * keep[:, None]


EMPHASIS_MEAN_FLOOR = 1e-3  # |mean| below this share of mean|z|: the mean is rounding residue


def emphasized(hidden: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """(M, T, C) states times their (M, T) token weights, rescaled to each row's unweighted mean (A1111's
    "Original" emphasis), the means in fp32. Weights of 1 leave the states bit for bit as they were.

    A row whose mean (or weighted mean) is ~0 against its mean magnitude keeps scale 1: states straight
    out of a LayerNorm of weight 1 and bias 0 (a default-initialised CLIP) average 0 per token, and the
    ratio would be rounding residue over rounding residue, different on every backend."""
    z = hidden.float()
    weighted = z * token_weights[..., None]
    mean, weighted_mean = z.mean((1, 2), keepdim=True), weighted.mean((1, 2), keepdim=True)
    resolvable = (mean.abs() > EMPHASIS_MEAN_FLOOR * z.abs().mean((1, 2), keepdim=True)) & (
        weighted_mean.abs() > EMPHASIS_MEAN_FLOOR * weighted.abs().mean((1, 2), keepdim=True))
    scale = torch.where(resolvable, mean / weighted_mean, torch.ones_like(mean))  # 0/0 is never selected
    return (weighted * scale).to(hidden.dtype)


class T5Encoder(nn.Module):
    """input_ids (N, L) int64, token_weights (N, L) f32, keep (N,) f32 -> hidden states (N, L, C): T5's last
    hidden state (diffusers' SD3 `text_encoder_3(ids)[0]`, no attention mask) with the CLIP encoders' emphasis."""

    def __init__(self, t5: nn.Module, slot: TextEncoderSlot):
        super().__init__()
        self.t5 = t5
        self.slot = slot

    def forward(self, input_ids: torch.Tensor, token_weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        hidden = emphasized(self.t5(input_ids, return_dict=True).last_hidden_state, token_weights)
        return hidden * keep.to(hidden.dtype)[:, None, None]


class DenoiseStep(nn.Module):
    """One sampler step: U-Net with CFG batching, the per-step linear update and the inpainting blend,
    all in-graph.

    Inputs, in order: latents (B, 4, h, w) f32; timestep (1,) f32; the family's conditioning tensors
    (CFG layout: (R*B, ...) with R = 2 for CFG ([uncond; cond]) or R = 1 without); the image inputs of
    `image_input` (families.IMAGE_INPUTS: (B, 4, h, w) latents, (B, 1, h, w) mask with 1 = repaint);
    guidance (1,) f32; an MMDiT's: skip_layers (L,) f32 (1 = the block is skipped) and skip_scale (1,)
    f32; step_coeffs (N_COEFFS,) f32 laid out as [c_in, a, b, hx_1..K, ho_1..K, d, ka, kn];
    x_history, out_history (K, B, 4, h, w) f32, newest first; noise (B, 4, h, w) f32. With J ControlNets,
    after the image inputs: control_image_0..J-1 (B, H, W, 3) uint8 RGB hints and control_scales (J, 2, R)
    f32, ControlNet j's multiplier of its residual r on the negative rows (0) and the prompt's rows (1; all
    rows without CFG) this step: its scale and control mode (sdrt.control), 0 outside its guidance window.

    Rows come in R groups of B: the cond rows alone (R = 1), [uncond; cond] (CFG), or [uncond; cond; cond]
    where the third group skips the flagged blocks (skip-layer guidance, SD 3.5; diffusers'
    `skip_guidance_layers`): guided = u + g·(c − u) + skip_scale·(c − s). The runtime sends R = 3 only on
    the steps of its window, so the other steps cost what plain CFG does.
    """

    def __init__(self, unet: nn.Module, conditioning: tuple[str, ...], cross_attention: tuple[str, ...],
                 added_cond: tuple[tuple[str, str], ...], image_input: str, image_inputs: tuple[str, ...],
                 denoiser: str = UNET, sequence: tuple[str, ...] = (), zero_sequence: int = 0,
                 controlnets: tuple[nn.Module, ...] = ()):
        super().__init__()
        self.unet = unet  # the family's denoiser: a U-Net, or SD3's transformer
        self.controlnets = nn.ModuleList(controlnets)  # diffusers ControlNetModels of the U-Net's architecture
        self.conditioning = conditioning
        self.cross_attention = cross_attention  # concatenated on channels: SDXL's [CLIP-L; bigG]
        self.added_cond = added_cond
        self.image_input = image_input
        self.image_inputs = image_inputs
        self.denoiser = denoiser
        self.sequence = sequence  # SD3's T5 states, after the CLIP states on the sequence axis
        self.zero_sequence = zero_sequence  # tokens of zeros standing in for an omitted T5 (diffusers' as well)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def adapted(self) -> tuple[nn.Module, Callable[[str], tuple[str, str]]]:
        """The denoiser, and a module path's weight name and original-layout path: a U-Net's
        `unet.<path>.weight` and openaimodel path; a transformer's `transformer.<path>.weight` (diffusers'
        and PEFT's naming) and none (kohya's MMDiT naming fuses q, k and v: not read)."""
        if self.denoiser == MMDIT:
            return self.unet, lambda path: (f"transformer.{path}.weight", "")
        return self.unet, lambda path: (f"unet.{path}.weight", unet_module_name(path, self.unet))

    def control_digests(self, into: dict) -> list[str]:
        """Adds every ControlNet parameter to the weight digests `into` (export.weights), named after its
        place in this module; returns the names."""
        names = []
        for j, controlnet in enumerate(self.controlnets):
            names += parameter_digests(controlnet, f"{CONTROLNET_WEIGHTS}{j}.", controlnet_original_names(controlnet),
                                       into)
        return names

    def forward(self, latents, timestep, *rest):
        n, m = len(self.conditioning), len(self.image_inputs)
        cond = dict(zip(self.conditioning, rest[:n]))
        image = dict(zip(self.image_inputs, rest[n : n + m]))
        j = len(self.controlnets)
        control = rest[n + m : n + m + j + 1] if j else ()  # the hints, then the scales
        guidance, *skip, step_coeffs, x_history, out_history, noise = rest[n + m + (j + 1 if j else 0) :]
        b = latents.shape[0]
        k = HISTORY
        hx = step_coeffs[HX : HX + k].view(k, 1, 1, 1, 1)
        ho = step_coeffs[HO : HO + k].view(k, 1, 1, 1, 1)
        hidden = torch.cat([cond[name].to(self.dtype) for name in self.cross_attention], dim=-1)  # (R*B, S, C)
        rows = torch.arange(hidden.shape[0], device=latents.device) % b  # (R*B,)
        cond_start = hidden.shape[0] // b // 2 * b  # the prompt's first row: 0 (R = 1), B (R = 2, 3)
        x_in = latents * step_coeffs[C_IN]
        control_x = x_in[rows].to(self.dtype)  # a ControlNet takes the 4 latent channels (diffusers' inpainting too)
        if self.image_input == CONCAT:  # (B, 4 + 1 + 4, h, w), diffusers' StableDiffusionInpaintPipeline
            x_in = torch.cat([x_in, image["mask"], image["masked_image_latents"]], dim=1)
        x_in = x_in[rows].to(self.dtype)  # (R*B, C, h, w)
        added: dict[str, torch.Tensor] = {}
        for key, name in self.added_cond:  # names under one key concatenated (SD3's two pooled outputs)
            value = cond[name].to(self.dtype)
            added[key] = torch.cat([added[key], value], dim=-1) if key in added else value
        if self.denoiser == MMDIT:  # (R*B, L): the blocks each row skips; rows of the third group of B alone
            skipped = (torch.arange(hidden.shape[0]) // b >= 2).float()[:, None] * skip[0]
            out = self._transformer(x_in, timestep, hidden, cond, added, skipped)
        else:
            residuals = self._control(control, control_x, timestep, hidden, added, rows, cond_start) if control else {}
            out = self.unet(x_in, timestep, hidden, added_cond_kwargs=added or None, return_dict=False,
                            **residuals)[0].float()
        rows_out = out.shape[0]
        out_u, out_c = out[:b], out[cond_start : cond_start + b]  # equal when R = 1 (no CFG)
        guided = out_u + guidance * (out_c - out_u)  # (B, 4, h, w)
        if skip:  # the last group: the skipping one (R = 3), else out_c and an exact + 0
            guided = guided + (out_c - out[rows_out - b :]) * skip[1]
        latents_next = (step_coeffs[A] * latents + step_coeffs[B] * guided + (hx * x_history).sum(0)
                        + (ho * out_history).sum(0) + step_coeffs[D] * noise)
        if self.image_input == BLEND:  # exact no-op where mask = 1 (text-to-image, img2img)
            known = step_coeffs[KA] * image["image_latents"] + step_coeffs[KN] * image["image_noise"]
            latents_next = image["mask"] * latents_next + (1 - image["mask"]) * known
        x_history_next = torch.cat([latents[None], x_history[:-1]])
        out_history_next = torch.cat([guided[None], out_history[:-1]])
        return latents_next, x_history_next, out_history_next

    def _control(self, control: tuple[torch.Tensor, ...], x_in: torch.Tensor, timestep: torch.Tensor,
                 hidden: torch.Tensor, added: dict[str, torch.Tensor], rows: torch.Tensor,
                 cond_start: int) -> dict[str, object]:
        """The U-Net's residual keywords: Σ_j w_j ⊙ ControlNet_j(x_in, hint_j), as diffusers'
        MultiControlNetModel sums them, w_j (rows, R) the weights of each row's half (negative / prompt).
        Hints (B, H, W, 3) uint8 -> [0, 1] NCHW (diffusers' control image processor: no normalization), one
        per row group (CFG: the same hint for uncond and cond)."""
        *hints, scales = control
        prompt_rows = (torch.arange(rows.shape[0], device=rows.device) >= cond_start).long()  # 0: negative, 1: prompt
        down: list[torch.Tensor] | None = None
        mid = None
        for j, (controlnet, hint) in enumerate(zip(self.controlnets, hints)):
            cond = (hint.float() / 255).permute(0, 3, 1, 2)[rows].to(self.dtype)
            d, m = controlnet(x_in, timestep, hidden, cond, added_cond_kwargs=added or None, return_dict=False)
            weights = scales[j].to(self.dtype)[prompt_rows]  # (rows, residuals)
            d = [r * weights[:, i, None, None, None] for i, r in enumerate(d)]
            m = m * weights[:, -1, None, None, None]
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return dict(down_block_additional_residuals=tuple(down or ()), mid_block_additional_residual=mid)

    def _transformer(self, x_in: torch.Tensor, timestep: torch.Tensor, clip: torch.Tensor, cond: dict[str, torch.Tensor],
                     added: dict[str, torch.Tensor], skipped: torch.Tensor) -> torch.Tensor:
        """SD3's MMDiT on [CLIP states zero-padded to the joint width; T5 states (or zeros)], (R*B, 77K + L, J).

        skipped (R*B, L) f32: 1 where a row skips a block (its states pass through unchanged, as diffusers'
        `skip_layers`)."""
        joint = self.unet.config.joint_attention_dim
        tail = [cond[name].to(self.dtype) for name in self.sequence if name in cond]
        if not tail:  # T5 omitted: zeros, as diffusers' pipeline with text_encoder_3=None
            tail = [clip.new_zeros(clip.shape[0], self.zero_sequence, joint)]
        hidden = torch.cat([nn.functional.pad(clip, (0, joint - clip.shape[-1])), *tail], dim=1)
        return mmdit_with_skips(self.unet, x_in, timestep.expand(x_in.shape[0]), hidden, added["pooled_projections"],
                                skipped > 0.5).float()


def mmdit_with_skips(t: nn.Module, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                     pooled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """diffusers' SD3Transformer2DModel.forward (0.42; no ControlNet, IP-Adapter or LoRA scale), with each
    row skipping the blocks skip (N, L) bool flags: x (N, C, h, w), context (N, S, J) -> (N, C, h, w)."""
    height, width = x.shape[-2:]
    hidden = t.pos_embed(x).contiguous()  # (N, h·w / p², D)
    temb = t.time_text_embed(timestep, pooled)
    context = t.context_embedder(context)
    for i, block in enumerate(t.transformer_blocks):
        context_out, hidden_out = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        keep = skip[:, i, None, None]  # a skipped block leaves the row's states as they were
        hidden = torch.where(keep, hidden, hidden_out)
        if context_out is not None:  # the last block (context_pre_only) returns no context
            context = torch.where(keep, context, context_out)
    hidden = t.proj_out(t.norm_out(hidden, temb))
    p, c = t.config.patch_size, t.out_channels
    hidden = hidden.reshape(hidden.shape[0], height // p, width // p, p, p, c)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(hidden.shape[0], c, height // p * p, width // p * p)


class _Vae(nn.Module):
    """A diffusers AutoencoderKL and its latent normalization: latents = (z - shift_factor) * scaling_factor."""

    def __init__(self, vae: nn.Module, scaling_factor: float, shift_factor: float = 0.0):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor  # SD3's VAE; 0 for SD 1.x / XL

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


class VaeEncoder(_Vae):
    """images (B, H, W, 3) uint8 RGB, pixel_mask (B, H, W, 1) f32 -> image_latents (B, 4, H/8, W/8) f32.

    diffusers' VaeImageProcessor normalization to [-1, 1]; pixels where pixel_mask is 1 become 0 (the
    masked image of inpainting U-Nets); the latent is the distribution's mean times the scaling factor
    (deterministic, where diffusers samples it by default).
    """

    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 * 2 - 1) * (1 - pixel_mask)  # (B, H, W, 3)
        x = x.permute(0, 3, 1, 2).to(self.dtype)
        mean = self.vae.encode(x, return_dict=False)[0].mean
        mean = mean.float()
        return (mean - self.shift_factor if self.shift_factor else mean) * self.scaling_factor


class VaeDecoder(_Vae):
    """latents (B, 4, h, w) f32 -> images (B, 8h, 8w, 3) uint8 RGB, diffusers' post-processing."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor
        z = (z + self.shift_factor if self.shift_factor else z).to(self.dtype)
        image = self.vae.decode(z, return_dict=False)[0].float()  # (B, 3, H, W) in [-1, 1]
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1)  # (B, H, W, 3)
        return image.to(torch.uint8)  # last op: TensorRT takes uint8 only at graph I/O
