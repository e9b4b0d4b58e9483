"""GeoPackage writer with the class style (QGIS ``layer_styles``: QML and SLD), streamed through SQLite."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pyarrow as pa
import shapely
import shapely.geometry

from geoseg.conventions import to_pyproj
from geoseg.write.features import FeatureBatch, VectorWriter, arrow_column

__all__ = ["GPKGWriter", "style_qml", "style_sld"]


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
        self.crs = to_pyproj(crs)
        self.layer = layer
        self.palette = palette or {}
        self.class_names = list(class_names or [])
        self.geometry_type = geometry_type
        self.batch_rows = int(batch_rows)
        self._buf: list[pa.Table] = []
        self._buf_rows = 0
        self._created = False

    def _write(self, batch: FeatureBatch) -> None:
        arrays = {k: arrow_column(v) for k, v in batch.columns.items()}
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
