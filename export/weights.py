"""Naming the weights a LoRA can change in an exported graph (DESIGN: adapters are weight deltas).

torch.onnx's TorchScript exporter keeps a convolution's weight under its parameter name but folds a
Linear's weight into a transposed constant named `onnx::MatMul_N`. Each Linear and Conv weight of the
adapted module is found among the written initializers by the sha1 of its bytes (as they are, or
transposed), and the initializer is renamed after the module (`unet.<path>.weight`, diffusers' and
PEFT's naming), so the runtime can override it by name (ONNX Runtime) or refit it (TensorRT).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import onnx
import torch
from onnx import helper
from torch import nn

from sdrt.export.onnx_io import StoredTensor
from sdrt.manifest import WeightSlot

ADAPTED = (nn.Linear, nn.Conv2d)  # what LoRA (and LoCon) layers change


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.sha1(t.detach().contiguous().numpy()).digest()  # the array's buffer, not a bytes copy


def _add_digests(out: dict[bytes, list[tuple[str, bool, str]]], name: str, w: torch.Tensor, alias: str) -> None:
    out.setdefault(_digest(w), []).append((name, False, alias))
    if w.ndim == 2:
        out.setdefault(_digest(w.T), []).append((name, True, alias))


def weight_digests(root: nn.Module, names: Callable[[str], tuple[str, str]]) -> dict[bytes, list[tuple[str, bool, str]]]:
    """sha1 of each Linear/Conv weight of root, as stored and transposed -> [(name, transposed, original)];
    names(module path) gives the weight's name and its module's original-layout path.

    A digest two weights share (equal tensors) lists both; name_weights leaves such weights unnamed."""
    out: dict[bytes, list[tuple[str, bool, str]]] = {}
    for path, module in root.named_modules():
        if isinstance(module, ADAPTED):
            name, alias = names(path)
            _add_digests(out, name, module.weight, alias)
    return out


def parameter_digests(root: nn.Module, prefix: str, originals: dict[str, str],
                      into: dict[bytes, list[tuple[str, bool, str]]]) -> list[str]:
    """Adds every parameter of root (a ControlNet: all of its weights are swapped, not only the adapted
    ones) to `into` as prefix + its state key, with its original-layout key; returns the names added. A
    folded copy that only reshapes (GroupNorm's (C,) -> (C, 1, 1)) has the same bytes, so it is found too."""
    names = []
    for key, value in root.named_parameters():
        _add_digests(into, prefix + key, value, originals.get(key, ""))
        names.append(prefix + key)
    return names


def name_weights(path: Path, stored: list[StoredTensor],
                 digests: dict[bytes, list[tuple[str, bool, str]]]) -> tuple[dict[str, WeightSlot], tuple[str, ...]]:
    """Renames the initializers of path that are adapted weights; returns their slots by new name, and
    the digests' weights the graph does not hold as one initializer of their own (pruned: their layer's
    output is never read; or equal to another weight, or written twice)."""
    hits: dict[str, list[tuple[StoredTensor, bool, str]]] = {}
    for t in stored:
        found = digests.get(t.digest, [])
        if len(found) == 1:  # else not a weight, equal weights, or a symmetric one (stored as is or transposed?)
            name, transposed, alias = found[0]
            hits.setdefault(name, []).append((t, transposed, alias))
    # a weight the exporter wrote twice is left alone: one override could not change both copies
    once = {name: found[0] for name, found in hits.items() if len(found) == 1}
    slots = {name: WeightSlot(t.offset, t.dims, helper.tensor_dtype_to_np_dtype(t.data_type).name, transposed, alias)
             for name, (t, transposed, alias) in once.items()}
    renames = {t.name: name for name, (t, _, _) in once.items()}
    model = onnx.load(str(path), load_external_data=False)
    taken = {i.name for i in model.graph.initializer} - set(renames)
    clash = sorted(set(renames.values()) & taken)
    if clash:
        raise RuntimeError(f"{path.name}: initializer {clash[0]} exists twice after naming; report this model")
    for tensor in model.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    _rename_inputs(model.graph, renames)
    onnx.save_model(model, str(path))
    unused = sorted({name for found in digests.values() for name, _, _ in found} - set(slots))
    return slots, tuple(unused)


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        for attribute in node.attribute:  # If/Loop bodies read outer initializers by name
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename_inputs(sub, renames)
