"""What every vector writer shares: ``FeatureBatch`` (geometries + attribute columns), WKB encoding, the
``VectorWriter`` base (temporary file beside the target, renamed into place on ``close``), Hilbert keys."""

from __future__ import annotations

import os
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import shapely
import shapely.geometry

from geoseg._ragged import concat as concat_ragged
from geoseg._ragged import offsets as _offsets
from geoseg._ragged import take as take_ragged
from geoseg.errors import InputError, OutputError, write_failure

__all__ = ["FeatureBatch", "VectorWriter", "wkb_polygons", "binary_array", "hilbert_index", "arrow_column", "col_list",
           "concat_col", "take_col", "FORMATS"]


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
                    columns: dict[str, Any], bounds: np.ndarray | None = None) -> FeatureBatch:
        """Polygons as shapely's ``from_ragged_array`` layout: float (N, 2) coords, closed rings; ``bounds``
        (n, 4) if the caller has them already (else computed from the coordinates when needed)."""
        batch = cls(None, columns, ragged=(np.ascontiguousarray(coords, dtype=np.float64),
                                           np.asarray(ring_offsets, np.int64), np.asarray(poly_offsets, np.int64)))
        batch._bounds = bounds
        return batch

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
                           {k: take_col(v, idx) for k, v in self.columns.items()},
                           ragged=None if self._ragged is None else take_ragged(*self._ragged, idx))
        return out

    @classmethod
    def concat(cls, batches: list[FeatureBatch]) -> FeatureBatch:
        if len(batches) == 1:
            return batches[0]
        names = list(batches[0].columns)
        cols = {k: concat_col([b.columns[k] for b in batches]) for k in names}
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
    count (uint32) and the points as float64 x, y. Headers are scattered into place; each ring's coordinates are
    one memory copy (a copy per ring costs far less than splicing headers into the coordinate bytes, which indexes
    every byte).
    """
    n_poly = len(poly_offsets) - 1
    if n_poly == 0:
        return pa.array([], type=pa.binary())
    ring_n = np.diff(ring_offsets)
    rings_per = np.diff(poly_offsets)
    ring_poly = np.repeat(np.arange(n_poly), rings_per)
    ring_cum = _offsets(4 + 16 * ring_n)
    offsets = _offsets(9 + ring_cum[poly_offsets[1:]] - ring_cum[poly_offsets[:-1]])
    ring_hdr = offsets[ring_poly] + 9 + ring_cum[:-1] - ring_cum[poly_offsets[:-1]][ring_poly]
    data = np.empty(int(offsets[-1]), dtype=np.uint8)
    head = offsets[:-1]
    data[head] = 1
    kind = np.full(n_poly, 3, dtype="<u4").view(np.uint8).reshape(-1, 4)
    nrings = rings_per.astype("<u4").view(np.uint8).reshape(-1, 4)
    npoints = ring_n.astype("<u4").view(np.uint8).reshape(-1, 4)
    for k in range(4):
        data[head + 1 + k] = kind[:, k]
        data[head + 5 + k] = nrings[:, k]
        data[ring_hdr + k] = npoints[:, k]
    src = memoryview(np.ascontiguousarray(coords, dtype="<f8").view(np.uint8).ravel())
    dst = memoryview(data)
    for d, s, n in zip((ring_hdr + 4).tolist(), (16 * ring_offsets[:-1]).tolist(), (16 * ring_n).tolist()):
        dst[d : d + n] = src[s : s + n]
    return binary_array(offsets, data)


def binary_array(offsets: np.ndarray, data: np.ndarray) -> pa.Array:
    """An Arrow binary array (large_binary past 2 GiB) over ``data`` (uint8) cut at ``offsets`` (n + 1), no
    nulls, no copy."""
    large = offsets[-1] >= 2**31
    return pa.Array.from_buffers(pa.large_binary() if large else pa.binary(), len(offsets) - 1,
                                 [None, pa.py_buffer(offsets.astype(np.int64 if large else np.int32)),
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


def concat_col(parts: list[Any]) -> Any:
    if _is_arrow(parts[0]):
        return pa.concat_arrays([arrow_column(p) for p in parts])
    return np.concatenate([np.asarray(p) for p in parts])


def take_col(col: Any, idx: np.ndarray) -> Any:
    return col.take(pa.array(idx)) if _is_arrow(col) else np.asarray(col)[idx]


def col_list(col: Any) -> list:
    return col.to_pylist() if _is_arrow(col) else np.asarray(col).tolist()


def arrow_column(values: Any) -> pa.Array:
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
