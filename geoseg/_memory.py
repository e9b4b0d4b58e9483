"""Give freed heap memory back to the OS between blocks.

Blocks at the raster's edges have other shapes than interior ones, and glibc keeps the freed buffers of every
shape in its arenas: without trimming, a long run's resident memory creeps up with the variety of block
shapes seen; with a trim after each block it stays flat (numbers in benchmarks/README.md). ``malloc_trim``
costs about a millisecond per block.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["release_free_memory"]


def _load_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        return None


_TRIM = _load_trim()


def release_free_memory() -> None:
    """Return free heap pages to the OS (glibc only; a no-op elsewhere)."""
    if _TRIM is not None:
        _TRIM(0)
