"""Class mask -> polygons, block by block, equal to one whole-mask polygonize.

The pieces, in the order data flows through them (pure functions and small state objects; no Ray here):

``polygonize_block``  one block of the mask -> ``BlockPolygons``: the block's polygons (GDAL's polygonize via
    ``rasterio.features.shapes``) in *global pixel coordinates* (x = column, y = row of the full raster, integer
    pixel corners), plus, for each block side, the pixel intervals each polygon's exterior covers there.
    Plain numpy arrays: cheap to pickle across processes or Ray.
``SeamMerger``  takes blocks in any order. A polygon that touches no internal block edge is final at once.
    Polygons that do are joined across seams (union-find on the side intervals: overlapping same-class
    intervals for 4-connectivity, also touching ones -- diagonal neighbours -- for 8, plus block corners) and a
    group is emitted as soon as no block it touches is unseen. Memory holds only the open seams and the
    polygons still touching them. A finished group's rings are re-chained exactly (below), so the output equals
    a single ``rasterio.features.shapes`` of the whole mask: same polygons, same vertices, same ring starts.
``sieve_block`` / ``sieve_array``  a minimum mapping unit that is identical block-wise and whole (see there).
``simplify_polygons``  shapely's ``coverage_simplify`` on finished polygons, noded at pixel corners first
    (``densify_px``) so that neighbours share their edges vertex for vertex; shared borders stay shared.
``polygon_table`` / ``to_map_coords``  affine to map coordinates; ``class_id``, ``class_name``, ``area_m2``,
    ``perimeter_m`` (geodesic in a geographic CRS), ``scene``, ``model``, ``model_version``, ``polygon_id``.
``PolygonSink``  the single-writer half: merger -> row bands released in raster order (``_Bands``: a canonical
    output order and the simplification batches) -> simplification -> class filter -> attributes -> writers.
``vectorize_file``  ``geoseg vectorize MASK.tif --out FILE``: worker processes read and polygonize blocks, the
    parent merges and writes.

Exact seam merge. GDAL traces every ring with the region on its left (exteriors counter-clockwise on screen,
holes clockwise) and, at a pinch vertex (two diagonal pixels of the region), always turns right, for either
connectivity (the tests check ring-for-ring equality on random masks). A block's rings are therefore those of the
whole mask except at vertices on its edges, and at vertices where rings of two of its polygons meet (4-connected
diagonal pixels that only the merge connects). Merging a group cuts its rings at such vertices, cancels the seam
unit edges that appear in both directions (same-class pixels on both sides), re-chains the pieces with the
right-turn rule, drops the collinear vertices the cuts left, and starts each ring at its lowest (row, col)
vertex as GDAL does.

``polygon_id`` is the linear pixel index ``row * cols + col`` of the polygon's first pixel in raster order (its
top-left pixel): unique, and the same for every block split and order.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio import features
from rasterio.windows import Window

from geoseg._ragged import concat as concat_ragged
from geoseg._ragged import offsets as _offsets
from geoseg._ragged import ranges as _ranges
from geoseg._ragged import take as take_ragged
from geoseg.errors import InputError, OutputError
from geoseg.write.vectors import _pyproj_crs

__all__ = [
    "BlockPolygons",
    "PolygonSet",
    "SeamMerger",
    "PolygonSink",
    "VectorizeResult",
    "polygonize_block",
    "polygonize_array",
    "sieve_array",
    "sieve_block",
    "sieve_context_px",
    "sieve_size_px",
    "read_with_context",
    "resolve_classes",
    "to_map_coords",
    "polygon_table",
    "simplify_coverage",
    "simplify_polygons",
    "densify_px",
    "simplify_tolerance",
    "block_windows",
    "read_class_names",
    "read_palette",
    "output_paths",
    "vectorize_file",
    "CLASS_NAMES_TAG",
]

CLASS_NAMES_TAG = "GEOSEG_CLASS_NAMES"
NODATA = 255

# Block sides (bit flags) and the (drow, dcol) of the neighbour across each.
W, E, N, S = 1, 2, 4, 8
_SIDE_STEP = {W: (0, -1), E: (0, 1), N: (-1, 0), S: (1, 0)}
_OPPOSITE = {W: E, E: W, N: S, S: N}
# Block corners, as (drow, dcol) of the diagonal neighbour; the opposite corner is the negated step.
_CORNERS = ((-1, -1), (-1, 1), (1, -1), (1, 1))

_COORD_BITS = 22  # pixel coordinates fit in 22 bits (4 M px a side) when packed into int64 keys


# ------------------------------------------------------------------------------------------------ arrays


@dataclass
class PolygonSet:
    """Finished polygons in global pixel coordinates, columnar (shapely ``from_ragged_array`` layout).

    ``coords`` (N, 2) int32 pixel corners (x = column, y = row), every ring closed; ``ring_offsets`` (R + 1)
    and ``poly_offsets`` (P + 1) index rings and polygons; the first ring of a polygon is its exterior.
    """

    coords: np.ndarray
    ring_offsets: np.ndarray
    poly_offsets: np.ndarray
    class_ids: np.ndarray
    polygon_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.class_ids)

    @classmethod
    def empty(cls) -> PolygonSet:
        z = np.zeros(1, dtype=np.int64)
        return cls(np.zeros((0, 2), np.int32), z, z.copy(), np.zeros(0, np.uint8), np.zeros(0, np.int64))

    @classmethod
    def concat(cls, sets: Iterable[PolygonSet]) -> PolygonSet:
        sets = [s for s in sets if len(s)]
        if not sets:
            return cls.empty()
        if len(sets) == 1:
            return sets[0]
        coords, ring_off, poly_off = concat_ragged([(s.coords, s.ring_offsets, s.poly_offsets) for s in sets])
        return cls(
            coords,
            ring_off,
            poly_off,
            np.concatenate([s.class_ids for s in sets]),
            np.concatenate([s.polygon_ids for s in sets]),
        )

    def take(self, idx: np.ndarray) -> PolygonSet:
        """The polygons at ``idx`` (an index array or boolean mask), in that order."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        coords, ring_off, poly_off = take_ragged(self.coords, self.ring_offsets, self.poly_offsets, idx)
        return PolygonSet(coords, ring_off, poly_off, self.class_ids[idx], self.polygon_ids[idx])

    def rings(self, i: int) -> list[np.ndarray]:
        """Polygon ``i`` as a list of closed (k, 2) rings, exterior first."""
        r0, r1 = self.poly_offsets[i], self.poly_offsets[i + 1]
        return [self.coords[self.ring_offsets[r] : self.ring_offsets[r + 1]] for r in range(r0, r1)]

    def map_coords(self, transform: Affine | None) -> np.ndarray:
        """``coords`` through ``transform`` (float64 (N, 2)); pixel coordinates when it is None."""
        xy = self.coords.astype(np.float64)
        if transform is None:
            return xy
        t = transform
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f])

    def to_shapely(self, transform: Affine | None = None) -> np.ndarray:
        """Shapely polygons (object array), in map coordinates through ``transform`` if given."""
        if not len(self):
            return np.empty(0, dtype=object)
        return shapely.from_ragged_array(
            shapely.GeometryType.POLYGON, self.map_coords(transform), (self.ring_offsets, self.poly_offsets)
        )


def _polygon_keys(coords: np.ndarray, ring_off: np.ndarray, poly_off: np.ndarray, cols: int) -> np.ndarray:
    """Linear pixel index of each polygon's top-left pixel (its lowest (row, col) vertex), int64."""
    if len(poly_off) == 1:
        return np.zeros(0, dtype=np.int64)
    k = coords[:, 1].astype(np.int64) * (cols + 1) + coords[:, 0]
    # Holes lie strictly below the exterior's top row, so the minimum over all rings is the exterior's.
    m = np.minimum.reduceat(k, ring_off[poly_off[:-1]])
    return (m // (cols + 1)) * cols + m % (cols + 1)


# ------------------------------------------------------------------------------------------ polygonize


@dataclass
class BlockPolygons:
    """The polygons of one block, in global pixel coordinates, plus what the seam merge needs.

    ``window`` is ``(col_off, row_off, width, height)``. ``sides[p]`` has the bit of each block side (W, E, N,
    S) polygon ``p``'s exterior lies on; ``seams[side]`` are that side's pixel intervals ``(poly, start, end)``
    (half-open, along the side, sorted by start). Plain arrays: picklable, no GDAL objects.
    """

    window: tuple[int, int, int, int]
    connectivity: int
    coords: np.ndarray
    ring_offsets: np.ndarray
    poly_offsets: np.ndarray
    class_ids: np.ndarray
    sides: np.ndarray
    seams: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.class_ids)

    def polygon_set(self, cols: int) -> PolygonSet:
        """All polygons of the block as a ``PolygonSet`` (``cols``: the full raster's width, for the ids)."""
        ids = _polygon_keys(self.coords, self.ring_offsets, self.poly_offsets, cols)
        return PolygonSet(self.coords, self.ring_offsets, self.poly_offsets, self.class_ids, ids)


def _window_tuple(window: Window | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(window, Window):
        vals = (window.col_off, window.row_off, window.width, window.height)
    else:
        vals = tuple(window)
    out = tuple(int(v) for v in vals)
    if out != tuple(vals) or len(out) != 4:
        raise InputError(f"block window must be whole pixels (col_off, row_off, width, height), got {vals}")
    return out  # type: ignore[return-value]


def _shapes_arrays(
    arr: np.ndarray, valid: np.ndarray | None, connectivity: int, col_off: int = 0, row_off: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``rasterio.features.shapes`` as arrays: coords (N, 2) int32, ring and polygon offsets, class values."""
    geoms = []
    values = []
    for geom, value in features.shapes(
        arr, mask=valid, connectivity=connectivity, transform=Affine.translation(col_off, row_off)
    ):
        geoms.append(geom["coordinates"])
        values.append(value)
    if not geoms:
        z = np.zeros(1, dtype=np.int64)
        return np.zeros((0, 2), np.int32), z, z.copy(), np.zeros(0, arr.dtype)
    chain = itertools.chain.from_iterable
    ring_len = np.fromiter((len(r) for g in geoms for r in g), dtype=np.int64)
    n_rings = np.fromiter((len(g) for g in geoms), dtype=np.int64, count=len(geoms))
    flat = np.fromiter(chain(chain(chain(geoms))), dtype=np.float64, count=2 * int(ring_len.sum()))
    coords = flat.reshape(-1, 2).astype(np.int32)  # pixel corners: exact integers
    return coords, _offsets(ring_len), _offsets(n_rings), np.asarray(values).astype(arr.dtype)


def polygonize_array(
    mask: np.ndarray, *, nodata: int | None = NODATA, connectivity: int = 4, classes: Iterable[int] | None = None
) -> PolygonSet:
    """Whole-array polygonize (the reference ``SeamMerger`` output equals), pixel coordinates, as a PolygonSet."""
    bp = polygonize_block(mask, (0, 0, mask.shape[1], mask.shape[0]), nodata=nodata, connectivity=connectivity,
                          classes=classes)
    return bp.polygon_set(mask.shape[1])


def polygonize_block(
    mask: np.ndarray,
    window: Window | Sequence[int],
    *,
    nodata: int | None = NODATA,
    connectivity: int = 4,
    classes: Iterable[int] | None = None,
) -> BlockPolygons:
    """Polygonize one block of a uint8 class mask into global pixel coordinates.

    ``window`` places ``mask`` in the full raster. Nodata pixels (and classes not in ``classes``, when given)
    produce no polygons. The result is plain data for ``SeamMerger.add``.
    """
    if connectivity not in (4, 8):
        raise InputError(f"connectivity must be 4 or 8, got {connectivity!r}")
    col_off, row_off, width, height = _window_tuple(window)
    if mask.ndim != 2 or mask.shape != (height, width):
        raise InputError(f"block mask has shape {mask.shape}, its window is {height} rows x {width} cols")
    arr = mask
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InputError(f"class mask values must fit uint8, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    valid = None if nodata is None else arr != nodata
    if classes is not None:
        keep = np.isin(arr, np.fromiter(classes, dtype=np.int64))
        valid = keep if valid is None else valid & keep
    if valid is not None and valid.all():
        valid = None
    coords, ring_off, poly_off, values = _shapes_arrays(arr, valid, connectivity, col_off, row_off)
    sides, seams = _side_intervals(coords, ring_off, poly_off, col_off, row_off, col_off + width, row_off + height)
    return BlockPolygons(
        window=(col_off, row_off, width, height),
        connectivity=connectivity,
        coords=coords,
        ring_offsets=ring_off,
        poly_offsets=poly_off,
        class_ids=values.astype(np.uint8),
        sides=sides,
        seams=seams,
    )


def _side_intervals(coords, ring_off, poly_off, x0, y0, x1, y1):
    """Per block side, the pixel intervals covered by each polygon's exterior (holes never reach a side)."""
    n_poly = len(poly_off) - 1
    sides = np.zeros(n_poly, dtype=np.uint8)
    empty = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))
    if n_poly == 0:
        return sides, {s: empty for s in (W, E, N, S)}
    ext = poly_off[:-1]
    s0 = ring_off[ext]
    nseg = ring_off[ext + 1] - s0 - 1
    seg = _ranges(s0, nseg)
    seg_poly = np.repeat(np.arange(n_poly, dtype=np.int32), nseg)
    p = coords[seg]
    q = coords[seg + 1]
    seams = {}
    for side, axis, val in ((W, 0, x0), (E, 0, x1), (N, 1, y0), (S, 1, y1)):
        on = (p[:, axis] == val) & (q[:, axis] == val)
        other = 1 - axis
        a = np.minimum(p[on, other], q[on, other])
        b = np.maximum(p[on, other], q[on, other])
        order = np.argsort(a, kind="stable")
        polys = seg_poly[on][order]
        seams[side] = (polys, a[order].astype(np.int32), b[order].astype(np.int32))
        sides[polys] |= side
    return sides, seams


# ------------------------------------------------------------------------------------------ seam merge


def block_windows(shape: tuple[int, int], block_px: int) -> list[Window]:
    """Row-major grid of ``block_px`` windows covering a ``(rows, cols)`` raster (edge blocks clipped)."""
    rows, cols = shape
    if block_px <= 0:
        raise InputError(f"block_px must be positive, got {block_px}")
    return [
        Window(c, r, min(block_px, cols - c), min(block_px, rows - r))
        for r in range(0, rows, block_px)
        for c in range(0, cols, block_px)
    ]


class _Group:
    __slots__ = ("pending", "members", "key")

    def __init__(self, member: int, key: int):
        self.pending = 0
        self.members = [member]
        self.key = key


class SeamMerger:
    """Streaming cross-block merge: blocks in any order in, finished polygons out.

    ``shape`` is the raster's ``(rows, cols)``; the block layout is a regular grid given by ``block_px`` or by
    the list of block ``windows`` (any grid of column and row edges). ``add`` returns the polygons that can no
    longer touch an unseen block; ``finish`` returns the rest (normally nothing; if blocks never arrived, the
    groups as far as they got). Together they equal ``polygonize_array`` of the whole mask.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        block_px: int | None = None,
        windows: Sequence[Window] | None = None,
        connectivity: int = 4,
    ):
        rows, cols = int(shape[0]), int(shape[1])
        if connectivity not in (4, 8):
            raise InputError(f"connectivity must be 4 or 8, got {connectivity!r}")
        if (block_px is None) == (windows is None):
            raise InputError("SeamMerger needs exactly one of block_px or windows")
        if rows >= 1 << _COORD_BITS or cols >= 1 << _COORD_BITS:
            raise InputError(f"raster of {rows} x {cols} pixels is too large to vectorize (max {1 << _COORD_BITS})")
        if windows is None:
            wins = block_windows((rows, cols), int(block_px))
        else:
            wins = [Window(*_window_tuple(w)) for w in windows]
        col_edges = sorted({int(w.col_off) for w in wins} | {cols})
        row_edges = sorted({int(w.row_off) for w in wins} | {rows})
        if col_edges[0] != 0 or row_edges[0] != 0:
            raise InputError("block windows must cover the raster from (0, 0)")
        self.shape = (rows, cols)
        self.connectivity = connectivity
        self._col_edges = np.asarray(col_edges)
        self._row_edges = np.asarray(row_edges)
        self._ncb = len(col_edges) - 1
        self._nrb = len(row_edges) - 1
        self._col_index = {c: i for i, c in enumerate(col_edges[:-1])}
        self._row_index = {r: i for i, r in enumerate(row_edges[:-1])}
        self._vseams = np.asarray(col_edges[1:-1], dtype=np.int64)
        self._hseams = np.asarray(row_edges[1:-1], dtype=np.int64)
        self._seen: set[int] = set()
        self._seen_per_row = np.zeros(self._nrb, dtype=np.int64)
        # Open seams: (block, side) -> (gids, start, end, class) of the side's intervals; (block, corner) -> gid.
        self._open_sides: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._open_corners: dict[tuple[int, tuple[int, int]], tuple[int, int] | None] = {}
        self._parent: dict[int, int] = {}
        self._groups: dict[int, _Group] = {}
        self._polys: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # gid -> (class, coords, ring lengths)

    # -- union-find
    def _find(self, g: int) -> int:
        parent = self._parent
        root = g
        while parent[root] != root:
            root = parent[root]
        while parent[g] != root:  # path compression
            parent[g], g = root, parent[g]
        return root

    def _union(self, a: int, b: int) -> int:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return ra
        ga, gb = self._groups[ra], self._groups[rb]
        if len(ga.members) < len(gb.members):
            ra, rb, ga, gb = rb, ra, gb, ga
        self._parent[rb] = ra
        ga.members.extend(gb.members)
        ga.pending += gb.pending
        ga.key = min(ga.key, gb.key)
        del self._groups[rb]
        return ra

    # -- state for callers that batch finished polygons by position (row bands)
    def rows_complete_until(self) -> int:
        """All blocks of raster rows ``< this`` have been added."""
        full = self._seen_per_row == self._ncb
        k = int(np.argmin(full)) if not full.all() else self._nrb
        return int(self._row_edges[k])

    @property
    def open_polygons(self) -> int:
        """Polygons held because they touch a seam of an unseen block."""
        return len(self._polys)

    def _block_index(self, window: tuple[int, int, int, int]) -> tuple[int, int]:
        col_off, row_off, width, height = window
        try:
            bi, bj = self._row_index[row_off], self._col_index[col_off]
        except KeyError:
            raise InputError(f"block window {window} is not on the merger's block grid") from None
        if (self._col_edges[bj + 1] - col_off, self._row_edges[bi + 1] - row_off) != (width, height):
            raise InputError(f"block window {window} is not on the merger's block grid")
        return bi, bj

    def add(self, block: BlockPolygons) -> PolygonSet:
        """Merge one block; return the polygons (of any blocks) that are now final."""
        if block.connectivity != self.connectivity:
            raise InputError(
                f"block polygonized with connectivity {block.connectivity}, merger uses {self.connectivity}"
            )
        bi, bj = self._block_index(block.window)
        b = bi * self._ncb + bj
        if b in self._seen:
            raise InputError(f"block {block.window} was added twice")
        self._seen.add(b)
        self._seen_per_row[bi] += 1
        col_off, row_off, width, height = block.window
        cols = self.shape[1]

        def neighbour(di: int, dj: int) -> int | None:
            i, j = bi + di, bj + dj
            return i * self._ncb + j if 0 <= i < self._nrb and 0 <= j < self._ncb else None

        n_poly = len(block)
        touch = np.zeros(n_poly, dtype=bool)
        for side, (di, dj) in _SIDE_STEP.items():
            if neighbour(di, dj) is not None:
                touch |= (block.sides & side) != 0
        corner_poly: dict[tuple[int, int], int | None] = {}
        if self.connectivity == 8:
            for di, dj in _CORNERS:
                if neighbour(di, dj) is None:
                    continue
                p = self._corner_polygon(block, di, dj)
                corner_poly[(di, dj)] = p
                if p is not None:
                    touch[p] = True

        keys = _polygon_keys(block.coords, block.ring_offsets, block.poly_offsets, cols)
        finals = []
        idle = np.flatnonzero(~touch)
        if len(idle):
            coords, ring_off, poly_off = take_ragged(block.coords, block.ring_offsets, block.poly_offsets, idle)
            finals.append(PolygonSet(coords, ring_off, poly_off, block.class_ids[idle], keys[idle]))

        base = b << 32
        touching = np.flatnonzero(touch)
        for p in touching.tolist():
            g = base | p
            r0, r1 = block.poly_offsets[p], block.poly_offsets[p + 1]
            ro = block.ring_offsets[r0 : r1 + 1]
            self._polys[g] = (int(block.class_ids[p]), block.coords[ro[0] : ro[-1]].copy(), np.diff(ro))
            self._parent[g] = g
            self._groups[g] = _Group(g, int(keys[p]))
        candidates = set(base | p for p in touching.tolist())

        # Seams with each side's neighbour: join with a seen one, or leave open for an unseen one.
        for side, (di, dj) in _SIDE_STEP.items():
            nb = neighbour(di, dj)
            if nb is None:
                continue
            polys, start, end = block.seams[side]
            gids = base | polys.astype(np.int64)
            if nb in self._seen:
                o_gids, o_start, o_end, o_cls = self._open_sides.pop((nb, _OPPOSITE[side]))
                ia, ib = _match_intervals(start, end, o_start, o_end, self.connectivity)
                same = block.class_ids[polys[ia]] == o_cls[ib]
                for ga, gb in zip(gids[ia[same]].tolist(), o_gids[ib[same]].tolist()):
                    self._union(ga, gb)
                for g in np.unique(o_gids).tolist():
                    self._groups[self._find(g)].pending -= 1
                    candidates.add(g)
            else:
                self._open_sides[(b, side)] = (gids, start, end, block.class_ids[polys])
                for g in np.unique(gids).tolist():
                    self._groups[self._find(g)].pending += 1
        for (di, dj), p in corner_poly.items():
            nb = neighbour(di, dj)
            mine = None if p is None else (base | p, int(block.class_ids[p]))
            if nb in self._seen:
                other = self._open_corners.pop((nb, (-di, -dj)))
                if other is not None:
                    if mine is not None and mine[1] == other[1]:
                        self._union(mine[0], other[0])
                    self._groups[self._find(other[0])].pending -= 1
                    candidates.add(other[0])
            else:
                self._open_corners[(b, (di, dj))] = mine
                if mine is not None:
                    self._groups[self._find(mine[0])].pending += 1

        done = {r for r in (self._find(g) for g in candidates) if self._groups[r].pending == 0}
        finals.extend(self._emit(sorted(done)))
        return PolygonSet.concat(finals)

    def _corner_polygon(self, block: BlockPolygons, di: int, dj: int) -> int | None:
        """Local index of the polygon owning the block's corner pixel towards (di, dj), if any."""
        col_off, row_off, width, height = block.window
        polys, start, end = block.seams[W if dj < 0 else E]
        if len(start) == 0:
            return None
        if di < 0:
            return int(polys[0]) if start[0] == row_off else None
        return int(polys[-1]) if end[-1] == row_off + height else None

    def finish(self) -> PolygonSet:
        """Emit every group still open (all of them final once every block was added)."""
        self._open_sides.clear()
        self._open_corners.clear()
        out = self._emit(sorted(self._groups))
        return PolygonSet.concat(out)

    def _emit(self, roots: Iterable[int]) -> list[PolygonSet]:
        """Pop finished groups: single polygons pass through; multi-block groups are merged in one pass."""
        single: list[tuple[int, int, int]] = []  # (gid, class, key)
        multi: list[tuple[list[int], int, int]] = []
        for r in roots:
            group = self._groups.pop(r)
            cls = self._polys[group.members[0]][0]
            if len(group.members) == 1:
                single.append((group.members[0], cls, group.key))
            else:
                multi.append((group.members, cls, group.key))
        out = []
        if single:
            polys = [self._polys.pop(g) for g, _, _ in single]
            lens = [p[2] for p in polys]
            out.append(PolygonSet(
                np.concatenate([p[1] for p in polys]),
                _offsets(np.concatenate(lens)),
                _offsets([len(x) for x in lens]),
                np.asarray([c for _, c, _ in single], dtype=np.uint8),
                np.asarray([k for _, _, k in single], dtype=np.int64),
            ))
            for g, _, _ in single:
                del self._parent[g]
        # Keys pack the group index above 44 bits of coordinates: merge at most 2**18 groups per pass.
        for k in range(0, len(multi), 1 << 18):
            chunk = multi[k : k + (1 << 18)]
            coords, lens, ring_group = [], [], []
            for gi, (members, _, _) in enumerate(chunk):
                for m in members:
                    _, c, rl = self._polys.pop(m)
                    del self._parent[m]
                    coords.append(c)
                    lens.append(rl)
                    ring_group.append(np.full(len(rl), gi, dtype=np.int64))
            merged, ring_lens, rings_per = _merge_groups(
                np.concatenate(coords), np.concatenate(lens), np.concatenate(ring_group), len(chunk),
                self._vseams, self._hseams,
            )
            out.append(PolygonSet(
                merged,
                _offsets(ring_lens),
                _offsets(rings_per),
                np.asarray([c for _, c, _ in chunk], dtype=np.uint8),
                np.asarray([k for _, _, k in chunk], dtype=np.int64),
            ))
        return out


def _match_intervals(a0, a1, b0, b1, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs of intervals (sorted, disjoint per side) that touch across a seam.

    4-connectivity: they share at least one pixel row (overlap). 8: also diagonal neighbours (end == start).
    """
    if len(a0) == 0 or len(b0) == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    if connectivity == 4:
        lo = np.searchsorted(b1, a0, side="right")
        hi = np.searchsorted(b0, a1, side="left")
    else:
        lo = np.searchsorted(b1, a0, side="left")
        hi = np.searchsorted(b0, a1, side="right")
    cnt = np.maximum(hi - lo, 0)
    return np.repeat(np.arange(len(a0), dtype=np.int64), cnt), _ranges(lo, cnt)


def _merge_groups(
    ring_coords: np.ndarray, ring_lens: np.ndarray, ring_group: np.ndarray, n_groups: int,
    vseams: np.ndarray, hseams: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rings (closed, GDAL orientation) of connected groups of block polygons -> each group's merged polygon.

    Per group: cut the rings at every vertex on a seam line or shared by several rings, cancel the seam unit
    edges present in both directions, re-chain the pieces with GDAL's pinch rule (turn right), drop collinear
    vertices, start each ring at its lowest (row, col) vertex. Vectorized over all groups at once (keys carry
    the group); only the walk around the re-chained rings is a Python loop.

    Returns (closed ring coords, ring lengths, rings per group); per group the exterior first, then the holes
    by start vertex.
    """
    n_in = len(ring_lens)
    ring_lens = np.asarray(ring_lens, dtype=np.int64)
    ring_group = np.asarray(ring_group, dtype=np.int64)
    closed_off = _offsets(ring_lens)
    is_closing = np.zeros(len(ring_coords), dtype=bool)
    is_closing[closed_off[1:] - 1] = True
    V = ring_coords[~is_closing].astype(np.int64)  # open rings
    lens = ring_lens - 1
    roff = _offsets(lens)
    ring_of = np.repeat(np.arange(n_in), lens)
    vgroup = ring_group[ring_of]
    local = np.arange(len(V)) - roff[ring_of]
    nxt = np.arange(len(V)) + 1
    nxt[roff[1:] - 1] = roff[:-1]  # each ring's last vertex is followed by its first
    gshift = 2 * _COORD_BITS
    gkey = (vgroup << gshift) | (V[:, 1] << _COORD_BITS) | V[:, 0]
    onv = np.isin(V[:, 0], vseams)
    onh = np.isin(V[:, 1], hseams)
    # Vertices several rings of a group pass through are pinches whose pairing the blocks may have decided
    # differently (with 4-connectivity, diagonal pixels that only the merge connects): cut and re-pair them.
    _, inv, cnt = np.unique(gkey, return_inverse=True, return_counts=True)
    cut = onv | onh | (cnt[inv.ravel()] > 1)
    ncut = np.bincount(ring_of[cut], minlength=n_in)
    whole = np.flatnonzero(ncut == 0)

    # Pieces: from each cut vertex to the next one of its ring (cyclically), ``n_seg`` segments long.
    ci = np.flatnonzero(cut)
    cr, cs = ring_of[ci], local[ci]
    first = np.concatenate([[True], cr[1:] != cr[:-1]])
    ring_first = np.flatnonzero(first)[np.cumsum(first) - 1]
    last = np.concatenate([first[1:], [True]])
    nxt_cut = np.empty_like(cs)
    nxt_cut[~last] = cs[1:][~last[:-1]]
    nxt_cut[last] = cs[ring_first[last]] + lens[cr[last]]
    n_seg = nxt_cut - cs
    q_idx = nxt[ci]
    P, Q = V[ci], V[q_idx]
    seam = (n_seg == 1) & (((P[:, 0] == Q[:, 0]) & onv[ci]) | ((P[:, 1] == Q[:, 1]) & onh[ci]))
    arc = ~seam
    a_ring, a_start, a_len = cr[arc], cs[arc], n_seg[arc]
    a_end_idx = roff[a_ring] + (a_start + a_len) % lens[a_ring]
    a_last_idx = roff[a_ring] + (a_start + a_len - 1) % lens[a_ring]
    run_s, run_e, run_g = _surviving_seam_runs(P[seam], Q[seam], ring_group[cr[seam]])

    # All pieces: arcs (index ranges into V) then seam runs (two points each, appended to V as extra vertices).
    n_arc, n_run = len(a_ring), len(run_s)
    piece_group = np.concatenate([ring_group[a_ring], run_g])
    start_pt = np.concatenate([V[ci[arc]], run_s])
    end_pt = np.concatenate([V[a_end_idx], run_e])
    first_dir = np.concatenate([np.sign(V[q_idx[arc]] - V[ci[arc]]), np.sign(run_e - run_s)])
    last_dir = np.concatenate([np.sign(V[a_end_idx] - V[a_last_idx]), np.sign(run_e - run_s)])
    base = np.concatenate([roff[a_ring], len(V) + np.arange(n_run)])
    start = np.concatenate([a_start, np.zeros(n_run, np.int64)])
    length = np.concatenate([a_len, np.ones(n_run, np.int64)])
    modulo = np.concatenate([lens[a_ring], np.ones(n_run, np.int64)])
    V2 = np.concatenate([V, run_s])

    out_coords: list[np.ndarray] = []
    out_lens: list[np.ndarray] = []
    out_group: list[np.ndarray] = []
    n_p = n_arc + n_run
    if n_p:
        # Successor of each piece: the piece starting where it ends; at a pinch (two such), the right turn.
        skey = (piece_group << gshift) | (start_pt[:, 1] << _COORD_BITS) | start_pt[:, 0]
        ekey = (piece_group << gshift) | (end_pt[:, 1] << _COORD_BITS) | end_pt[:, 0]
        order = np.argsort(skey, kind="stable")
        sorted_keys = skey[order]
        lo = np.searchsorted(sorted_keys, ekey, side="left")
        hi = np.searchsorted(sorted_keys, ekey, side="right")
        if ((hi - lo) < 1).any() or ((hi - lo) > 2).any():
            raise RuntimeError("seam merge found an unmatched ring piece; this is a bug")
        c1 = order[lo]
        c2 = order[np.minimum(lo + 1, n_p - 1)]
        cross = last_dir[:, 0] * first_dir[c1, 1] - last_dir[:, 1] * first_dir[c1, 0]
        succ = np.where((hi - lo == 1) | (cross > 0), c1, c2).tolist()
        seen = bytearray(n_p)
        walk: list[int] = []
        cycle_len: list[int] = []
        for i in range(n_p):
            if seen[i]:
                continue
            j = i
            n0 = len(walk)
            while not seen[j]:
                seen[j] = 1
                walk.append(j)
                j = succ[j]
            if j != i:
                raise RuntimeError("seam merge could not close a ring; this is a bug")
            cycle_len.append(len(walk) - n0)
        c = np.asarray(walk)
        ln = length[c]
        idx = np.repeat(base[c], ln) + _ranges(start[c], ln) % np.repeat(modulo[c], ln)
        n_cyc = len(cycle_len)
        vert_cycle = np.repeat(np.repeat(np.arange(n_cyc), cycle_len), ln)
        coords, lens_c = _clean_rings(V2[idx], vert_cycle, n_cyc)
        out_coords.append(coords)
        out_lens.append(lens_c)
        out_group.append(piece_group[c[_offsets(cycle_len)[:-1]]])
    if len(whole):
        out_coords.append(ring_coords[_ranges(closed_off[whole], ring_lens[whole])].astype(np.int64))
        out_lens.append(ring_lens[whole])
        out_group.append(ring_group[whole])
    coords = np.concatenate(out_coords)
    lens_out = np.concatenate(out_lens)
    group_out = np.concatenate(out_group)
    off = _offsets(lens_out)
    ring_id = np.repeat(np.arange(len(lens_out)), lens_out)
    # Signed area per closed ring (its last vertex repeats the first and starts no segment).
    nxt_v = np.minimum(np.arange(len(coords)) + 1, len(coords) - 1)
    cross_v = coords[:, 0] * coords[nxt_v, 1] - coords[nxt_v, 0] * coords[:, 1]
    cross_v[off[1:] - 1] = 0
    signs = np.bincount(ring_id, weights=cross_v, minlength=len(lens_out))
    n_ext = np.bincount(group_out[signs < 0], minlength=n_groups)
    if (n_ext != 1).any() or (signs == 0).any():
        raise RuntimeError(f"seam merge produced {n_ext.max()} exterior rings for a polygon (expected 1): a bug")
    first_key = (coords[off[:-1], 1] << _COORD_BITS) | coords[off[:-1], 0]
    ring_order = np.lexsort((first_key, signs > 0, group_out))  # by group: exterior, then holes by start
    sel = _ranges(off[ring_order], lens_out[ring_order])
    return coords[sel].astype(np.int32), lens_out[ring_order], np.bincount(group_out, minlength=n_groups)


def _surviving_seam_runs(
    p: np.ndarray, q: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seam segments p -> q (of ``group``) as unit edges; drop those present in both directions within a group;
    rejoin the rest into runs. Returns (run starts, run ends, run groups)."""
    if len(p) == 0:
        z = np.zeros((0, 2), dtype=np.int64)
        return z, z, np.zeros(0, dtype=np.int64)
    step = np.sign(q - p)
    length = np.abs(q - p).sum(axis=1)
    seg_id = np.repeat(np.arange(len(p)), length)
    t = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    st = step[seg_id]
    a = p[seg_id] + st * t[:, None]
    b = a + st
    lo = np.minimum(a, b)
    vertical = (st[:, 0] == 0).astype(np.int64)
    undirected = (((group[seg_id] << (2 * _COORD_BITS)) | (lo[:, 1] << _COORD_BITS) | lo[:, 0]) << 1) | vertical
    _, inv, counts = np.unique(undirected, return_inverse=True, return_counts=True)
    alive = counts[inv.ravel()] == 1
    first = t == 0
    last = t == length[seg_id] - 1
    prev_alive = np.concatenate([[False], alive[:-1]])
    next_alive = np.concatenate([alive[1:], [False]])
    run_start = alive & (first | ~prev_alive)
    run_end = alive & (last | ~next_alive)
    return a[run_start], b[run_end], group[seg_id[run_start]]


def _clean_rings(v: np.ndarray, ring: np.ndarray, n_rings: int) -> tuple[np.ndarray, np.ndarray]:
    """Open rings (vertices ``v`` grouped by ``ring``): drop collinear vertices, start each at its lowest
    (row, col) vertex, close. Returns (closed coords, ring lengths)."""
    counts = np.bincount(ring, minlength=n_rings)
    off = _offsets(counts)
    i = np.arange(len(v))
    prev = i - 1
    prev[off[:-1]] = off[1:] - 1
    nxt = i + 1
    nxt[off[1:] - 1] = off[:-1]
    keep = (np.sign(v - v[prev]) != np.sign(v[nxt] - v)).any(axis=1)
    v, ring = v[keep], ring[keep]
    counts = np.bincount(ring, minlength=n_rings)
    off = _offsets(counts)
    # Rotate each ring to its lowest (row, col) vertex; it is never a pinch, so it occurs once per ring.
    key = (v[:, 1] << _COORD_BITS) | v[:, 0]
    low = np.minimum.reduceat(key, off[:-1])
    first = np.flatnonzero(key == low[ring])
    start = first - off[:-1]
    # closed ring r: positions 0..n_r, source index off[r] + (start[r] + j) % n_r
    n_closed = counts + 1
    j = np.arange(int(n_closed.sum())) - np.repeat(_offsets(n_closed)[:-1], n_closed)
    r = np.repeat(np.arange(n_rings), n_closed)
    closed = v[off[r] + (start[r] + j) % counts[r]]
    return closed, n_closed


# ------------------------------------------------------------------------------------------------ sieve


def sieve_context_px(size_px: int) -> int:
    """Context (pixels on every side) a block needs so that ``sieve_block`` equals ``sieve_array``.

    A small region (< ``size_px`` pixels) lies within ``size_px - 1`` of any of its pixels, and so does a small
    neighbour region of it: ``2 * size_px`` of context contains both, with a margin.
    """
    return 2 * int(size_px) if size_px > 1 else 0


def sieve_size_px(sieve_px: int, min_area_m2: float, transform: Affine, crs: Any, shape: tuple[int, int]) -> int:
    """The sieve threshold in pixels: ``sieve_px`` or ``min_area_m2`` in pixels, whichever is larger.

    In a geographic CRS the pixel area is taken at the raster's centre row.
    """
    size = int(sieve_px)
    if min_area_m2 > 0:
        px_area = _pixel_area_m2(transform, crs, shape)
        size = max(size, int(math.ceil(min_area_m2 / px_area - 1e-9)))
    return size


def read_with_context(ds: rasterio.DatasetReader, window: Window | Sequence[int], context_px: int,
                      nodata: int = NODATA, band: int = 1) -> np.ndarray:
    """``window`` grown by ``context_px`` on every side; outside the raster filled with ``nodata``."""
    col_off, row_off, width, height = _window_tuple(window)
    c0, r0 = col_off - context_px, row_off - context_px
    c1, r1 = col_off + width + context_px, row_off + height + context_px
    cc0, rr0, cc1, rr1 = max(c0, 0), max(r0, 0), min(c1, ds.width), min(r1, ds.height)
    data = ds.read(band, window=Window(cc0, rr0, cc1 - cc0, rr1 - rr0))
    if (cc0, rr0, cc1, rr1) == (c0, r0, c1, r1):
        return data
    return np.pad(data, ((rr0 - r0, r1 - rr1), (cc0 - c0, c1 - cc1)), constant_values=nodata)


def sieve_array(mask: np.ndarray, size_px: int, connectivity: int = 4, *, nodata: int = NODATA) -> np.ndarray:
    """Whole-mask minimum mapping unit: the reference ``sieve_block`` equals.

    Rule (local, so that it can be computed block by block): a region (a connected set of one class, by
    ``connectivity``) of fewer than ``size_px`` pixels takes the class it shares the most pixel contacts with
    among the pixels of neighbouring regions of at least ``size_px`` pixels (contacts are edge neighbours, and
    also diagonal ones for 8-connectivity; ties go to the lowest class id). A small region with no large
    neighbour (only nodata or other small regions around it) is kept. Nodata is never filled and never fills.
    This differs from ``rasterio.features.sieve``, whose choice depends on the sizes of whole neighbouring
    regions and on the order of merges, which no bounded block context can reproduce.
    """
    if size_px <= 1:
        return mask.copy()
    padded = np.pad(mask, 1, constant_values=nodata)
    return _sieve_core(padded, int(size_px), connectivity, nodata)[1:-1, 1:-1]


def sieve_block(
    mask_with_context: np.ndarray, context_px: int, size_px: int, connectivity: int = 4, *, nodata: int = NODATA
) -> np.ndarray:
    """Sieve one block read with ``context_px`` of mask on every side; returns the block's interior.

    Read it with ``read_with_context`` (outside the raster padded with nodata). With ``context_px >=
    sieve_context_px(size_px)`` the interior equals the same window of ``sieve_array`` of the whole mask.
    """
    if size_px <= 1:
        out = mask_with_context
    else:
        if context_px < sieve_context_px(size_px):
            raise InputError(f"sieve of {size_px} px needs {sieve_context_px(size_px)} px of context, got {context_px}")
        out = _sieve_core(np.ascontiguousarray(mask_with_context), int(size_px), connectivity, nodata)
    c = int(context_px)
    h, w = out.shape
    return out[c : h - c, c : w - c].copy()


def _sieve_core(arr: np.ndarray, size_px: int, connectivity: int, nodata: int) -> np.ndarray:
    """Sieve ``arr``; regions touching the array's edge count as large (the context's edge cuts them)."""
    arr = np.ascontiguousarray(arr.astype(np.uint8, copy=False))
    h, w = arr.shape
    valid = arr != nodata
    coords, ring_off, poly_off, values = _shapes_arrays(arr, valid, connectivity)
    if len(values) == 0:
        return arr.copy()
    n_poly = len(values)
    # Pixel count of each region: the shoelace area of its rings (exterior negative, holes positive).
    nseg = np.diff(ring_off) - 1
    seg = _ranges(ring_off[:-1], nseg)
    x0, y0 = coords[seg, 0].astype(np.int64), coords[seg, 1].astype(np.int64)
    x1, y1 = coords[seg + 1, 0].astype(np.int64), coords[seg + 1, 1].astype(np.int64)
    ring_of_seg = np.repeat(np.arange(len(nseg)), nseg)
    poly_of_ring = np.repeat(np.arange(n_poly), np.diff(poly_off))
    area2 = np.bincount(poly_of_ring[ring_of_seg], weights=(x0 * y1 - x1 * y0), minlength=n_poly)
    size = np.rint(-area2 / 2).astype(np.int64)
    ext = ring_off[poly_off[:-1]]
    ext_pts = _ranges(ext, ring_off[poly_off[:-1] + 1] - ext)
    pt_poly = np.repeat(np.arange(n_poly), ring_off[poly_off[:-1] + 1] - ext)
    cx, cy = coords[ext_pts, 0], coords[ext_pts, 1]
    on_edge = np.zeros(n_poly, dtype=bool)
    on_edge[pt_poly[(cx == 0) | (cx == w) | (cy == 0) | (cy == h)]] = True
    small = np.flatnonzero((size < size_px) & ~on_edge)
    if len(small) == 0:
        return arr.copy()
    # Label the small regions by burning their polygons (pixel-centre rule reproduces the pixels exactly).
    sub = PolygonSet(coords, ring_off, poly_off, values, np.zeros(n_poly, np.int64)).take(small)
    geoms = sub.to_shapely()
    labels = features.rasterize(
        zip(geoms, range(1, len(small) + 1)), out_shape=(h, w), fill=0, dtype="int32",
        transform=Affine.identity(),
    )
    big = valid & (labels == 0)
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    lab_parts, cls_parts = [], []
    for dy, dx in offsets:
        sa = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
        sb = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
        for s_small, s_big in ((sa, sb), (sb, sa)):
            la = labels[s_small]
            hit = (la > 0) & big[s_big]
            lab_parts.append(la[hit])
            cls_parts.append(arr[s_big][hit])
    lab = np.concatenate(lab_parts).astype(np.int64)
    cls = np.concatenate(cls_parts).astype(np.int64)
    out = arr.copy()
    if len(lab) == 0:
        return out
    pair, counts = np.unique(lab * 256 + cls, return_counts=True)
    plab, pcls = pair // 256, pair % 256
    order = np.lexsort((pcls, -counts, plab))  # per label: most contacts first, then the lowest class
    plab, pcls = plab[order], pcls[order]
    first = np.concatenate([[True], plab[1:] != plab[:-1]])
    lut = np.full(len(small) + 1, -1, dtype=np.int64)
    lut[plab[first]] = pcls[first]
    new = lut[labels]
    sel = new >= 0
    out[sel] = new[sel].astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------- classes, units


def resolve_classes(
    include: Sequence[int | str] | None, exclude: Sequence[int | str] | None, class_names: Sequence[str]
) -> set[int] | None:
    """Class ids kept by include/exclude lists of ids or names; None when every class is kept."""
    names = {n: i for i, n in enumerate(class_names) if n}

    def ids(items: Sequence[int | str], key: str) -> set[int]:
        out = set()
        for it in items:
            if isinstance(it, bool):
                raise InputError(f"vector.{key}: {it!r} is not a class id or name")
            if isinstance(it, int) or (isinstance(it, str) and it.strip().isdigit()):
                cid = int(it)
                if not 0 <= cid <= 254:
                    raise InputError(f"vector.{key}: class id {cid} is outside 0..254")
                out.add(cid)
            elif it in names:
                out.add(names[it])
            else:
                valid = ", ".join(n for n in class_names if n) or "(none)"
                raise InputError(f"vector.{key}: unknown class {it!r} (valid names: {valid})")
        return out

    if include is None and not exclude:
        return None
    keep = ids(include, "include_classes") if include is not None else set(range(255))
    return keep - ids(exclude or [], "exclude_classes")


def class_name(cid: int, class_names: Sequence[str]) -> str:
    return class_names[cid] if cid < len(class_names) and class_names[cid] else f"class_{cid}"


def _metres_per_unit(pcrs) -> float:
    """Linear unit of a projected CRS in metres (1 when unknown)."""
    if pcrs is None:
        return 1.0
    for axis in pcrs.axis_info:
        if axis.unit_conversion_factor:
            return float(axis.unit_conversion_factor)
    return 1.0


def _ellipsoid_q(lat_deg: np.ndarray, e: float) -> np.ndarray:
    """Authalic ``q(phi)``: the area between the equator and ``phi`` per radian of longitude is b^2 q / 2."""
    s = np.sin(np.radians(lat_deg))
    if e == 0:
        return 2 * s
    return s / (1 - e * e * s * s) + np.log((1 + e * s) / (1 - e * s)) / (2 * e)


def _geo_ellipsoid(pcrs) -> tuple[float, float]:
    ell = pcrs.ellipsoid
    a = float(ell.semi_major_metre)
    inv_f = float(ell.inverse_flattening or 0.0)
    f = 1 / inv_f if inv_f else 0.0
    return a, f


def _pixel_area_m2(transform: Affine, crs: Any, shape: tuple[int, int]) -> float:
    pcrs = _pyproj_crs(crs)
    if pcrs is not None and pcrs.is_geographic:
        a, f = _geo_ellipsoid(pcrs)
        b, e = a * (1 - f), math.sqrt(f * (2 - f))
        row = shape[0] // 2
        lats = np.array([transform.f + transform.e * row, transform.f + transform.e * (row + 1)])
        q = _ellipsoid_q(lats, e)
        return abs(0.5 * b * b * (q[1] - q[0]) * math.radians(abs(transform.a)))
    k = _metres_per_unit(pcrs)
    return abs(transform.a * transform.e - transform.b * transform.d) * k * k


def simplify_tolerance(tolerance_m: float, crs: Any) -> float:
    """A tolerance in metres in the CRS's units (geographic: degrees of latitude, 111 320 m each)."""
    pcrs = _pyproj_crs(crs)
    if pcrs is not None and pcrs.is_geographic:
        return tolerance_m / 111_320.0
    return tolerance_m / _metres_per_unit(pcrs)


# ---------------------------------------------------------------------------------- map coordinates


def to_map_coords(polys: PolygonSet, transform: Affine) -> np.ndarray:
    """Shapely polygons in the raster's CRS (``transform`` maps pixel corners to map coordinates)."""
    return polys.to_shapely(transform)


def polygon_table(
    polys: PolygonSet,
    geoms: np.ndarray | None = None,
    *,
    transform: Affine,
    crs: Any,
    class_names: Sequence[str] = (),
    scene: str | None = None,
    model: str | None = None,
    model_version: str | None = None,
    pixel_exact: bool = True,
    arrow_strings: bool = False,
) -> dict[str, Any]:
    """Attribute columns for ``polys``; ``geoms`` are their map geometries, needed only when they are no longer
    the pixel polygons (``pixel_exact=False``, after simplification).

    Numpy arrays; with ``arrow_strings`` the string columns are pyarrow dictionary arrays instead (no
    per-row Python objects; the writers take both).

    ``area_m2`` / ``perimeter_m``: in a projected CRS planar, converted from the CRS's linear unit; in a
    geographic CRS on the CRS's ellipsoid: the perimeter is the sum of geodesic edge lengths
    (``pyproj.Geod``), the area is the exact ellipsoidal area of the polygon's cells when ``pixel_exact`` (the
    polygons follow the pixel grid and the grid is north-up), else ``Geod.geometry_area_perimeter``.
    ``pixel_exact`` must be False once geometries were simplified.
    """
    n = len(polys)
    pcrs = _pyproj_crs(crs)
    north_up = transform.b == 0 and transform.d == 0
    if pcrs is not None and pcrs.is_geographic:
        geod = pcrs.get_geod()
        if pixel_exact and north_up:
            area = _cell_area_geographic(polys, transform, pcrs)
            perim = _geodesic_perimeters(polys, transform, geod)
        else:
            area = np.empty(n)
            perim = np.empty(n)
            for i, g in enumerate(geoms):
                a, p = geod.geometry_area_perimeter(g)
                area[i], perim[i] = abs(a), p
    else:
        k = _metres_per_unit(pcrs)
        if pixel_exact:
            det = abs(transform.a * transform.e - transform.b * transform.d)
            area = _pixel_areas(polys) * det * k * k
            perim = _planar_perimeters(polys, transform) * k
        else:
            area = shapely.area(geoms) * k * k
            perim = shapely.length(geoms) * k
    names = [class_name(c, class_names) for c in range(256)]
    if arrow_strings:
        import pyarrow as pa

        def const(v: str | None) -> Any:
            return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([v], pa.string()))

        cname: Any = pa.DictionaryArray.from_arrays(pa.array(polys.class_ids.astype(np.int32)), pa.array(names))
    else:

        def const(v: str | None) -> Any:
            return np.full(n, v, dtype=object)

        cname = np.array(names, dtype=object)[polys.class_ids.astype(np.int64)]
    return {
        "polygon_id": polys.polygon_ids.astype(np.int64),
        "class_id": polys.class_ids.astype(np.uint8),
        "class_name": cname,
        "area_m2": np.asarray(area, dtype=np.float64),
        "perimeter_m": np.asarray(perim, dtype=np.float64),
        "scene": const(scene),
        "model": const(model),
        "model_version": const(model_version),
    }


def _segments(polys: PolygonSet) -> tuple[np.ndarray, np.ndarray]:
    """Start index of every ring segment (into coords) and the polygon it belongs to."""
    nseg = np.diff(polys.ring_offsets) - 1
    seg = _ranges(polys.ring_offsets[:-1], nseg)
    ring_poly = np.repeat(np.arange(len(polys)), np.diff(polys.poly_offsets))
    return seg, np.repeat(ring_poly, nseg)


def _pixel_areas(polys: PolygonSet) -> np.ndarray:
    """Exact pixel counts (shoelace in integer pixel coordinates, holes subtract by their orientation)."""
    if not len(polys):
        return np.zeros(0)
    x = polys.coords[:, 0].astype(np.int64)
    y = polys.coords[:, 1].astype(np.int64)
    cross = np.zeros(len(x), dtype=np.int64)
    cross[:-1] = x[:-1] * y[1:] - x[1:] * y[:-1]
    cross[polys.ring_offsets[1:] - 1] = 0  # a ring's closing vertex does not start a segment
    return np.abs(np.add.reduceat(cross, polys.ring_offsets[polys.poly_offsets[:-1]])) / 2


def _planar_perimeters(polys: PolygonSet, transform: Affine) -> np.ndarray:
    """Boundary length (exterior and holes) in map units."""
    if not len(polys):
        return np.zeros(0)
    xy = polys.map_coords(transform)
    seg = np.zeros(len(xy))
    seg[:-1] = np.hypot(xy[1:, 0] - xy[:-1, 0], xy[1:, 1] - xy[:-1, 1])
    seg[polys.ring_offsets[1:] - 1] = 0  # a ring's closing vertex does not start a segment
    return np.add.reduceat(seg, polys.ring_offsets[polys.poly_offsets[:-1]])


def _cell_area_geographic(polys: PolygonSet, transform: Affine, pcrs) -> np.ndarray:
    """Ellipsoidal area of pixel-aligned polygons on a north-up geographic grid, summed per horizontal edge.

    With ``F(y)`` the area from the equator to row line ``y`` per pixel column, a polygon's area is
    ``|sum over horizontal edges of dx * F(y)|`` (Green's theorem on the cell grid): exact for cells bounded by
    parallels and meridians, vectorized over all polygons.
    """
    a, f = _geo_ellipsoid(pcrs)
    b, e = a * (1 - f), math.sqrt(f * (2 - f))
    seg, seg_poly = _segments(polys)
    c = polys.coords
    y0 = c[seg, 1]
    horiz = y0 == c[seg + 1, 1]
    dx = (c[seg + 1, 0] - c[seg, 0]).astype(np.float64)
    lat = transform.f + transform.e * y0[horiz].astype(np.float64)
    fy = 0.5 * b * b * _ellipsoid_q(lat, e) * math.radians(abs(transform.a))
    return np.abs(np.bincount(seg_poly[horiz], weights=dx[horiz] * fy, minlength=len(polys)))


def _geodesic_perimeters(polys: PolygonSet, transform: Affine, geod) -> np.ndarray:
    seg, seg_poly = _segments(polys)
    xy = polys.map_coords(transform)
    lengths = geod.line_lengths(xy[:, 0], xy[:, 1]) if len(xy) > 1 else np.zeros(0)
    lengths = np.asarray(lengths, dtype=np.float64)
    return np.bincount(seg_poly, weights=lengths[seg], minlength=len(polys))


# ---------------------------------------------------------------------------------------- simplify


def densify_px(polys: PolygonSet) -> PolygonSet:
    """Put a vertex at every pixel corner along every edge (exact integers).

    GDAL's polygons have vertices only where a boundary turns, so a straight edge of one polygon can meet
    several neighbours (T-junctions) and the coverage is not edge-matched, which ``coverage_simplify``
    requires. Pixel corners are the same points for every polygon whichever batch it is in.
    """
    if not len(polys):
        return polys
    c = polys.coords.astype(np.int64)
    closing = np.zeros(len(c), dtype=bool)
    closing[polys.ring_offsets[1:] - 1] = True
    step = np.zeros_like(c)
    step[:-1] = np.sign(c[1:] - c[:-1])
    step[closing] = 0
    count = np.ones(len(c), dtype=np.int64)
    seg_len = np.zeros(len(c), dtype=np.int64)
    seg_len[:-1] = np.abs(c[1:] - c[:-1]).sum(axis=1)
    count[~closing] = seg_len[~closing]
    src = np.repeat(np.arange(len(c)), count)
    k = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    coords = (c[src] + step[src] * k[:, None]).astype(np.int32)
    ring_of = np.repeat(np.arange(len(polys.ring_offsets) - 1), np.diff(polys.ring_offsets))
    ring_len = np.bincount(ring_of, weights=count, minlength=len(polys.ring_offsets) - 1).astype(np.int64)
    return PolygonSet(coords, _offsets(ring_len), polys.poly_offsets, polys.class_ids, polys.polygon_ids)


def simplify_coverage(geoms: np.ndarray, tolerance: float) -> np.ndarray:
    """``shapely.coverage_simplify`` of edge-matched polygons that tile without overlap (shared edges stay
    shared; see ``densify_px``).

    ``tolerance`` is in the geometries' units. Edges that only one polygon of ``geoms`` has (the set's outer
    boundary: raster edge, nodata, polygons simplified in another batch) are kept exactly, so batches fit
    together. 8-connected polygons pinch at single vertices (OGC-invalid); they are made valid first, which
    splits them into multipolygons at the pinches.
    """
    if tolerance <= 0 or len(geoms) == 0:
        return geoms
    valid = shapely.is_valid(geoms)
    if not valid.all():
        geoms = geoms.copy()
        geoms[~valid] = shapely.make_valid(geoms[~valid], method="structure", keep_collapsed=False)
    return shapely.coverage_simplify(geoms, tolerance, simplify_boundary=False)


def simplify_polygons(polys: PolygonSet, transform: Affine, tolerance: float) -> np.ndarray:
    """Finished polygons -> coverage-simplified map geometries (``tolerance`` in map units)."""
    return simplify_coverage(to_map_coords(densify_px(polys), transform), tolerance)


class _Bands:
    """Holds finished polygons until their row band is complete, then releases bands in raster order.

    A polygon belongs to the band of its last (bottom) pixel row. Once every block of rows ``<= band end`` was
    added, the merger has emitted all polygons of that band (a polygon ending above a seam is final when the
    blocks below it are seen). Released bands are sorted by ``polygon_id``, so the output order -- and the
    batches coverage simplification sees -- are the same for every block size and arrival order, and memory
    holds about one band of polygons (a giant polygon that spans the raster belongs to the last band, so it
    delays nothing). Bands are fixed raster rows (``band_px``), independent of the blocks.
    """

    def __init__(self, rows: int, band_px: int):
        self.rows = rows
        self.band_px = max(int(band_px), 1)
        self.n = max(1, -(-rows // self.band_px))
        self.held: dict[int, list[PolygonSet]] = collections.defaultdict(list)
        self.next = 0  # first band not yet released

    def add(self, polys: PolygonSet) -> list[PolygonSet]:
        """Take finished polygons; returns any that belong to an already released band (blocks that
        never arrived until ``finish``), to be written as they are."""
        if not len(polys):
            return []
        bottom = np.maximum.reduceat(polys.coords[:, 1], polys.ring_offsets[polys.poly_offsets[:-1]]) - 1
        band = np.minimum(bottom.astype(np.int64) // self.band_px, self.n - 1)
        late = []
        for k in np.unique(band).tolist():
            sub = polys.take(band == k) if len(polys) and (band != k).any() else polys
            (late.append(sub) if k < self.next else self.held[k].append(sub))
        return late

    def ready(self, rows_complete: int) -> list[PolygonSet]:
        """Complete bands, in order (``rows_complete``: all blocks of rows below it were added)."""
        out = []
        while self.next < self.n:
            hi = min((self.next + 1) * self.band_px, self.rows)
            if not (rows_complete > hi or rows_complete >= self.rows):
                break
            out.append(_sorted_by_id(PolygonSet.concat(self.held.pop(self.next, []))))
            self.next += 1
        return [p for p in out if len(p)]

    def flush(self) -> list[PolygonSet]:
        return self.ready(self.rows)


def _sorted_by_id(polys: PolygonSet) -> PolygonSet:
    """The same polygons in ``polygon_id`` order (a canonical order; GEOS simplifies edges in input order)."""
    order = np.argsort(polys.polygon_ids, kind="stable")
    return polys.take(order)


# ------------------------------------------------------------------------------------------- sink


_FORMAT_FILES = {
    "parquet": "polygons.parquet",
    "gpkg": "polygons.gpkg",
    "geojson": "polygons.geojson",
    "geojsonseq": "polygons.geojsonl",
}
_SUFFIX_FORMAT = {
    ".parquet": "parquet",
    ".geoparquet": "parquet",
    ".gpkg": "gpkg",
    ".geojson": "geojson",
    ".json": "geojson",
    ".geojsonl": "geojsonseq",
    ".geojsons": "geojsonseq",
    ".geojsonseq": "geojsonseq",
    ".ndjson": "geojsonseq",
}


def output_paths(out: str | os.PathLike, formats: Sequence[str]) -> dict[str, Path]:
    """``{format: path}``: a file with a known suffix is that one format; anything else is a directory."""
    out = Path(out)
    fmt = _SUFFIX_FORMAT.get(out.suffix.lower())
    if fmt is not None:
        return {fmt: out}
    if out.suffix and not out.is_dir():
        known = ", ".join(sorted(_SUFFIX_FORMAT))
        raise InputError(f"{out}: unknown vector format suffix {out.suffix!r} (known: {known}; or a directory)")
    return {f: out / _FORMAT_FILES[f] for f in formats}


class PolygonSink:
    """The single-writer half of vectorization for one scene: merge, simplify, filter, attribute, write.

    Feed it ``BlockPolygons`` in any order with ``add``; ``finish`` publishes every output atomically and
    returns ``{format: path}``; ``abort`` removes the temporary files. ``outputs`` maps formats
    (parquet, gpkg, geojson, geojsonseq) to paths. Polygons are written in row bands of ``band_px`` raster
    rows, each sorted by ``polygon_id`` (see ``_Bands``): the files are byte-identical for every block size and
    arrival order, and simplification is partition-invariant (edges between polygons of different bands are
    kept exact, so bands fit together without gaps).
    """

    def __init__(
        self,
        outputs: dict[str, str | os.PathLike],
        *,
        shape: tuple[int, int],
        transform: Affine,
        crs: Any,
        cfg: Any,
        block_px: int | None = None,
        windows: Sequence[Window] | None = None,
        class_names: Sequence[str] = (),
        palette: dict[int, tuple[int, int, int, int]] | None = None,
        scene: str | None = None,
        model: str | None = None,
        model_version: str | None = None,
        band_px: int = 512,
        overwrite: bool = True,
        write_chunk: int = 4096,
    ):
        from geoseg.write.vectors import open_vector_writer

        self.shape = (int(shape[0]), int(shape[1]))
        self.transform = transform
        self.crs = crs
        self.cfg = cfg
        self.class_names = list(class_names)
        self.meta = dict(scene=scene, model=model, model_version=model_version)
        self.keep = resolve_classes(cfg.include_classes, cfg.exclude_classes, self.class_names)
        self.tolerance = simplify_tolerance(cfg.simplify_tolerance_m, crs) if cfg.simplify_tolerance_m > 0 else 0.0
        self.merger = SeamMerger(self.shape, block_px=block_px, windows=windows, connectivity=cfg.connectivity)
        self.bands = _Bands(self.shape[0], band_px)
        self.write_chunk = max(1, int(write_chunk))
        self.count = 0
        rows, cols = self.shape
        t = transform
        cx = np.array([0, cols, 0, cols], dtype=np.float64)
        cy = np.array([0, 0, rows, rows], dtype=np.float64)
        xs, ys = t.a * cx + t.b * cy + t.c, t.d * cx + t.e * cy + t.f
        extent = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
        pal = palette or default_palette(len(self.class_names) or 16)
        self.writers = {}
        try:
            for fmt, path in outputs.items():
                if Path(path).exists() and not overwrite:
                    raise OutputError(f"{path}: exists (set overwrite to replace it)")
                self.writers[fmt] = open_vector_writer(
                    path, fmt, crs, palette=pal, class_names=self.class_names, extent=extent,
                    geometry_type="MultiPolygon" if (self.tolerance and cfg.connectivity == 8) else "Polygon",
                )
        except BaseException:
            self.abort()
            raise

    @property
    def classes_at_polygonize(self) -> set[int] | None:
        """Classes a block may drop already when polygonizing (all are needed to simplify a coverage)."""
        return None if self.tolerance else self.keep

    def add(self, block: BlockPolygons) -> int:
        """Merge one block and write what became final; returns the number of polygons written."""
        final = self.merger.add(block)
        return self._route(final, self.merger.rows_complete_until())

    def _route(self, final: PolygonSet, rows_complete: int) -> int:
        n = sum(self._write_chunked(p) for p in self.bands.add(final))
        return n + sum(self._write_chunked(p) for p in self.bands.ready(rows_complete))

    def _write_chunked(self, polys: PolygonSet) -> int:
        """Write a band in slices of ``write_chunk`` polygons when that cannot change the output.

        A band spans the raster's width, so its attribute table, WKB and GeoJSON text would grow with the image;
        slices keep those transients at a fixed size. Pixel-exact polygons are written one by one anyway (the
        files are the same for any slicing); a simplified band must stay whole, it is one coverage.
        """
        if self.tolerance or len(polys) <= self.write_chunk:
            return self._write(polys)
        return sum(self._write(polys.take(np.arange(i, min(i + self.write_chunk, len(polys)))))
                   for i in range(0, len(polys), self.write_chunk))

    def _write(self, polys: PolygonSet) -> int:
        """Simplify (optional), filter classes, attribute and write one released band."""
        if not len(polys):
            return 0
        from geoseg.write.vectors import FeatureBatch

        pixel_exact = not self.tolerance

        geoms = None if pixel_exact else simplify_polygons(polys, self.transform, self.tolerance)
        if self.keep is not None:
            sel = np.isin(polys.class_ids, np.fromiter(self.keep, dtype=np.int64))
            polys = polys.take(sel)
            geoms = None if geoms is None else geoms[sel]
            if not len(polys):
                return 0
        cols = polygon_table(
            polys, geoms, transform=self.transform, crs=self.crs, class_names=self.class_names,
            pixel_exact=pixel_exact, arrow_strings=True, **self.meta,
        )
        if geoms is None:  # exact pixel polygons: WKB and bboxes straight from the arrays
            batch = FeatureBatch.from_ragged(polys.map_coords(self.transform), polys.ring_offsets,
                                             polys.poly_offsets, cols)
        else:
            batch = FeatureBatch(geoms, cols)
        for w in self.writers.values():
            w.write(batch)
        self.count += len(polys)
        return len(polys)

    def finish(self) -> dict[str, Path]:
        """Write the remaining polygons and publish every output; returns ``{format: path}``."""
        try:
            self._route(self.merger.finish(), self.shape[0])
            return {fmt: w.close() for fmt, w in self.writers.items()}
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def default_palette(n: int) -> dict[int, tuple[int, int, int, int]]:
    """A fixed qualitative palette for masks that carry no colour table."""
    base = [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
        (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
        (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
    ]
    return {i: (*base[i % len(base)], 255) for i in range(max(n, 1))}


def read_class_names(ds: rasterio.DatasetReader) -> list[str]:
    """Class names from the mask's ``GEOSEG_CLASS_NAMES`` tag (JSON list by class id); else empty."""
    raw = ds.tags().get(CLASS_NAMES_TAG) or ds.tags(1).get(CLASS_NAMES_TAG)
    if not raw:
        return []
    try:
        names = json.loads(raw)
    except ValueError:
        raise InputError(f"{ds.name}: tag {CLASS_NAMES_TAG} is not a JSON list ({raw[:80]!r})") from None
    if not isinstance(names, list):
        raise InputError(f"{ds.name}: tag {CLASS_NAMES_TAG} is not a JSON list ({raw[:80]!r})")
    return [str(n) if n is not None else "" for n in names]


def read_palette(ds: rasterio.DatasetReader, n_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """The mask's colour table for its classes if it has one, else ``default_palette``."""
    try:
        cmap = ds.colormap(1)
    except ValueError:
        cmap = None
    if not cmap:
        return default_palette(n_classes or 16)
    if n_classes:
        return {int(k): tuple(int(c) for c in v) for k, v in cmap.items() if int(k) < n_classes}
    # no class list: the entries the table actually sets (GDAL pads tables with transparent black)
    return {int(k): tuple(int(c) for c in v) for k, v in cmap.items() if int(k) < 255 and tuple(v) != (0, 0, 0, 0)}


# ------------------------------------------------------------------------------------- vectorize_file


class VectorizeResult(list):
    """What ``vectorize_file`` wrote: a list of the written paths, plus ``paths`` ({format: path}),
    ``polygons`` (features written), ``blocks`` and ``seconds``."""

    def __init__(self, paths: dict[str, Path], polygons: int, blocks: int, seconds: float):
        super().__init__(paths.values())
        self.paths = paths
        self.polygons = polygons
        self.blocks = blocks
        self.seconds = seconds

    def __repr__(self) -> str:
        return (f"VectorizeResult(paths={self.paths!r}, polygons={self.polygons}, blocks={self.blocks}, "
                f"seconds={self.seconds:.2f})")


_WORKER_DS: dict[tuple, rasterio.DatasetReader] = {}


def _worker_dataset(path: str) -> rasterio.DatasetReader:
    """The worker's open dataset for ``path``, reopened when the file changed: keyed by path alone, a mask
    rewritten under the same name (a notebook's second run) was read from the stale handle."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    ds = _WORKER_DS.get(key)
    if ds is None:
        for old in [k for k in _WORKER_DS if k[0] == path]:
            _WORKER_DS.pop(old).close()
        ds = _WORKER_DS[key] = rasterio.open(path)
    return ds


def _block_task(
    path: str, window: tuple[int, int, int, int], nodata: int | None, connectivity: int, sieve_px: int,
    classes: tuple[int, ...] | None,
) -> BlockPolygons:
    """Worker: read one block (with sieve context), sieve, polygonize. Keeps its dataset open between tasks."""
    ds = _worker_dataset(path)
    fill = NODATA if nodata is None else nodata
    if sieve_px > 1:
        ctx = sieve_context_px(sieve_px)
        mask = sieve_block(read_with_context(ds, window, ctx, fill), ctx, sieve_px, connectivity, nodata=fill)
    else:
        mask = ds.read(1, window=Window(*window))
    return polygonize_block(mask, window, nodata=nodata, connectivity=connectivity, classes=classes)


def vectorize_file(
    mask_path: str | os.PathLike,
    out: str | os.PathLike,
    cfg: Any,
    *,
    block_px: int = 1024,
    workers: int = 2,
    scene: str | None = None,
    model: str | None = None,
    model_version: str | None = None,
    overwrite: bool = False,
    band_px: int = 512,
    write_chunk: int = 4096,
    mp_context: str | None = None,
    storage: Any = None,
) -> VectorizeResult:
    """Polygonize a class mask GeoTIFF into ``out`` (a file whose suffix names the format, or a directory that
    receives ``cfg.formats`` as ``polygons.*``), block-parallel in ``workers`` processes.

    ``mask_path`` and ``out`` may be ``s3://`` URLs (``storage``: a ``StorageConfig``): the mask is fetched to a
    temporary file, the outputs are written locally and published through ``geoseg.io.store`` (one PUT each).

    ``cfg`` is a ``VectorConfig``. The mask is uint8 class ids; its nodata (255 when unset) gives no polygons.
    Class names come from the ``GEOSEG_CLASS_NAMES`` tag (else ``class_<id>``), colours from its colour table.
    With a sieve, polygons follow the sieved mask (the file itself is not rewritten). Iterating the result
    yields the written paths.
    """
    t0 = time.perf_counter()
    mask_path = str(mask_path)
    if str(out).startswith("s3://") or mask_path.startswith("s3://"):
        return _vectorize_via_local(mask_path, str(out), cfg, storage, overwrite=overwrite, scene=scene,
                                    kwargs=dict(block_px=block_px, workers=workers, model=model,
                                                model_version=model_version, band_px=band_px,
                                                write_chunk=write_chunk, mp_context=mp_context))
    try:
        ds = rasterio.open(mask_path)
    except rasterio.errors.RasterioError as e:
        raise InputError(f"{mask_path}: cannot open the mask ({e})") from None
    with ds:
        if ds.count < 1 or ds.dtypes[0] not in ("uint8", "int8", "uint16", "int16"):
            raise InputError(f"{mask_path}: a class mask is one band of integer class ids, got {ds.dtypes}")
        shape = (ds.height, ds.width)
        transform, crs = ds.transform, ds.crs
        nodata = NODATA if ds.nodata is None else int(ds.nodata)
        names = read_class_names(ds)
        palette = read_palette(ds, len(names))
    if scene is None:
        scene = Path(mask_path).stem
    sieve_px = sieve_size_px(cfg.sieve_px, cfg.min_area_m2, transform, crs, shape)
    paths = output_paths(out, cfg.formats)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    sink = PolygonSink(
        paths, shape=shape, transform=transform, crs=crs, cfg=cfg, block_px=block_px, class_names=names,
        palette=palette, scene=scene, model=model, model_version=model_version,
        band_px=band_px, overwrite=overwrite, write_chunk=write_chunk,
    )
    keep = sink.classes_at_polygonize
    classes = tuple(sorted(keep)) if keep is not None else None
    wins = [_window_tuple(w) for w in block_windows(shape, block_px)]
    args = [(mask_path, w, nodata, cfg.connectivity, sieve_px, classes) for w in wins]
    try:
        if workers <= 1 or len(wins) == 1:
            try:
                for a in args:
                    sink.add(_block_task(*a))
            finally:  # in this process: do not keep the file open after the call
                for key in [k for k in _WORKER_DS if k[0] == mask_path]:
                    _WORKER_DS.pop(key).close()
        else:
            ctx = multiprocessing.get_context(mp_context) if mp_context else None
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                # In order, at most 2 per worker in flight: bounded memory and a deterministic row order.
                pending: collections.deque[cf.Future] = collections.deque()
                it = iter(args)
                for a in itertools.islice(it, 2 * workers):
                    pending.append(pool.submit(_block_task, *a))
                while pending:
                    block = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(_block_task, *nxt))
                    sink.add(block)
        written = sink.finish()
    except BaseException:
        sink.abort()
        raise
    return VectorizeResult(written, sink.count, len(wins), time.perf_counter() - t0)


def _vectorize_via_local(mask_path: str, out: str, cfg: Any, storage: Any, *, overwrite: bool, scene: str | None,
                         kwargs: dict[str, Any]) -> VectorizeResult:
    """``vectorize_file`` for ``s3://`` masks or outputs: stage locally, publish atomically through the store."""
    import shutil
    import tempfile
    from pathlib import PurePosixPath

    from geoseg.io import store

    work = Path(tempfile.mkdtemp(prefix="geoseg-vectorize-"))
    try:
        local_mask = mask_path
        if store.is_s3(mask_path):
            local_mask = str(work / PurePosixPath(mask_path).name)
            Path(local_mask).write_bytes(store.read_bytes(mask_path, storage))
        name = PurePosixPath(out.rstrip("/")).name if store.is_s3(out) else Path(out).name
        local_out = work / "out" / name if store.is_s3(out) else Path(out)
        if store.is_s3(out):
            dests = {fmt: (out if fmt_path == local_out else store.join(out, fmt_path.name))
                     for fmt, fmt_path in output_paths(local_out, cfg.formats).items()}
            if not overwrite:
                for d in dests.values():
                    if store.exists(d, storage):
                        raise OutputError(f"{d}: exists (set overwrite to replace it)")
        res = vectorize_file(local_mask, local_out, cfg, overwrite=overwrite,
                             scene=scene or PurePosixPath(mask_path).stem, **kwargs)
        if not store.is_s3(out):
            return res
        for fmt, local in res.paths.items():
            store.publish_file(str(local), dests[fmt], storage)
        return VectorizeResult({f: dests[f] for f in res.paths}, res.polygons, res.blocks, res.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
