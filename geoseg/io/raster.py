"""Open and validate input rasters, map bands to the model, read block windows with their validity mask.

Everything here takes a path (local or ``s3://``) and plain values and returns plain values, so the same
functions run in the driver and in Ray workers. Every failure is one ``InputError`` naming the file.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.windows import Window

from geoseg.config import StorageConfig
from geoseg.errors import InputError

__all__ = ["RasterInfo", "open_raster", "cached_dataset", "inspect", "resolve_bands", "band_name", "read_window",
           "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


@dataclass(frozen=True)
class RasterInfo:
    """What geoseg needs to know about an input raster (picklable; CRS kept as WKT)."""

    path: str
    shape: tuple[int, int]  # (rows, cols)
    count: int
    dtype: str
    crs_wkt: str
    transform: Affine
    nodata: float | None
    descriptions: tuple[str | None, ...]

    @property
    def resolution(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units."""
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def crs(self) -> rasterio.crs.CRS:
        return rasterio.crs.CRS.from_wkt(self.crs_wkt)


@contextlib.contextmanager
def open_raster(path: str | os.PathLike[str], storage: StorageConfig | None = None,
                **kwargs) -> Iterator[rasterio.DatasetReader]:
    """Open a local raster or an ``s3://`` object for windowed reading (the one way geoseg opens rasters)::

        with open_raster("s3://bucket/scene.tif", storage) as ds:
            block = ds.read(window=Window(0, 0, 256, 256))

    A context manager, not a bare dataset: for S3 the GDAL options (``geoseg.io.s3.raster_env``) must stay
    active while reading. Failures opening or reading become one ``InputError`` (missing, not a raster, corrupt)
    or ``StorageError`` (denied, unreachable) naming the path. ``kwargs`` go to ``rasterio.open``.
    """
    from geoseg.io import s3

    storage = storage or StorageConfig()
    path = os.fspath(path)
    remote = s3.is_s3(path)
    env = s3.raster_env(storage, path) if remote else contextlib.nullcontext()
    with env:
        try:
            ds = rasterio.open(s3.vsis3(path) if remote else path, **kwargs)
        except RasterioError as e:
            raise _open_error(path, storage, e) from None
        with ds:
            try:
                yield ds
            except RasterioIOError as e:
                # A read of this dataset failing mid-way (connection lost, object deleted, corrupt tile). Errors
                # that do not name it (a rasterio write in the caller's block, say) pass through untouched.
                if os.path.basename(path.rstrip("/")) not in s3.gdal_messages(e):
                    raise
                raise _open_error(path, storage, e, opened=True) from None


def _open_error(path: str, storage: StorageConfig, e: BaseException, opened: bool = False) -> Exception:
    from geoseg.io import s3

    detail = s3.gdal_messages(e)
    if s3.is_s3(path):
        return s3.open_error(path, storage, detail, opened)  # asks the store itself what is wrong
    detail = s3.redact(detail)
    if not os.path.exists(path):
        return InputError(f"{path}: input raster not found")
    if os.path.isdir(path):
        return InputError(f"{path}: is a directory, not a raster")
    if opened:
        return InputError(f"{path}: failed reading raster ({detail})")
    return InputError(f"{path}: not a readable raster ({detail})")


# A worker keeps its datasets open between blocks of the same file (one open per file, not per block: on S3
# each open costs header requests). Local files are keyed by their identity too: a mask rewritten under the
# same name (a notebook's second run) must not be read from the stale handle.
_OPEN: dict[tuple, rasterio.DatasetReader] = {}
_MAX_OPEN = 4


def cached_dataset(path: str, storage: StorageConfig | None = None) -> rasterio.DatasetReader:
    """This process's open dataset for ``path`` (opened through ``open_raster``), reused across calls."""
    from geoseg.io import store

    key: tuple = (path,)
    if not store.is_s3(path) and os.path.exists(path):
        key = (path, *_identity(os.stat(path)))
    ds = _OPEN.get(key)
    if ds is None or ds.closed:
        stale = [k for k in _OPEN if k[0] == path] if len(_OPEN) < _MAX_OPEN else list(_OPEN)
        for k in stale:
            _close(_OPEN.pop(k))
        cm = open_raster(path, storage)
        ds = cm.__enter__()
        ds._geoseg_cm = cm  # keep the context (and any GDAL env) alive with the dataset
        _OPEN[key] = ds
    return ds


def _identity(st) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _close(ds: rasterio.DatasetReader) -> None:
    cm = getattr(ds, "_geoseg_cm", None)
    with contextlib.suppress(Exception):
        if cm is not None:
            cm.__exit__(None, None, None)
        else:
            ds.close()


def _gdal_reason(e: BaseException) -> str:
    """The most specific GDAL message: rasterio often says "see previous exception" and chains GDAL's."""
    from geoseg.io import s3

    return "; ".join(m.splitlines()[0] for m in s3.gdal_messages(e, limit=3).split("; ")) or "read failed"


def inspect(src: rasterio.DatasetReader, path: str | None = None) -> RasterInfo:
    """Validate an open dataset for segmentation and describe it. Raises ``InputError`` naming the file."""
    path = path or src.name
    if src.count < 1:
        raise InputError(f"{path}: has no raster bands")
    dtypes = set(src.dtypes)
    bad = sorted(dtypes - set(SUPPORTED_DTYPES))
    if bad:
        raise InputError(
            f"{path}: unsupported data type {', '.join(bad)} (supported: {', '.join(SUPPORTED_DTYPES)})"
        )
    if src.crs is None:
        if src.gcps[0]:
            raise InputError(
                f"{path}: georeferenced only by ground control points; warp it to a grid first "
                "(e.g. gdalwarp) so outputs can share its grid"
            )
        raise InputError(f"{path}: has no CRS; geoseg needs a georeferenced raster to place its outputs")
    t = src.transform
    if t.b != 0 or t.d != 0:
        raise InputError(
            f"{path}: rotated or sheared geotransform {tuple(t)[:6]} is not supported; warp it north-up first"
        )
    if t.a == 0 or t.e == 0 or not all(math.isfinite(v) for v in tuple(t)[:6]):
        raise InputError(f"{path}: invalid geotransform {tuple(t)[:6]}")
    if t.e > 0 or t.a < 0:
        # Georeferencing would be exact, but the model would see a mirrored image (and map it wrongly).
        kind = "south-up (positive pixel height)" if t.e > 0 else "east-to-west (negative pixel width)"
        raise InputError(
            f"{path}: {kind} geotransform {tuple(t)[:6]}: the model would see a mirrored image; warp it "
            "north-up first (e.g. gdalwarp in.tif out.tif, which writes north-up)"
        )
    _probe_last_block(src, path)
    return RasterInfo(
        path=str(path),
        shape=(src.height, src.width),
        count=src.count,
        dtype=np.result_type(*src.dtypes).name,
        crs_wkt=src.crs.to_wkt(),
        transform=t,
        nodata=src.nodata,
        descriptions=tuple(src.descriptions),
    )


def _probe_last_block(src: rasterio.DatasetReader, path: str) -> None:
    """Read the last pixel of every band: a truncated file fails here, before any work, not hours later."""
    try:
        src.read(window=Window(src.width - 1, src.height - 1, 1, 1))
    except RasterioError as e:
        raise InputError(f"{path}: truncated or corrupt raster ({_gdal_reason(e)})") from None


# Names of the same band in other spellings (compared after upper-casing).
_ALIASES = {"R": "RED", "G": "GREEN", "B": "BLUE", "N": "NIR", "NIR1": "NIR", "NEAR-INFRARED": "NIR",
            "NEAR_INFRARED": "NIR", "NEARINFRARED": "NIR"}


def band_name(name: str | None) -> str | None:
    """A comparable band name, or None for an unnamed band (empty, or GDAL-style "Band 3")."""
    if not name or not name.strip():
        return None
    n = name.strip().upper()
    if n.replace(" ", "").replace("_", "").removeprefix("BAND").isdigit():
        return None  # "Band 1", "band_1": a position, not a name
    # Sentinel-2 / Landsat style names: B08 and B8 are the same band, B8A stays itself.
    if len(n) >= 2 and n[0] == "B" and n[1:].isdigit():
        n = "B" + str(int(n[1:]))
    return _ALIASES.get(n, n)


def resolve_bands(info: RasterInfo, model_bands: list[str], bands: list[int] | None) -> list[int]:
    """The 1-based band indexes to feed the model, in the model's band order.

    ``bands`` from the config wins. Otherwise, when the raster names its bands (band descriptions), the
    model's band names must all be found among them (case-insensitive, ``B08`` == ``B8``, ``red`` == ``R``):
    named bands are never taken by position, since a 9-band B1..B8A file fed as B2..B12 maps nonsense. Only a
    raster whose bands are all unnamed is taken in order, and only with exactly the model's band count.
    """
    need = len(model_bands)
    if bands is not None:
        if len(bands) != need:
            raise InputError(
                f"{info.path}: input.bands lists {len(bands)} bands {bands} but the model takes {need} "
                f"({', '.join(model_bands)})"
            )
        over = [b for b in bands if b > info.count]
        if over:
            raise InputError(f"{info.path}: input.bands {over} out of range; the raster has {info.count} bands")
        return list(bands)

    if info.count < need:
        raise InputError(
            f"{info.path}: has {info.count} bands but the model needs {need} ({', '.join(model_bands)})"
        )
    desc = [band_name(d) for d in info.descriptions]
    if any(desc):
        idx, missing = [], []
        for b in model_bands:
            nb = band_name(b) or b.upper()
            if nb in desc:
                idx.append(desc.index(nb) + 1)
            else:
                missing.append(b)
        if not missing:
            return idx
        named = [d if d else f"#{i + 1}" for i, d in enumerate(info.descriptions)]
        raise InputError(
            f"{info.path}: its bands are named {named} but the model needs {', '.join(model_bands)} "
            f"(missing: {', '.join(missing)}); if the bands are right under other names, choose them with "
            "input.bands (1-based, in the model's order)"
        )
    if info.count == need:
        return list(range(1, need + 1))
    raise InputError(
        f"{info.path}: has {info.count} unnamed bands but the model needs {need} ({', '.join(model_bands)}); "
        "choose them with input.bands (1-based, in the model's order)"
    )


def read_window(
    src: rasterio.DatasetReader, window: Window, bands: list[int], *, fill: float | None = None,
    scale: float = 1.0, offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``bands`` in ``window``: (data (bands, rows, cols), valid (rows, cols) bool).

    A pixel is valid only if it is valid in every used band: the dataset's per-band masks (nodata value,
    internal mask or alpha), and finite (not NaN or inf). With ``scale`` / ``offset`` the values become
    float32 ``x * scale + offset``. With ``fill``, every invalid band value (nodata, NaN, inf) is replaced by
    ``fill``, so the model never sees NaN or an arbitrary nodata value: a pixel next to a NaN is predicted
    exactly as if that pixel had been nodata from the start.
    """
    try:
        data = src.read(bands, window=window)
        masks = src.read_masks(bands, window=window)
    except RasterioError as e:
        raise InputError(f"{src.name}: read failed in window {_fmt(window)} ({_gdal_reason(e)})") from None
    band_ok = masks > 0
    if data.dtype.kind == "f":
        band_ok &= np.isfinite(data)
    valid = np.all(band_ok, axis=0)
    if scale != 1.0 or offset != 0.0:
        data = data.astype(np.float32) * np.float32(scale) + np.float32(offset)
    if fill is not None and not band_ok.all():
        if data.dtype.kind != "f":
            lim = np.iinfo(data.dtype)
            if not (float(fill).is_integer() and lim.min <= fill <= lim.max):
                data = data.astype(np.float32)
        data[~band_ok] = fill
    return data, valid


def _fmt(w: Window) -> str:
    return f"(col_off={int(w.col_off)}, row_off={int(w.row_off)}, width={int(w.width)}, height={int(w.height)})"
