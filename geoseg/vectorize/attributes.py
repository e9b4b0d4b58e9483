"""Polygon attributes and units: class filters, map coordinates, ``polygon_table`` (``class_id``, ``class_name``,
``area_m2``, ``perimeter_m`` (geodesic in a geographic CRS), ``scene``, ``model``, ``model_version``,
``polygon_id``), pixel areas and simplification tolerances in metres."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np
import shapely
from affine import Affine

from geoseg.conventions import class_label, to_pyproj
from geoseg.errors import InputError
from geoseg.vectorize.geodesic import edge_measures, ellipsoid_q
from geoseg.vectorize.polygonize import PolygonSet


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


def _metres_per_unit(pcrs) -> float:
    """Linear unit of a projected CRS in metres (1 when unknown)."""
    if pcrs is None:
        return 1.0
    for axis in pcrs.axis_info:
        if axis.unit_conversion_factor:
            return float(axis.unit_conversion_factor)
    return 1.0


def _geo_ellipsoid(pcrs) -> tuple[float, float]:
    ell = pcrs.ellipsoid
    a = float(ell.semi_major_metre)
    inv_f = float(ell.inverse_flattening or 0.0)
    f = 1 / inv_f if inv_f else 0.0
    return a, f


def pixel_area_m2(transform: Affine, crs: Any, shape: tuple[int, int]) -> float:
    pcrs = to_pyproj(crs)
    if pcrs is not None and pcrs.is_geographic:
        a, f = _geo_ellipsoid(pcrs)
        b, e = a * (1 - f), math.sqrt(f * (2 - f))
        row = shape[0] // 2
        lats = np.array([transform.f + transform.e * row, transform.f + transform.e * (row + 1)])
        q = ellipsoid_q(lats, e)
        return abs(0.5 * b * b * (q[1] - q[0]) * math.radians(abs(transform.a)))
    k = _metres_per_unit(pcrs)
    return abs(transform.a * transform.e - transform.b * transform.d) * k * k


def simplify_tolerance(tolerance_m: float, crs: Any) -> float:
    """A tolerance in metres in the CRS's units (geographic: degrees of latitude, 111 320 m each)."""
    pcrs = to_pyproj(crs)
    if pcrs is not None and pcrs.is_geographic:
        return tolerance_m / 111_320.0
    return tolerance_m / _metres_per_unit(pcrs)


# ---------------------------------------------------------------------------------- map coordinates


def scene_extent(shape: tuple[int, int], transform) -> tuple[float, float, float, float]:
    """The scene's bounding box in its CRS (the vector writers' Hilbert frame: the same for every part)."""
    rows, cols = shape
    t = transform
    cx = np.array([0, cols, 0, cols], dtype=np.float64)
    cy = np.array([0, 0, rows, rows], dtype=np.float64)
    xs, ys = t.a * cx + t.b * cy + t.c, t.d * cx + t.e * cy + t.f
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


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
    pcrs = to_pyproj(crs)
    north_up = transform.b == 0 and transform.d == 0
    if pcrs is not None and pcrs.is_geographic:
        geod = pcrs.get_geod()
        if pixel_exact and north_up:
            area, perim = _geographic_measures(polys, transform, geod)
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
    names = _class_labels(tuple(class_names))
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


@functools.lru_cache(maxsize=16)
def _class_labels(class_names: tuple[str, ...]) -> list[str]:
    """Every class id's label (the writers call ``polygon_table`` per batch)."""
    return [class_label(class_names, c) for c in range(256)]


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


def _geographic_measures(polys: PolygonSet, transform: Affine, geod) -> tuple[np.ndarray, np.ndarray]:
    """(ellipsoidal area, geodesic perimeter) of pixel-aligned polygons on a north-up geographic grid, from the
    grid's per-row tables (``geoseg.vectorize.geodesic.edge_measures``). Edges are consecutive coordinates: no
    gather of segment indices. The area is exact for cells bounded by parallels and meridians (Green's theorem on
    the cell grid); the perimeter sums geodesic edge lengths (exterior and holes)."""
    if not len(polys):
        return np.zeros(0), np.zeros(0)
    x, y = polys.coords[:, 0], polys.coords[:, 1]
    x1, y1 = x[1:].copy(), y[1:].copy()
    closing = polys.ring_offsets[1:-1] - 1  # a ring's closing vertex starts a zero-length edge
    x1[closing], y1[closing] = x[closing], y[closing]
    lengths, terms = edge_measures(x[:-1], y[:-1], x1, y1, transform, geod)
    starts = polys.ring_offsets[polys.poly_offsets[:-1]]  # (the last closing vertex starts no edge at all)
    return np.abs(np.add.reduceat(terms, starts)), np.add.reduceat(lengths, starts)
