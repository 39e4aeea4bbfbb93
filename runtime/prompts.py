"""Prompts as AUTOMATIC1111 reads them: emphasis weights, BREAK, and 75-token chunks past CLIP's context.

Emphasis (A1111's documented syntax): `(text)` multiplies the weight of its tokens by 1.1, `[text]`
divides it by 1.1, `(text:1.3)` sets the factor, brackets nest and multiply; `\\(`, `\\)`, `\\[`,
`\\]`, `\\\\` are literal; an unclosed bracket applies to the end of the prompt, an unopened closing
one is literal text. `BREAK` (upper case, a word of its own) ends the current chunk. Two departures,
both where A1111 misbehaves: a BREAK inside brackets still breaks (A1111 weights the word instead),
and a malformed weight such as `(a:1.2.3)` is literal text (A1111 raises).

Chunks: the prompt's tokens are cut into chunks of 75, each encoded on its own as
[BOS] + 75 tokens + [EOS] (padded) = 77 and the embeddings concatenated, so the denoiser sees 77·K
tokens. As A1111 does (its default `comma_padding_backtrack` of 20), a chunk that fills up within
20 tokens after a comma ends at that comma and the rest moves to the next chunk. A textual-inversion
embedding's vectors (sdrt.embeddings) are never split: one that does not fit opens the next chunk, and
one the comma backtrack moves takes its vectors along (A1111 moves its placeholder tokens but leaves
the vectors at their old positions, a third departure).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

CHUNK_TOKENS = 75  # prompt tokens per chunk; with BOS and EOS, CLIP's 77 positions
CHUNK_LENGTH = CHUNK_TOKENS + 2
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's factors of ( ) and [ ]


class Break:
    """BREAK: the current chunk ends here."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = Break()
Piece = tuple[str, float]  # text and its weight

_TOKEN = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash
  | \\                      # a lone backslash (dropped, as A1111)
  | \(|\[                   # opening brackets
  | :\s*([+-]?[.\d]+)\s*\)  # `:weight)` closes a round bracket with that factor
  | \)|\]                   # closing brackets
  | [^\\()\[\]:]+           # text
  | :                       # a colon that closes nothing
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")  # what float() takes of [+-]?[.\d]+


def parse_emphasis(prompt: str) -> list[Piece | Break]:
    """prompt -> text pieces with their weights and BREAK markers, equal neighbours merged.

    `a (b:1.5) [c]` -> [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]
    """
    items: list[list] = []  # [text, weight] or [BREAK]
    round_open: list[int] = []  # positions in items where a bracket opened
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in items[start:]:
            if item[0] is not BREAK:
                item[1] *= factor

    def text(value: str) -> None:
        for i, part in enumerate(_BREAK.split(value)):
            if i:
                items.append([BREAK])
            items.append([part, 1.0])

    for match in _TOKEN.finditer(prompt):
        token, weight = match[0], match[1]
        if token.startswith("\\"):
            items.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(items))
        elif token == "[":
            square_open.append(len(items))
        elif weight is not None and round_open and _NUMBER.fullmatch(weight):
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            text(token)
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    out: list[Piece | Break] = []
    for item in items:
        if item[0] is BREAK:
            out.append(BREAK)
        elif not item[0]:
            continue
        elif out and out[-1] is not BREAK and out[-1][1] == item[1]:  # type: ignore[index]
            out[-1] = (out[-1][0] + item[0], item[1])  # type: ignore[index]
        else:
            out.append((item[0], item[1]))
    return out or [("", 1.0)]


@dataclass(frozen=True)
class Chunk:
    """Up to CHUNK_TOKENS prompt tokens and their weights (no BOS, EOS or padding)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


def chunk_tokens(pieces: Sequence[tuple[Sequence[int | tuple[int, ...]], float] | Break], comma: int | None,
                 backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Token ids of each piece (and BREAKs) -> chunks of at most CHUNK_TOKENS; at least one chunk.

    A chunk that is full when a token other than a comma comes, with a comma among its last
    `backtrack` tokens, ends after that comma; the tokens after it open the next chunk. A tuple of ids
    (an embedding's vectors) stays in one chunk: one it does not fit in ends before it (A1111)."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in ids of the current chunk's last comma

    def close(keep: int) -> None:
        nonlocal ids, weights, last_comma
        chunks.append(Chunk(tuple(ids[:keep]), tuple(weights[:keep])))
        ids, weights, last_comma = ids[keep:], weights[keep:], -1

    for piece in pieces:
        if piece is BREAK:
            close(len(ids))
            continue
        tokens, weight = piece  # type: ignore[misc]
        for token in tokens:
            group = token if isinstance(token, tuple) else (token,)
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma >= 0 and len(ids) - last_comma <= backtrack:
                close(last_comma + 1)
            if len(ids) == CHUNK_TOKENS or len(ids) + len(group) > CHUNK_TOKENS:
                close(len(ids))
            ids.extend(group)
            weights.extend([weight] * len(group))
    if ids or not chunks:
        close(len(ids))
    return chunks


def chunk_rows(chunks: Sequence[Chunk], count: int, bos: int, eos: int, pad: int) -> Iterator[tuple[list[int], list[float]]]:
    """`count` rows of CHUNK_LENGTH: [BOS] ids [EOS] pad..., weight 1 outside the prompt tokens;
    chunks past the prompt's own are empty (the encoding of "")."""
    for i in range(count):
        chunk = chunks[i] if i < len(chunks) else Chunk((), ())
        fill = CHUNK_TOKENS - len(chunk.ids)
        yield [bos, *chunk.ids, eos] + [pad] * fill, [1.0, *chunk.weights, 1.0] + [1.0] * fill
