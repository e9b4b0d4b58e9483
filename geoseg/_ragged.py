"""Polygons as ragged arrays (shapely's ``from_ragged_array`` layout): ``coords`` (N, 2), ``ring_offsets``
(R + 1) into coords and ``poly_offsets`` (P + 1) into rings. Vectorized selection and concatenation, shared by
the seam merger (``geoseg.vectorize``) and the vector writers (``geoseg.write.vectors``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ranges", "offsets", "take", "take_rows", "concat", "repeated"]

Ragged = tuple[np.ndarray, np.ndarray, np.ndarray]


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c), vectorized."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    shift = starts - (np.cumsum(counts) - counts)
    return np.repeat(shift, counts) + np.arange(total, dtype=np.int64)


def offsets(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Offsets (len + 1, int64, starting at 0) of consecutive runs of ``counts`` items."""
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def take(coords: np.ndarray, ring_off: np.ndarray, poly_off: np.ndarray, idx: np.ndarray) -> Ragged:
    """The polygons at indices ``idx``, in that order."""
    idx = np.asarray(idx, dtype=np.int64)
    r0 = poly_off[idx]
    nr = poly_off[idx + 1] - r0
    rings = ranges(r0, nr)
    c0 = ring_off[rings]
    nc = ring_off[rings + 1] - c0
    return take_rows(coords, ranges(c0, nc)), offsets(nc), offsets(nr)


def take_rows(coords: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``coords[idx]`` for (N, 2) coordinates, gathering each row as one 8- or 16-byte item (a 2-D fancy index
    costs several times more per row)."""
    width = coords.shape[1] * coords.itemsize if coords.ndim == 2 else 0
    if width in (8, 16) and coords.flags.c_contiguous and len(coords):
        flat = coords.view(np.int64 if width == 8 else np.complex128).reshape(-1)
        return flat[idx].view(coords.dtype).reshape(-1, coords.shape[1])
    return coords[idx]


def concat(parts: Sequence[Ragged]) -> Ragged:
    """One ragged set holding ``parts`` in order (offsets shifted by the coords and rings before them)."""
    coords = np.concatenate([c for c, _, _ in parts])
    n_coords = np.cumsum([0] + [len(c) for c, _, _ in parts[:-1]])
    n_rings = np.cumsum([0] + [len(r) - 1 for _, r, _ in parts[:-1]])
    ring_off = np.concatenate([[0]] + [r[1:] + k for (_, r, _), k in zip(parts, n_coords)])
    poly_off = np.concatenate([[0]] + [p[1:] + k for (_, _, p), k in zip(parts, n_rings)])
    return coords, ring_off.astype(np.int64), poly_off.astype(np.int64)


def repeated(keys: np.ndarray) -> np.ndarray:
    """Boolean mask of the ``keys`` that occur more than once. One plain sort and a binary search of the (few)
    repeated values: several times cheaper than ``np.unique(return_inverse=True, return_counts=True)``, whose
    stable argsort dominated the seam merge on large polygons."""
    keys = np.asarray(keys)
    if len(keys) < 2:
        return np.zeros(len(keys), dtype=bool)
    s = np.sort(keys)
    dup = s[1:][s[1:] == s[:-1]]
    if not len(dup):
        return np.zeros(len(keys), dtype=bool)
    dup = dup[np.concatenate([[True], dup[1:] != dup[:-1]])]
    pos = np.minimum(np.searchsorted(dup, keys), len(dup) - 1)
    return dup[pos] == keys
