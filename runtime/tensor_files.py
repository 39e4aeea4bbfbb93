"""Tensor files read with numpy alone (the runtime has no torch): .safetensors, and torch.save's zip
files (.pt / .bin) read weights-only — a restricted unpickler that builds tensors, dicts, lists and
plain values and refuses any other object by name, so a file cannot run code (torch.load's own
`weights_only=True` rule)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.errors import InputError

_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}
# torch.save's storage classes -> numpy dtypes (BFloat16: the top half of a float32, widened on read)
_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
             "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32}


def _widened(raw: np.ndarray, bfloat16: bool) -> np.ndarray:
    """BF16 (stored as uint16) and F64 as float32; F16 and F32 as stored."""
    if bfloat16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False) if raw.dtype == np.float64 else raw


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A .safetensors file -> (tensors, metadata): F16 and F32 as stored, BF16 and F64 as float32."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= size - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
            start = 8 + n
            tensors = {}
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                dtype = _DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise InputError(f"{path}: tensor {key} is {entry['dtype']}; sdrt reads F16, BF16, F32 and F64 "
                                     "tensors here")
                if start + end > size:
                    raise ValueError(f"tensor {key} runs past the end of the file")
                f.seek(start + begin)
                raw = np.frombuffer(f.read(end - begin), dtype).reshape(entry["shape"])
                tensors[key] = _widened(raw, entry["dtype"] == "BF16")
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise InputError(f"{path} is not a readable .safetensors file ({e}): download it again") from None
    return tensors, dict(header.get("__metadata__") or {})


class _Storage:
    """A torch storage's bytes, as the zip's data/<key> record holds them."""

    def __init__(self, raw: bytes, name: str):
        self.values = np.frombuffer(raw, _STORAGES[name])
        self.bfloat16 = name == "BFloat16Storage"


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a strided view of the storage, copied out."""
    itemsize = storage.values.itemsize
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if offset < 0 or last >= len(storage.values) or min(stride, default=0) < 0:
        raise ValueError(f"a tensor of shape {tuple(size)} runs past its storage")
    view = np.lib.stride_tricks.as_strided(storage.values[offset:], tuple(size), tuple(s * itemsize for s in stride))
    return _widened(np.array(view), storage.bfloat16)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


class _StorageName(str):
    """What the pickle names for a storage class (torch.FloatStorage): its name, checked when used."""


class _WeightsOnly(pickle.Unpickler):
    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("collections", "OrderedDict"): OrderedDict}

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return _StorageName(name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"it holds a {module}.{name}, which a weights-only file does not")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage_name, key, _location, _numel = pid  # ('storage', torch.FloatStorage, '0', 'cpu', n)
        if kind != "storage" or not isinstance(storage_name, _StorageName):
            raise pickle.UnpicklingError(f"unknown persistent record {kind!r}")
        return _Storage(self.archive.read(f"{self.prefix}data/{key}"), storage_name)


def read_torch_file(path: Path) -> Any:
    """A torch.save zip file (.pt / .bin) -> its object, tensors as numpy arrays (BF16 and F64 as float32)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError("no data.pkl record")
            prefix = pickles[0][: -len("data.pkl")]
            if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder") != b"little":
                raise ValueError("its tensors are big-endian")
            with archive.open(pickles[0]) as f:
                return _WeightsOnly(f, archive, prefix).load()
    except zipfile.BadZipFile:
        raise InputError(f"{path} is not a zip-format torch file (torch.save before PyTorch 1.6, or not a torch file "
                         "at all): save it again with a current PyTorch, or convert it to .safetensors") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"{path} is not a readable weights-only torch file ({e}): download it again, or "
                         "convert it to .safetensors") from None
