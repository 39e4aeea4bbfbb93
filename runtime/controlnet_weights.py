"""Another ControlNet's weights in exported engines, without re-exporting (DESIGN: adapters are weights).

ControlNets of one architecture differ only in their weights: every SD 1.5 ControlNet shares one (canny,
depth, openpose, …), as SDXL's mostly do. The exporter names every parameter of the step graph's
ControlNet j `controlnets.j.<state key>` and records where it lies in the ONNX data, with cldm's key
(manifest ComponentSpec.control_weights). A file of the same architecture is read here (numpy, no torch),
matched key for key in diffusers' or cldm's naming, and handed to the step engine in place of those
initializers (ONNX Runtime: a new session; TensorRT: a refit), as LoRA weights are.

Read: a diffusers ControlNetModel folder, `.safetensors` (diffusers' keys, or cldm's with or without
`control_model.`, as lllyasviel's and thibaud's files), and the torch files of the same layouts (`.pth`
etc., with a weights-only reader that runs no pickled code).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from sdrt.errors import InputError
from sdrt.manifest import STEP, Manifest
from sdrt.tensor_files import read_safetensors, read_torch_file

PREFIX = "controlnets."  # the step graph's initializer names: controlnets.J.<state key>
CLDM_PREFIX = "control_model."  # lllyasviel's files (and whole checkpoints that carry a ControlNet)
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")


def controlnet_file(path: str | Path) -> Path:
    """The file holding a ControlNet's weights: path itself, or the weights file of a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in FOLDER_FILES if (path / name).is_file()), None)
        if found is None:
            raise InputError(f"ControlNet {path}: a folder without {FOLDER_FILES[0]} (a diffusers ControlNetModel "
                             "folder holds it)")
        return found
    if not path.is_file():
        raise InputError(f"ControlNet {path} does not exist")
    if path.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise InputError(f"ControlNet {path}: sdrt reads .safetensors, {', '.join(TORCH_SUFFIXES)} files and "
                         "diffusers folders")
    return path


def controlnet_label(path: str | Path) -> str:
    """The ControlNet's name as A1111 lists it: a file's stem, a folder's name."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def available_controlnets(folder: Path | None) -> dict[str, Path]:
    """NAME -> path of every ControlNet in folder (A1111's models/ControlNet): its files by stem and its
    diffusers folders by name."""
    if folder is None:
        return {}
    out = {}
    for path in sorted(Path(folder).iterdir()):
        if (path.is_file() and path.suffix in (".safetensors", *TORCH_SUFFIXES)) or (
                path.is_dir() and any((path / name).is_file() for name in FOLDER_FILES)):
            out.setdefault(controlnet_label(path), path)
    return out


@lru_cache(maxsize=2)  # a real ControlNet is 0.7 GB (fp16) to 1.4 GB: two at most stay read
def _tensors(path: Path, stamp: tuple[int, int]) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    state = read_torch_file(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise InputError(f"ControlNet {path} holds no state dict of tensors")
    return state


def read_controlnet(path: str | Path) -> dict[str, np.ndarray]:
    """A ControlNet's tensors by their file's keys (cached by path, size and mtime)."""
    file = controlnet_file(path).resolve()
    st = file.stat()
    return _tensors(file, (st.st_size, st.st_mtime_ns))


class ControlNetSlots:
    """The engines' ControlNets and where their parameters lie, for swapping in other weights."""

    def __init__(self, engine_dir: Path, manifest: Manifest):
        self.engine_dir = Path(engine_dir)
        self.names = manifest.model.controlnets
        self.spec = manifest.components[STEP]
        self.keys: list[dict[str, str]] = [{} for _ in self.names]  # per slot: state key -> initializer
        self.originals: list[dict[str, str]] = [{} for _ in self.names]  # per slot: cldm key -> initializer
        for name, slot in self.spec.control_weights.items():
            j, _, key = name.removeprefix(PREFIX).partition(".")
            self.keys[int(j)][key] = name
            self.originals[int(j)][slot.original] = name

    def check(self, j: int, path: str | Path) -> str:
        """The resolved path of a ControlNet that fits slot j, refused naming why not (read and checked now,
        so a bad file fails before any generation)."""
        self.weights(j, path)
        return str(Path(path).resolve())

    def weights(self, j: int, path: str | Path) -> dict[str, np.ndarray]:
        """initializer name -> the file's tensor in the stored layout and dtype, for every parameter of slot j."""
        name = self.names[j]
        if not self.keys[j]:
            raise InputError(f"these engines were exported before sdrt named their ControlNets' weights: re-export "
                             f"them with `sdrt export … --controlnet` to swap ControlNet {name!r}")
        unnamed = [k for k in self.spec.control_unnamed if k.startswith(f"{PREFIX}{j}.")]
        if unnamed:
            raise InputError(f"ControlNet {name!r} cannot be swapped: {len(unnamed)} of its weights (e.g. "
                             f"{unnamed[0]}) are not initializers of their own in the step graph (equal to another "
                             "weight); export the ControlNet you want with `sdrt export … --controlnet FILE`")
        label = Path(path).name
        tensors = read_controlnet(path)
        table = self._table(j, tensors, label)
        out = {}
        for key, initializer in table.items():
            slot = self.spec.control_weights[initializer]
            value = tensors[key]
            if value.size != math.prod(slot.shape) or (slot.transposed and value.shape != slot.module_shape):
                raise InputError(f"ControlNet {label}: {key} is {tuple(value.shape)} where {name!r} has "
                                 f"{tuple(slot.module_shape)}: a ControlNet of another architecture")
            value = (value.T if slot.transposed else value).reshape(slot.shape)
            value = np.ascontiguousarray(value, dtype=np.dtype(slot.dtype))
            if not np.all(np.isfinite(value)):
                raise InputError(f"ControlNet {label}: {key} is not finite in {slot.dtype}")
            out[initializer] = value
        return out

    def _table(self, j: int, tensors: dict[str, np.ndarray], label: str) -> dict[str, str]:
        """The file's key -> initializer, for diffusers' keys or cldm's (prefixed or bare); refuses a file
        whose keys are not exactly slot j's."""
        if any("lora" in k for k in list(tensors)[:64]):
            raise InputError(f"{label} is a LoRA, not a ControlNet: apply it with loras= / --lora")
        by_key, by_original = self.keys[j], self.originals[j]
        if any(k in by_key for k in tensors):
            table, present = by_key, set(tensors)
        else:
            prefixed = any(k.startswith(CLDM_PREFIX) for k in tensors)
            present = {k.removeprefix(CLDM_PREFIX) for k in tensors if k.startswith(CLDM_PREFIX) or not prefixed}
            table = by_original
        missing = sorted(set(table) - present)
        extra = sorted(present - set(table))
        if missing or extra:
            what = (f"lacks {len(missing)} of its {len(table)} weights (e.g. {missing[0]})" if missing
                    else f"has {len(extra)} weights it lacks (e.g. {extra[0]})")
            raise InputError(f"ControlNet {label} is not of the architecture of these engines' {self.names[j]!r}: "
                             f"it {what}. Export engines with it: `sdrt export MODEL --controlnet {label}`")
        if table is by_key:
            return dict(by_key)
        prefix = CLDM_PREFIX if any(k.startswith(CLDM_PREFIX) for k in tensors) else ""
        return {prefix + original: initializer for original, initializer in by_original.items()}

    def all_weights(self, files: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The step's swapped weights for files (one per slot from the first; "" for the exported ones)."""
        out: dict[str, np.ndarray] = {}
        for j, path in enumerate(files):
            if path:
                out.update(self.weights(j, path))
        return out
