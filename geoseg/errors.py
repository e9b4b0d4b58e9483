"""geoseg's exceptions and the exit codes they map to.

One base class, ``GeosegError``; each subclass also inherits the matching built-in so callers can catch
either. Every exception is built from one plain message string, so it pickles across Ray workers unchanged.
Messages name the file (or key) and the problem, quoting the bad value and, where it helps, the valid ones.

Each class carries the process exit code the CLI uses for it, so a scheduler can tell what to do:
``EXIT_INPUT`` (3) means the job as given can never succeed (do not retry), ``EXIT_RUNTIME`` (4) a failure
that a retry may fix (storage, a block, disk full), ``EXIT_INTERRUPTED`` (130) a stop by SIGINT/SIGTERM (a
rerun resumes). ``EXIT_INTERNAL`` (1) is a bug in geoseg; 2 is click's usage error.
"""

from __future__ import annotations

__all__ = [
    "GeosegError",
    "InputError",
    "ConfigError",
    "ModelError",
    "OutputError",
    "StorageError",
    "ObjectNotFoundError",
    "AccessDeniedError",
    "EndpointUnreachableError",
    "BlockError",
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_INPUT",
    "EXIT_RUNTIME",
    "EXIT_INTERRUPTED",
    "exit_code",
    "write_failure",
]

EXIT_OK = 0
EXIT_INTERNAL = 1  # an unexpected exception: a bug (``--debug`` shows the traceback)
EXIT_USAGE = 2  # click: unknown option, missing argument
EXIT_INPUT = 3  # bad input, config, model or output conflict: retrying the same job cannot help
EXIT_RUNTIME = 4  # storage, block or disk failures: a retry may succeed (finished blocks are kept)
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM (128 + SIGINT): partial results are kept, a rerun resumes


class GeosegError(Exception):
    """Base class of every error geoseg raises on purpose."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str):
        super().__init__(message)

    def __reduce__(self):  # pickle as (class, (message,)) whatever the subclass adds
        return (self.__class__, (str(self),))


class InputError(GeosegError, ValueError):
    """An input raster is missing, unreadable, or unfit for the model."""

    exit_code = EXIT_INPUT


class ConfigError(GeosegError, ValueError):
    """A job configuration is invalid (unknown key, bad value)."""

    exit_code = EXIT_INPUT


class ModelError(GeosegError, ValueError):
    """A model name, card or weights file is unknown, malformed, or does not fit its architecture."""

    exit_code = EXIT_INPUT


class OutputError(GeosegError, OSError):
    """An output cannot be written (exists, not writable, or a conflicting partial run)."""

    exit_code = EXIT_INPUT


class StorageError(GeosegError, OSError):
    """An object store could not be reached or refused a request."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object or file at the path, or its bucket does not exist."""


class AccessDeniedError(StorageError, PermissionError):
    """The store refused the request (credentials, bucket policy, IAM)."""


class EndpointUnreachableError(StorageError, ConnectionError):
    """The S3 endpoint did not answer, after the configured retries."""


class BlockError(GeosegError, RuntimeError):
    """Processing one block failed; the message names the scene and the block."""


def exit_code(e: BaseException) -> int:
    """The CLI exit code for an exception (see the module docstring)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, GeosegError):
        return e.exit_code
    return EXIT_INTERNAL


_DISK_FULL = ("no space left", "disk is full", "disk full", "quota exceeded", "file too large")


def write_failure(path, e: BaseException, action: str = "write it") -> BaseException:
    """The error for a failed write of ``path``: disk full (or a quota) is a ``StorageError`` that a rerun
    after freeing space resumes from; anything else an ``OutputError`` quoting the library's reason."""
    import errno

    if isinstance(e, GeosegError):
        return e
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or any(
        k in str(e).lower() for k in _DISK_FULL
    ):
        return StorageError(
            f"{path}: no space left on device while trying to {action}; free space and rerun the same "
            "command: finished blocks are kept and the run resumes"
        )
    io_library = type(e).__module__.split(".")[0] in ("rasterio", "pyogrio", "pyarrow", "sqlite3", "fiona")
    if isinstance(e, OSError) or io_library:
        return OutputError(f"{path}: cannot {action} ({text})")
    return e  # not an I/O failure: a bug, which must surface as one (exit code 1), not as an output error
