"""GeoParquet 1.1 writer (streamed row groups, bbox covering columns).

Row order: rows are Hilbert-sorted (by bounding-box centre, on the extent given at open) within each row group,
and row groups follow the order polygons are finished, which is block order. So every row group covers a
compact area and its ``bbox`` column statistics let readers skip it; the file is not globally Hilbert-sorted
(that would need an external sort of spilled runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geoseg.conventions import to_pyproj
from geoseg.write.features import (FeatureBatch, VectorWriter, arrow_column, binary_array, concat_col, hilbert_index,
                                   take_col)

__all__ = ["GeoParquetWriter"]


class GeoParquetWriter(VectorWriter):
    """GeoParquet 1.1.0: WKB ``geometry``, ``bbox`` covering struct, PROJJSON CRS, Snappy, streamed row groups."""

    def __init__(
        self,
        path: str | os.PathLike,
        crs: Any,
        *,
        extent: tuple[float, float, float, float] | None = None,
        row_group_rows: int = 16_384,
        row_group_bytes: int = 32 * 2**20,
        compression: str = "snappy",
    ):
        super().__init__(path)
        self.crs = to_pyproj(crs)
        self.extent = extent
        self.row_group_rows = int(row_group_rows)
        self.row_group_bytes = int(row_group_bytes)  # large polygons: a row group per ~32 MiB of WKB
        self.compression = compression
        self._buf: list[_Encoded] = []
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
        # Encoded now: buffered rows are WKB, bounds and columns, so a row group is reordered by copying bytes
        # (the ragged coordinates of large polygons cost more to concatenate and reorder than their WKB).
        self._buf.append(_Encoded(batch.wkb, bounds, batch.columns))
        self._buf_rows += len(batch)
        while self._buf_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)
        if sum(b.wkb.nbytes for b in self._buf) >= self.row_group_bytes:
            self._flush()

    def _flush(self, limit: int | None = None) -> None:
        """Write up to ``limit`` buffered rows as one row group, Hilbert-sorted by bounding-box centre."""
        if not self._buf:
            return
        parts, self._buf = self._buf, []
        wkbs = [p.wkb for p in parts]
        n = sum(len(p) for p in parts)
        k = n if limit is None else min(limit, n)
        bounds = np.concatenate([p.bounds for p in parts])
        columns = {c: concat_col([p.columns[c] for p in parts]) for c in parts[0].columns}
        if k < n:  # the rows past the limit stay buffered
            rest = np.arange(k, n)
            self._buf = [_Encoded(_gather_binary(wkbs, rest), bounds[rest],
                                  {c: take_col(v, rest) for c, v in columns.items()})]
        self._buf_rows = n - k
        bounds = bounds[:k]
        cx = (bounds[:, 0] + bounds[:, 2]) / 2
        cy = (bounds[:, 1] + bounds[:, 3]) / 2
        extent = self.extent or (cx.min(), cy.min(), cx.max(), cy.max())
        h = hilbert_index(cx, cy, extent)
        ids = columns.get("polygon_id")
        # ties (e.g. an island and the ring around it share a bbox centre) by polygon_id: a canonical order
        order = np.lexsort((np.asarray(ids)[:k], h)) if ids is not None else np.argsort(h, kind="stable")
        bounds = bounds[order]
        arrays = {c: arrow_column(take_col(v, order)) for c, v in columns.items()}
        arrays["geometry"] = _gather_binary(wkbs, order)  # copied once, straight into the row group's order
        arrays["bbox"] = pa.StructArray.from_arrays(
            [pa.array(bounds[:, i], type=pa.float64()) for i in range(4)], names=["xmin", "ymin", "xmax", "ymax"]
        )
        table = pa.table(arrays)
        if self._schema is None:
            self._schema = table.schema
        elif table.schema != self._schema:
            table = table.select(self._schema.names).cast(self._schema)
        if self._writer is None:
            # no dictionary attempt and no min/max statistics on the WKB (unique, large values: both cost a pass
            # over every byte for nothing); the bbox covering columns keep theirs, readers filter on them
            plain = [f.name for f in table.schema if f.name not in ("geometry", "bbox")]
            self._writer = pq.ParquetWriter(
                self.tmp, table.schema, compression=self.compression, store_schema=False, use_dictionary=plain,
                write_statistics=plain + [f"bbox.{k}" for k in ("xmin", "ymin", "xmax", "ymax")])
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


class _Encoded:
    """Buffered rows of a row group: WKB, bounds (n, 4) and attribute columns."""

    def __init__(self, wkb: pa.Array, bounds: np.ndarray, columns: dict[str, Any]):
        self.wkb, self.bounds, self.columns = wkb, bounds, columns

    def __len__(self) -> int:
        return len(self.wkb)


def _gather_binary(arrays: list[pa.Array], rows: np.ndarray) -> pa.Array:
    """The values at ``rows`` (indices over the concatenation of ``arrays``, binary without nulls), in that
    order, as one binary array: one memory copy per value."""
    offsets, datas = [], []
    for a in arrays:
        _, off_buf, data_buf = a.buffers()
        large = pa.types.is_large_binary(a.type)
        offsets.append(np.frombuffer(off_buf, dtype=np.int64 if large else np.int32)[a.offset : a.offset + len(a) + 1]
                       .astype(np.int64))
        datas.append(memoryview(np.frombuffer(data_buf, dtype=np.uint8)) if data_buf is not None else memoryview(b""))
    starts = np.concatenate([o[:-1] for o in offsets])[rows]
    sizes = np.concatenate([np.diff(o) for o in offsets])[rows]
    part = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])[rows]
    out_off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out_off[1:])
    out = np.empty(int(out_off[-1]), dtype=np.uint8)
    dst = memoryview(out)
    for d, st, sz, p in zip(out_off[:-1].tolist(), starts.tolist(), sizes.tolist(), part.tolist()):
        dst[d : d + sz] = datas[p][st : st + sz]
    return binary_array(out_off, out)
