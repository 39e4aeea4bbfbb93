"""sdrt's exceptions (every message names the fix) and the checks input errors use."""

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


def is_digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²" and "٣", which int() then refuses."""
    return text.isascii() and text.isdigit()


def check_text(text: str, label: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate (half of an emoji cut by a client) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{label} is not valid Unicode (a lone surrogate at character {e.start}): "
                         "send whole characters, UTF-8 encoded") from None
    return text
