"""Geodesic perimeters and ellipsoidal areas of pixel polygons on a north-up geographic grid, from per-row tables
(no inverse per edge).

Every edge of such a polygon runs along a meridian or a parallel:

- along a meridian the geodesic is the meridian arc, so an edge is the difference of the arc lengths from the
  equator of its two row lines (one ``Geod.inv`` per row line);
- along a parallel the geodesic length depends on the latitude and the longitude difference ``d`` (in pixels)
  only, and is an odd analytic function of ``d``: ``s(d) = d (A + B d^2) + O(d^5)``. Per row line ``A`` and ``B``
  come from two inverses (``d = 1`` and ``d = R``, where ``R`` pixels span ``SERIES_MAX_RAD`` of longitude); over
  that span the dropped terms are below 1e-12 of the length. Longer edges (coarse global grids) take an exact
  inverse each, deduplicated by (row, d).

The per-row values are cached per grid (chunks of rows, computed on first use), so the writer and every block of a
scene pay for each row line once, and the numbers are a function of the edge alone: the same polygon gets the same
perimeter however the scene was split into blocks.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
from affine import Affine

__all__ = ["edge_measures", "ellipsoid_q", "SERIES_MAX_RAD"]

SERIES_MAX_RAD = 0.005  # longest parallel edge (radians of longitude) measured by the series
_CHUNK = 1024  # row lines per cached chunk
_MAX_GRIDS = 8
_cache: OrderedDict[tuple, "_RowTable"] = OrderedDict()
_lock = threading.Lock()


class _RowTable:
    """Per-row-line meridian arc and series coefficients of one grid, filled chunk by chunk."""

    def __init__(self, lat0: float, dlat: float, dlon: float, geod):
        self.lat0, self.dlat, self.dlon, self.geod = lat0, dlat, dlon, geod
        self.R = max(1, int(SERIES_MAX_RAD // math.radians(dlon)))
        self.chunks: dict[int, np.ndarray] = {}  # chunk -> (4, _CHUNK): arc, A, B, F

    def _chunk(self, c: int) -> np.ndarray:
        rows = np.arange(c * _CHUNK, (c + 1) * _CHUNK, dtype=np.float64)
        lat = self.lat0 + self.dlat * rows
        zero = np.zeros_like(lat)
        _, _, arc = self.geod.inv(zero, zero, zero, lat)
        arc = np.copysign(np.asarray(arc, dtype=np.float64), lat)
        _, _, s1 = self.geod.inv(zero, lat, np.full_like(lat, self.dlon), lat)
        s1 = np.asarray(s1, dtype=np.float64)
        if self.R > 1:
            _, _, sr = self.geod.inv(zero, lat, np.full_like(lat, self.dlon * self.R), lat)
            b = (np.asarray(sr, dtype=np.float64) / self.R - s1) / (self.R * self.R - 1.0)
        else:
            b = np.zeros_like(s1)
        # F: the ellipsoidal area from the equator to the row line per pixel column (a cell's area is a difference)
        semi_minor, e = self.geod.a * (1 - self.geod.f), math.sqrt(self.geod.f * (2 - self.geod.f))
        area = 0.5 * semi_minor * semi_minor * ellipsoid_q(lat, e) * math.radians(self.dlon)
        return np.stack([arc, s1 - b, b, area])

    def rows(self, lo: int, hi: int) -> tuple[int, np.ndarray]:
        """(first row, (4, n) values) covering row lines ``lo..hi``."""
        c0, c1 = lo // _CHUNK, hi // _CHUNK
        for c in range(c0, c1 + 1):
            if c not in self.chunks:
                self.chunks[c] = self._chunk(c)
        return c0 * _CHUNK, np.concatenate([self.chunks[c] for c in range(c0, c1 + 1)], axis=1)


def _table(transform: Affine, geod) -> _RowTable:
    key = (transform.f, transform.e, abs(transform.a), geod.a, geod.f)
    with _lock:
        t = _cache.get(key)
        if t is None:
            t = _cache[key] = _RowTable(transform.f, transform.e, abs(transform.a), geod)
            while len(_cache) > _MAX_GRIDS:
                _cache.popitem(last=False)
        else:
            _cache.move_to_end(key)
        return t


def ellipsoid_q(lat_deg: np.ndarray, e: float) -> np.ndarray:
    """Authalic ``q(phi)``: the area between the equator and ``phi`` per radian of longitude is b^2 q / 2."""
    s = np.sin(np.radians(lat_deg))
    if e == 0:
        return 2 * s
    return s / (1 - e * e * s * s) + np.log((1 + e * s) / (1 - e * s)) / (2 * e)


def edge_measures(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, transform: Affine,
                  geod) -> tuple[np.ndarray, np.ndarray]:
    """(geodesic length, signed area term) of each edge ``(x0, y0) -> (x1, y1)`` (integer pixel corner
    coordinates, each edge along a row or a column line; a zero-length edge gives 0, 0). The area terms of a ring
    sum to its ellipsoidal area, signed by orientation: ``dx * F(y)`` per edge along a parallel, with ``F`` the
    area from the equator to the row line per pixel column (Green's theorem on cells bounded by parallels and
    meridians: exact).

    No boolean selections (each would copy): a meridian edge has ``dx = 0``, so its parallel terms vanish, and a
    parallel edge has ``y0 = y1``, so its arc difference does."""
    if not len(x0):
        return np.zeros(0), np.zeros(0)
    table = _table(transform, geod)
    lo = int(min(y0.min(), y1.min()))
    hi = int(max(y0.max(), y1.max()))
    with _lock:
        base, vals = table.rows(lo, hi)
    arc, A, B, F = vals
    r0, r1 = y0 - base, y1 - base
    dx = (x1 - x0).astype(np.float64)
    terms = dx * F[r0]
    d = np.abs(dx)
    lengths = np.abs(arc[r1] - arc[r0])
    lengths += d * (A[r0] + B[r0] * (d * d))
    long = np.flatnonzero(d > table.R)
    if len(long):  # beyond the series' span: exact inverses, one per distinct (row, d)
        dl, yl = d[long].astype(np.int64), np.asarray(y0[long], dtype=np.int64)
        width = int(dl.max()) + 1
        keys, inv = np.unique(yl * width + dl, return_inverse=True)
        row, cols = np.divmod(keys, width)
        lat = transform.f + transform.e * row.astype(np.float64)
        _, _, s = geod.inv(np.zeros_like(lat), lat, abs(transform.a) * cols.astype(np.float64), lat)
        lengths[long] = np.asarray(s, dtype=np.float64)[inv.ravel()]
    return lengths, terms
