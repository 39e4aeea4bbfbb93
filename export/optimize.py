"""`sdrt optimize`: beside each exported graph, one rewritten for an ONNX Runtime execution provider by
ONNX Runtime's transformer optimizer (onnxruntime.transformers): fused multi-head attention, LayerNorm
(+ residual), Gelu; on CUDA also GroupNorm (+ SiLU, + residual) in NHWC, NHWC convolutions,
BiasSplitGelu and BiasAdd, which have no CPU kernels.

The plain graphs stay (a LoRA runs on them where the optimized graph packed the weights it changes:
self-attention's q, k and v); `manifest.json` records per provider and component the optimized file, how many
nodes of each fused op it holds, and every attention block (a Softmax) left unfused, by node name: a
count that drops is the sign that an export's pattern changed. The optimized graph keeps the plain
one's I/O, so the runtime binds it the same way.
"""

from __future__ import annotations

import collections
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.errors import InputError
from sdrt.families import FAMILIES
from sdrt.manifest import STEP, Manifest, OptimizedGraph, read_manifest, sha256_file, verify_files, write_manifest

PROVIDERS = ("cpu", "cuda")
# the fused ops counted in the manifest (onnxruntime's com.microsoft domain, and ONNX's LayerNormalization)
FUSED_OPS = ("MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv",
             "SkipLayerNormalization", "LayerNormalization", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization", "QuickGelu", "FastGelu", "BiasGelu", "Gelu")
# FusionOptions flags whose ops have CUDA kernels only
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
                     "enable_packed_qkv", "enable_packed_kv", "enable_bias_add")


@dataclass(frozen=True)
class OptimizeConfig:
    engine_dir: Path
    provider: str = "cuda"


def optimizer_model_type(manifest: Manifest, component: str) -> str:
    """onnxruntime.transformers' name for the component's architecture."""
    if component == STEP:
        return FAMILIES[manifest.model.family].denoiser  # "unet" or "mmdit", onnxruntime's names too
    slot = next((s for s in manifest.model.text_encoders if s.component == component), None)
    if slot is not None:
        return "t5" if slot.kind == "t5" else "clip"
    return "vae"


def optimize(config: OptimizeConfig, progress: bool = True) -> Manifest:
    """Writes `<component>.<provider>.onnx` (+ `.onnx.data`) for every component; returns the manifest."""
    from tqdm import tqdm

    if config.provider not in PROVIDERS:
        raise InputError(f"--provider must be one of {', '.join(PROVIDERS)}, got {config.provider!r}")
    engine_dir = Path(config.engine_dir)
    manifest = read_manifest(engine_dir)
    fp16 = [name for name in manifest.model.components
            if (manifest.components[name].precision or manifest.precision) == "fp16"]
    if fp16:
        raise NotImplementedError(
            f"sdrt optimize takes fp32 graphs for now ({', '.join(fp16)} are fp16): onnxruntime's fusions match "
            "fp32 patterns, and converting the fused graph to fp16 with the export's fp32 islands kept is not "
            "written yet. Optimize an fp32 export (`sdrt export MODEL -o DIR --precision fp32`)")
    verify_files(engine_dir, manifest, [rel for rel in manifest.files if rel.endswith((".onnx", ".onnx.data"))])
    staging = engine_dir / f".optimize-{config.provider}-{os.getpid()}"
    staging.mkdir()
    records: dict[str, OptimizedGraph] = {}
    try:
        for name in tqdm(manifest.model.components, desc=f"optimize {engine_dir.name} for {config.provider}",
                         unit="graph", disable=not progress):
            records[name] = _optimize_component(manifest, engine_dir, staging, name, config.provider)
        files = {k: v for k, v in manifest.files.items() if f".{config.provider}.onnx" not in k}
        for record in records.values():
            for rel in (record.onnx, record.onnx + ".data"):
                files[rel] = sha256_file(staging / rel)
                os.replace(staging / rel, engine_dir / rel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    updated = replace(manifest, files=files, optimized={**manifest.optimized, config.provider: records})
    write_manifest(engine_dir, updated)
    return updated


def _optimize_component(manifest: Manifest, engine_dir: Path, staging: Path, name: str,
                        provider: str) -> OptimizedGraph:
    from onnxruntime.transformers.fusion_options import FusionOptions  # onnx and onnxruntime's tools
    from onnxruntime.transformers.optimizer import optimize_model

    _patch_num_heads()
    spec = manifest.components[name]
    model_type = optimizer_model_type(manifest, name)
    options = FusionOptions(model_type)
    if provider == "cpu":
        for flag in CUDA_ONLY_FUSIONS:
            setattr(options, flag, False)
    else:  # packed Q, K, V pay off in fp16 (onnxruntime's own SD pipeline packs them only then)
        options.enable_packed_qkv = options.enable_packed_kv = False
    model = optimize_model(str(engine_dir / spec.onnx), model_type=model_type, num_heads=0, hidden_size=0,
                           opt_level=0, optimization_options=options, use_gpu=provider == "cuda")
    graph = model.model.graph
    _check_io(graph, spec, name)
    ops = collections.Counter(node.op_type for node in graph.node)
    initializers = {t.name for t in graph.initializer}
    rel = f"{name}.{provider}.onnx"
    model.save_model_to_file(str(staging / rel), use_external_data_format=True, all_tensors_to_one_file=True)
    if not (staging / (rel + ".data")).is_file():
        raise RuntimeError(f"onnxruntime's optimizer wrote {rel} without its weights file {rel}.data")
    return OptimizedGraph(
        onnx=rel, model_type=model_type, fused={op: ops[op] for op in FUSED_OPS if ops[op]},
        unfused_attention=tuple(node.name for node in graph.node if node.op_type == "Softmax"),
        lora_weights=all(w in initializers for w in spec.weights))


def _check_io(graph: Any, spec: Any, name: str) -> None:
    """The optimized graph takes and gives what the plain one does (the runtime binds it by the manifest)."""
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    if inputs != {t.name for t in spec.inputs} or outputs != {t.name for t in spec.outputs}:
        raise RuntimeError(f"onnxruntime's optimizer changed {name}'s I/O ({sorted(inputs)} -> {sorted(outputs)}); "
                           "report it with `sdrt --version` and the onnxruntime version")


def _patch_num_heads() -> None:
    """onnxruntime's U-Net attention fusion reads the head count with int() on a shape-(1,) array, an
    error since numpy 2.4 (it was deprecated): read it with .item() instead. Its fusion modules load
    both as top-level modules (its tools add their folder to sys.path) and as package modules."""
    import sys

    def num_heads(self: Any, reshape_q: Any, is_torch2: bool = False) -> int:
        if is_torch2:  # the reshape's shape is Concat(0, 0, heads, head_size)
            parent = self.model.get_parent(reshape_q, 1)
            if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
                return 0
            value = self.model.get_constant_value(parent.input[2])
        else:  # a constant shape [0, 0, heads, head_size]
            shape = self.model.get_constant_value(reshape_q.input[1])
            value = shape[2] if isinstance(shape, np.ndarray) and shape.shape == (4,) else None
        value = np.asarray(value) if value is not None else None
        return int(value.reshape(-1)[0]) if value is not None and value.size == 1 and value.reshape(-1)[0] > 0 else 0

    for module in ("fusion_attention_unet", "onnxruntime.transformers.fusion_attention_unet"):
        if module in sys.modules:
            sys.modules[module].FusionAttentionUnet.get_num_heads = num_heads
