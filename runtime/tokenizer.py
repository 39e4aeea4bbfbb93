"""CLIP tokenizer on the `tokenizers` library (the pipeline transformers' CLIPTokenizer uses, from the
tokenizer.json the exporter writes), with A1111's prompt reading on top (sdrt.prompts): emphasis
weights, BREAK and 75-token chunks. A prompt of one chunk without emphasis gives exactly diffusers'
ids (`padding="max_length", max_length=77`)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from sdrt.errors import EngineError
from sdrt.prompts import BREAK, CHUNK_LENGTH, CHUNK_TOKENS, Chunk, chunk_rows, chunk_tokens, parse_emphasis

CACHED_PROMPTS = 1024  # a server sees the same prompts (negatives above all) again and again


class ClipTokenizer:
    def __init__(self, tokenizer_dir: Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise EngineError(f"{path} is missing: re-export the engines with `sdrt export`")
        config_path = Path(tokenizer_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}

        def token(key: str, default: str) -> int:
            value = config.get(key, default)
            value = value["content"] if isinstance(value, dict) else value
            token_id = self._tok.token_to_id(value)
            if token_id is None:
                raise EngineError(f"{path}: {key} {value!r} is not in the vocabulary; re-export the engines")
            return token_id

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.bos = token("bos_token", "<|startoftext|>")
        self.eos = token("eos_token", "<|endoftext|>")
        self.pad = token("pad_token", "<|endoftext|>")
        self.comma = self._tok.token_to_id(",</w>")
        self.chunks = lru_cache(maxsize=CACHED_PROMPTS)(self._chunks)

    def _chunks(self, prompt: str) -> tuple[Chunk, ...]:
        """prompt -> its chunks (each piece of text tokenized on its own, as A1111 does)."""
        pieces = parse_emphasis(prompt)
        texts = [p[0] for p in pieces if p is not BREAK]
        encoded = iter(self._tok.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        tokens = [p if p is BREAK else (next(encoded).ids, p[1]) for p in pieces]
        return tuple(chunk_tokens(tokens, self.comma))

    def tokens(self, prompt: str) -> int:
        """The number of prompt tokens, as A1111's counter shows it (BREAK pads to the chunk's end)."""
        chunks = self.chunks(prompt)
        return CHUNK_TOKENS * (len(chunks) - 1) + len(chunks[-1].ids)

    def __call__(self, prompts: list[str], chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> input_ids (N, 77·chunks) int64 and token weights (N, 77·chunks) float32.

        Every prompt is padded to `chunks` chunks with empty ones; more chunks than that is an error."""
        ids, weights = [], []
        for prompt in prompts:
            own = self.chunks(prompt)
            if len(own) > chunks:
                raise ValueError(f"the prompt has {len(own)} chunks, more than {chunks}")
            rows = list(chunk_rows(own, chunks, self.bos, self.eos, self.pad))
            ids.append([i for row_ids, _ in rows for i in row_ids])
            weights.append([w for _, row_weights in rows for w in row_weights])
        shape = (len(prompts), CHUNK_LENGTH * chunks)
        return np.array(ids, np.int64).reshape(shape), np.array(weights, np.float32).reshape(shape)
