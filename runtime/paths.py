"""Where sdrt keeps caches: computed here and nowhere else."""

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
