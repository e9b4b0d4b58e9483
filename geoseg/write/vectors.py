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
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from geoseg.errors import InputError, OutputError

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


@dataclass
class FeatureBatch:
    """Shapely geometries (object array, in the writer's source CRS) and attribute columns of equal length."""

    geometry: np.ndarray
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.geometry)

    @classmethod
    def coerce(cls, obj: Any) -> FeatureBatch:
        if isinstance(obj, FeatureBatch):
            return obj
        try:  # a GeoDataFrame
            geom = np.asarray(obj.geometry.values, dtype=object)
            cols = {c: obj[c].to_numpy() for c in obj.columns if c != obj.geometry.name}
            return cls(geom, cols)
        except AttributeError:
            raise InputError(f"vector writers take a FeatureBatch or a GeoDataFrame, got {type(obj).__name__}") from None


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
            except OSError as e:
                raise OutputError(f"{self.path}: write failed ({e})") from None
            self.rows += len(batch)

    def close(self) -> Path:
        """Finish the temporary file and rename it to ``path``; returns ``path``."""
        if self._closed:
            return self.path
        try:
            self._finish()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.path}: cannot publish ({e})") from None
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


def hilbert_index(x: np.ndarray, y: np.ndarray, extent: tuple[float, float, float, float], order: int = 16) -> np.ndarray:
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


def _arrow_column(values: np.ndarray) -> pa.Array:
    values = np.asarray(values)
    if values.dtype == object or values.dtype.kind == "U":
        try:
            return pa.array(values, type=pa.string())  # C conversion; None -> null
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return pa.array([None if v is None else str(v) for v in values.tolist()], type=pa.string())
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
        row_group_rows: int = 65_536,
        compression: str = "snappy",
    ):
        super().__init__(path)
        self.crs = _pyproj_crs(crs)
        self.extent = extent
        self.row_group_rows = int(row_group_rows)
        self.compression = compression
        self._buf: list[tuple[FeatureBatch, np.ndarray]] = []
        self._buf_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._types: set[str] = set()
        self._bbox = [np.inf, np.inf, -np.inf, -np.inf]

    def _write(self, batch: FeatureBatch) -> None:
        bounds = shapely.bounds(batch.geometry)
        self._types.update(_GEOM_NAMES.get(int(t), "Unknown") for t in np.unique(shapely.get_type_id(batch.geometry)))
        self._bbox = [
            min(self._bbox[0], float(bounds[:, 0].min())), min(self._bbox[1], float(bounds[:, 1].min())),
            max(self._bbox[2], float(bounds[:, 2].max())), max(self._bbox[3], float(bounds[:, 3].max())),
        ]
        self._buf.append((batch, bounds))
        self._buf_rows += len(batch)
        while self._buf_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, limit: int | None = None) -> None:
        """Write up to ``limit`` buffered rows as one row group, Hilbert-sorted by bounding-box centre."""
        if not self._buf:
            return
        names = list(self._buf[0][0].columns)
        geoms = np.concatenate([b.geometry for b, _ in self._buf])
        bounds = np.concatenate([bb for _, bb in self._buf])
        cols = {k: np.concatenate([np.asarray(b.columns[k]) for b, _ in self._buf]) for k in names}
        self._buf = []
        if limit is not None and len(geoms) > limit:
            rest = FeatureBatch(geoms[limit:], {k: v[limit:] for k, v in cols.items()})
            self._buf = [(rest, bounds[limit:])]
            geoms, bounds, cols = geoms[:limit], bounds[:limit], {k: v[:limit] for k, v in cols.items()}
        self._buf_rows = sum(len(b) for b, _ in self._buf)
        cx = (bounds[:, 0] + bounds[:, 2]) / 2
        cy = (bounds[:, 1] + bounds[:, 3]) / 2
        extent = self.extent or (cx.min(), cy.min(), cx.max(), cy.max())
        order = np.argsort(hilbert_index(cx, cy, extent), kind="stable")
        bounds = bounds[order]
        arrays = {k: _arrow_column(v[order]) for k, v in cols.items()}
        arrays["geometry"] = pa.array(shapely.to_wkb(geoms[order], output_dimension=2), type=pa.binary())
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
        geo = shapely.to_geojson(self._lonlat(batch.geometry))
        cols = {k: np.asarray(v) for k, v in batch.columns.items()}
        names = list(cols)
        lists = [cols[k].tolist() for k in names]
        ids = cols[self.id_column].tolist() if self.id_column in cols else None
        parts = []
        for i, g in enumerate(geo.tolist()):
            props = json.dumps(dict(zip(names, (lst[i] for lst in lists))), separators=(",", ":"),
                               allow_nan=False, default=str)
            fid = "" if ids is None else f'"id":{json.dumps(ids[i])},'
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
        batch_rows: int = 50_000,
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
        arrays["geom"] = pa.array(shapely.to_wkb(batch.geometry, output_dimension=2), type=pa.binary())
        self._buf.append(pa.table(arrays))
        self._buf_rows += len(batch)
        if self._buf_rows >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        import pyogrio

        if not self._buf and self._created:
            return
        if self._buf:
            table = pa.concat_tables(self._buf, promote_options="default")
        else:
            table = pa.table({"polygon_id": pa.array([], pa.int64()), "geom": pa.array([], pa.binary())})
        self._buf, self._buf_rows = [], 0
        pyogrio.write_arrow(
            table, str(self.tmp), layer=self.layer, driver="GPKG", geometry_name="geom",
            geometry_type=self.geometry_type, crs=self.crs.to_wkt() if self.crs is not None else None,
            append=self._created,
        )
        self._created = True

    def _finish(self) -> None:
        self._flush()
        self._add_style()

    def _add_style(self) -> None:
        """The QGIS ``layer_styles`` table (QML + SLD), registered in ``gpkg_contents`` as QGIS does."""
        qml = style_qml(self.palette, self.class_names)
        sld = style_sld(self.palette, self.class_names, self.layer)
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
                "styleName, styleQML, styleSLD, useAsDefault, description, owner) "
                "VALUES ('', '', ?, 'geom', ?, ?, ?, 1, 'class colours', '')",
                (self.layer, f"{self.layer} classes", qml, sld),
            )
            con.execute(
                "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description, "
                "last_change) VALUES ('layer_styles', 'attributes', 'layer_styles', '', "
                "strftime('%Y-%m-%dT%H:%M:%fZ','now'))"
            )
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
