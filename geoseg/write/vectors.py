"""Streaming polygon writers: GeoParquet 1.1, GeoJSON (RFC 7946) / GeoJSONSeq, GeoPackage with a class style.

All writers take ``FeatureBatch``es (shapely geometries in the source CRS + attribute columns) or GeoDataFrames,
any number of times, and keep at most one row group / write batch in memory. Each writes a temporary file beside
its target (``.<name>.tmp-<pid>-<random><suffix>``) and renames it into place on ``close``; ``abort`` removes it.
As context managers they close on success and abort on an exception.

GeoParquet row order: rows are Hilbert-sorted (by bounding-box centre, on the extent given at open) within
each row group, and row groups follow the order polygons are finished, which is block order. So every row
group covers a compact area and its ``bbox`` column statistics let readers skip it; the file is not globally
Hilbert-sorted (that would need an external sort of spilled runs).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import shapely.geometry

from geoseg._ragged import concat as concat_ragged
from geoseg._ragged import offsets as _offsets
from geoseg._ragged import take as take_ragged
from geoseg.errors import InputError, OutputError, write_failure

__all__ = [
    "FeatureBatch",
    "VectorWriter",
    "GeoParquetWriter",
    "GeoJSONWriter",
    "GPKGWriter",
    "open_vector_writer",
    "hilbert_index",
    "style_qml",
    "style_sld",
    "FORMATS",
]

FORMATS = ("parquet", "gpkg", "geojson", "geojsonseq")


class FeatureBatch:
    """Polygons (in the writer's source CRS) and attribute columns of equal length.

    Built either from shapely geometries (``FeatureBatch(geoms, columns)``) or, without any per-feature Python
    objects, from ragged polygon arrays (``FeatureBatch.from_ragged``); WKB, bounding boxes and shapely
    geometries are derived lazily from whichever is given. Columns are numpy or pyarrow arrays.
    """

    def __init__(self, geometry: np.ndarray | None, columns: dict[str, Any], *,
                 ragged: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        if geometry is None and ragged is None:
            raise InputError("a FeatureBatch needs geometries or ragged polygon arrays")
        self._geometry = geometry
        self._ragged = ragged
        self.columns = columns
        self._wkb: pa.Array | None = None
        self._bounds: np.ndarray | None = None

    @classmethod
    def from_ragged(cls, coords: np.ndarray, ring_offsets: np.ndarray, poly_offsets: np.ndarray,
                    columns: dict[str, Any]) -> FeatureBatch:
        """Polygons as shapely's ``from_ragged_array`` layout: float (N, 2) coords, closed rings."""
        return cls(None, columns, ragged=(np.ascontiguousarray(coords, dtype=np.float64),
                                          np.asarray(ring_offsets, np.int64), np.asarray(poly_offsets, np.int64)))

    def __len__(self) -> int:
        return len(self._geometry) if self._geometry is not None else len(self._ragged[2]) - 1

    @property
    def geometry(self) -> np.ndarray:
        """Shapely geometries (object array)."""
        if self._geometry is None:
            coords, ring_off, poly_off = self._ragged
            self._geometry = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_off, poly_off))
        return self._geometry

    @property
    def bounds(self) -> np.ndarray:
        """(n, 4) xmin, ymin, xmax, ymax."""
        if self._bounds is None:
            if self._ragged is not None:
                coords, ring_off, poly_off = self._ragged
                starts = ring_off[poly_off[:-1]]  # a polygon's exterior holds its holes
                self._bounds = np.column_stack([
                    np.minimum.reduceat(coords[:, 0], starts), np.minimum.reduceat(coords[:, 1], starts),
                    np.maximum.reduceat(coords[:, 0], starts), np.maximum.reduceat(coords[:, 1], starts),
                ]) if len(starts) else np.zeros((0, 4))
            else:
                self._bounds = shapely.bounds(self._geometry)
        return self._bounds

    @property
    def wkb(self) -> pa.Array:
        """ISO WKB (little-endian, 2D) as an Arrow binary array."""
        if self._wkb is None:
            if self._ragged is not None:
                self._wkb = wkb_polygons(*self._ragged)
            else:
                self._wkb = pa.array(shapely.to_wkb(self._geometry, output_dimension=2), type=pa.binary())
        return self._wkb

    def geometry_types(self) -> set[str]:
        if self._geometry is None:
            return {"Polygon"}
        return {_GEOM_NAMES.get(int(t), "Unknown") for t in np.unique(shapely.get_type_id(self._geometry))}

    def take(self, idx: np.ndarray) -> FeatureBatch:
        """Rows ``idx`` (geometry, columns, and any derived WKB/bounds already computed)."""
        out = FeatureBatch(self.geometry[idx] if self._ragged is None else None,
                           {k: _take_col(v, idx) for k, v in self.columns.items()},
                           ragged=None if self._ragged is None else take_ragged(*self._ragged, idx))
        return out

    @classmethod
    def concat(cls, batches: list[FeatureBatch]) -> FeatureBatch:
        if len(batches) == 1:
            return batches[0]
        names = list(batches[0].columns)
        cols = {k: _concat_col([b.columns[k] for b in batches]) for k in names}
        if all(b._ragged is not None for b in batches):
            return cls(None, cols, ragged=concat_ragged([b._ragged for b in batches]))
        return cls(np.concatenate([b.geometry for b in batches]), cols)

    @classmethod
    def coerce(cls, obj: Any) -> FeatureBatch:
        if isinstance(obj, FeatureBatch):
            return obj
        try:  # a GeoDataFrame
            geom = np.asarray(obj.geometry.values, dtype=object)
            cols = {c: obj[c].to_numpy() for c in obj.columns if c != obj.geometry.name}
            return cls(geom, cols)
        except AttributeError:
            kind = type(obj).__name__
            raise InputError(f"vector writers take a FeatureBatch or a GeoDataFrame, got {kind}") from None


def wkb_polygons(coords: np.ndarray, ring_offsets: np.ndarray, poly_offsets: np.ndarray) -> pa.Array:
    """ISO WKB of polygons given as ragged arrays, built with numpy straight into an Arrow binary array.

    Per polygon: byte order (1 = little-endian), type 3 (uint32), ring count (uint32), then per ring its point
    count (uint32) and the points as float64 x, y. The headers are spliced between the coordinate bytes.
    """
    n_poly = len(poly_offsets) - 1
    if n_poly == 0:
        return pa.array([], type=pa.binary())
    ring_n = np.diff(ring_offsets)
    rings_per = np.diff(poly_offsets)
    coord_bytes = np.ascontiguousarray(coords, dtype="<f8").view(np.uint8).ravel()
    poly_hdr = np.empty((n_poly, 9), dtype=np.uint8)
    poly_hdr[:, 0] = 1
    poly_hdr[:, 1:5] = np.full(n_poly, 3, dtype="<u4").view(np.uint8).reshape(-1, 4)
    poly_hdr[:, 5:9] = rings_per.astype("<u4").view(np.uint8).reshape(-1, 4)
    ring_hdr = ring_n.astype("<u4").view(np.uint8).reshape(-1, 4)
    # Insert each header just before the coordinates of its (first) ring; a polygon's header precedes its
    # first ring's header because it comes first in ``values`` and np.insert keeps that order for ties.
    first_ring = poly_offsets[:-1]
    item_pos = np.concatenate([ring_offsets[first_ring] * 16, ring_offsets[:-1] * 16])
    item_kind = np.concatenate([np.zeros(n_poly, np.int8), np.ones(len(ring_n), np.int8)])
    order = np.lexsort((item_kind, item_pos))
    item_len = np.where(item_kind == 0, 9, 4)[order]
    items = [poly_hdr, ring_hdr]
    hdr_rows = np.concatenate([np.arange(n_poly), np.arange(len(ring_n))])[order]
    kinds = item_kind[order]
    hdr_bytes = np.empty(int(item_len.sum()), dtype=np.uint8)
    pos_in_hdr = _offsets(item_len)[:-1]
    for kind, width in ((0, 9), (1, 4)):
        sel = np.flatnonzero(kinds == kind)
        dest = (pos_in_hdr[sel][:, None] + np.arange(width)).ravel()
        hdr_bytes[dest] = items[kind][hdr_rows[sel]].ravel()
    data = np.insert(coord_bytes, np.repeat(item_pos[order], item_len), hdr_bytes)
    size = 9 + np.add.reduceat(4 + 16 * ring_n, first_ring)
    offsets = _offsets(size)
    return pa.Array.from_buffers(pa.binary() if offsets[-1] < 2**31 else pa.large_binary(), n_poly,
                                 [None, pa.py_buffer(offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)),
                                  pa.py_buffer(data)])


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


class VectorWriter(ABC):
    """One output file: ``write`` batches, then ``close`` (publish) or ``abort`` (discard)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = _temp_path(self.path)
        self.rows = 0
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot create its directory ({e})") from None

    def write(self, batch: FeatureBatch | Any) -> None:
        if self._closed:
            raise OutputError(f"{self.path}: writer is already closed")
        batch = FeatureBatch.coerce(batch)
        if len(batch):
            try:
                self._write(batch)
            except Exception as e:  # GDAL, SQLite and Arrow each word a full disk their own way
                self.abort()
                raise write_failure(self.path, e, "write polygons") from None
            self.rows += len(batch)

    def close(self) -> Path:
        """Finish the temporary file and rename it to ``path``; returns ``path``."""
        if self._closed:
            return self.path
        try:
            self._finish()
            self.verify(self.tmp)
            os.replace(self.tmp, self.path)
        except Exception as e:
            self.abort()
            raise write_failure(self.path, e, "finish the file") from None
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._release()
        except Exception:
            pass
        for p in (self.tmp, *(self.tmp.with_name(self.tmp.name + s) for s in ("-journal", "-wal", "-shm"))):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> VectorWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def verify(self, path: Path) -> None:
        """Check the finished file before it is published: some writers report a full disk only as a log line
        (GDAL drops a GeoPackage's spatial index that way), so the file itself is checked. Raises OSError."""
        if not path.is_file() or path.stat().st_size == 0:
            raise OSError(f"{path.name} is missing or empty after writing")

    @abstractmethod
    def _write(self, batch: FeatureBatch) -> None: ...

    @abstractmethod
    def _finish(self) -> None: ...

    def _release(self) -> None:
        """Close open handles without publishing (abort)."""


# ------------------------------------------------------------------------------------------ helpers


def _pyproj_crs(crs: Any):
    import pyproj

    if crs is None:
        return None
    if isinstance(crs, pyproj.CRS):
        return crs
    return pyproj.CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)


def hilbert_index(
    x: np.ndarray, y: np.ndarray, extent: tuple[float, float, float, float], order: int = 16
) -> np.ndarray:
    """Position of points on a Hilbert curve of ``2**order`` cells a side over ``extent`` (uint64)."""
    xmin, ymin, xmax, ymax = extent
    n = 1 << order
    sx = (n - 1) / (xmax - xmin) if xmax > xmin else 0.0
    sy = (n - 1) / (ymax - ymin) if ymax > ymin else 0.0
    xi = np.clip(((np.asarray(x) - xmin) * sx), 0, n - 1).astype(np.int64)
    yi = np.clip(((np.asarray(y) - ymin) * sy), 0, n - 1).astype(np.int64)
    d = np.zeros(len(xi), dtype=np.int64)
    s = n >> 1
    while s > 0:
        rx = (xi & s) > 0
        ry = (yi & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        # rotate the quadrant so the sub-curve has the standard orientation
        flip = ~ry & rx
        xi = np.where(flip, n - 1 - xi, xi)
        yi = np.where(flip, n - 1 - yi, yi)
        swap = ~ry
        xi, yi = np.where(swap, yi, xi), np.where(swap, xi, yi)
        s >>= 1
    return d.astype(np.uint64)


def _is_arrow(col: Any) -> bool:
    return isinstance(col, (pa.Array, pa.ChunkedArray))


def _concat_col(parts: list[Any]) -> Any:
    if _is_arrow(parts[0]):
        return pa.concat_arrays([_arrow_column(p) for p in parts])
    return np.concatenate([np.asarray(p) for p in parts])


def _take_col(col: Any, idx: np.ndarray) -> Any:
    return col.take(pa.array(idx)) if _is_arrow(col) else np.asarray(col)[idx]


def _col_list(col: Any) -> list:
    return col.to_pylist() if _is_arrow(col) else np.asarray(col).tolist()


def _arrow_column(values: Any) -> pa.Array:
    if _is_arrow(values):
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr
    values = np.asarray(values)
    if values.dtype == object or values.dtype.kind == "U":
        # Attribute strings repeat (class names, scene, model): encode each distinct value once.
        seen: dict[Any, int] = {}
        codes = np.fromiter((seen.setdefault(v, len(seen)) for v in values.tolist()), dtype=np.int32,
                            count=len(values))
        uniques = [None if v is None else str(v) for v in seen]
        return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(uniques, type=pa.string())).dictionary_decode()
    return pa.array(values)


_GEOM_NAMES = {0: "Point", 1: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
               6: "MultiPolygon", 7: "GeometryCollection"}


# ------------------------------------------------------------------------------------------ GeoParquet


class GeoParquetWriter(VectorWriter):
    """GeoParquet 1.1.0: WKB ``geometry``, ``bbox`` covering struct, PROJJSON CRS, Snappy, streamed row groups."""

    def __init__(
        self,
        path: str | os.PathLike,
        crs: Any,
        *,
        extent: tuple[float, float, float, float] | None = None,
        row_group_rows: int = 16_384,
        compression: str = "snappy",
    ):
        super().__init__(path)
        self.crs = _pyproj_crs(crs)
        self.extent = extent
        self.row_group_rows = int(row_group_rows)
        self.compression = compression
        self._buf: list[FeatureBatch] = []
        self._buf_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._types: set[str] = set()
        self._bbox = [np.inf, np.inf, -np.inf, -np.inf]

    def _write(self, batch: FeatureBatch) -> None:
        bounds = batch.bounds
        self._types.update(batch.geometry_types())
        self._bbox = [
            min(self._bbox[0], float(bounds[:, 0].min())), min(self._bbox[1], float(bounds[:, 1].min())),
            max(self._bbox[2], float(bounds[:, 2].max())), max(self._bbox[3], float(bounds[:, 3].max())),
        ]
        self._buf.append(batch)
        self._buf_rows += len(batch)
        while self._buf_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, limit: int | None = None) -> None:
        """Write up to ``limit`` buffered rows as one row group, Hilbert-sorted by bounding-box centre."""
        if not self._buf:
            return
        batch = FeatureBatch.concat(self._buf)
        self._buf = []
        if limit is not None and len(batch) > limit:
            self._buf = [batch.take(np.arange(limit, len(batch)))]
            batch = batch.take(np.arange(limit))
        self._buf_rows = sum(len(b) for b in self._buf)
        bounds = batch.bounds
        cx = (bounds[:, 0] + bounds[:, 2]) / 2
        cy = (bounds[:, 1] + bounds[:, 3]) / 2
        extent = self.extent or (cx.min(), cy.min(), cx.max(), cy.max())
        h = hilbert_index(cx, cy, extent)
        ids = batch.columns.get("polygon_id")
        # ties (e.g. an island and the ring around it share a bbox centre) by polygon_id: a canonical order
        order = np.lexsort((np.asarray(ids), h)) if ids is not None else np.argsort(h, kind="stable")
        batch = batch.take(order)
        bounds = batch.bounds
        arrays = {k: _arrow_column(v) for k, v in batch.columns.items()}
        arrays["geometry"] = batch.wkb
        arrays["bbox"] = pa.StructArray.from_arrays(
            [pa.array(bounds[:, i], type=pa.float64()) for i in range(4)], names=["xmin", "ymin", "xmax", "ymax"]
        )
        table = pa.table(arrays)
        if self._schema is None:
            self._schema = table.schema
        elif table.schema != self._schema:
            table = table.select(self._schema.names).cast(self._schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, table.schema, compression=self.compression,
                                            store_schema=False)
        self._writer.write_table(table, row_group_size=len(table))

    def _geo_metadata(self) -> dict:
        col: dict[str, Any] = {
            "encoding": "WKB",
            "geometry_types": sorted(self._types) if self._types else ["Polygon"],
            "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
        }
        col["crs"] = self.crs.to_json_dict() if self.crs is not None else None
        if np.isfinite(self._bbox).all():
            col["bbox"] = [float(v) for v in self._bbox]
        return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": col}}

    def _finish(self) -> None:
        self._flush()
        if self._writer is None:  # no rows: an empty file with the standard columns
            schema = pa.schema(
                [("polygon_id", pa.int64()), ("class_id", pa.uint8()), ("class_name", pa.string()),
                 ("area_m2", pa.float64()), ("perimeter_m", pa.float64()), ("scene", pa.string()),
                 ("model", pa.string()), ("model_version", pa.string()), ("geometry", pa.binary()),
                 ("bbox", pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")]))]
            )
            self._writer = pq.ParquetWriter(self.tmp, schema, compression=self.compression, store_schema=False)
        self._writer.add_key_value_metadata({"geo": json.dumps(self._geo_metadata())})
        self._writer.close()
        self._writer = None

    def verify(self, path: Path) -> None:
        """The footer parses and counts every row."""
        super().verify(path)
        rows = pq.read_metadata(path).num_rows
        if rows != self.rows:
            raise OSError(f"{path.name}: {rows} rows written of {self.rows}")

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ------------------------------------------------------------------------------------------ GeoJSON


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
        src = _pyproj_crs(crs)
        wgs84 = pyproj.CRS.from_epsg(4326)
        self._transformer = None
        if src is not None and not src.equals(wgs84, ignore_axis_order=True):
            self._transformer = pyproj.Transformer.from_crs(src, wgs84, always_xy=True)
        self._fh = open(self.tmp, "w", encoding="utf-8", newline="\n")
        self._first = True
        if not seq:
            self._fh.write('{"type":"FeatureCollection","features":[\n')

    def _lonlat(self, geoms: np.ndarray) -> np.ndarray:
        dec = self.decimals
        tr = self._transformer

        def fn(xy: np.ndarray) -> np.ndarray:
            if tr is not None:
                x, y = tr.transform(xy[:, 0], xy[:, 1])
                xy = np.column_stack([x, y])
            return np.round(xy, dec)

        out = shapely.transform(geoms, fn)
        return shapely.orient_polygons(out, exterior_cw=False)

    def _write(self, batch: FeatureBatch) -> None:
        geo = _geojson_geometries(self._lonlat(batch.geometry))
        names = list(batch.columns)
        lists = [_col_list(batch.columns[k]) for k in names]
        ids = _col_list(batch.columns[self.id_column]) if self.id_column in batch.columns else None
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

    orjson prints the shortest string that reads back the same double (like Python's float repr, 12x faster
    than ``json``), so a value rounded to 7 decimals prints with at most 7 (GEOS's writer prints up to 17
    significant digits instead).
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


# ------------------------------------------------------------------------------------------ GeoPackage


def _hex(rgba: tuple[int, ...]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgba[:3])


def style_qml(palette: dict[int, tuple[int, ...]], class_names: list[str], attribute: str = "class_id") -> str:
    """A QGIS QML categorized renderer colouring ``attribute`` values with ``palette`` (RGBA 0..255)."""
    cats, syms = [], []
    for i, (cid, rgba) in enumerate(sorted(palette.items())):
        r, g, b, a = (tuple(rgba) + (255,))[:4]
        label = class_names[cid] if cid < len(class_names) and class_names[cid] else f"class_{cid}"
        cats.append(f'      <category render="true" symbol="{i}" value="{cid}" label={quoteattr(label)}/>')
        color = f"{r},{g},{b},{a}"
        syms.append(
            f'      <symbol type="fill" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
            f'        <layer class="SimpleFill" pass="0" enabled="1" locked="0">\n'
            f'          <Option type="Map">\n'
            f'            <Option name="color" type="QString" value="{color}"/>\n'
            f'            <Option name="style" type="QString" value="solid"/>\n'
            f'            <Option name="outline_style" type="QString" value="no"/>\n'
            f'          </Option>\n'
            f'          <prop k="color" v="{color}"/>\n'
            f'          <prop k="style" v="solid"/>\n'
            f'          <prop k="outline_style" v="no"/>\n'
            f'        </layer>\n'
            f'      </symbol>'
        )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="Symbology">\n'
        f'  <renderer-v2 type="categorizedSymbol" attr={quoteattr(attribute)} enableorderby="0" '
        'symbollevels="0" forceraster="0">\n'
        "    <categories>\n" + "\n".join(cats) + "\n    </categories>\n"
        "    <symbols>\n" + "\n".join(syms) + "\n    </symbols>\n"
        "  </renderer-v2>\n"
        "</qgis>\n"
    )


def style_sld(palette: dict[int, tuple[int, ...]], class_names: list[str], layer: str,
              attribute: str = "class_id") -> str:
    """The same colouring as an OGC SLD 1.1 document (for GeoServer, ArcGIS Pro import)."""
    rules = []
    for cid, rgba in sorted(palette.items()):
        label = class_names[cid] if cid < len(class_names) and class_names[cid] else f"class_{cid}"
        opacity = (tuple(rgba) + (255,))[3] / 255
        rules.append(
            "      <se:Rule>\n"
            f"        <se:Name>{escape(label)}</se:Name>\n"
            "        <ogc:Filter><ogc:PropertyIsEqualTo>"
            f"<ogc:PropertyName>{escape(attribute)}</ogc:PropertyName><ogc:Literal>{cid}</ogc:Literal>"
            "</ogc:PropertyIsEqualTo></ogc:Filter>\n"
            "        <se:PolygonSymbolizer><se:Fill>"
            f'<se:SvgParameter name="fill">{_hex(rgba)}</se:SvgParameter>'
            f'<se:SvgParameter name="fill-opacity">{opacity:.3f}</se:SvgParameter>'
            "</se:Fill></se:PolygonSymbolizer>\n"
            "      </se:Rule>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<StyledLayerDescriptor version="1.1.0" xmlns="http://www.opengis.net/sld" '
        'xmlns:ogc="http://www.opengis.net/ogc" xmlns:se="http://www.opengis.net/se" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n'
        f"  <NamedLayer><se:Name>{escape(layer)}</se:Name><UserStyle><se:Name>{escape(layer)}</se:Name>\n"
        "    <se:FeatureTypeStyle>\n" + "\n".join(rules) + "\n    </se:FeatureTypeStyle>\n"
        "  </UserStyle></NamedLayer>\n</StyledLayerDescriptor>\n"
    )


class GPKGWriter(VectorWriter):
    """GeoPackage layer (GDAL via pyogrio, R-tree spatial index) plus a QGIS ``layer_styles`` row.

    Batches are buffered to ``batch_rows`` features per GDAL write.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        crs: Any,
        *,
        layer: str = "polygons",
        palette: dict[int, tuple[int, ...]] | None = None,
        class_names: list[str] | None = None,
        geometry_type: str = "Polygon",
        batch_rows: int = 16_384,
    ):
        super().__init__(path)
        self.crs = _pyproj_crs(crs)
        self.layer = layer
        self.palette = palette or {}
        self.class_names = list(class_names or [])
        self.geometry_type = geometry_type
        self.batch_rows = int(batch_rows)
        self._buf: list[pa.Table] = []
        self._buf_rows = 0
        self._created = False

    def _write(self, batch: FeatureBatch) -> None:
        arrays = {k: _arrow_column(v) for k, v in batch.columns.items()}
        if self.geometry_type == "MultiPolygon":  # GPKG wants one type per layer: promote the single parts
            geoms = batch.geometry.copy()
            single = np.flatnonzero(shapely.get_type_id(geoms) == 3)
            if len(single):
                geoms[single] = shapely.multipolygons(geoms[single], indices=np.arange(len(single)))
            arrays["geom"] = pa.array(shapely.to_wkb(geoms, output_dimension=2), type=pa.binary())
        else:
            arrays["geom"] = batch.wkb
        self._buf.append(pa.table(arrays))
        self._buf_rows += len(batch)
        while self._buf_rows >= self.batch_rows:
            self._flush(self.batch_rows)

    def _flush(self, limit: int | None = None) -> None:
        """Write up to ``limit`` buffered rows in one GDAL write. Writes of a fixed row count make the file's
        layout independent of how the rows were handed in."""
        import pyogrio

        if not self._buf and self._created:
            return
        if self._buf:
            table = pa.concat_tables(self._buf, promote_options="default")
        else:
            table = pa.table({"polygon_id": pa.array([], pa.int64()), "geom": pa.array([], pa.binary())})
        self._buf, self._buf_rows = [], 0
        if limit is not None and table.num_rows > limit:
            rest = table.slice(limit)
            self._buf, self._buf_rows = [rest], rest.num_rows
            table = table.slice(0, limit)
        table = table.combine_chunks()  # one Arrow batch per write: GDAL commits per batch
        pyogrio.write_arrow(
            table, str(self.tmp), layer=self.layer, driver="GPKG", geometry_name="geom",
            geometry_type=self.geometry_type, crs=self.crs.to_wkt() if self.crs is not None else None,
            append=self._created,
        )
        self._created = True

    def _finish(self) -> None:
        self._flush()
        self._add_style()

    def verify(self, path: Path) -> None:
        """Rows, spatial index and SQLite integrity: GDAL builds the R-tree when it closes the file and, when
        the disk fills up then, only logs it (the layer reads fine but every spatial query is slow)."""
        super().verify(path)
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if con.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise OSError(f"{path.name}: SQLite integrity check failed")
            rows = con.execute(f'SELECT count(*) FROM "{self.layer}"').fetchone()[0]
            if rows != self.rows:
                raise OSError(f"{path.name}: {rows} features written of {self.rows}")
            rtree = f"rtree_{self.layer}_geom"
            have = con.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (rtree,)).fetchone()[0]
            if not have or con.execute(f'SELECT count(*) FROM "{rtree}"').fetchone()[0] != rows:
                raise OSError(f"{path.name}: the spatial index was not written completely (disk full?)")
        except sqlite3.Error as e:
            raise OSError(f"{path.name}: unreadable after writing ({e})") from None
        finally:
            con.close()

    def _add_style(self) -> None:
        """The QGIS ``layer_styles`` table (QML + SLD), registered in ``gpkg_contents`` as QGIS does.

        Timestamps are set to ``SOURCE_DATE_EPOCH`` (the reproducible-builds convention), else 1970-01-01, so
        the file's bytes depend only on its content.
        """
        qml = style_qml(self.palette, self.class_names)
        sld = style_sld(self.palette, self.class_names, self.layer)
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))
        con = sqlite3.connect(self.tmp)
        try:
            con.execute(
                "CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256), "
                "f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT, "
                "useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30), "
                "update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
            )
            con.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                "styleName, styleQML, styleSLD, useAsDefault, description, owner, update_time) "
                "VALUES ('', '', ?, 'geom', ?, ?, ?, 1, 'class colours', '', ?)",
                (self.layer, f"{self.layer} classes", qml, sld, stamp),
            )
            con.execute(
                "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description, "
                "last_change) VALUES ('layer_styles', 'attributes', 'layer_styles', '', ?)", (stamp,)
            )
            con.execute("UPDATE gpkg_contents SET last_change = ?", (stamp,))
            con.commit()
        finally:
            con.close()


# ------------------------------------------------------------------------------------------ factory


def open_vector_writer(
    path: str | os.PathLike,
    fmt: str,
    crs: Any,
    *,
    palette: dict[int, tuple[int, ...]] | None = None,
    class_names: list[str] | None = None,
    extent: tuple[float, float, float, float] | None = None,
    geometry_type: str = "Polygon",
    layer: str = "polygons",
) -> VectorWriter:
    """A writer for ``fmt`` (parquet, gpkg, geojson, geojsonseq) at ``path``; geometries arrive in ``crs``."""
    if fmt == "parquet":
        return GeoParquetWriter(path, crs, extent=extent)
    if fmt == "gpkg":
        return GPKGWriter(path, crs, layer=layer, palette=palette, class_names=class_names,
                          geometry_type=geometry_type)
    if fmt in ("geojson", "geojsonseq"):
        return GeoJSONWriter(path, crs, seq=fmt == "geojsonseq")
    raise InputError(f"unknown vector format {fmt!r} (valid: {', '.join(FORMATS)})")
