"""`sdrt export`: a diffusers folder of a supported family, or a single-file checkpoint, ->
engines/<name>/ (ONNX, manifest, tokenizers).

Everything is written into a staging directory beside the target and renamed into place at the
end, so an interrupted export never leaves a directory that loads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from functools import partial
from typing import Any, Callable, NamedTuple

import numpy as np

from sdrt.embeddings import TOKEN_ROWS
from sdrt.errors import InputError, ModelError, ValidationError
from sdrt.export.components_io import DENOISER, VAE, file_variant, load_components, present_slot
from sdrt.families import (CONTROL_SCALES, DENOISER_FOLDERS, HOST, IMAGE_INPUTS, LEADING_DIM, MMDIT, T5, Family,
                           TextEncoderSlot, control_image_names, family_for)
from sdrt.manifest import (DECODER, ENCODER, STEP, ComponentSpec, Manifest, ModelInfo, ShapeRange, TensorSpec, sha256_file,
                           write_manifest)
from sdrt.prompts import CHUNK_LENGTH
from sdrt.schedulers import HISTORY, N_COEFFS, NoiseSchedule
from sdrt.versions import package_versions
from sdrt.export.checkpoints import describe_keys, read_checkpoint, SingleFile, TextEncoderFiles
from sdrt.export.controlnets import check_controlnets, control_residuals, load_controlnet

PRECISIONS = ("fp16", "fp32")
OPSET = 17
TRACE_LATENT = 8  # latents a side at which graphs are traced (plus one and two patches)
MAX_CHUNKS = 16  # 1200 prompt tokens; TensorRT sizes the step's cross-attention for the most
RECORDED_PACKAGES = ("sdrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu")


@dataclass(frozen=True)
class Tolerances:
    """Max error of each exported component against the fp32 PyTorch module, on random inputs.

    rel = max|onnx - torch| / max|torch|; images: max pixel difference out of 255.
    """

    fp32: dict[str, float] = field(default_factory=lambda: {
        "text_encoder": 1e-4, "vae_encoder": 1e-4, "denoise_step": 1e-4, "vae_decoder": 1.0})
    fp16: dict[str, float] = field(default_factory=lambda: {
        "text_encoder": 2e-2, "vae_encoder": 2e-2, "denoise_step": 2e-2, "vae_decoder": 8.0})

    def of(self, component: str, precision: str) -> float:
        """Every text encoder (text_encoder, text_encoder_2, ...) shares the text_encoder tolerance."""
        table = self.fp16 if precision == "fp16" else self.fp32
        return table["text_encoder" if component.startswith("text_encoder") else component]


@dataclass(frozen=True)
class ExportConfig:
    model_dir: Path
    out_dir: Path
    precision: str = "fp16"
    opset: int = OPSET
    min_size: int = 64
    max_size: int | None = None  # None: max(1024, 2 x the model's native size)
    max_batch: int = 8
    max_chunks: int = 4  # prompt chunks of 75 tokens the step takes: prompts up to 300 tokens
    validate: bool = True
    validation_size: int | None = None  # None: min(native size, 256)
    force: bool = False
    tolerances: Tolerances = field(default_factory=Tolerances)
    vae: Path | None = None  # an AutoencoderKL folder or single file replacing the model's VAE (e.g. SD 1.5's ft-MSE)
    variant: str | None = None  # weights saved as a variant: diffusion_pytorch_model.<variant>.safetensors
    config_dir: Path | None = None  # single files: a diffusers folder whose configs fit (default: sdrt's own)
    prediction_type: str | None = None  # single files: epsilon / v_prediction (default: detected)
    text_encoders_dir: Path | None = None  # SD 3 single files without their text encoders: Stability's text_encoders/
    drop: tuple[str, ...] = ()  # optional text encoders to leave out: ("text_encoder_3",) is SD3 without T5
    max_sequence_length: int = 256  # T5 tokens (diffusers' default; at most 512)
    controlnets: tuple[Path, ...] = ()  # ControlNet folders or single files, into the denoise step in this order


MAX_SEQUENCE_LENGTH = 512  # T5's, as diffusers' StableDiffusion3Pipeline allows


def check_model_dir(model_dir: Path, variant: str | None = None, vae: Path | None = None,
                    drop: tuple[str, ...] = ()) -> Family:
    """The folder's family, once every file it needs is there and parses (weights of the variant when
    given; not the VAE's weights when `vae` replaces them; not those of optional text encoders that are
    dropped or absent)."""
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a directory: point `sdrt export` at a diffusers folder "
                         f"(or make a test one with `sdrt testmodel tiny {model_dir}`)")
    index_path = model_dir / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
        family = family_for(index, str(model_dir))
    except FileNotFoundError:
        raise ModelError(f"{model_dir} has no model_index.json: export the full pipeline saved with "
                         "`save_pretrained`, or a single-file checkpoint (.safetensors / .ckpt)") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{index_path} is not valid JSON ({e}): restore it from the original model") from e
    slots = [t for t in family.text_encoders if present_slot(index, model_dir, t, drop)]
    weights = (DENOISER_FOLDERS[family.denoiser], "vae") + tuple(t.component for t in slots)
    json_files = [f"{sub}/config.json" for sub in weights] + ["scheduler/scheduler_config.json"]
    required = json_files + [t.tokenizer for t in slots]
    missing = [p for p in required if not (model_dir / p).exists()]
    if missing:
        raise ModelError(f"{model_dir} is not a complete diffusers {family.label} folder: missing "
                         f"{', '.join(missing)}. Save the full pipeline with `save_pretrained`")
    for sub in weights:
        if sub == "vae" and vae is not None:
            continue
        files = list((model_dir / sub).glob("*.safetensors"))
        variants = {file_variant(p.name) for p in files}
        if variant not in variants:  # without a variant, plain names only (not model.fp16.safetensors)
            found = sorted(v for v in variants if v is not None)
            hint = (f" (variants here: {', '.join(found)}: pass --variant)" if found and not variant else
                    ": convert the checkpoint to safetensors (`save_pretrained(..., safe_serialization=True)`)")
            raise ModelError(f"{model_dir / sub} has no {variant + ' ' if variant else ''}.safetensors weights{hint}")
        for path in (p for p in files if file_variant(p.name) == variant):
            _check_header(path)
    for p in json_files:
        try:
            json.loads((model_dir / p).read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{model_dir / p} is not valid JSON ({e}): restore it from the original model") from e
    # scheduler settings sdrt cannot honour are refused here, before minutes of export
    NoiseSchedule.from_config(json.loads((model_dir / "scheduler/scheduler_config.json").read_text()))
    return family


def _check_header(path: Path) -> None:
    """A truncated download fails here, not when its component loads after minutes of exporting the others
    (components load one at a time); only the safetensors header is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np"):
            pass
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ModelError(f"{path} is not a readable safetensors file ({e}): download it again") from e


def check_vae(vae: Path) -> None:
    """--vae: a diffusers AutoencoderKL folder (config.json + safetensors weights) or a single file of
    VAE weights in the original layout (a VAE alone, or a full checkpoint's first_stage_model)."""
    if not vae.exists():
        raise ModelError(f"--vae {vae} does not exist: pass a VAE file or a diffusers AutoencoderKL folder")
    if vae.is_file():
        keys = read_checkpoint(vae, "VAE")
        if not any(k.startswith(("encoder.down.", "first_stage_model.encoder.", "vae.encoder.")) for k in keys):
            raise ModelError(f"--vae {vae} is {describe_keys(keys)}; pass a VAE file (e.g. "
                             "vae-ft-mse-840000-ema-pruned.safetensors) or a diffusers AutoencoderKL folder")
        return
    if not (vae / "config.json").is_file() or not any(vae.glob("*.safetensors")):
        raise ModelError(f"--vae {vae} is neither a VAE file nor a diffusers AutoencoderKL folder (config.json "
                         "and .safetensors weights, as `save_pretrained` writes them)")


def source_hash_of(path: Path) -> str:
    """A file's sha256 (A1111's model hash of a checkpoint), or a folder's over its files."""
    return sha256_file(path) if path.is_file() else source_hash(path)


def source_hash(model_dir: Path) -> str:
    """sha256 over (relative path, sha256) of every file of the source model."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(model_dir).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def export(config: ExportConfig, progress: bool = True) -> Manifest:
    """Exports every component of the model's family; returns the manifest of the new engine directory."""
    model_dir, out_dir = Path(config.model_dir), Path(config.out_dir)
    if config.precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    if not (isinstance(config.max_sequence_length, int) and 1 <= config.max_sequence_length <= MAX_SEQUENCE_LENGTH):
        raise InputError(f"max_sequence_length must be from 1 to {MAX_SEQUENCE_LENGTH} T5 tokens, got "
                         f"{config.max_sequence_length!r}")
    if not 1 <= config.max_chunks <= MAX_CHUNKS:
        raise InputError(f"max_chunks must be from 1 to {MAX_CHUNKS} (chunks of 75 prompt tokens), got {config.max_chunks}")
    single = None
    if model_dir.is_file():
        if config.variant:
            raise InputError("--variant picks weights files in a diffusers folder; a single file has one set of weights")
        single = SingleFile.open(model_dir, config.config_dir, config.prediction_type, config.text_encoders_dir)
        family = single.family
    else:
        if (config.config_dir, config.prediction_type, config.text_encoders_dir) != (None, None, None):
            raise InputError("--config, --prediction-type and --text-encoders are for single-file checkpoints; a "
                             "diffusers folder brings its own configs and text encoders (edit its scheduler_config.json "
                             "to change the prediction type)")
        family = check_model_dir(model_dir, config.variant, config.vae, config.drop)
    optional = {t.component for t in family.text_encoders if t.optional}
    if set(config.drop) - optional:
        have = ", ".join(sorted(optional)) if optional else f"none in {family.label}"
        raise InputError(f"only optional text encoders can be left out ({have}), got {', '.join(config.drop)}")
    if config.vae is not None:
        check_vae(config.vae)
    controlnet_names = check_controlnets(config.controlnets, family)
    if out_dir.exists() and not config.force:
        raise InputError(f"{out_dir} already exists: pass --force to replace it, or choose another -o")

    from tqdm import tqdm

    started = time.perf_counter()
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        bar = tqdm(total=5 + len(family.text_encoders), desc=f"export {out_dir.name}", unit="stage",
                   disable=not progress)
        bar.set_postfix_str("loading model")
        described: dict[str, Any] = {}
        if single is not None:
            parts, prediction = single.load_parts(config.vae, config.drop)
            described = {"format": "single file", "architecture": single.label,
                         "prediction_type": prediction.value, "prediction_type_from": prediction.found_by}
            if isinstance(single.checkpoint, TextEncoderFiles):
                described["text_encoder_files"] = {c: str(p.resolve()) for c, p in single.checkpoint.files.items()}
        else:
            parts = load_components(model_dir, family, variant=config.variant, vae_override=config.vae,
                                    drop=config.drop)
        bar.total = 5 + len(parts.slots)
        bar.update(1)
        src = source_hash_of(model_dir)
        vae_source = {"vae": {"path": str(config.vae.resolve()), "sha256": source_hash_of(config.vae)}} if config.vae else {}
        if config.controlnets:
            vae_source["controlnets"] = [{"name": name, "path": str(Path(p).resolve()), "sha256": source_hash_of(Path(p))}
                                         for name, p in zip(controlnet_names, config.controlnets)]
        bar.update(1)
        manifest_parts = _export_components(parts, staging, config, bar, controlnet_names)
        for name, tokenizer in parts.tokenizers.items():
            tokenizer.save_pretrained(staging / name)
        files = {p.relative_to(staging).as_posix(): sha256_file(p)
                 for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = Manifest(
            name=out_dir.name, precision=config.precision, files=files,
            source={"path": str(model_dir.resolve()), "sha256": src, **described, **vae_source,
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


def _export_components(parts: Any, staging: Path, config: ExportConfig, bar: Any,
                       controlnet_names: tuple[str, ...] = ()) -> dict[str, Any]:
    import torch

    from sdrt.export.components import DenoiseStep, VaeDecoder, VaeEncoder  # torch: loaded when an export runs
    from sdrt.export.onnx_io import export_onnx
    from sdrt.export.weights import name_weights, weight_digests

    family: Family = parts.family
    patch = parts.patch_size
    multiple = parts.vae_scale_factor * patch  # pixels per denoiser token
    native = parts.denoiser.config.sample_size * parts.vae_scale_factor
    # a transformer's learned position table covers pos_embed_max_size tokens a side (SD3.5: 3072 pixels)
    table = getattr(parts.denoiser.config, "pos_embed_max_size", None)
    top = table * multiple if table else None
    max_size = config.max_size or max(1024, 2 * native)
    if top is not None and max_size > top:
        if config.max_size:
            raise InputError(f"--max-size {config.max_size}: the transformer's position table covers {top} pixels a side")
        max_size = top
    for label, v in (("--min-size", config.min_size), ("--max-size", max_size)):
        if v % multiple:
            raise InputError(f"{label} {v} is not a multiple of {multiple} pixels (the VAE's {parts.vae_scale_factor} "
                             f"times the transformer's patch of {patch})")
    shapes = ShapeRange(min_size=config.min_size, default_size=native, max_size=max_size,
                        max_batch=config.max_batch, max_chunks=config.max_chunks)
    vs = config.validation_size or min(native, 256)
    lat = vs // parts.vae_scale_factor
    lc = parts.denoiser.config.out_channels
    contexts = {parts.text_encoders[s.component].config.max_position_embeddings for s in parts.slots if s.kind != T5}
    if contexts != {CHUNK_LENGTH}:
        raise ModelError(f"{config.model_dir}: text encoders with a context of {sorted(contexts)} tokens; sdrt "
                         f"reads prompts in chunks of CLIP's {CHUNK_LENGTH}")
    clip_skip_max = 1
    gen = torch.Generator().manual_seed(0)

    jobs: list[_Job] = []
    produced: dict[str, TensorSpec] = {}  # conditioning written by the text encoders, per text row (N, ...)
    slots = []  # as the manifest records them (T5's with its sequence length)
    for slot in parts.slots:
        te = parts.text_encoders[slot.component]
        if slot.kind == T5:
            slot = replace(slot, max_length=config.max_sequence_length)
        spec, wrap = text_encoder_spec(slot, te.config, config.precision)
        slots.append(slot)
        if slot.clip_skip:
            clip_skip_max = te.config.num_hidden_layers
        jobs.append(_Job(slot.component, spec, slot.component, wrap))
        produced.update({t.name: t for t in spec.outputs})

    present = tuple(c for c in family.conditioning if c.source == HOST or c.source in parts.text_encoders)
    conditioning = []
    for c in present:
        written = produced.get(c.name)  # as its text encoder writes it (SD3's fp32 T5 in fp16 engines)
        dtype, row_shape = ("float32", c.row_shape) if written is None else (written.dtype, written.shape[1:])
        conditioning.append(TensorSpec(c.name, dtype, (LEADING_DIM[c.layout],) + tuple(row_shape)))
    state = ("B", lc, "h", "w")
    image_inputs = tuple(TensorSpec(name, "float32", ("B", 1, "h", "w") if name == "mask" else state)
                         for name in IMAGE_INPUTS[parts.image_input])
    vae_precision = "fp32" if parts.vae_needs_fp32 else config.precision
    encoder_spec = ComponentSpec(
        "vae_encoder.onnx", (TensorSpec("images", "uint8", ("B", "H", "W", 3)),
                             TensorSpec("pixel_mask", "float32", ("B", "H", "W", 1))),
        (TensorSpec("image_latents", "float32", state),), vae_precision)
    jobs.append(_Job(ENCODER, encoder_spec, VAE, partial(VaeEncoder, scaling_factor=parts.scaling_factor,
                                                          shift_factor=parts.shift_factor)))
    # an MMDiT's skip-layer guidance: a (L,) flag per block (1 = skipped by the third row group) and its scale
    skippable = len(parts.denoiser.transformer_blocks) if family.denoiser == MMDIT else 0
    skip_inputs = (TensorSpec("skip_layers", "float32", (skippable,)),
                   TensorSpec("skip_scale", "float32", (1,))) if skippable else ()
    # ControlNets: one (B, H, W, 3) uint8 hint each, and their weights this step (J, 2, R), sdrt.control
    residuals = control_residuals(parts.denoiser) if controlnet_names else 0
    scales_shape = (len(controlnet_names), 2, residuals)
    control_inputs = tuple(TensorSpec(name, "uint8", ("B", "H", "W", 3)) for name in control_image_names(
        len(controlnet_names))) + ((TensorSpec(CONTROL_SCALES, "float32", scales_shape),) if controlnet_names else ())
    step_spec = ComponentSpec(
        "denoise_step.onnx",
        (TensorSpec("latents", "float32", state), TensorSpec("timestep", "float32", (1,)), *conditioning,
         *image_inputs, *control_inputs,
         TensorSpec("guidance", "float32", (1,)), *skip_inputs, TensorSpec("step_coeffs", "float32", (N_COEFFS,)),
         TensorSpec("x_history", "float32", (HISTORY,) + state), TensorSpec("out_history", "float32", (HISTORY,) + state),
         TensorSpec("noise", "float32", state)),
        (TensorSpec("latents_next", "float32", state), TensorSpec("x_history_next", "float32", (HISTORY,) + state),
         TensorSpec("out_history_next", "float32", (HISTORY,) + state)),
        config.precision)
    step_args = dict(conditioning=tuple(c.name for c in present), cross_attention=family.cross_attention,
                     added_cond=family.added_cond, image_input=parts.image_input,
                     image_inputs=IMAGE_INPUTS[parts.image_input], denoiser=family.denoiser, sequence=family.sequence,
                     zero_sequence=config.max_sequence_length)

    def step(denoiser: Any) -> Any:  # the ControlNets load with the U-Net, and go with it
        controlnets = tuple(load_controlnet(Path(p), denoiser.config) for p in config.controlnets)
        return DenoiseStep(denoiser, controlnets=controlnets, **step_args)
    jobs.append(_Job(STEP, step_spec, DENOISER, step))
    vae_spec = ComponentSpec("vae_decoder.onnx", (TensorSpec("latents", "float32", state),),
                             (TensorSpec("images", "uint8", ("B", "H", "W", 3)),), vae_precision)
    jobs.append(_Job(DECODER, vae_spec, VAE, partial(VaeDecoder, scaling_factor=parts.scaling_factor,
                                                     shift_factor=parts.shift_factor)))

    def sample(name: str, spec: ComponentSpec, h: int, w: int, typed: bool) -> tuple[Any, ...]:
        """Random inputs of the spec at batch 1 (CFG rows 2), latent size h x w; typed: in the spec's
        dtypes (tracing), else float32 (the fp32 reference module)."""
        f = parts.vae_scale_factor
        dims = {"B": 1, "RB": 2, "N": 2, "S": 2 * CHUNK_LENGTH, "E": 3, "h": h, "w": w, "H": h * f, "W": w * f}
        special = {"timestep": torch.tensor([500.0]), "guidance": torch.tensor([7.5]),
                   "step_coeffs": torch.rand(N_COEFFS, generator=gen), "keep": torch.ones(2),
                   CONTROL_SCALES: 0.5 + torch.rand(scales_shape, generator=gen),
                   "skip_layers": (torch.rand(skippable, generator=gen) > 0.5).float(), "skip_scale": torch.tensor([2.8]),
                   "time_ids": torch.tensor([[native, native, 0, 0, native, native]] * 2, dtype=torch.float32),
                   "clip_skip": torch.tensor([2 if clip_skip_max > 1 else 1])}
        out = []
        for t in spec.inputs:
            shape = t.resolve(dims)
            if t.name == "clip_skip":
                out.append(special[t.name])
                continue
            if t.name == "token_weights":
                out.append(0.5 + torch.rand(shape, generator=gen))
                continue
            if t.dtype == "int64":
                vocab = parts.text_encoders[name].config.vocab_size
                ids = torch.randint(0, vocab, shape, generator=gen)
                if any(i.name == TOKEN_ROWS for i in spec.inputs):  # embedding rows -1 and -E in every chunk
                    ids.view(-1, CHUNK_LENGTH)[:, 3:5] = torch.tensor([-1, -dims["E"]])
                out.append(ids)
                continue
            if t.dtype == "uint8":
                out.append(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8))
                continue
            if t.name in ("mask", "pixel_mask"):  # binary, 1 = repaint
                out.append((torch.rand(shape, generator=gen) > 0.5).float())
                continue
            value = special.get(t.name)
            value = torch.randn(shape, generator=gen) * (4 if name == DECODER else 1) if value is None else value
            out.append(value.to(getattr(torch, t.dtype)) if typed else value.float())
        return tuple(out)

    validation: dict[str, Any] = {}
    for i, (name, spec, source, wrap) in enumerate(jobs):
        precision = spec.precision
        bar.set_postfix_str(f"exporting {name}")
        module = wrap(parts.load(source))  # a folder's text encoders and denoiser: loaded now, one at a time
        # trace at a latent size that is not a multiple of the U-Net's down factor, so the graph keeps
        # diffusers' explicit upsample sizes and accepts any multiple of 8 pixels (a transformer's: of its
        # patch); and small, because torch runs an fp16 trace's forward pass with its slow CPU fp16 kernels
        # (SD 3.5's fp16 VAE decoder at 272x288 pixels: 44 min). Validation runs at another size, lat x lat.
        small = min(lat, TRACE_LATENT)
        trace_args = sample(name, spec, small + patch, small + 2 * patch, typed=True)
        check_args = sample(name, spec, lat, lat, typed=False)
        with torch.no_grad():  # the fp32 module's answer, before any conversion
            reference = _as_tuple(module.eval()(*check_args)) if config.validate else ()
        # one copy of the weights at a time: a module no later graph exports from is converted in place and
        # its weights are freed once exported (SDXL's U-Net is 10 GB in fp32, 5 GB in fp16)
        last_use = source not in [later.source for later in jobs[i + 1:]]
        if precision == "fp16":
            module = module.to(torch.float16) if last_use else copy.deepcopy(module).to(torch.float16)
        stored = export_onnx(module, trace_args, staging / spec.onnx, [t.name for t in spec.inputs],
                             [t.name for t in spec.outputs], dynamic_axes(spec), config.opset)
        if getattr(module, "adapted", None):  # the CLIP text encoders' and the denoiser's weights, named for LoRA
            digests = weight_digests(*module.adapted)
            control = set(module.control_digests(digests)) if name == STEP else set()  # all, to be swapped
            named, unnamed = name_weights(staging / spec.onnx, stored, digests)
            spec = replace(spec, weights={k: v for k, v in named.items() if k not in control},
                           unused_weights=tuple(k for k in unnamed if k not in control),
                           control_weights={k: v for k, v in named.items() if k in control},
                           control_unnamed=tuple(k for k in unnamed if k in control))
            jobs[i] = jobs[i]._replace(spec=spec)
        if last_use:
            module.to("meta")
        del module
        if config.validate:
            validation[name] = validate_component(name, staging / spec.onnx, spec, check_args, reference,
                                         config.tolerances.of(name, precision))
        bar.update(1)

    model = ModelInfo(
        family=family.name, text_encoders=tuple(slots), conditioning=present,
        defaults=family.defaults, latent_channels=lc, vae_scale_factor=parts.vae_scale_factor,
        scaling_factor=parts.scaling_factor, clip_skip_max=clip_skip_max, history=HISTORY, opset=config.opset,
        zero_empty_negative=parts.zero_empty_negative, image_input=parts.image_input, size_multiple=multiple,
        omitted=parts.omitted, shift_factor=parts.shift_factor, controlnets=controlnet_names,
        control_residuals=residuals)
    return dict(components={job.name: job.spec for job in jobs}, shapes=shapes, model=model,
                scheduler_config=parts.scheduler_config, validation=validation)


class _Job(NamedTuple):
    name: str  # the component's
    spec: ComponentSpec  # its graph contract, precision included
    source: str  # what it exports from: a name for TorchParts.load
    wrap: Callable[[Any], Any]  # that module -> the module whose graph is exported


def text_encoder_spec(slot: TextEncoderSlot, te_config: Any, precision: str) -> tuple[ComponentSpec, Callable[[Any], Any]]:
    """A text-encoder slot's graph contract and the module around its encoder. CLIP: S = 77 per prompt
    chunk, in the engines' precision. T5: one sequence of slot.max_length tokens, fp32 even in fp16 engines
    (T5 v1.1's feed-forward activations overflow fp16)."""
    from sdrt.export.components import T5Encoder, TextEncoder  # torch: loaded when an export runs

    if slot.kind == T5:
        tokens, precision, width, wrap = slot.max_length, "fp32", te_config.d_model, partial(T5Encoder, slot=slot)
    else:
        tokens, width, wrap = "S", te_config.hidden_size, partial(TextEncoder, slot=slot)
    dtype = "float16" if precision == "fp16" else "float32"
    outputs = [TensorSpec(slot.hidden, dtype, ("N", tokens, width))]
    if slot.pooled:
        outputs.append(TensorSpec(slot.pooled, dtype, ("N", te_config.projection_dim)))
    inputs = [TensorSpec("input_ids", "int64", ("N", tokens)), TensorSpec("token_weights", "float32", ("N", tokens)),
              TensorSpec("keep", "float32", ("N",))]
    if slot.kind != T5:  # textual-inversion vectors, in place of the ids below 0
        inputs.append(TensorSpec(TOKEN_ROWS, "float32", ("E", width)))
    if slot.clip_skip:
        inputs.append(TensorSpec("clip_skip", "int64", (1,)))
    return ComponentSpec(f"{slot.component}.onnx", tuple(inputs), tuple(outputs), precision), wrap


def dynamic_axes(spec: ComponentSpec) -> dict[str, dict[int, str]]:
    """torch.onnx.export's dynamic_axes: every named dimension of the spec's tensors."""
    return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs + spec.outputs}


def _as_tuple(outputs: Any) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def validate_component(name: str, path: Path, spec: ComponentSpec, args: tuple, reference: tuple,
                       tolerance: float) -> dict:
    """Runs the ONNX file on ONNX Runtime (CPU) on args; raises where it is off the fp32 torch reference."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {t.name: a.numpy().astype(t.dtype) for t, a in zip(spec.inputs, args)}
    got = session.run(None, feeds)
    del session
    report: dict[str, Any] = {"tolerance": tolerance, "outputs": {}}
    worst = 0.0
    for t, g, r in zip(spec.outputs, got, reference):
        r = r.numpy()
        g = g.astype(np.float64)
        if not np.all(np.isfinite(r)):
            raise ValidationError(f"{name}: output {t.name} of the PyTorch model itself has NaN/inf on random "
                                  "inputs: the checkpoint's weights are broken; check the source model")
        if not np.all(np.isfinite(g)):
            raise ValidationError(f"{name}: output {t.name} has NaN/inf on ONNX Runtime ({spec.precision}): the "
                                  f"exported graph overflows or is numerically broken; {_fix(spec.precision)}")
        diff = float(np.abs(g - r.astype(np.float64)).max())
        err = diff if t.dtype == "uint8" else diff / max(float(np.abs(r).max()), 1e-12)
        report["outputs"][t.name] = {"max_abs": diff, "error": err}
        worst = max(worst, err)
    report["error"] = worst
    if worst > tolerance:
        raise ValidationError(f"{name}: error {worst:.3g} against PyTorch exceeds tolerance {tolerance:g}; "
                              f"the export is not trustworthy: {_fix(spec.precision)}")
    return report


def _fix(precision: str) -> str:
    """What a user can do about a component that fails validation in this precision."""
    if precision == "fp16":
        return "export with --precision fp32, and report the model"
    return ("an fp32 graph should match PyTorch, so this is a bug in sdrt or the exporting libraries: report it "
            "with the model's config.json files and the torch, transformers, onnx and onnxruntime versions")
