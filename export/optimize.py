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
    if fp16 and config.provider == "cpu":
        raise NotImplementedError(
            f"sdrt optimize --provider cpu takes fp32 graphs ({', '.join(fp16)} are fp16): the fused ops' CPU "
            "kernels are fp32 only. On a CPU, optimize an fp32 export (`sdrt export MODEL -o DIR --precision fp32`)")
    verify_files(engine_dir, manifest, [rel for rel in manifest.files if rel.endswith((".onnx", ".onnx.data"))])
    _patch_onnxruntime_fusions()
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
    import onnx  # onnx and onnxruntime's tools: the export extra
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    spec = manifest.components[name]
    model_type = optimizer_model_type(manifest, name)
    options = FusionOptions(model_type)
    if provider == "cpu":
        for flag in CUDA_ONLY_FUSIONS:
            setattr(options, flag, False)
    else:  # packed Q, K, V pay off in fp16 (onnxruntime's own SD pipeline packs them only then)
        options.enable_packed_qkv = options.enable_packed_kv = (spec.precision or manifest.precision) == "fp16"
    source = onnx.load(str(engine_dir / spec.onnx))
    if (spec.precision or manifest.precision) == "fp16":
        fp16_attention_scale(source.graph)
    model = optimize_model(source, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                           optimization_options=options, use_gpu=provider == "cuda")
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
        lora_weights=all(w in initializers for w in spec.weights),
        control_weights=all(w in initializers for w in spec.control_weights))


def _check_io(graph: Any, spec: Any, name: str) -> None:
    """The optimized graph takes and gives what the plain one does (the runtime binds it by the manifest)."""
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    if inputs != {t.name for t in spec.inputs} or outputs != {t.name for t in spec.outputs}:
        raise RuntimeError(f"onnxruntime's optimizer changed {name}'s I/O ({sorted(inputs)} -> {sorted(outputs)}); "
                           "report it with `sdrt --version` and the onnxruntime version")


def fp16_attention_scale(graph: Any) -> int:
    """Rewrites, in place, each SDPA scale of an fp16 export into the form the U-Net attention fusion
    matches; returns how many. torch exports the scale sqrt(1 / sqrt(head_size)) of an fp16 graph as
    Cast16(Div(1, Cast32(Sqrt(Cast16(head_size))))) before the outer Sqrt; the fusion looks for
    Sqrt(Div(1, Sqrt(Cast(head_size)))), which fp32 graphs are once their no-op Casts are removed. The
    rewrite computes the scale in fp16 (exact for head sizes this small; the fused op recomputes it)."""
    from onnx import TensorProto, numpy_helper

    producer = {out: node for node in graph.node for out in node.output}
    users: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)

    def constant(name: str) -> np.ndarray | None:
        found = next((t for t in graph.initializer if t.name == name), None)
        if found is not None:
            return numpy_helper.to_array(found)
        node = producer.get(name)
        return numpy_helper.to_array(node.attribute[0].t) if node is not None and node.op_type == "Constant" else None

    def cast_to(node: Any, dtype: int) -> bool:
        return node is not None and node.op_type == "Cast" and node.attribute[0].i == dtype

    rewritten: set[str] = set()  # the Divs' outputs, fp16 now
    for to_half in [n for n in graph.node if cast_to(n, TensorProto.FLOAT16)]:
        div = producer.get(to_half.input[0])
        to_float = producer.get(div.input[1]) if div is not None and div.op_type == "Div" else None
        sqrt = producer.get(to_float.input[0]) if cast_to(to_float, TensorProto.FLOAT) else None
        one = constant(div.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
        if one is None or one.size != 1:
            continue
        graph.initializer.append(numpy_helper.from_array(one.astype(np.float16), f"{div.name}/numerator_fp16"))
        div.input[0], div.input[1] = f"{div.name}/numerator_fp16", sqrt.output[0]
        for user in users[to_half.output[0]]:
            user.input[:] = [div.output[0] if i == to_half.output[0] else i for i in user.input]
        graph.node.remove(to_half)
        if all(user is div for user in users[to_float.output[0]]):
            graph.node.remove(to_float)
        rewritten.add(div.output[0])
    kept = [v for v in graph.value_info if v.name not in rewritten]  # their recorded dtype was fp32
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return len(rewritten)


def _patch_onnxruntime_fusions() -> None:
    """Two fixes to onnxruntime's fusions, which assume fp32 graphs and a numpy it predates. Its fusion
    modules load both as top-level modules (its tools add their folder to sys.path) and as package ones.

    - The U-Net attention fusion reads the head count with int() on a shape-(1,) array, an error since
      numpy 2.4 (it was deprecated): read it with .item() instead.
    - Fusions write new initializers as raw bytes of whatever array they computed under the dtype they
      name: an fp16 graph's attention bias (fp32 zeros named fp16) or GroupNorm's gamma (fp16 named
      fp32, as the op takes it) come out the wrong size. Cast the array to the named dtype first."""
    import sys

    import onnxruntime.transformers.optimizer  # noqa: F401  (loads the fusion modules patched below)
    from onnx import helper

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
    for module in ("fusion_base", "onnxruntime.transformers.fusion_base"):
        fusion = sys.modules[module].Fusion if module in sys.modules else None
        if fusion is None or getattr(fusion.add_initializer, "sdrt_typed", False):
            continue
        original = fusion.add_initializer

        def add_initializer(self: Any, name: str, data_type: int, dims: Any, vals: Any, raw: bool = True,
                            _original: Any = original) -> Any:
            if raw and isinstance(vals, np.ndarray):
                vals = vals.astype(helper.tensor_dtype_to_np_dtype(data_type))
            return _original(self, name, data_type, dims, vals, raw)

        add_initializer.sdrt_typed = True  # type: ignore[attr-defined]
        fusion.add_initializer = add_initializer
