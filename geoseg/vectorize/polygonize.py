"""Polygonize one block of a class mask: ``BlockPolygons`` in global pixel coordinates, plus seam intervals.

``polygonize_block``: one block of the mask -> its polygons (GDAL's polygonize via ``rasterio.features.shapes``)
in *global pixel coordinates* (x = column, y = row of the full raster, integer pixel corners) and, for each block
side, the pixel intervals each polygon's exterior covers there (what ``seams`` joins). Plain numpy arrays in a
ragged layout (``PolygonSet``): cheap to pickle across processes or Ray.

``polygon_id`` is the linear pixel index ``row * cols + col`` of the polygon's first pixel in raster order (its
top-left pixel): unique, and the same for every block split and order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import shapely
from affine import Affine
from rasterio import features
from rasterio.windows import Window

from geoseg._ragged import concat as concat_ragged
from geoseg._ragged import offsets as _offsets
from geoseg._ragged import ranges as _ranges
from geoseg._ragged import repeated
from geoseg._ragged import take as take_ragged
from geoseg.conventions import NODATA
from geoseg.errors import InputError
from geoseg.vectorize import ogr


# Block sides (bit flags) and the (drow, dcol) of the neighbour across each.
W, E, N, S = 1, 2, 4, 8
SIDE_STEP = {W: (0, -1), E: (0, 1), N: (-1, 0), S: (1, 0)}
OPPOSITE = {W: E, E: W, N: S, S: N}
# Block corners, as (drow, dcol) of the diagonal neighbour; the opposite corner is the negated step.
CORNERS = ((-1, -1), (-1, 1), (1, -1), (1, 1))

COORD_BITS = 22  # pixel coordinates fit in 22 bits (4 M px a side) when packed into int64 keys


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
        if transform is None:
            return self.coords.astype(np.float64)
        t = transform
        x, y = self.coords[:, 0], self.coords[:, 1]
        out = np.empty((len(x), 2), dtype=np.float64)
        if t.b == 0 and t.d == 0:  # north-up: two multiply-adds straight into place (the writer maps every vertex)
            np.multiply(x, t.a, out=out[:, 0])
            np.multiply(y, t.e, out=out[:, 1])
            out += (t.c, t.f)
            return out
        out[:, 0] = t.a * x + t.b * y + t.c
        out[:, 1] = t.d * x + t.e * y + t.f
        return out

    def map_bounds(self, transform: Affine) -> np.ndarray | None:
        """(n, 4) xmin, ymin, xmax, ymax in map coordinates from the integer pixel extremes (bit-identical to the
        bounds of ``map_coords``: a north-up transform is monotonic per axis); None for a rotated grid."""
        t = transform
        if t.b != 0 or t.d != 0:
            return None
        if not len(self):
            return np.zeros((0, 4))
        starts = self.ring_offsets[self.poly_offsets[:-1]]  # a polygon's rings are consecutive
        x, y = self.coords[:, 0], self.coords[:, 1]
        ext = [np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts),
               np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts)]
        xs = [e * t.a + t.c for e in ext[:2]]
        ys = [e * t.e + t.f for e in ext[2:]]
        xmin, xmax = (xs[0], xs[1]) if t.a >= 0 else (xs[1], xs[0])
        ymin, ymax = (ys[0], ys[1]) if t.e >= 0 else (ys[1], ys[0])
        return np.column_stack([xmin, ymin, xmax, ymax])

    def to_shapely(self, transform: Affine | None = None) -> np.ndarray:
        """Shapely polygons (object array), in map coordinates through ``transform`` if given."""
        if not len(self):
            return np.empty(0, dtype=object)
        return shapely.from_ragged_array(
            shapely.GeometryType.POLYGON, self.map_coords(transform), (self.ring_offsets, self.poly_offsets)
        )


def polygon_keys(coords: np.ndarray, ring_off: np.ndarray, poly_off: np.ndarray, cols: int) -> np.ndarray:
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
    (half-open, along the side, sorted by start); ``shared`` the flags of ``shared_vertices`` once computed (a
    subset drops them). Plain arrays: picklable, no GDAL objects.
    """

    window: tuple[int, int, int, int]
    connectivity: int
    coords: np.ndarray
    ring_offsets: np.ndarray
    poly_offsets: np.ndarray
    class_ids: np.ndarray
    sides: np.ndarray
    seams: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    shared: np.ndarray | None = None  # per coordinate, from ``shared_vertices`` (the worker's; None: not computed)

    def __len__(self) -> int:
        return len(self.class_ids)

    def subset(self, idx: np.ndarray) -> BlockPolygons:
        """The block with only the polygons at ``idx`` (ascending), seam intervals renumbered; the intervals of
        dropped polygons go too."""
        idx = np.asarray(idx, dtype=np.int64)
        coords, ring_off, poly_off = take_ragged(self.coords, self.ring_offsets, self.poly_offsets, idx)
        new = np.full(len(self), -1, dtype=np.int64)
        new[idx] = np.arange(len(idx))
        seams = {}
        for side, (polys, start, end) in self.seams.items():
            keep = new[polys] >= 0
            seams[side] = (new[polys[keep]].astype(polys.dtype), start[keep], end[keep])
        return BlockPolygons(self.window, self.connectivity, coords, ring_off, poly_off, self.class_ids[idx],
                             self.sides[idx], seams)

    def polygon_set(self, cols: int) -> PolygonSet:
        """All polygons of the block as a ``PolygonSet`` (``cols``: the full raster's width, for the ids)."""
        ids = polygon_keys(self.coords, self.ring_offsets, self.poly_offsets, cols)
        return PolygonSet(self.coords, self.ring_offsets, self.poly_offsets, self.class_ids, ids)


def shared_vertices(block: BlockPolygons) -> np.ndarray:
    """Per coordinate of ``block``'s polygons on a block side (the others' are False): True where the vertex
    (closing vertices excepted) occurs more than once among those polygons of its class: pinches within a polygon
    and diagonal contacts between polygons of one class. Off the seam lines these are the only vertices where
    pieces of one merged polygon from the same block can meet, i.e. where ``SeamMerger`` must cut rings; a worker
    computes them for the polygons it sends to the writer, so the writer need not sort every vertex of the
    polygons that cross seams."""
    rings_per = np.diff(block.poly_offsets)
    # only polygons on a block side can reach the merger (the rest are final in their block): sort just theirs
    return repeated_vertices(block.coords, block.ring_offsets, np.repeat(block.class_ids, rings_per),
                             np.repeat(block.sides != 0, rings_per))


def repeated_vertices(coords: np.ndarray, ring_offsets: np.ndarray, ring_label: np.ndarray,
                      ring_sel: np.ndarray | None = None) -> np.ndarray:
    """Per coordinate of closed rings: True where the vertex occurs more than once among the open vertices of the
    rings with the same ``ring_label`` (closing vertices, which repeat their ring's first, never count), among
    the rings ``ring_sel`` (all when None; the others' coordinates are False)."""
    out = np.zeros(len(coords), dtype=bool)
    if not len(coords):
        return out
    ring_n = np.diff(ring_offsets)
    sel = np.ones(len(coords), dtype=bool) if ring_sel is None else np.repeat(ring_sel, ring_n)
    sel[ring_offsets[1:] - 1] = False
    label = np.repeat(np.asarray(ring_label, dtype=np.int64), ring_n)[sel]
    v = coords[sel].astype(np.int64)
    out[sel] = repeated((label << (2 * COORD_BITS)) | (v[:, 1] << COORD_BITS) | v[:, 0])
    return out


def window_tuple(window: Window | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(window, Window):
        vals = (window.col_off, window.row_off, window.width, window.height)
    else:
        vals = tuple(window)
    out = tuple(int(v) for v in vals)
    if out != tuple(vals) or len(out) != 4:
        raise InputError(f"block window must be whole pixels (col_off, row_off, width, height), got {vals}")
    return out  # type: ignore[return-value]


def shapes_arrays(
    arr: np.ndarray, valid: np.ndarray | None, connectivity: int, col_off: int = 0, row_off: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``rasterio.features.shapes`` as arrays: coords (N, 2) int32, ring and polygon offsets, class values
    (through GDAL's Arrow API where it is reachable, ``geoseg.vectorize.ogr``: the same polygons, no Python
    object per vertex)."""
    if ogr.available():
        return ogr.polygonize_arrays(arr, valid, connectivity, col_off, row_off)
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
    col_off, row_off, width, height = window_tuple(window)
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
    coords, ring_off, poly_off, values = shapes_arrays(arr, valid, connectivity, col_off, row_off)
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
