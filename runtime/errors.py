"""sdrt's exceptions. Every message names the fix."""


class SdrtError(Exception):
    """Base class: anything sdrt raises on purpose."""


class ModelError(SdrtError):
    """A model folder or one of its components is missing or malformed."""


class EngineError(SdrtError):
    """An engine directory, its manifest or an artifact does not match."""


class InputError(SdrtError, ValueError):
    """A generation argument is out of range."""


class BackendError(SdrtError):
    """No usable backend, or a backend failed to load or run an engine."""


class ValidationError(SdrtError):
    """An exported component disagrees with PyTorch beyond tolerance."""
