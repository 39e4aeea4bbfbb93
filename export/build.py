"""`sdrt build`: the ONNX of an engine directory -> one TensorRT plan per component.

Strongly typed networks (precision comes from the ONNX), one optimization profile per component
covering the CFG batch (2B) and the chosen sizes. Plans are written beside the ONNX through a
temporary name and renamed once all are built; the manifest then records flavour, version,
target architectures, profiles, I/O and sha256 (see `sdrt.manifest.Manifest.plans`).
Needs no torch: only a TensorRT flavour (and, for full TensorRT, the GPU it builds for).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from sdrt.errors import BackendError, EngineError, InputError
from sdrt.manifest import (
    ComponentSpec,
    Manifest,
    PlanRecord,
    PlanSet,
    ShapeLimits,
    read_manifest,
    verify_files,
    write_manifest,
)
from sdrt.paths import write_atomic
from sdrt.plans import check_io
from sdrt.prompts import CHUNK_LENGTH, CHUNK_TOKENS
from sdrt.tensorrt_lib import RTX_ARCHS, TensorRT, cache_path, import_tensorrt
from sdrt.cuda import gpu_arch

Dims = tuple[int, ...]


@dataclass(frozen=True)
class BuildConfig:
    engine_dir: Path
    shapes: str | None = None  # None: static at the model's native size, batch 1
    archs: tuple[str, ...] = ()  # empty: the GPU here, else (TensorRT-RTX only) every RTX arch
    flavour: str = "auto"  # auto | tensorrt | tensorrt_rtx
    optimization_level: int | None = None  # TensorRT's builder level 0-5; None: its default (3)
    # the weights LoRA and swapped ControlNets change refittable (REFIT_INDIVIDUAL), so they switch without a rebuild. None: where
    # a GPU builds (TensorRT-RTX 1.7 cannot build them without one: its Myelin compiler then fails with
    # `sm_vers_.size() == 1` for several archs and `status == CUDA_SUCCESS` for one)
    refit: bool | None = None
    # the step's rows profiled up to 3B, for skip-layer guidance's third row group (SD 3.5); False: up to
    # CFG's 2B. None: where the step takes it. The backend sizes activation memory for the shapes each
    # call runs (update_device_memory_size_for_shapes), so the wider profile costs memory on SLG steps alone
    skip_layer_guidance: bool | None = None


SHAPES_HELP = "static:WxH,batch=N (e.g. static:512x512,batch=1) or dynamic:MIN-MAX,batch=A-B (e.g. dynamic:256-1024,batch=1-4)"


def shapes_text(shapes: ShapeLimits) -> str:
    """The --shapes spelling of what was built."""
    if shapes.kind == "static":
        return f"static:{shapes.width[0]}x{shapes.height[0]},batch={shapes.batch[0]}"
    return f"dynamic:{shapes.height[0]}-{shapes.height[2]},batch={shapes.batch[0]}-{shapes.batch[2]}"


def parse_shapes(text: str | None, manifest: Manifest) -> ShapeLimits:
    """Parses --shapes against the range the ONNX was exported for."""
    rng = manifest.shapes
    if text is None:
        text = f"static:{rng.default_size}x{rng.default_size},batch=1"
    static = re.fullmatch(r"static:(\d+)(?:x(\d+))?(?:,batch=(\d+))?", text.strip())
    dynamic = re.fullmatch(r"dynamic:(\d+)-(\d+)(?:,batch=(\d+)(?:-(\d+))?)?", text.strip())
    if static:
        w = int(static[1])
        h = int(static[2] or static[1])
        b = int(static[3] or 1)
        shapes = ShapeLimits("static", (h, h, h), (w, w, w), (b, b, b), rng.max_chunks)
    elif dynamic:
        lo, hi = int(dynamic[1]), int(dynamic[2])
        b_lo = int(dynamic[3] or 1)
        b_hi = int(dynamic[4] or dynamic[3] or 1)
        opt = min(max(rng.default_size, lo), hi)
        shapes = ShapeLimits("dynamic", (lo, opt, hi), (lo, opt, hi), (b_lo, b_lo, b_hi), rng.max_chunks)
    else:
        raise InputError(f"--shapes {text!r} is not understood: use {SHAPES_HELP}")
    m = manifest.model.size_multiple  # 8 pixels; 16 for SD3's transformer (patches of 2 latents)
    for axis, (lo, _, hi) in (("height", shapes.height), ("width", shapes.width)):
        if lo > hi or lo % m or hi % m or lo < rng.min_size or hi > rng.max_size:
            raise InputError(f"--shapes {text!r}: {axis} must be multiples of {m} within the exported range "
                             f"{rng.min_size}-{rng.max_size} (re-export with --min-size/--max-size for more)")
    if not 1 <= shapes.batch[0] <= shapes.batch[2] <= rng.max_batch:
        raise InputError(f"--shapes {text!r}: batch must be within 1-{rng.max_batch} (the exported range; "
                         "re-export with --max-batch for more)")
    return shapes


def component_profiles(manifest: Manifest, shapes: ShapeLimits,
                       groups: int = 2) -> dict[str, dict[str, tuple[Dims, Dims, Dims]]]:
    """(min, opt, max) dims of every dynamic input of every component.

    B is the image batch; RB and N (rows with CFG) run from B without CFG to 2B with it, 2B at opt; the
    step's RB to 3B with groups=3 (skip-layer guidance's third row group).
    h, w are latent sizes (pixels / vae_scale_factor), H, W pixel sizes; S the prompt's tokens,
    77 per chunk, one chunk at opt; E the textual-inversion rows a call uses (sdrt.embeddings), one at
    opt, at most one per prompt token.
    """
    f = manifest.model.vae_scale_factor
    b_lo, b_opt, b_hi = shapes.batch
    sym = {
        "B": shapes.batch, "RB": (b_lo, 2 * b_opt, groups * b_hi), "N": (b_lo, 2 * b_opt, 2 * b_hi),
        "h": tuple(v // f for v in shapes.height), "w": tuple(v // f for v in shapes.width),
        "H": shapes.height, "W": shapes.width, "S": (CHUNK_LENGTH, CHUNK_LENGTH, CHUNK_LENGTH * shapes.max_chunks),
        "E": (1, 1, 2 * b_hi * CHUNK_TOKENS * shapes.max_chunks),
    }
    out: dict[str, dict[str, tuple[Dims, Dims, Dims]]] = {}
    for name in manifest.model.components:
        spec = manifest.components[name]
        out[name] = {}
        for t in spec.inputs:
            if all(isinstance(d, int) for d in t.shape):
                continue
            dims = [[d, d, d] if isinstance(d, int) else list(sym[d]) for d in t.shape]
            out[name][t.name] = tuple(tuple(d[i] for d in dims) for i in range(3))  # type: ignore[misc]
    return out


TURING = "sm75"  # TensorRT-RTX compiles no FP32 matrix multiply for it (Myelin: "FP32 GEMM is not supported")


def resolve_archs(lib: TensorRT, requested: tuple[str, ...], gpu: str | None,
                  fp32_components: Sequence[str] = ()) -> tuple[list[str], str | None]:
    """Target architectures, and a notice when one was left out: TensorRT-RTX can target any RTX arch
    from anywhere (but Turing only for fp16 graphs); full TensorRT builds for the GPU it runs on."""
    requested = tuple(a.strip().lower() for a in requested if a.strip())
    if lib.rtx:
        bad = [a for a in requested if a not in RTX_ARCHS]
        if bad:
            raise InputError(f"--arch {','.join(bad)}: TensorRT-RTX targets {', '.join(RTX_ARCHS)} only "
                             "(for other GPUs install full TensorRT and build on that GPU)")
        archs = list(requested) if requested else [gpu] if gpu in RTX_ARCHS else list(RTX_ARCHS)
        if TURING not in archs or not fp32_components:
            return archs, None
        why = (f"TensorRT-RTX cannot compile FP32 matrix multiplies for Turing ({TURING}), and "
               f"{', '.join(fp32_components)} {'is' if len(fp32_components) == 1 else 'are'} fp32")
        if requested or gpu == TURING:
            raise InputError(f"{why}: export with --precision fp16 for Turing cards (an SDXL VAE stays fp32: "
                             f"such models cannot target {TURING}), or build for other architectures")
        return [a for a in archs if a != TURING], f"{TURING} left out: {why}"
    if gpu is None:
        raise BackendError("full TensorRT builds for the GPU it runs on and none was found: build on the target "
                           "GPU, or use --flavour tensorrt_rtx to build for RTX cards without a GPU")
    if requested and list(requested) != [gpu]:
        raise InputError(f"--arch {','.join(requested)}: full TensorRT builds only for this GPU ({gpu}); use "
                         "--flavour tensorrt_rtx to target other RTX architectures")
    return [gpu], None


def build(config: BuildConfig, progress: bool = True) -> Manifest:
    """Builds one plan per component; returns the updated manifest."""
    from tqdm import tqdm

    engine_dir = Path(config.engine_dir)
    manifest = read_manifest(engine_dir)
    shapes = parse_shapes(config.shapes, manifest)
    lib = import_tensorrt(config.flavour)
    fp32 = [name for name in manifest.model.components
            if (manifest.components[name].precision or manifest.precision) == "fp32"]
    archs, notice = resolve_archs(lib, config.archs, gpu_arch(), fp32)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    onnx_files = [rel for rel in manifest.files if rel.endswith((".onnx", ".onnx.data"))]
    verify_files(engine_dir, manifest, onnx_files)
    skippable = manifest.skippable_blocks > 0
    if config.skip_layer_guidance and not skippable:
        raise InputError(f"--skip-layer-guidance: these {manifest.model.family} engines take none (it is SD 3.5's; "
                         "SD3 engines exported before sdrt had it: re-export them with `sdrt export`)")
    slg = skippable if config.skip_layer_guidance is None else config.skip_layer_guidance
    profiles = component_profiles(manifest, shapes, 3 if slg else 2)
    refit = gpu_arch() is not None if config.refit is None else config.refit

    logger = lib.error_logger()
    timing_path = cache_path(lib, "timing", archs[0]) if not lib.rtx else None
    timing = timing_path.read_bytes() if timing_path is not None and timing_path.is_file() else b""
    records: dict[str, PlanRecord] = {}
    components = manifest.model.components
    temps: list[tuple[Path, Path]] = []
    digests: dict[str, str] = {}  # hashed from memory: re-reading a 1.7 GB plan would double the I/O
    bar = tqdm(total=len(components), desc=f"build {engine_dir.name}", unit="plan", disable=not progress)
    try:
        for name in components:
            bar.set_postfix_str(name)
            spec = manifest.components[name]
            start = time.perf_counter()
            plan, io, timing, refittable = _build_plan(lib, logger, engine_dir / spec.onnx, spec, profiles[name],
                                                       archs, config.optimization_level, timing, bar, refit)
            plan_name = f"{name}.plan"
            tmp = engine_dir / f".{plan_name}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(plan)
            temps.append((tmp, engine_dir / plan_name))
            digests[plan_name] = hashlib.sha256(plan).hexdigest()
            records[name] = PlanRecord(
                plan=plan_name, bytes=len(plan), build_s=round(time.perf_counter() - start, 2), io=tuple(io),
                onnx_sha256=manifest.files[spec.onnx],
                profile={k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in profiles[name].items()},
                refittable=refittable)
            bar.update(1)
        bar.close()
        for tmp, final in temps:
            os.replace(tmp, final)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    if timing_path is not None and timing:
        write_atomic(timing_path, timing)

    files = {k: v for k, v in manifest.files.items() if not k.endswith(".plan")}
    files.update(digests)
    plans = PlanSet(lib.flavour, lib.version, tuple(archs), shapes_text(shapes), shapes, records)
    updated = replace(manifest, files=files, plans=plans)
    write_manifest(engine_dir, updated)
    return updated


def _progress_monitor(lib: TensorRT, bar: Any) -> Any:
    """Shows TensorRT's innermost build phase in the bar's postfix."""
    trt = lib.module
    prefix = bar.postfix or ""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            bar.set_postfix_str(f"{prefix}: {phase_name}", refresh=False)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # keep building

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def _build_plan(lib: TensorRT, logger: Any, onnx_path: Path, spec: ComponentSpec,
                profile: dict[str, tuple[Dims, Dims, Dims]], archs: list[str], level: int | None,
                timing: bytes, bar: Any, refit: bool) -> tuple[bytes, list[dict[str, Any]], bytes, bool]:
    """One strongly typed plan; returns (plan, the network's I/O, the updated timing cache, whether the
    weights LoRA changes are refittable)."""
    trt = lib.module
    logger.errors.clear()
    builder, network, parser, io = parse_network(lib, logger, onnx_path, spec)  # parser: kept until built
    cfg = builder.create_builder_config()
    refittable = refit and bool(refittable_weights(spec))
    if refittable:  # only the named weights: TensorRT still folds and fuses every other constant
        cfg.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        mark_refittable(lib, network, spec, onnx_path)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    cfg.add_optimization_profile(opt)
    if level is not None:
        cfg.builder_optimization_level = level
    if lib.rtx:
        caps = [getattr(trt.ComputeCapability, a.upper()) for a in archs]
        cfg.num_compute_capabilities = len(caps)
        for i, cap in enumerate(caps):
            cfg.set_compute_capability(cap, i)
    else:
        cache = cfg.create_timing_cache(timing)
        cfg.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(lib, bar)
    cfg.progress_monitor = monitor
    plan = builder.build_serialized_network(network, cfg)
    if plan is None:
        raise BackendError(f"TensorRT {lib.version} failed to build {onnx_path.name}: "
                           f"{'; '.join(logger.errors) or 'no message'}. Try narrower --shapes or report it")
    if not lib.rtx:
        timing = bytes(memoryview(cfg.get_timing_cache().serialize()))
    return bytes(memoryview(plan)), io, timing, refittable


def parse_network(lib: TensorRT, logger: Any, onnx_path: Path,
                  spec: ComponentSpec) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    """onnx_path parsed into a strongly typed network whose I/O is spec's: (builder, network, parser, I/O).
    The parser owns the weights the network points at: keep it until the plan is built."""
    trt = lib.module
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT {lib.version} could not parse {onnx_path}: {errors}. Re-export it with "
                          f"`sdrt export` (opset 17), or report the model")
    io = network_io(lib, network)
    check_io(io, spec, onnx_path)
    return builder, network, parser, io


def refittable_weights(spec: ComponentSpec) -> list[str]:
    """The initializers a refit may change: LoRA's (spec.weights) and the ControlNets' (swapped whole)."""
    return [*spec.weights, *spec.control_weights]


def mark_refittable(lib: TensorRT, network: Any, spec: ComponentSpec, onnx_path: Path) -> None:
    """Marks every weight a LoRA or a swapped ControlNet changes (by initializer name) refittable in network."""
    names = refittable_weights(spec)
    lost = [name for name in names if not network.mark_weights_refittable(name)]
    if lost:
        raise EngineError(f"TensorRT {lib.version} found no weights {lost[0]} in {onnx_path.name} "
                          f"({len(lost)} of {len(names)} LoRA and ControlNet weights): re-export with `sdrt export`, "
                          "or build with --no-refit")


def network_io(lib: TensorRT, network: Any) -> list[dict[str, Any]]:
    """Name, mode, dtype and (symbolic -1) shape of a parsed network's I/O."""
    io = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            io.append({"name": t.name, "mode": mode, "dtype": lib.dtype_name(t.dtype), "shape": list(t.shape)})
    return io


__all__ = ["BuildConfig", "build", "component_profiles", "parse_shapes", "resolve_archs"]
