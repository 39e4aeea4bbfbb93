"""CLIP tokenizer on the `tokenizers` library: the same pipeline transformers' CLIPTokenizer uses,
loaded from the tokenizer.json the exporter writes; padded and truncated as diffusers asks
(`padding="max_length", truncation=True, max_length=77`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from sdrt.errors import EngineError


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and was cut."""


class ClipTokenizer:
    def __init__(self, tokenizer_dir: Path, max_length: int):
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise EngineError(f"{path} is missing: re-export the engines with `sdrt export`")
        config_path = Path(tokenizer_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        pad_token = config.get("pad_token", "<|endoftext|>")
        pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
        self._tok = Tokenizer.from_file(str(path))
        pad_id = self._tok.token_to_id(pad_token)
        if pad_id is None:
            raise EngineError(f"{path}: pad token {pad_token!r} is not in the vocabulary; re-export the engines")
        self.max_length = max_length
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """prompts -> input_ids (N, max_length) int64; warns about truncated prompts."""
        encodings = self._tok.encode_batch(list(prompts))
        for prompt, enc in zip(prompts, encodings):
            if enc.overflowing:
                kept = self._tok.decode(enc.ids, skip_special_tokens=True).replace("</w>", " ").strip()
                warnings.warn(
                    f"prompt truncated to {self.max_length} tokens; kept: {kept[:60]!r}…",
                    PromptTruncatedWarning, stacklevel=3)
        return np.array([enc.ids for enc in encodings], dtype=np.int64)
