"""GeoJSON (RFC 7946, WGS 84) and GeoJSONSeq writers, streamed."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import orjson
import shapely
import shapely.geometry

from geoseg.conventions import to_pyproj
from geoseg.errors import InputError
from geoseg.write.features import FeatureBatch, VectorWriter, col_list

__all__ = ["GeoJSONWriter"]


class GeoJSONWriter(VectorWriter):
    """RFC 7946 GeoJSON (or, with ``seq``, newline-delimited GeoJSONSeq), streamed feature by feature.

    Geometries are reprojected to WGS84 longitude/latitude, exterior rings counter-clockwise and holes clockwise,
    coordinates rounded to ``decimals`` (at most 7, about 1 cm).
    """

    def __init__(self, path: str | os.PathLike, crs: Any, *, seq: bool = False, decimals: int = 7,
                 id_column: str | None = "polygon_id"):
        super().__init__(path)
        import pyproj

        if not 0 <= decimals <= 7:
            raise InputError(f"GeoJSON decimals must be 0..7, got {decimals}")
        self.decimals = decimals
        self.seq = seq
        self.id_column = id_column
        src = to_pyproj(crs)
        wgs84 = pyproj.CRS.from_epsg(4326)
        self._transformer = None
        if src is not None and not src.equals(wgs84, ignore_axis_order=True):
            self._transformer = pyproj.Transformer.from_crs(src, wgs84, always_xy=True)
        self._fh = open(self.tmp, "w", encoding="utf-8", newline="\n")
        self._first = True
        if not seq:
            self._fh.write('{"type":"FeatureCollection","features":[\n')

    def _lonlat(self, geoms: np.ndarray) -> np.ndarray:
        out = shapely.transform(geoms, self._lonlat_coords)
        return shapely.orient_polygons(out, exterior_cw=False)

    def _lonlat_coords(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) coordinates to lon/lat rounded to ``decimals`` (for shapely geometries and ragged arrays alike;
        the latter's rings are oriented by ``_ragged_geometries``)."""
        if self._transformer is not None:
            x, y = self._transformer.transform(xy[:, 0], xy[:, 1])
            xy = np.column_stack([x, y])
        return np.round(xy, self.decimals)

    def _write(self, batch: FeatureBatch) -> None:
        ragged = batch._ragged
        if ragged is not None:
            coords, ring_off, poly_off = ragged
            geo = _ragged_geometries(self._lonlat_coords(coords), ring_off, poly_off)
        else:
            geo = _geojson_geometries(self._lonlat(batch.geometry))
        names = list(batch.columns)
        lists = [col_list(batch.columns[k]) for k in names]
        ids = col_list(batch.columns[self.id_column]) if self.id_column in batch.columns else None
        parts = []
        for i, g in enumerate(geo):
            props = orjson.dumps(dict(zip(names, (lst[i] for lst in lists))), default=str).decode()
            fid = "" if ids is None else f'"id":{orjson.dumps(ids[i]).decode()},'
            parts.append(f'{{"type":"Feature",{fid}"properties":{props},"geometry":{g}}}')
        if self.seq:
            self._fh.write("\n".join(parts) + "\n")
        else:
            sep = ",\n"
            self._fh.write(("" if self._first else sep) + sep.join(parts))
        self._first = False

    def _finish(self) -> None:
        if not self.seq:
            self._fh.write("\n]}\n")
        self._fh.close()

    def _release(self) -> None:
        self._fh.close()


def _geojson_geometries(geoms: np.ndarray) -> list[str]:
    """GeoJSON geometry members for already rounded lon/lat geometries.

    orjson prints the shortest string that reads back the same double (like Python's float repr, and much
    faster than ``json``), so a value rounded to 7 decimals prints with at most 7 (GEOS's writer prints up to
    17 significant digits instead).
    """
    out: list[str] = [""] * len(geoms)
    types = shapely.get_type_id(geoms)
    poly = np.flatnonzero(types == 3)
    if len(poly):
        _, coords, (ring_off, geom_off) = shapely.to_ragged_array(geoms[poly])
        clist = coords.tolist()
        ro, go = ring_off.tolist(), geom_off.tolist()
        for j, i in enumerate(poly.tolist()):
            rings = [clist[ro[r] : ro[r + 1]] for r in range(go[j], go[j + 1])]
            out[i] = '{"type":"Polygon","coordinates":' + orjson.dumps(rings).decode() + "}"
    for i in np.flatnonzero(types != 3).tolist():
        gi = shapely.geometry.mapping(geoms[i])
        out[i] = orjson.dumps({"type": gi["type"], "coordinates": gi["coordinates"]}).decode()
    return out


def _ragged_geometries(xy: np.ndarray, ring_off: np.ndarray, poly_off: np.ndarray) -> list[str]:
    """GeoJSON Polygon members of ragged polygons (closed rings, rounded lon/lat ``xy``): exteriors turned
    counter-clockwise and holes clockwise, as ``shapely.orient_polygons(exterior_cw=False)`` does; numpy slices
    serialized by orjson directly (its float format is the same as for Python floats)."""
    n_rings = len(ring_off) - 1
    if n_rings == 0:
        return []
    nxt = np.minimum(np.arange(len(xy)) + 1, len(xy) - 1)
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
    cross[ring_off[1:] - 1] = 0  # a ring's closing vertex starts no segment
    area2 = np.add.reduceat(cross, ring_off[:-1])  # > 0: counter-clockwise
    exterior = np.zeros(n_rings, dtype=bool)
    exterior[poly_off[:-1]] = True
    flip = np.flatnonzero(np.where(exterior, area2 < 0, area2 > 0))
    if len(flip):
        xy = xy.copy()
        for r in flip.tolist():
            a, b = ring_off[r], ring_off[r + 1]
            xy[a:b] = xy[a:b][::-1]
    xy = np.ascontiguousarray(xy)
    ro, go = ring_off.tolist(), poly_off.tolist()
    opt = orjson.OPT_SERIALIZE_NUMPY
    return ['{"type":"Polygon","coordinates":'
            + orjson.dumps([xy[ro[r] : ro[r + 1]] for r in range(go[j], go[j + 1])], option=opt).decode() + "}"
            for j in range(len(go) - 1)]
