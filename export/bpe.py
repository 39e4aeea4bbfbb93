"""A small byte-level BPE trainer that writes CLIP-format vocab.json / merges.txt.

Test models need a real CLIP-style tokenizer without downloading one: this learns merges from a
built-in corpus, deterministically (ties broken by the pair's text), and lays the vocabulary out
the way CLIP does: 256 byte symbols, the same with `</w>`, one entry per merge, then the two
special tokens last.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from sdrt.errors import ModelError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

CORPUS = """
a photograph of an astronaut riding a horse on the moon, highly detailed, 8k, sharp focus
a painting of a castle in the mountains at sunset by a famous artist, oil on canvas, dramatic light
portrait of a young woman with red hair, studio lighting, bokeh, professional photography
a cute cat sitting on a wooden table next to a cup of coffee, morning light, cozy kitchen
cyberpunk city street at night with neon lights and rain, reflections, cinematic, trending
a watercolor illustration of a forest with tall trees and a small river, soft colors
an old man with a long white beard reading a book in a library, warm tones, detailed face
a futuristic car driving through the desert, dust, motion blur, wide angle lens
a bowl of fresh fruit on a marble counter, still life, natural light, high resolution
a dragon flying over the ocean during a storm, lightning, epic fantasy art, concept art
a small house on a hill covered with snow, winter landscape, blue sky, clouds
low quality, blurry, bad anatomy, extra fingers, watermark, text, deformed, ugly, worst quality
the quick brown fox jumps over the lazy dog while the birds are singing in the green garden
"""

_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _word_symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_map[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def train_merges(text: str, max_merges: int) -> list[tuple[str, str]]:
    byte_map = bytes_to_unicode()
    counts = collections.Counter(_WORD.findall(text.lower()))
    words = {_word_symbols(w, byte_map): n for w, n in counts.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {_merge(symbols, best): n for symbols, n in words.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return vocab


def write_vocab_files(out_dir: Path, merges: list[tuple[str, str]]) -> tuple[Path, Path, dict[str, int]]:
    """Writes CLIP's vocab.json and merges.txt for `merges`; returns their paths and the vocabulary."""
    vocab = clip_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path, vocab


# CLIP's (and OpenCLIP's) tokenizer: 49,408 tokens = 512 byte symbols + 48,894 merges + 2 special
CLIP_MERGES = 49408 - 512 - 2
CLIP_BPE_PACKAGE = "open-clip-torch"  # ships the merges as open_clip/bpe_simple_vocab_16e6.txt.gz


def real_clip_merges() -> list[tuple[str, str]]:
    """The merges of the real CLIP vocabulary, read from the open_clip package's data file without
    importing the package (installed with --no-deps: only its data file is used)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "bpe_simple_vocab_16e6.txt.gz" if spec else None
    if path is None or not path.is_file():
        raise ModelError(f"the real CLIP vocabulary is needed for a single-file checkpoint: install it with "
                         f"`pip install --no-deps {CLIP_BPE_PACKAGE}` (`make setup` does), or pass --config DIR, a "
                         "diffusers folder whose tokenizer folders fit the checkpoint")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1:1 + CLIP_MERGES]
    return [tuple(line.split()) for line in lines]  # type: ignore[misc]


def write_clip_bpe(out_dir: Path, max_merges: int = 2000) -> tuple[Path, Path, dict[str, int]]:
    """Writes the vocab.json and merges.txt of a small BPE trained on CORPUS."""
    return write_vocab_files(out_dir, train_merges(CORPUS, max_merges))
