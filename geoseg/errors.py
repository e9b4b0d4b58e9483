"""geoseg's exceptions.

One base class, ``GeosegError``; each subclass also inherits the matching built-in so callers can catch
either. Every exception is built from one plain message string, so it pickles across Ray workers unchanged.
Messages name the file (or key) and the problem, quoting the bad value and, where it helps, the valid ones.
"""

from __future__ import annotations

__all__ = [
    "GeosegError",
    "InputError",
    "ConfigError",
    "ModelError",
    "OutputError",
    "StorageError",
    "BlockError",
]


class GeosegError(Exception):
    """Base class of every error geoseg raises on purpose."""

    def __init__(self, message: str):
        super().__init__(message)

    def __reduce__(self):  # pickle as (class, (message,)) whatever the subclass adds
        return (self.__class__, (str(self),))


class InputError(GeosegError, ValueError):
    """An input raster is missing, unreadable, or unfit for the model."""


class ConfigError(GeosegError, ValueError):
    """A job configuration is invalid (unknown key, bad value)."""


class ModelError(GeosegError, ValueError):
    """A model name, card or weights file is unknown, malformed, or does not fit its architecture."""


class OutputError(GeosegError, OSError):
    """An output cannot be written (exists, not writable, or a conflicting partial run)."""


class StorageError(GeosegError, OSError):
    """An object store could not be reached or refused a request."""


class BlockError(GeosegError, RuntimeError):
    """Processing one block failed; the message names the scene and the block."""
