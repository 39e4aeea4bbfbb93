"""A reference for A1111's prompt encoding built on transformers' CLIP alone (no sdrt code): the test
says the pieces and their weights; chunks are cut every 75 tokens (the prompts have no commas, so
A1111's comma backtrack does not apply) and at BREAK."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BREAK = "BREAK"


def _chunked(tokenizer, pieces) -> list[list[tuple[int, float]]]:
    chunks: list[list[tuple[int, float]]] = [[]]
    for piece in pieces:
        if piece == BREAK:
            chunks.append([])
            continue
        text, weight = piece
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.convert_tokens_to_ids(",</w>") not in ids, "the reference does not backtrack to commas"
        for token in ids:
            if len(chunks[-1]) == 75:
                chunks.append([])
            chunks[-1].append((token, weight))
    return chunks


def reference_embeddings(model_dir: Path, encoder: str, tokenizer: str, layer: int, final_norm: bool,
                         pieces, chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(77·K, C) hidden states of `pieces` [(text, weight) or BREAK] and the (P,) pooled output of the
    first chunk (zeros without a projection); K = `chunks` (empty chunks appended) or the prompt's own."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model_dir / tokenizer)
    with_projection = (model_dir / encoder / "config.json").read_text().count("WithProjection") > 0
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel).from_pretrained(model_dir / encoder).eval()
    norm = getattr(model, "text_model", model).final_layer_norm
    own = _chunked(tok, pieces)
    own += [[] for _ in range((chunks or len(own)) - len(own))]
    hidden, pooled = [], []
    with torch.no_grad():
        for chunk in own:
            pad = 75 - len(chunk)
            ids = [tok.bos_token_id] + [t for t, _ in chunk] + [tok.eos_token_id] + [tok.pad_token_id] * pad
            weights = torch.tensor([1.0] + [w for _, w in chunk] + [1.0] * (pad + 1))
            out = model(torch.tensor([ids]), output_hidden_states=True)
            z = out.hidden_states[-layer][0]  # (77, C)
            if final_norm:
                z = norm(z)
            weighted = z * weights[:, None]
            hidden.append(weighted * (z.mean() / weighted.mean()))  # A1111's "Original" emphasis
            pooled.append(out.text_embeds[0] if with_projection else torch.zeros(1))
    return torch.cat(hidden).numpy(), pooled[0].numpy()
