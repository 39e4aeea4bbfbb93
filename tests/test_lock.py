"""requirements.lock: what `make setup` installs, exactly, on any clone."""

from __future__ import annotations

import re
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def test_every_locked_package_is_an_exact_version_from_an_index():
    lines = [line.split("#")[0].strip() for line in LOCK.read_text().splitlines()]
    pins = [line for line in lines if line]
    assert len(pins) > 50  # the test extras' closure, not a stub
    for pin in pins:
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", pin), f"not an exact pin from an index: {pin!r}"
    names = {pin.split("==")[0].lower() for pin in pins}
    assert "sdrt" not in names  # this checkout installs itself (pip install -e .), never a pinned path
    assert {"torch", "diffusers", "transformers", "onnx", "onnxruntime", "peft"} <= names
