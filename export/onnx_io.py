"""torch module -> one ONNX file with its weights in one external-data file beside it."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

ALIGNMENT = 4096  # each tensor starts on a page, so ONNX Runtime can map the weights instead of copying them
COPY_CHUNK = 64 * 2**20


@dataclass(frozen=True)
class StoredTensor:
    """One initializer as gather_weights wrote it into the data file."""

    name: str
    offset: int
    length: int
    dims: tuple[int, ...]
    data_type: int  # onnx.TensorProto element type
    digest: bytes  # sha1 of its bytes: how export.weights finds the parameter it came from


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> list[StoredTensor]:
    """Writes path (graph) and path + '.data' (all weights), nothing else; returns where each weight went."""
    raw_dir = path.parent / f".{path.stem}.raw"
    shutil.rmtree(raw_dir, ignore_errors=True)
    raw_dir.mkdir(parents=True)
    try:
        raw = raw_dir / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about shape-dependent control flow
            torch.onnx.export(
                module, args, str(raw), input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        return gather_weights(raw, path)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)


def gather_weights(raw: Path, path: Path) -> list[StoredTensor]:
    """raw (the exporter's graph, its weights inline or in files beside it) -> path + path.data.

    Streams one tensor at a time, so memory stays at the largest tensor (torch writes the weights of
    a model over 2 GB as one file per tensor; loading them all would hold a second copy of the model).
    """
    model = onnx.load(str(raw), load_external_data=False)
    for node in model.graph.node:  # torch writes even Constant nodes' tensors to files past 2 GB (SD 3.5's
        for attr in node.attribute:  # weightless LayerNorms): inline again, as below 2 GB (they are small)
            if attr.type == onnx.AttributeProto.TENSOR and uses_external_data(attr.t):
                _inline(attr.t, raw.parent)
    data_name = path.name + ".data"
    stored = []
    with open(path.parent / data_name, "wb") as out:
        for tensor in model.graph.initializer:  # constant nodes stay inline: ONNX Runtime's shape inference reads them
            if uses_external_data(tensor):
                source, offset, length = _external_span(tensor, raw.parent)
            elif tensor.HasField("raw_data"):
                source, offset, length = None, 0, len(tensor.raw_data)
            else:  # typed fields (small int lists): left inline, as onnx's own converter does
                continue
            out.write(b"\0" * (-out.tell() % ALIGNMENT))
            start = out.tell()
            digest = hashlib.sha1()
            if source is None:
                out.write(tensor.raw_data)
                digest.update(tensor.raw_data)
            else:
                with open(source, "rb") as src:
                    src.seek(offset)
                    left = length
                    while left:
                        chunk = src.read(min(COPY_CHUNK, left))
                        if not chunk:
                            raise OSError(f"{source}: {left} bytes of {tensor.name} missing")
                        out.write(chunk)
                        digest.update(chunk)
                        left -= len(chunk)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", start), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            stored.append(StoredTensor(tensor.name, start, length, tuple(tensor.dims), tensor.data_type,
                                       digest.digest()))
    onnx.save_model(model, str(path))
    # open() above made the data file with the umask's mode: the graph's own mode, as onnx.save gives it
    os.chmod(path.parent / data_name, stat.S_IMODE(path.stat().st_mode))
    return stored


def _external_span(tensor: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor's bytes; no length: to the end of the file."""
    info = ExternalDataInfo(tensor)
    source, offset = base / info.location, info.offset or 0
    return source, offset, source.stat().st_size - offset if info.length is None else info.length


def _inline(tensor: onnx.TensorProto, base: Path) -> None:
    """Moves an external tensor's bytes into the tensor itself."""
    source, offset, length = _external_span(tensor, base)
    with open(source, "rb") as src:
        src.seek(offset)
        tensor.raw_data = src.read(length)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
