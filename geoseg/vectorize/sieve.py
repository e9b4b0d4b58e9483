"""A minimum mapping unit that is identical block-wise and whole: ``sieve_block`` / ``sieve_array``."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio import features
from rasterio.windows import Window

from geoseg._ragged import ranges as _ranges
from geoseg.conventions import NODATA
from geoseg.errors import InputError
from geoseg.vectorize.attributes import pixel_area_m2
from geoseg.vectorize.polygonize import PolygonSet, shapes_arrays, window_tuple


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
        px_area = pixel_area_m2(transform, crs, shape)
        size = max(size, int(math.ceil(min_area_m2 / px_area - 1e-9)))
    return size


def read_with_context(ds: rasterio.DatasetReader, window: Window | Sequence[int], context_px: int,
                      nodata: int = NODATA, band: int = 1) -> np.ndarray:
    """``window`` grown by ``context_px`` on every side; outside the raster filled with ``nodata``."""
    col_off, row_off, width, height = window_tuple(window)
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
    coords, ring_off, poly_off, values = shapes_arrays(arr, valid, connectivity)
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
