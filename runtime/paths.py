"""Where sdrt keeps caches (computed here and nowhere else), and how small files are written."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """$SDRT_CACHE_DIR/<kind>, else $XDG_CACHE_HOME/sdrt/<kind>, else ~/.cache/sdrt/<kind>."""
    root = os.environ.get("SDRT_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "sdrt")
    path = Path(root) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Writes a temporary file beside path and renames it over path: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
