"""Single files' tensors, read offline and weights-only: `.safetensors` lazily, one tensor at a time;
`.ckpt` pickles with torch's weights-only unpickler (a file that needs code execution is refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from sdrt.errors import InputError, ModelError

SAFETENSORS = (".safetensors",)
PICKLES = (".ckpt", ".pt", ".pth", ".bin")


class SafetensorsFile(Mapping[str, Any]):
    """A .safetensors file's tensors, read from disk one at a time as they are asked for: converting
    SDXL holds its fp32 modules, not also the whole file, in memory."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")  # checks the header against the file's size
        self._keys = dict.fromkeys(self._file.keys())  # ordered, and a set for `in`

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_checkpoint(path: Path, what: str = "checkpoint") -> Mapping[str, Any]:
    """A single file's tensors, by key. Pickles are read weights-only; refused if they need code."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in SAFETENSORS:
            return SafetensorsFile(path)
        elif suffix in PICKLES:
            import zipfile

            # mmap (no copy of GBs in memory) works for torch's zip format only, not the legacy one
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        else:
            raise ModelError(f"{path}: unknown {what} format {suffix or '(no suffix)'!r}; sdrt reads "
                             f"{', '.join(SAFETENSORS + PICKLES)} files or diffusers folders")
    except pickle.UnpicklingError as e:
        import re

        called = re.search(r"GLOBAL (\S+)", str(e))
        found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", str(e), re.S)
        what = (f"it calls {called.group(1)}" if called else
                " ".join((found.group(1) if found else str(e)).split())[:200])
        raise ModelError(f"{path}: refused, loading this pickle would run code ({what}). sdrt reads .ckpt files "
                         "with torch's weights-only loader only; get the .safetensors release of the model, or "
                         "convert the file in an environment you trust") from None
    except ModelError:
        raise
    except Exception as e:  # safetensors' SafetensorError, zipfile/EOF errors of a cut-off .ckpt
        raise ModelError(f"{path}: not a readable {suffix} file ({type(e).__name__}: {e}); it is truncated or "
                         "damaged: download it again") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def describe_keys(checkpoint: Mapping[str, Any]) -> str:
    """What a file that is not a full Stable Diffusion checkpoint looks like it is."""
    keys = list(checkpoint)
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) or ".lora_" in k for k in keys):
        return "a LoRA adapter, not a model"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "a VAE alone: pass it to --vae with the model it belongs to"
    if not keys:
        return "an empty file"
    return f"not a Stable Diffusion checkpoint (keys like {', '.join(sorted(keys)[:3])})"
