"""sdrt: Stable Diffusion on exported engines, with a lean runtime (no torch).

    from sdrt import Pipeline, save_png
    pipe = Pipeline.load("engines/NAME")
    images = pipe("a photograph of an astronaut riding a horse", steps=20, seed=1)  # PIL images
    save_png(images[0], "out.png")  # keeps the A1111 `parameters` chunk (PIL's own save drops it)
"""

from typing import Any

__version__ = "0.1.0"

from sdrt.errors import BackendError, EngineError, InputError, ModelError, SdrtError, ValidationError  # noqa: E402

_LAZY = {"Pipeline": "sdrt.pipeline", "GenerationConfig": "sdrt.pipeline", "save_png": "sdrt.png"}


def __getattr__(name: str) -> Any:
    """Pipeline and friends import on first use, so `import sdrt` stays cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdrt' has no attribute {name!r}")


__all__ = ["Pipeline", "GenerationConfig", "save_png", "SdrtError", "EngineError", "InputError", "ModelError",
           "BackendError", "ValidationError", "__version__"]
