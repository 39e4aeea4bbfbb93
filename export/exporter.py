"""`sdrt export`: a diffusers SD 1.x folder -> engines/<name>/ (ONNX + manifest + tokenizer).

Everything is written into a staging directory beside the target and renamed into place at the
end, so an interrupted export never leaves a directory that loads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.errors import InputError, ModelError, ValidationError
from sdrt.manifest import ComponentSpec, Manifest, ShapeRange, TensorSpec, sha256_file, write_manifest
from sdrt.schedulers import HISTORY, N_COEFFS
from sdrt.versions import package_versions

PRECISIONS = ("fp16", "fp32")
JSON_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "scheduler/scheduler_config.json")
REQUIRED = JSON_FILES + ("tokenizer",)
RECORDED_PACKAGES = ("sdrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu")


@dataclass(frozen=True)
class Tolerances:
    """Max error of each exported component against the fp32 PyTorch module, on random inputs.

    rel = max|onnx - torch| / max|torch|; images: max pixel difference out of 255.
    """

    fp32: dict[str, float] = field(default_factory=lambda: {
        "text_encoder": 1e-4, "denoise_step": 1e-4, "vae_decoder": 1.0})
    fp16: dict[str, float] = field(default_factory=lambda: {
        "text_encoder": 2e-2, "denoise_step": 2e-2, "vae_decoder": 8.0})

    def for_precision(self, precision: str) -> dict[str, float]:
        return self.fp16 if precision == "fp16" else self.fp32


@dataclass(frozen=True)
class ExportConfig:
    model_dir: Path
    out_dir: Path
    precision: str = "fp16"
    opset: int = 17
    min_size: int = 64
    max_size: int | None = None  # None: max(1024, 2 x the model's native size)
    max_batch: int = 8
    validate: bool = True
    validation_size: int | None = None  # None: min(native size, 256)
    force: bool = False
    tolerances: Tolerances = field(default_factory=Tolerances)


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a directory: point `sdrt export` at a diffusers SD 1.x folder "
                         f"(or make a test one with `sdrt testmodel tiny {model_dir}`)")
    missing = [p for p in REQUIRED if not (model_dir / p).exists()]
    if missing:
        raise ModelError(f"{model_dir} is not a complete diffusers SD 1.x folder: missing {', '.join(missing)}. "
                         "Save the full pipeline with `StableDiffusionPipeline.save_pretrained`")
    for sub in ("unet", "vae", "text_encoder"):
        if not any((model_dir / sub).glob("*.safetensors")):
            raise ModelError(f"{model_dir / sub} has no .safetensors weights: convert the checkpoint to "
                             "safetensors (`save_pretrained(..., safe_serialization=True)`)")
    for p in JSON_FILES:
        try:
            json.loads((model_dir / p).read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{model_dir / p} is not valid JSON ({e}): restore it from the original model") from e


def source_hash(model_dir: Path) -> str:
    """sha256 over (relative path, sha256) of every file of the source model."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(model_dir).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def export(config: ExportConfig, progress: bool = True) -> Manifest:
    """Exports the three components; returns the manifest of the new engine directory."""
    model_dir, out_dir = Path(config.model_dir), Path(config.out_dir)
    if config.precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    check_model_dir(model_dir)
    if out_dir.exists() and not config.force:
        raise InputError(f"{out_dir} already exists: pass --force to replace it, or choose another -o")

    from tqdm import tqdm

    started = time.perf_counter()
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        bar = tqdm(total=6, desc=f"export {out_dir.name}", unit="stage", disable=not progress)
        bar.set_postfix_str("loading model")
        from sdrt.export.components_io import load_components

        parts = load_components(model_dir)
        bar.update(1)
        src = source_hash(model_dir)
        bar.update(1)
        manifest_parts = _export_components(parts, staging, config, bar)
        parts.tokenizer.save_pretrained(staging / "tokenizer")
        files = {p.relative_to(staging).as_posix(): sha256_file(p)
                 for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = Manifest(
            name=out_dir.name, precision=config.precision, files=files,
            source={"path": str(model_dir.resolve()), "sha256": src,
                    "export_s": round(time.perf_counter() - started, 1)},
            versions={k: v for k, v in package_versions(RECORDED_PACKAGES).items() if v},
            **manifest_parts,
        )
        write_manifest(staging, manifest)
        bar.close()
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_components(parts: Any, staging: Path, config: ExportConfig, bar: Any) -> dict[str, Any]:
    import torch

    from sdrt.export.components import DenoiseStep, TextEncoder, VaeDecoder
    from sdrt.export.onnx_io import export_onnx

    dtype = torch.float16 if config.precision == "fp16" else torch.float32
    f = "float16" if config.precision == "fp16" else "float32"
    native = parts.unet.config.sample_size * parts.vae_scale_factor
    shapes = ShapeRange(min_size=config.min_size, default_size=native,
                        max_size=config.max_size or max(1024, 2 * native), max_batch=config.max_batch)
    vs = config.validation_size or min(native, 256)
    lat = vs // parts.vae_scale_factor
    hidden = parts.text_encoder.config.hidden_size
    seq = parts.text_encoder.config.max_position_embeddings  # 77
    lc = parts.unet.config.in_channels
    gen = torch.Generator().manual_seed(0)

    te_specs = ComponentSpec("text_encoder.onnx", (TensorSpec("input_ids", "int64", ("N", seq)),),
                             (TensorSpec("text_embeddings", f, ("N", seq, hidden)),))
    step_specs = ComponentSpec(
        "denoise_step.onnx",
        (TensorSpec("latents", "float32", ("B", lc, "h", "w")), TensorSpec("timestep", "float32", (1,)),
         TensorSpec("text_embeddings", f, ("RB", seq, hidden)), TensorSpec("guidance", "float32", (1,)),
         TensorSpec("step_coeffs", "float32", (N_COEFFS,)),
         TensorSpec("x_history", "float32", (HISTORY, "B", lc, "h", "w")),
         TensorSpec("out_history", "float32", (HISTORY, "B", lc, "h", "w")),
         TensorSpec("noise", "float32", ("B", lc, "h", "w"))),
        (TensorSpec("latents_next", "float32", ("B", lc, "h", "w")),
         TensorSpec("x_history_next", "float32", (HISTORY, "B", lc, "h", "w")),
         TensorSpec("out_history_next", "float32", (HISTORY, "B", lc, "h", "w"))),
    )
    vae_specs = ComponentSpec("vae_decoder.onnx", (TensorSpec("latents", "float32", ("B", lc, "h", "w")),),
                              (TensorSpec("images", "uint8", ("B", "H", "W", 3)),))

    def dyn(spec: ComponentSpec) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in spec.inputs + spec.outputs}

    ids = torch.randint(0, parts.text_encoder.config.vocab_size, (2, seq), generator=gen)
    # trace at a latent size that is not a multiple of the U-Net's down factor, so the graph keeps
    # diffusers' explicit upsample sizes and accepts any multiple of 8 pixels
    th, tw = lat + 1, lat + 2
    step_args = lambda h, w, d: (  # noqa: E731
        torch.randn(1, lc, h, w, generator=gen), torch.tensor([500.0]),
        torch.randn(2, seq, hidden, generator=gen).to(d), torch.tensor([7.5]),
        torch.rand(N_COEFFS, generator=gen), torch.randn(HISTORY, 1, lc, h, w, generator=gen),
        torch.randn(HISTORY, 1, lc, h, w, generator=gen), torch.randn(1, lc, h, w, generator=gen))

    jobs = [
        ("text_encoder", te_specs, TextEncoder(parts.text_encoder), (ids,), (ids,)),
        ("denoise_step", step_specs, DenoiseStep(parts.unet), step_args(th, tw, dtype), step_args(lat, lat, torch.float32)),
        ("vae_decoder", vae_specs, VaeDecoder(parts.vae, parts.scaling_factor),
         (torch.randn(1, lc, th, tw, generator=gen),), (torch.randn(1, lc, lat, lat, generator=gen) * 4,)),
    ]
    tolerances = config.tolerances.for_precision(config.precision)
    validation: dict[str, Any] = {}
    for name, spec, ref_module, trace_args, check_args in jobs:
        bar.set_postfix_str(f"exporting {name}")
        module = copy.deepcopy(ref_module).to(dtype).eval() if dtype != torch.float32 else ref_module.eval()
        export_onnx(module, trace_args, staging / spec.onnx, [t.name for t in spec.inputs],
                    [t.name for t in spec.outputs], dyn(spec), config.opset)
        if config.validate:
            validation[name] = _validate(name, staging / spec.onnx, spec, ref_module, check_args, tolerances[name])
        del module
        bar.update(1)

    return dict(
        components={"text_encoder": te_specs, "denoise_step": step_specs, "vae_decoder": vae_specs},
        shapes=shapes,
        model={"latent_channels": lc, "vae_scale_factor": parts.vae_scale_factor, "text_max_length": seq,
               "text_hidden_size": hidden, "history": HISTORY, "n_coeffs": N_COEFFS,
               "scaling_factor": parts.scaling_factor, "opset": config.opset},
        scheduler_config=parts.scheduler_config,
        validation=validation,
    )


def _validate(name: str, path: Path, spec: ComponentSpec, ref_module: Any, args: tuple, tolerance: float) -> dict:
    """Runs the ONNX file on ONNX Runtime (CPU) against the fp32 torch module; raises above tolerance."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {t.name: a.numpy().astype(t.dtype) for t, a in zip(spec.inputs, args)}
    got = session.run(None, feeds)
    with torch.no_grad():
        ref = ref_module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    report: dict[str, Any] = {"tolerance": tolerance, "outputs": {}}
    worst = 0.0
    for t, g, r in zip(spec.outputs, got, ref):
        r = r.numpy()
        g = g.astype(np.float64)
        if not np.all(np.isfinite(g)):
            raise ValidationError(f"{name}: output {t.name} has NaN/inf on ONNX Runtime: the exported graph is "
                                  "numerically broken; try --precision fp32 and report the model")
        diff = float(np.abs(g - r.astype(np.float64)).max())
        err = diff if t.dtype == "uint8" else diff / max(float(np.abs(r).max()), 1e-12)
        report["outputs"][t.name] = {"max_abs": diff, "error": err}
        worst = max(worst, err)
    report["error"] = worst
    if worst > tolerance:
        raise ValidationError(f"{name}: error {worst:.3g} against PyTorch exceeds tolerance {tolerance:g}; "
                              "the export is not trustworthy (try --precision fp32, or report the model)")
    return report
