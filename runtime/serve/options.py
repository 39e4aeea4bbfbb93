"""AUTOMATIC1111's `/sdapi/v1/options`: the server-wide settings its clients read and write.

GET reports what sdrt runs with. POST takes the settings sdrt supports (the clip skip applied to A1111
requests that do not override it) and any other reported setting at its reported value (clients post
back the whole dict they read); anything else is a 400 and nothing is changed.
"""

from __future__ import annotations

from typing import Any

from sdrt.errors import InputError
from sdrt.manifest import Manifest
from sdrt.serve.a1111_requests import a1111_title

CLIP_SKIP = "CLIP_stop_at_last_layers"


class A1111Options:
    def __init__(self) -> None:
        self._clip_skip = 1

    @property
    def clip_skip(self) -> int:
        return self._clip_skip

    def report(self, manifest: Manifest) -> dict[str, Any]:
        """The options as GET answers them (the model's title in A1111's form: NAME [hash])."""
        return {
            "sd_model_checkpoint": a1111_title(manifest),
            "sd_checkpoint_hash": manifest.source.get("sha256", ""),
            CLIP_SKIP: self._clip_skip,
            "sd_vae": "Automatic",
            "samples_format": "png",
            "samples_save": False,
            "save_images_add_number": True,
            "enable_pnginfo": True,
            "eta_noise_seed_delta": 0,
            "live_previews_enable": False,
            "show_progress_every_n_steps": -1,
        }

    def update(self, changes: Any, manifest: Manifest) -> None:
        """Applies a POSTed dict after checking all of it: a 400 (InputError) changes nothing."""
        if not isinstance(changes, dict):
            raise InputError("POST a JSON object of option names and values")
        current = self.report(manifest)
        clip_skip = self._clip_skip
        for key, value in changes.items():
            if key == CLIP_SKIP:
                clip_skip = self._clip_skip_value(value, manifest)
            elif key == "sd_model_checkpoint":
                if value not in (current[key], manifest.name, manifest.model_hash):
                    raise InputError(f"this server runs one model, {current[key]!r}: start another sdrt serve for "
                                     f"{value!r}")
            elif key not in current:
                raise InputError(f"sdrt does not implement the option {key!r}")
            elif value != current[key]:
                raise InputError(f"the option {key!r} is fixed at {current[key]!r} on sdrt")
        self._clip_skip = clip_skip  # one assignment, after every check: all or nothing

    @staticmethod
    def _clip_skip_value(value: Any, manifest: Manifest) -> int:
        top = manifest.model.clip_skip_max  # 1: the model takes none (SDXL): stored and ignored, as A1111 does
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max(top, 12):
            raise InputError(f"{CLIP_SKIP} is an integer from 1 to 12, got {value!r}")
        if top > 1 and value > top:
            raise InputError(f"{CLIP_SKIP} is at most {top} for these engines, got {value}")
        return value


__all__ = ["A1111Options", "CLIP_SKIP"]
