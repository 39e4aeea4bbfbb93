"""sdrt's exceptions (every message names the fix) and the integer check input errors use."""

from numbers import Integral


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


def is_integer(value: object) -> bool:
    """An int or numpy integer, but not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)
