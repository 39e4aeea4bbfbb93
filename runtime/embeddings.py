"""Textual-inversion embeddings (Gal et al. 2022) as A1111 loads them, without re-exporting.

An embedding file holds n learned token vectors; its file name, used as a word in a prompt, stands for
them. The tokenizer (sdrt.tokenizer) puts n placeholder ids in place of the name's tokens: id -1 - e
for row e of the table here, one table per CLIP encoder; the text-encoder graphs take the rows a
prompt uses as their `token_rows` input (E, C) and put row e in place of the token embedding at
those positions (sdrt.export.components.TextEncoder). They count in the 75-token chunks as n tokens
and take emphasis like any word, as in A1111.

Files read (weights-only; .safetensors, .pt, .bin): A1111's `string_to_param` layout, diffusers'
`learned_embeds` layout (one tensor under the token's name), one-tensor safetensors (`emb_params`), and
SDXL's `clip_l` / `clip_g` pairs. An embedding fits a model when its vectors have the widths of the
model's CLIP encoders, in order (SD 1.x: 768, SD 2.x: 1024, SDXL: 768 and 1280); the others are
skipped with the reason, as A1111 lists them, and a prompt that uses a skipped one is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sdrt.errors import EngineError, InputError
from sdrt.families import T5
from sdrt.manifest import Manifest
from sdrt.prompts import CHUNK_TOKENS
from sdrt.tensor_files import read_safetensors, read_torch_file

TOKEN_ROWS = "token_rows"  # the text-encoder input: the rows of the ids below 0
SUFFIXES = (".safetensors", ".pt", ".bin")
PAIR = ("clip_l", "clip_g")  # SDXL's two encoders, in the slots' order
_METADATA = ("step", "sd_checkpoint", "sd_checkpoint_name")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedding:
    name: str  # the word that stands for it: the file name without its suffix
    path: Path
    vectors: tuple[np.ndarray, ...]  # per CLIP encoder: (n, C) float32
    metadata: Mapping[str, Any]  # A1111's step, sd_checkpoint, sd_checkpoint_name (None where unknown)

    @property
    def count(self) -> int:
        return self.vectors[0].shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(v.shape[1] for v in self.vectors)


def _contents(path: Path) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(tensors or pickled dict, metadata) of an embedding file."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    data = read_torch_file(path)
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}, not the dict of an embedding file")
    return data, data


def _tensors(path: Path, data: Mapping[str, Any]) -> list[Any]:
    """The file's vector tensors: one, or SDXL's (clip_l, clip_g)."""
    if "string_to_param" in data:  # A1111: {"*": (n, C)}
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise InputError(f"{path}: string_to_param holds {len(params)} entries; an embedding has one")
        return list(params.values())
    if all(k in data for k in PAIR):
        return [data[k] for k in PAIR]
    arrays = [v for v in data.values() if isinstance(v, np.ndarray)]
    if len(arrays) != 1:  # diffusers: {"<token>": (C,) or (n, C)}; safetensors: {"emb_params": (n, C)}
        raise InputError(f"{path} holds {len(arrays)} tensors ({', '.join(map(str, data))}); an embedding holds "
                         "string_to_param, clip_l and clip_g, or one tensor")
    return arrays


def read_embedding(path: Path) -> Embedding:
    """An embedding file -> its vectors; an InputError naming what was read where it is not one."""
    path = Path(path)
    data, metadata = _contents(path)
    vectors = []
    for tensor in _tensors(path, data):
        if not isinstance(tensor, np.ndarray) or tensor.ndim not in (1, 2) or tensor.dtype.kind != "f":
            what = f"{tensor.dtype} {tensor.shape}" if isinstance(tensor, np.ndarray) else type(tensor).__name__
            raise InputError(f"{path}: its vectors are {what}; an embedding's are (vectors, width) floats")
        v = np.atleast_2d(tensor).astype(np.float32)
        if not 1 <= len(v) <= CHUNK_TOKENS or not np.all(np.isfinite(v)):
            raise InputError(f"{path}: {len(v)} vectors{'' if np.all(np.isfinite(v)) else ' with NaN or inf'}; an "
                             f"embedding has 1 to {CHUNK_TOKENS} finite vectors")
        vectors.append(v)
    if len({len(v) for v in vectors}) != 1:
        raise InputError(f"{path}: clip_l and clip_g hold {len(vectors[0])} and {len(vectors[1])} vectors; "
                         "an SDXL embedding has as many of each")
    info = {k: (metadata.get(k) if isinstance(metadata.get(k), (str, int)) else None) for k in _METADATA}
    return Embedding(path.stem, path, tuple(vectors), info)


@dataclass(frozen=True)
class Embeddings:
    """A folder's embeddings fitted to one model: what loaded, what did not and why, and the rows."""

    folder: Path | None
    loaded: Mapping[str, Embedding]
    skipped: Mapping[str, str]  # name -> why (the file named)
    unfit: Mapping[str, Embedding]  # the skipped ones that were read: of another model's widths
    rows: tuple[np.ndarray, ...]  # per CLIP encoder: (E, C) float32, every loaded embedding's vectors

    def words(self) -> dict[str, tuple[int, ...] | str]:
        """name -> its placeholder ids, or, for a skipped one, the InputError a prompt using it gets."""
        out: dict[str, tuple[int, ...] | str] = {}
        start = 0
        for name, e in self.loaded.items():
            out[name] = tuple(-1 - r for r in range(start, start + e.count))
            start += e.count
        for name, why in self.skipped.items():
            out[name] = f"the prompt uses the embedding {name}, which was not loaded: {why}"
        return out


def _fitted(e: Embedding, widths: tuple[int, ...]) -> str | None:
    """Why the embedding does not fit encoders of these widths; None where it does."""
    if e.widths == widths:
        return None
    return (f"{e.path} holds vectors {' and '.join(map(str, e.widths))} wide; this model's text encoders take "
            f"{' and '.join(map(str, widths))} (an embedding trained for another model family)")


def load_embeddings(folder: Path | None, widths: tuple[int, ...]) -> Embeddings:
    """Every embedding file under `folder` (recursively, in path order; the first of a name wins) fitted
    to CLIP encoders of `widths`; None: no embeddings."""
    if folder is None:
        return Embeddings(None, {}, {}, {}, tuple(np.zeros((0, w), np.float32) for w in widths))
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"the embeddings folder {folder} does not exist: pass the folder of .safetensors / .pt files")
    loaded: dict[str, Embedding] = {}
    skipped: dict[str, str] = {}
    unfit: dict[str, Embedding] = {}
    for path in sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        if path.stem in loaded or path.stem in skipped:
            log.warning("embedding %s: %s has the name of one already loaded; skipped", path.stem, path)
            continue
        e: Embedding | None = None
        try:
            e = read_embedding(path)
            why = _fitted(e, widths)
        except InputError as error:
            why = str(error)
        if why is None:
            loaded[path.stem] = e
            continue
        log.warning("embedding %s skipped: %s", path.stem, why)
        skipped[path.stem] = why
        if e is not None:
            unfit[path.stem] = e
    rows = tuple(np.concatenate([np.zeros((0, w), np.float32)] + [e.vectors[i] for e in loaded.values()])
                 for i, w in enumerate(widths))
    return Embeddings(folder, loaded, skipped, unfit, rows)


def compact_rows(ids: np.ndarray, rows: np.ndarray | None, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids with placeholders into `rows` (E, width)) -> the same with only the rows the ids use, ids
    renumbered into them; one zero row where none is used (the graphs' E is at least 1)."""
    placed = ids < 0
    used = np.unique(ids[placed])  # ascending: the last rows first
    if not used.size:
        return ids, np.zeros((1, width), np.float32)
    if rows is None or len(rows) < -used[0]:
        raise InputError(f"token ids {used.tolist()} name embedding rows that are not loaded")
    out = ids.copy()
    out[placed] = -1 - np.searchsorted(used, ids[placed])
    return out, rows[-1 - used]


def use_embeddings(tokenizers: Mapping[str, Any], manifest: Manifest, folder: Path | None) -> Embeddings:
    """The folder's embeddings fitted to the engines' CLIP encoders and handed to their tokenizers (None:
    none); an error where these engines cannot take them."""
    slots = [s for s in manifest.model.text_encoders if s.kind != T5]
    specs = [manifest.components[s.component] for s in slots]
    if folder is not None:
        if len(slots) != len(manifest.model.text_encoders):
            raise InputError(f"{manifest.name} is an SD 3 model: textual-inversion embeddings are for SD 1.x, 2.x "
                             "and SDXL (neither A1111 nor diffusers defines them for T5); run without --embeddings-dir")
        if any(all(t.name != TOKEN_ROWS for t in spec.inputs) for spec in specs):
            raise EngineError(f"{manifest.name}'s text encoders were exported before sdrt took textual-inversion "
                              "embeddings: re-export the engines with `sdrt export` to use them")
    widths = tuple(next((t.shape[1] for t in spec.inputs if t.name == TOKEN_ROWS), 0) for spec in specs)
    embeddings = load_embeddings(folder, widths)
    for slot, rows in zip(slots, embeddings.rows):
        tokenizers[slot.tokenizer].use_embeddings(embeddings.words(), rows if len(rows) else None)
    return embeddings
