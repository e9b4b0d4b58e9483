"""True class areas: square metres on the ellipsoid, whatever the CRS of the mask or the polygons.

Two exact-enough ways, both pure functions:

* **From a class mask** (``mask_class_areas``): pixel counts times pixel areas. A north-up grid in a geographic
  CRS (degrees) has one pixel area per row, the exact ellipsoidal area of a cell bounded by two parallels and
  two meridians (authalic latitude, ``b^2/2 * (q(phi1) - q(phi0)) * dlon``). Any other grid (projected,
  rotated) gets one pixel area per cell of ``cell_px`` x ``cell_px`` pixels (64): the cell's corners are projected
  to a Lambert azimuthal equal-area CRS centred on the scene (equal-area on the ellipsoid) and measured there. A
  cell's total is exact; within it the CRS's scale varies a little (a state plane grid of 28.5 m pixels: class
  areas within 2e-6 of the polygons' geodesic areas). The mask is read in strips of rows, so memory
  does not grow with the scene.
* **From geometries** (``geometry_areas_m2``): densified in their own CRS (so edges that are straight there
  stay close to it), projected to the same kind of equal-area CRS, measured by shapely.

A table (``area_table``) holds, per class, the pixels, ``area_m2``, ``area_ha`` and ``percent`` of the valid (not
nodata) area; ``sum_tables`` adds the tables of several scenes into one for a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from geoseg.conventions import M2_PER_HA, NODATA, class_label

__all__ = [
    "equal_area_crs",
    "row_pixel_areas_m2",
    "cell_pixel_areas_m2",
    "mask_class_areas",
    "ClassAreaCounter",
    "block_area_counts",
    "area_units",
    "geometry_areas_m2",
    "area_table",
    "sum_tables",
    "METHOD_ROWS",
    "METHOD_CELLS",
    "METHOD_GEOMETRY",
]

METHOD_ROWS = "ellipsoidal pixel area per row (north-up geographic grid)"
METHOD_CELLS = "pixel area per {n}x{n}-pixel cell in a Lambert azimuthal equal-area CRS"
METHOD_GEOMETRY = "polygon area in a Lambert azimuthal equal-area CRS (edges densified)"


def _pcrs(crs: Any):
    import pyproj

    if crs is None:
        return None
    if isinstance(crs, pyproj.CRS):
        return crs
    if hasattr(crs, "to_wkt"):
        return pyproj.CRS.from_wkt(crs.to_wkt())
    return pyproj.CRS.from_user_input(crs)


def equal_area_crs(lon: float, lat: float, crs: Any = None):
    """A Lambert azimuthal equal-area CRS centred on (lon, lat), on ``crs``'s ellipsoid (else WGS 84)."""
    import pyproj

    ell = "+ellps=WGS84"
    p = _pcrs(crs)
    if p is not None and p.ellipsoid is not None:
        a = float(p.ellipsoid.semi_major_metre)
        rf = float(p.ellipsoid.inverse_flattening or 0.0)
        ell = f"+a={a!r} +rf={rf!r}" if rf else f"+R={a!r}"
    return pyproj.CRS.from_proj4(f"+proj=laea +lat_0={lat:.9f} +lon_0={lon:.9f} {ell} +units=m +no_defs +type=crs")


def _authalic_q(lat_deg: np.ndarray, e: float) -> np.ndarray:
    s = np.sin(np.radians(lat_deg))
    if e == 0:
        return 2 * s
    return s / (1 - e * e * s * s) + np.log((1 + e * s) / (1 - e * s)) / (2 * e)


def _is_geographic_north_up(transform, pcrs) -> bool:
    return pcrs is not None and pcrs.is_geographic and transform.b == 0 and transform.d == 0


def row_pixel_areas_m2(transform, crs: Any, row0: int, row1: int) -> np.ndarray:
    """Exact ellipsoidal area (m2) of one pixel in each row ``row0 .. row1-1`` of a north-up geographic grid."""
    pcrs = _pcrs(crs)
    if not _is_geographic_north_up(transform, pcrs):
        raise ValueError("row_pixel_areas_m2 needs a north-up grid in a geographic CRS")
    a = float(pcrs.ellipsoid.semi_major_metre)
    inv_f = float(pcrs.ellipsoid.inverse_flattening or 0.0)
    f = 1 / inv_f if inv_f else 0.0
    b, e = a * (1 - f), math.sqrt(f * (2 - f))
    # The CRS's angular unit may not be the degree (grads, radians): convert edges to degrees.
    unit = float(pcrs.axis_info[0].unit_conversion_factor or math.radians(1)) / math.radians(1)
    edges = (transform.f + transform.e * np.arange(row0, row1 + 1, dtype=np.float64)) * unit
    edges = np.clip(edges, -90.0, 90.0)
    q = _authalic_q(edges, e)
    dlon = math.radians(abs(transform.a) * unit)
    return np.abs(0.5 * b * b * np.diff(q) * dlon)


def _scene_centre_lonlat(transform, crs: Any, shape: tuple[int, int]) -> tuple[float, float]:
    import pyproj

    rows, cols = shape
    x, y = transform @ (cols / 2, rows / 2)
    pcrs = _pcrs(crs)
    to_ll = pyproj.Transformer.from_crs(pcrs, pcrs.geodetic_crs, always_xy=True)
    lon, lat = to_ll.transform(x, y)
    return float(lon), float(lat)


def cell_pixel_areas_m2(transform, crs: Any, shape: tuple[int, int], cell_px: int = 256) -> np.ndarray:
    """Area (m2) of one pixel in each ``cell_px`` x ``cell_px`` cell of the grid: shape (cell rows, cell cols).

    Each cell's four corners go to a Lambert azimuthal equal-area CRS centred on the scene; its area there divided
    by its pixel count is the pixel area (the grid's own CRS may be any, rotated or not).
    """
    import pyproj

    rows, cols = shape
    pcrs = _pcrs(crs)
    if pcrs is None:
        raise ValueError("cell_pixel_areas_m2 needs a CRS")
    r_edges = np.unique(np.r_[np.arange(0, rows, cell_px), rows]).astype(np.float64)
    c_edges = np.unique(np.r_[np.arange(0, cols, cell_px), cols]).astype(np.float64)
    cc, rr = np.meshgrid(c_edges, r_edges)
    x, y = transform @ (cc, rr)
    lon, lat = _scene_centre_lonlat(transform, pcrs, shape)
    laea = equal_area_crs(lon, lat, pcrs)
    ex, ey = pyproj.Transformer.from_crs(pcrs, laea, always_xy=True).transform(x, y)
    ex, ey = np.asarray(ex), np.asarray(ey)
    # shoelace over the quads (corners in ring order: top-left, top-right, bottom-right, bottom-left)
    qx = np.stack([ex[:-1, :-1], ex[:-1, 1:], ex[1:, 1:], ex[1:, :-1]])
    qy = np.stack([ey[:-1, :-1], ey[:-1, 1:], ey[1:, 1:], ey[1:, :-1]])
    area = 0.5 * np.abs(np.sum(qx * np.roll(qy, -1, axis=0) - np.roll(qx, -1, axis=0) * qy, axis=0))
    npx = np.outer(np.diff(r_edges), np.diff(c_edges))
    return area / npx


def mask_class_areas(
    mask: Any,
    class_names: Sequence[str] | None = None,
    *,
    nodata: int | None = None,
    strip_rows: int = 256,
    cell_px: int = 64,
) -> dict[str, Any]:
    """Class areas of a uint8 class mask (a path or an open rasterio dataset) as an ``area_table``.

    ``class_names`` default to the mask's ``GEOSEG_CLASS_NAMES`` tag; ``nodata`` to the mask's (else 255).
    """
    import rasterio
    from rasterio.windows import Window

    if isinstance(mask, (str, bytes)) or hasattr(mask, "__fspath__"):
        with rasterio.open(mask) as ds:
            return mask_class_areas(ds, class_names, nodata=nodata, strip_rows=strip_rows, cell_px=cell_px)
    ds = mask
    if class_names is None:
        from geoseg.vectorize import read_class_names

        class_names = read_class_names(ds)
    if nodata is None:
        nodata = NODATA if ds.nodata is None else int(ds.nodata)
    rows, cols = ds.height, ds.width
    transform, pcrs = ds.transform, _pcrs(ds.crs)
    if pcrs is None:
        from geoseg.errors import InputError

        raise InputError(f"{ds.name}: the mask has no CRS, so its pixels have no ground area")
    counter = ClassAreaCounter(transform, pcrs, (rows, cols), strip_rows=strip_rows, cell_px=cell_px)
    for r0 in range(0, rows, counter.strip):  # a strip at a time: memory does not grow with the scene
        strip = ds.read(1, window=Window(0, r0, cols, min(counter.strip, rows - r0)))
        counter.add(block_area_counts(strip, r0, 0, counter.by_row, counter.strip))
    return counter.table(class_names, nodata)


# ------------------------------------------------------------------ the same table from per-block counts


def area_units(transform, crs: Any, *, strip_rows: int = 256, cell_px: int = 64) -> tuple[bool, int]:
    """(by row, strip rows) as ``mask_class_areas`` uses them for a grid: pixel areas per row in strips of
    ``strip_rows`` on a north-up geographic grid, else per ``cell_px`` cell, one strip per row of cells."""
    by_row = _is_geographic_north_up(transform, _pcrs(crs))
    return by_row, (strip_rows if by_row else cell_px)


def block_area_counts(mask: np.ndarray, row_off: int, col_off: int, by_row: bool, strip: int) -> list[tuple]:
    """A block's pixel counts in the units ``mask_class_areas`` weighs, for ``ClassAreaCounter.add``: one
    ``(strip, first unit, classes, counts (units, classes) int32)`` per strip the block overlaps. Units are the
    strip's rows (``by_row``), else its ``strip``-pixel cell columns. Only the classes present travel."""
    h, w = mask.shape
    rows = np.arange(row_off, row_off + h)
    strips = rows // strip
    s0 = int(strips[0]) if h else 0
    if by_row:
        idx = (np.arange(h, dtype=np.int64)[:, None] * 256 + mask).ravel()
        per = np.bincount(idx, minlength=h * 256).reshape(h, 256)
    else:
        c0 = col_off // strip
        ncc = (col_off + w - 1) // strip - c0 + 1
        cell_col = (np.arange(col_off, col_off + w) // strip - c0).astype(np.int64)
        key = (strips - s0).astype(np.int64)[:, None] * ncc + cell_col[None, :]
        per = np.bincount((key * 256 + mask).ravel(), minlength=(int(strips[-1]) - s0 + 1) * ncc * 256)
        per = per.reshape(-1, ncc, 256)
    out = []
    for s in np.unique(strips).tolist():
        if by_row:
            sel = strips == s
            part, first = per[sel], int(rows[sel][0]) - s * strip
        else:
            part, first = per[s - s0], int(col_off // strip)
        cls = np.flatnonzero(part.sum(axis=0))
        out.append((s, first, cls.astype(np.uint8), part[:, cls].astype(np.int32)))
    return out


class ClassAreaCounter:
    """The class-area table of a mask that arrives in pieces, in any order, from ``block_area_counts`` of each: a
    strip's area is computed when its last pixel is counted and the strips are summed in order at the end, so the
    table is the same bit for bit however the mask was cut (``mask_class_areas`` feeds it the finished mask's
    strips; a scene's writer its blocks). Memory: the strips that are not complete yet."""

    def __init__(self, transform, crs: Any, shape: tuple[int, int], *, strip_rows: int = 256, cell_px: int = 64):
        self.transform, self.pcrs = transform, _pcrs(crs)
        self.rows, self.cols = int(shape[0]), int(shape[1])
        self.by_row, self.strip = area_units(transform, self.pcrs, strip_rows=strip_rows, cell_px=cell_px)
        self.cell_area = None if self.by_row else cell_pixel_areas_m2(transform, self.pcrs, shape, cell_px)
        self.method = METHOD_ROWS if self.by_row else METHOD_CELLS.format(n=cell_px)
        self._open: dict[int, list] = {}  # strip -> [counts (units, 256) int64, pixels counted]
        self._done: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # strip -> (area (256), counts (256))

    def _height(self, s: int) -> int:
        return min(self.strip, self.rows - s * self.strip)

    def add(self, parts: list[tuple]) -> None:
        for s, first, cls, counts in parts:
            if s in self._done:
                raise ValueError(f"strip {s} of the class-area counts was counted twice")
            entry = self._open.get(s)
            if entry is None:
                units = self._height(s) if self.by_row else self.cell_area.shape[1]
                entry = self._open[s] = [np.zeros((units, 256), np.int64), 0]
            entry[0][first : first + len(counts), cls.astype(np.int64)] += counts
            entry[1] += int(counts.sum())
            if entry[1] == self._height(s) * self.cols:
                self._fold(s, entry[0])
                del self._open[s]

    def _fold(self, s: int, per: np.ndarray) -> None:
        r0 = s * self.strip
        if self.by_row:
            area = row_pixel_areas_m2(self.transform, self.pcrs, r0, r0 + self._height(s)) @ per
        else:
            area = self.cell_area[r0 // self.strip] @ per
        self._done[s] = (area, per.sum(axis=0))

    @property
    def complete(self) -> bool:
        return not self._open and len(self._done) == -(-self.rows // self.strip)

    def table(self, class_names: Sequence[str], nodata: int = NODATA) -> dict[str, Any]:
        """The ``area_table`` (as ``mask_class_areas`` returns it) once every pixel was counted."""
        if not self.complete:
            raise ValueError(f"class-area counts are incomplete ({len(self._done)} strips done, "
                             f"{len(self._open)} open)")
        area = np.zeros(256, dtype=np.float64)
        counts = np.zeros(256, dtype=np.int64)
        for s in sorted(self._done):
            a, c = self._done[s]
            counts += c
            area += a
        valid = [c for c in range(256) if counts[c] and c != nodata]
        return area_table(
            {class_label(class_names, c): float(area[c]) for c in valid},
            pixels={class_label(class_names, c): int(counts[c]) for c in valid},
            class_ids={class_label(class_names, c): c for c in valid},
            nodata_pixels=int(counts[nodata]) if 0 <= nodata < 256 else 0,
            nodata_m2=float(area[nodata]) if 0 <= nodata < 256 else 0.0,
            method=self.method,
            crs=self.pcrs.to_string(),
        )


def geometry_areas_m2(geoms: np.ndarray, crs: Any, *, densify: float | None = None) -> np.ndarray:
    """True areas (m2) of shapely (multi)polygons given in ``crs``.

    Edges are densified in ``crs`` to at most ``densify`` CRS units (default: 1/200 of the data's extent), so a
    parallel in a degree CRS stays a parallel, then the polygons are measured in a Lambert azimuthal equal-area
    CRS centred on the data.
    """
    import pyproj
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    out = np.zeros(len(geoms), dtype=np.float64)
    ok = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    if not ok.any():
        return out
    pcrs = _pcrs(crs)
    if pcrs is None:
        raise ValueError("geometry_areas_m2 needs the geometries' CRS")
    g = geoms[ok]
    xmin, ymin, xmax, ymax = shapely.total_bounds(g)
    if densify is None:
        densify = max(xmax - xmin, ymax - ymin) / 200 or 1.0
    g = shapely.segmentize(g, densify)
    to_ll = pyproj.Transformer.from_crs(pcrs, pcrs.geodetic_crs, always_xy=True)
    lon, lat = to_ll.transform((xmin + xmax) / 2, (ymin + ymax) / 2)
    laea = equal_area_crs(float(lon), float(lat), pcrs)
    tr = pyproj.Transformer.from_crs(pcrs, laea, always_xy=True)

    def fwd(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    out[ok] = shapely.area(shapely.transform(g, fwd))
    return out


def area_table(
    areas_m2: Mapping[str, float],
    *,
    pixels: Mapping[str, int] | None = None,
    class_ids: Mapping[str, int] | None = None,
    valid_m2: float | None = None,
    nodata_pixels: int | None = None,
    nodata_m2: float | None = None,
    method: str = "",
    crs: str | None = None,
) -> dict[str, Any]:
    """``{"valid_m2", "valid_ha", "method", "classes": {name: {"id", "pixels", "area_m2", "area_ha",
    "percent"}}}``; percent of ``valid_m2`` (default: the sum of the class areas), classes in id order."""
    total = float(sum(areas_m2.values())) if valid_m2 is None else float(valid_m2)
    ids = dict(class_ids or {})
    order = sorted(areas_m2, key=lambda n: (ids.get(n, 1 << 30), n))
    classes = {}
    for name in order:
        a = float(areas_m2[name])
        row: dict[str, Any] = {}
        if name in ids:
            row["id"] = int(ids[name])
        if pixels is not None and name in pixels:
            row["pixels"] = int(pixels[name])
        row.update(area_m2=round(a, 3), area_ha=round(a / M2_PER_HA, 6),
                   percent=round(100.0 * a / total, 6) if total > 0 else 0.0)
        classes[name] = row
    out: dict[str, Any] = {"valid_m2": round(total, 3), "valid_ha": round(total / M2_PER_HA, 6)}
    if nodata_pixels is not None:
        out["nodata_pixels"] = int(nodata_pixels)
    if nodata_m2 is not None:
        out["nodata_m2"] = round(float(nodata_m2), 3)
    if method:
        out["method"] = method
    if crs:
        out["crs"] = crs
    out["classes"] = classes
    return out


def sum_tables(tables: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One table for several scenes: areas and pixels added per class name, percent of the summed valid area.

    Scenes that overlap count their common ground twice (the tables carry no geometry)."""
    areas: dict[str, float] = {}
    pixels: dict[str, int] = {}
    ids: dict[str, int] = {}
    valid = 0.0
    nodata_px = 0
    methods = []
    for t in tables:
        valid += float(t.get("valid_m2", 0.0))
        nodata_px += int(t.get("nodata_pixels", 0))
        if t.get("method") and t["method"] not in methods:
            methods.append(t["method"])
        for name, row in t.get("classes", {}).items():
            areas[name] = areas.get(name, 0.0) + float(row["area_m2"])
            if "pixels" in row:
                pixels[name] = pixels.get(name, 0) + int(row["pixels"])
            if "id" in row:
                ids[name] = int(row["id"])
    return area_table(areas, pixels=pixels or None, class_ids=ids, valid_m2=valid, nodata_pixels=nodata_px,
                      method="; ".join(methods))
