"""LoRA as weight deltas on exported engines, without re-exporting (DESIGN: adapters are weight deltas).

A LoRA stores, per adapted layer, down (r, in[, kh, kw]) and up (out, r[, 1, 1]) and optionally alpha;
at weight w it changes the layer's weight W (out, in[, kh, kw]) to (Hu et al. 2021, eq. 3):

    W' = W + w · (alpha / r) · up @ down          (reshaped to W; alpha defaults to r)

Formats read: kohya / A1111 (`lora_unet_…`, `lora_te_…`, SDXL's `lora_te1_…`/`lora_te2_…`, U-Net paths
in diffusers' or the original openaimodel naming, LoCon convolutions) and diffusers / PEFT
(`unet.….lora_A.weight`, SD3's `transformer.….lora_A.weight`, `text_encoder.….lora.down.weight`). The
exporter names every Linear and Conv weight of the denoiser and CLIP text encoders after its module and
records where it lies in the ONNX data (manifest WeightSlot); the deltas are computed here in float32 against those base weights, read from
the engine files (never written), so switching LoRAs never adds a delta to a delta.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sdrt.errors import InputError
from sdrt.manifest import STEP, ComponentSpec, Manifest, WeightSlot
from sdrt.tensor_files import read_safetensors

SUFFIX = ".safetensors"
# a layer's tensors: kohya (lora_down/up), diffusers' old (lora.down/up), PEFT (lora_A/B)
_DOWN = (".lora_down.weight", ".lora.down.weight", ".lora_A.weight")
_UP = (".lora_up.weight", ".lora.up.weight", ".lora_B.weight")
_ALPHA = ".alpha"
# other adapter kinds, recognised to be refused by name
_UNSUPPORTED = {".hada_": "LoHa", ".lokr_": "LoKr", ".dora_scale": "DoRA", ".lora_mid.": "LoCon with CP decomposition",
                ".diff": "a full weight difference", ".lora_B.bias": "LoRA with biases", ".oft_": "OFT"}
TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network tag: <lora:NAME:WEIGHT>


@dataclass(frozen=True)
class LoraLayer:
    down: np.ndarray  # (r, in[, kh, kw]) float16 / float32, as the file stores it
    up: np.ndarray  # (out, r[, 1, 1])
    alpha: float | None


@dataclass(frozen=True)
class LoraFile:
    path: Path
    layers: dict[str, LoraLayer]  # by the module key as the file spells it


@lru_cache(maxsize=16)
def _read_lora(path: Path, stamp: tuple[int, int]) -> LoraFile:
    tensors, metadata = read_safetensors(path)
    peft_alpha = _peft_alphas(path, metadata)
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        for marker, kind in _UNSUPPORTED.items():
            if marker in key:
                raise InputError(f"{path} is {kind} ({key}); sdrt applies LoRA and LoCon (lora_down/lora_up)")
        for part, suffixes in (("down", _DOWN), ("up", _UP), ("alpha", (_ALPHA,))):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix:
                layers.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            raise InputError(f"{path}: {key} is not a LoRA tensor (lora_down/lora_up/alpha or lora_A/lora_B); "
                             "is this a LoRA file?")
    out = {}
    for module, parts in layers.items():
        if "down" not in parts or "up" not in parts:
            raise InputError(f"{path}: layer {module} lacks its {'up' if 'down' in parts else 'down'} weight: "
                             "the file is incomplete")
        alpha = float(parts["alpha"].reshape(-1)[0]) if "alpha" in parts else peft_alpha(module, parts["down"].shape[0])
        out[module] = LoraLayer(parts["down"], parts["up"], alpha)
    if not out:
        raise InputError(f"{path} holds no LoRA layers")
    return LoraFile(path, out)


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA file, parsed once per content (cached by path, size and mtime)."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise InputError(f"LoRA {path}: sdrt reads LoRAs as {SUFFIX} files")
    try:
        st = path.stat()
    except OSError:
        raise InputError(f"LoRA {path} does not exist") from None
    return _read_lora(path.resolve(), (st.st_size, st.st_mtime_ns))


def _peft_alphas(path: Path, metadata: dict[str, str]) -> Callable[[str, int], float | None]:
    """(module key, rank) -> alpha, from the PEFT LoraConfig diffusers stores in a file's metadata
    (`lora_adapter_metadata`: flat `unet.lora_alpha`, `unet.alpha_pattern`, …, or one config); None
    without one (alpha = rank). rsLoRA's alpha/√r is returned as the alpha that gives it over r."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return lambda module, rank: None
    try:
        doc = json.loads(raw)
        configs: dict[str, dict] = {}
        for key, value in doc.items():
            prefix, _, field = key.rpartition(".")
            configs.setdefault(prefix, {})[field] = value
        for config in configs.values():
            float(config["lora_alpha"])
            if config.get("use_dora"):
                raise InputError(f"{path} is DoRA (use_dora); sdrt applies LoRA and LoCon")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"{path}: lora_adapter_metadata is malformed ({e})") from None

    def alpha(module: str, rank: int) -> float | None:
        prefix = max((p for p in configs if module.startswith(f"{p}.") or not p), key=len, default=None)
        if prefix is None:
            return None
        config, name = configs[prefix], module[len(prefix) + 1:] if prefix else module
        value = float(config["lora_alpha"])
        for pattern, override in (config.get("alpha_pattern") or {}).items():  # PEFT: a suffix of the module path
            if re.fullmatch(rf"(.*\.)?{pattern}", name):
                value = float(override)
                break
        return value * math.sqrt(rank) if config.get("use_rslora") else value

    return alpha


# --- engines' weights ----------------------------------------------------------------------------


def lora_keys(manifest: Manifest) -> dict[str, tuple[str, str]]:
    """Every key a LoRA file may use for an adapted weight -> (component, weight name); for a weight the
    graph does not hold (ComponentSpec.unused_weights) -> (component, "")."""
    kohya_te = {t.component: ("lora_te" if len(manifest.model.text_encoders) == 1 else f"lora_te{i + 1}")
                for i, t in enumerate(manifest.model.text_encoders)}
    out: dict[str, tuple[str, str]] = {}
    for component, spec in manifest.components.items():
        slots: dict[str, WeightSlot | None] = {**spec.weights, **dict.fromkeys(spec.unused_weights)}
        for name, slot in slots.items():
            module = name.removesuffix(".weight")
            prefix, _, path = module.partition(".")  # unet / text_encoder / text_encoder_2
            keys = [module]
            if prefix == "unet":
                keys += [f"lora_unet_{path.replace('.', '_')}"]
                keys += [f"lora_unet_{slot.original.replace('.', '_')}"] if slot and slot.original else []
            elif prefix in kohya_te:
                keys += [f"{prefix}.{path.removeprefix('text_model.')}", f"{kohya_te[prefix]}_{path.replace('.', '_')}"]
            for key in keys:
                out[key] = (component, name if slot else "")
    return out


def base_weight(engine_dir: Path, spec: ComponentSpec, name: str) -> np.ndarray:
    """The exported weight `name` (a LoRA's or a ControlNet's) as stored in spec's ONNX data file (read-only memory map)."""
    slot = spec.slot(name)
    return np.memmap(Path(engine_dir) / f"{spec.onnx}.data", np.dtype(slot.dtype), "r", slot.offset, slot.shape)


def _delta(layer: LoraLayer, slot: WeightSlot, scale: float) -> np.ndarray:
    """w·(alpha/r)·up @ down in the stored layout of slot, float32 (shapes checked by LoraIndex.targets)."""
    rank = layer.down.shape[0]
    alpha = rank if layer.alpha is None else layer.alpha
    up = layer.up.reshape(-1, rank).astype(np.float32, copy=False)  # (out, r)
    down = layer.down.reshape(rank, -1).astype(np.float32, copy=False)  # (r, in·kh·kw)
    # a transposed slot gets downᵀ @ upᵀ: (up @ down)ᵀ made in C order, not a strided view of it
    delta = (down.T @ up.T) if slot.transposed else (up @ down).reshape(slot.shape)
    delta *= np.float32(scale * alpha / rank)
    return delta


class LoraIndex:
    """Where LoRA files' layers land in one engine directory's weights (the manifest's WeightSlots)."""

    def __init__(self, engine_dir: Path, manifest: Manifest):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.keys = lora_keys(manifest)  # built once: a request's LoRAs are checked against it

    def check(self, loras: Sequence[tuple[str | Path, float]]) -> tuple[tuple[str, float], ...]:
        """(path, weight) pairs, validated, read and checked to fit, so a bad file fails before any generation."""
        out = []
        for entry in loras:
            try:
                path, weight = entry
                weight = float(weight)
            except (TypeError, ValueError):
                raise InputError(f"LoRAs are (path, weight) pairs, got {entry!r}") from None
            if not math.isfinite(weight) or abs(weight) > 100:
                raise InputError(f"LoRA weight must be a finite number (usually 0 to 1), got {weight}")
            self.targets(read_lora(path))
            out.append((str(Path(path).resolve()), weight))
        return tuple(out)

    def targets(self, lora: LoraFile) -> list[tuple[str, str, LoraLayer]]:
        """(component, weight name, layer) of each layer of the file the engines hold; refuses a file whose
        layers name weights these engines lack or have at other sizes (a LoRA for another model)."""
        if not self.keys:
            raise InputError(f"{self.manifest.name} was exported before sdrt named the weights LoRA changes: "
                             "re-export it with `sdrt export` to use LoRA")
        unknown = [k for k in lora.layers if k not in self.keys]
        step = self.manifest.components[STEP].weights
        if unknown and not step:
            raise InputError(f"LoRA {lora.path.name}: {self.manifest.name} was exported before sdrt named its "
                             "denoiser's weights for LoRA: re-export it with `sdrt export`")
        if unknown and unknown[0].startswith("lora_unet_") and not any(s.original for s in step.values()):
            raise InputError(f"LoRA {lora.path.name} names its layers the kohya way ({unknown[0]}); for "
                             f"{self.manifest.model.family} engines sdrt reads LoRAs saved by diffusers / PEFT "
                             "(transformer.….lora_A.weight), as diffusers' load_lora_weights does")
        if unknown:
            raise InputError(f"LoRA {lora.path.name}: {len(unknown)} of its {len(lora.layers)} layers name none of "
                             f"these {self.manifest.model.family} engines' layers (e.g. {unknown[0]}): a LoRA for "
                             "another model family?")
        out = []
        for key, layer in lora.layers.items():
            component, name = self.keys[key]
            if not name:  # a layer whose output the model never reads
                continue
            shape = self.manifest.components[component].weights[name].module_shape
            rank, out_features = layer.down.shape[0], layer.up.shape[0]
            if (layer.up.size != out_features * rank or out_features != shape[0]
                    or layer.down.size != rank * math.prod(shape[1:])):
                raise InputError(f"LoRA {lora.path.name}, {key}: a layer of shape {tuple(layer.up.shape)} x "
                                 f"{tuple(layer.down.shape)} does not fit the engines' weight of shape {tuple(shape)}: "
                                 "a LoRA for a model of another size or family")
            out.append((component, name, layer))
        return out

    def weights(self, loras: Sequence[tuple[str, float]]) -> dict[str, dict[str, np.ndarray]]:
        """component -> {weight name: base + Σ deltas, in the stored dtype} for every weight the LoRAs
        (checked pairs; weight-0 ones change nothing) touch."""
        sums: dict[tuple[str, str], np.ndarray] = {}
        for path, scale in loras:
            if scale == 0:
                continue
            for component, name, layer in self.targets(read_lora(path)):
                delta = _delta(layer, self.manifest.components[component].weights[name], scale)
                if (component, name) in sums:
                    sums[(component, name)] += delta
                else:
                    sums[(component, name)] = delta
        out: dict[str, dict[str, np.ndarray]] = {}
        for (component, name), value in sums.items():
            spec = self.manifest.components[component]
            base = base_weight(self.engine_dir, spec, name)
            value += base  # float32: Σ deltas + base, then the stored dtype
            value = value.astype(base.dtype, copy=False)
            if not np.all(np.isfinite(value)):
                raise InputError(f"LoRA weights overflow {spec.weights[name].dtype} in {name}: lower the LoRA weights")
            out.setdefault(component, {})[name] = value
        return out


# --- names and prompt tags -------------------------------------------------------------------


def available_loras(lora_dir: Path | None) -> dict[str, Path]:
    """NAME -> file of every LoRA in lora_dir (A1111's --lora-dir; NAME is the file name, no suffix)."""
    if lora_dir is None:
        return {}
    return {p.stem: p for p in sorted(Path(lora_dir).rglob(f"*{SUFFIX}")) if p.is_file()}


def prompt_loras(prompts: Sequence[str], lora_dir: Path | None) -> tuple[tuple[str, ...], tuple[tuple[Path, float], ...]]:
    """A1111's `<lora:NAME:WEIGHT>` tags: the prompts without them, and the LoRAs they name (weight 1 when
    left out), resolved in lora_dir. The same LoRA at two weights in one batch is refused."""
    found: dict[str, float] = {}
    stripped = []
    for prompt in prompts:
        for kind, args in TAG.findall(prompt):
            if kind not in ("lora", "lyco"):
                raise InputError(f"<{kind}:{args}>: sdrt applies LoRAs (<lora:NAME:WEIGHT>) only")
            name, _, weight = args.partition(":")
            weight = weight.split(":")[0] or "1"  # A1111's <lora:NAME:TE_WEIGHT:UNET_WEIGHT>: the first
            try:
                value = float(weight)
            except ValueError:
                raise InputError(f"<lora:{args}>: the weight {weight!r} is not a number") from None
            if found.setdefault(name, value) != value:
                raise InputError(f"<lora:{name}> appears at weights {found[name]:g} and {value:g} in one batch: "
                                 "send them as separate requests")
        stripped.append(TAG.sub("", prompt))
    if not found:
        return tuple(stripped), ()
    if lora_dir is None:
        raise InputError("the prompt names LoRAs (<lora:…>) but no LoRA folder is set: start with --lora-dir DIR")
    files = available_loras(lora_dir)
    missing = [n for n in found if n not in files]
    if missing:
        raise InputError(f"no LoRA named {missing[0]!r} in {lora_dir} (has: {', '.join(files) or 'none'})")
    return tuple(stripped), tuple((files[n], w) for n, w in found.items())
