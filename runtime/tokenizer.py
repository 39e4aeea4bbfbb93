"""CLIP and T5 tokenizers on the `tokenizers` library (the pipeline transformers' tokenizers use, from the
tokenizer.json the exporter writes), with A1111's prompt reading on top (sdrt.prompts): emphasis
weights, BREAK and, for CLIP, 75-token chunks and textual-inversion embeddings (sdrt.embeddings). A
prompt of one chunk without emphasis gives exactly diffusers' ids (CLIP: `padding="max_length",
max_length=77`; T5: `max_length=max_sequence_length`)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sdrt.errors import EngineError, InputError
from sdrt.families import T5
from sdrt.prompts import BREAK, CHUNK_LENGTH, CHUNK_TOKENS, Chunk, chunk_rows, chunk_tokens, parse_emphasis

CACHED_PROMPTS = 1024  # a server sees the same prompts (negatives above all) again and again


class _Tokenizer:
    """A tokenizer.json, without truncation or padding, and its special tokens from tokenizer_config.json."""

    def __init__(self, tokenizer_dir: Path):
        from tokenizers import Tokenizer

        self.path = Path(tokenizer_dir) / "tokenizer.json"
        if not self.path.is_file():
            raise EngineError(f"{self.path} is missing: re-export the engines with `sdrt export`")
        config_path = Path(tokenizer_dir) / "tokenizer_config.json"
        self._config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.no_truncation()
        self._tok.no_padding()

    def _token(self, key: str, default: str) -> int:
        value = self._config.get(key, default)
        value = value["content"] if isinstance(value, dict) else value
        token_id = self._tok.token_to_id(value)
        if token_id is None:
            raise EngineError(f"{self.path}: {key} {value!r} is not in the vocabulary; re-export the engines")
        return token_id


class ClipTokenizer(_Tokenizer):
    def __init__(self, tokenizer_dir: Path):
        super().__init__(tokenizer_dir)
        self.bos = self._token("bos_token", "<|startoftext|>")
        self.eos = self._token("eos_token", "<|endoftext|>")
        self.pad = self._token("pad_token", "<|endoftext|>")
        self.comma = self._tok.token_to_id(",</w>")
        self.use_embeddings({}, None)

    def use_embeddings(self, words: Mapping[str, tuple[int, ...] | str], rows: np.ndarray | None) -> None:
        """Embedding names -> their placeholder ids (or, skipped ones, the error a prompt using them gets),
        and the rows (E, C) the placeholders index (sdrt.embeddings); matched on token ids, longest first,
        within each piece of emphasis, as A1111 does."""
        self.rows = rows
        self._words: dict[int, list[tuple[tuple[int, ...], tuple[int, ...] | str]]] = {}
        for name, value in words.items():
            key = tuple(self._tok.encode(name, add_special_tokens=False).ids)
            if key:
                self._words.setdefault(key[0], []).append((key, value))
        for candidates in self._words.values():
            candidates.sort(key=lambda c: -len(c[0]))
        self.chunks = lru_cache(maxsize=CACHED_PROMPTS)(self._chunks)  # the cache read the old names

    def _placed(self, ids: Sequence[int]) -> list[int | tuple[int, ...]]:
        """Token ids with each embedding name replaced by its group of placeholder ids."""
        out: list[int | tuple[int, ...]] = []
        i = 0
        while i < len(ids):
            match = next((c for c in self._words.get(ids[i], ()) if tuple(ids[i: i + len(c[0])]) == c[0]), None)
            if match is None:
                out.append(ids[i])
                i += 1
                continue
            if isinstance(match[1], str):
                raise InputError(match[1])
            out.append(match[1])
            i += len(match[0])
        return out

    def check(self, prompt: str, label: str, limit: int | None) -> int:
        """The chunks the prompt takes; an InputError above `limit` (None: no limit), naming the fix."""
        chunks = len(self.chunks(prompt))
        if limit is not None and chunks > limit:
            raise InputError(f"{label} is {self.tokens(prompt)} tokens ({chunks} chunks of 75); these TensorRT plans "
                             f"take at most {limit * 75}: shorten it, rebuild them after `sdrt export --max-chunks "
                             f"{chunks}`, or run ONNX Runtime (--backend ort), which takes any length")
        return chunks

    def _chunks(self, prompt: str) -> tuple[Chunk, ...]:
        """prompt -> its chunks (each piece of text tokenized on its own, as A1111 does)."""
        pieces = parse_emphasis(prompt)
        texts = [p[0] for p in pieces if p is not BREAK]
        encoded = iter(self._tok.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        tokens = [p if p is BREAK else (self._placed(next(encoded).ids), p[1]) for p in pieces]
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


class T5Tokenizer(_Tokenizer):
    """SD3's third tokenizer: one sequence of max_length tokens, `</s>` after the prompt, `<pad>` after that.
    Emphasis is read as for CLIP (each piece tokenized on its own, its weight on its tokens); BREAK, a CLIP
    chunk boundary, is dropped. A prompt longer than the sequence is refused rather than truncated."""

    def __init__(self, tokenizer_dir: Path, max_length: int):
        super().__init__(tokenizer_dir)
        self.max_length = max_length
        self.eos = self._token("eos_token", "</s>")
        self.pad = self._token("pad_token", "<pad>")
        self.pieces = lru_cache(maxsize=CACHED_PROMPTS)(self._pieces)

    def _pieces(self, prompt: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        pieces = [p for p in parse_emphasis(prompt) if p is not BREAK]
        encoded = self._tok.encode_batch([text for text, _ in pieces], add_special_tokens=False) if pieces else []
        ids = tuple(i for e in encoded for i in e.ids)
        weights = tuple(w for e, (_, w) in zip(encoded, pieces) for _ in e.ids)
        return ids, weights

    def tokens(self, prompt: str) -> int:
        return len(self.pieces(prompt)[0])

    def check(self, prompt: str, label: str, limit: int | None) -> int:
        """1 (T5 takes no chunks); an InputError when the prompt does not fit the sequence."""
        count = self.tokens(prompt)
        if count > self.max_length - 1:
            raise InputError(f"{label} is {count} T5 tokens; these engines take at most {self.max_length - 1}: shorten "
                             f"it, or re-export with `sdrt export --max-sequence-length {count + 1}` (at most 512)")
        return 1

    def __call__(self, prompts: list[str], chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> input_ids (N, max_length) int64 and token weights (N, max_length) float32."""
        n = self.max_length
        ids = np.full((len(prompts), n), self.pad, np.int64)
        weights = np.ones((len(prompts), n), np.float32)
        for row, prompt in enumerate(prompts):
            own, own_weights = self.pieces(prompt)
            if len(own) > n - 1:
                raise ValueError(f"the prompt has {len(own)} T5 tokens, more than {n - 1}")
            ids[row, : len(own) + 1] = own + (self.eos,)
            weights[row, : len(own)] = own_weights
        return ids, weights


def load_tokenizer(tokenizer_dir: Path, kind: str, max_length: int = 0) -> ClipTokenizer | T5Tokenizer:
    """The tokenizer of a text-encoder slot's kind (sdrt.families CLIP or T5)."""
    return T5Tokenizer(tokenizer_dir, max_length) if kind == T5 else ClipTokenizer(tokenizer_dir)
