"""sdrt: Stable Diffusion on exported engines, with a lean runtime (no torch)."""

__version__ = "0.1.0"

from sdrt.errors import BackendError, EngineError, InputError, ModelError, SdrtError, ValidationError  # noqa: E402

__all__ = ["SdrtError", "EngineError", "InputError", "ModelError", "BackendError", "ValidationError", "__version__"]
