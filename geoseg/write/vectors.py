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

import os
from typing import Any

from geoseg.errors import InputError
from geoseg.write.features import FORMATS, FeatureBatch, VectorWriter, hilbert_index
from geoseg.write.geojson import GeoJSONWriter
from geoseg.write.gpkg import GPKGWriter, style_qml, style_sld
from geoseg.write.parquet import GeoParquetWriter

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
