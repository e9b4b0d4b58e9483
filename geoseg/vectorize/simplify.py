"""Coverage simplification of finished polygons: shapely's ``coverage_simplify``, noded at pixel corners first
(``densify_px``) so that neighbours share their edges vertex for vertex; shared borders stay shared."""

from __future__ import annotations


import numpy as np
import shapely
from affine import Affine

from geoseg._ragged import offsets as _offsets
from geoseg.vectorize.attributes import to_map_coords
from geoseg.vectorize.polygonize import PolygonSet


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
