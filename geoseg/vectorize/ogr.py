"""GDAL's polygonize straight into arrays: ``GDALPolygonize`` into an in-memory OGR layer, read back as one Arrow
batch of WKB (``OGR_L_GetArrowStream``), parsed by shapely into ragged coordinates.

Why: ``rasterio.features.shapes`` runs the same ``GDALPolygonize`` but hands every polygon over as a GeoJSON-like
dict of Python tuples, which ``polygonize.shapes_arrays`` then flattens again; on real land-cover blocks those
Python objects cost more than the polygonize itself (2.5x the CPU of this path; benchmarks/README.md). The
polygons, their vertex order and their order are GDAL's either way (tests compare both paths).

GDAL is the library rasterio already loaded (its wheel ships one); it is found among the process's mapped
libraries, so this works where that is possible (Linux ``/proc/self/maps``) and GDAL >= 3.6 has the Arrow API.
Elsewhere ``available()`` is False and callers use rasterio's ``shapes``. ``GEOSEG_POLYGONIZE=rasterio`` forces
that path.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pyarrow as pa
import shapely

__all__ = ["available", "polygonize_arrays"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_GDT_BYTE, _GF_WRITE, _WKB_POLYGON, _OFT_INTEGER = 1, 1, 3, 0
_P, _I, _S = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
_SIGNATURES = {  # name: (restype, argtypes)
    "GDALVersionInfo": (_S, [_S]),
    "GDALAllRegister": (None, []),
    "GDALGetDriverByName": (_P, [_S]),
    "GDALCreate": (_P, [_P, _S, _I, _I, _I, _I, _P]),
    "GDALClose": (None, [_P]),
    "GDALGetRasterBand": (_P, [_P, _I]),
    "GDALRasterIO": (_I, [_P, _I, _I, _I, _I, _I, _P, _I, _I, _I, _I, _I]),
    "GDALSetGeoTransform": (_I, [_P, ctypes.POINTER(ctypes.c_double)]),
    "GDALDatasetCreateLayer": (_P, [_P, _S, _P, _I, _P]),
    "OGR_Fld_Create": (_P, [_S, _I]),
    "OGR_Fld_Destroy": (None, [_P]),
    "OGR_L_CreateField": (_I, [_P, _P, _I]),
    "GDALPolygonize": (_I, [_P, _P, _P, _I, _P, _P, _P]),
    "OGR_L_GetArrowStream": (ctypes.c_bool, [_P, _P, _P]),
    "CSLSetNameValue": (_P, [_P, _S, _S]),
    "CSLDestroy": (None, [_P]),
}


def _find_gdal() -> ctypes.CDLL | None:
    import rasterio

    del rasterio  # imported for its GDAL, which is now mapped into this process

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgdal" in line and ".so" in line}
    except OSError:
        return None
    # rasterio's own GDAL first (another package may have loaded a second one, e.g. pyogrio's wheel)
    for path in sorted(paths, key=lambda p: ("rasterio" not in p, p)):
        try:
            lib = ctypes.CDLL(path)
            for name, (res, args) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
        except (OSError, AttributeError):
            continue
        major, minor = (int(v) for v in lib.GDALVersionInfo(b"RELEASE_NAME").decode().split(".")[:2])
        if (major, minor) >= (3, 6):
            lib.GDALAllRegister()  # idempotent; rasterio registers drivers only inside its environments
            lib.vector_driver = b"MEM" if (major, minor) >= (3, 11) else b"Memory"  # MEM does vectors from 3.11
            return lib
    return None


def _gdal() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _find_gdal()
                _tried = True
    return _lib


def available() -> bool:
    """Whether ``polygonize_arrays`` can run here (else use ``rasterio.features.shapes``)."""
    return os.environ.get("GEOSEG_POLYGONIZE", "gdal") != "rasterio" and _gdal() is not None


class _ArrowArrayStream(ctypes.Structure):
    # the Arrow C stream interface: get_schema, get_next, get_last_error, release, private_data
    _fields_ = [("get_schema", _P), ("get_next", _P), ("get_last_error", _P), ("release", _P),
                ("private_data", _P)]


def _mem_band(lib: ctypes.CDLL, arr: np.ndarray, col_off: int, row_off: int) -> tuple[int, int]:
    """(dataset, band) of an in-memory uint8 copy of ``arr`` whose pixel (0, 0) is at (col_off, row_off)."""
    h, w = arr.shape
    ds = lib.GDALCreate(lib.GDALGetDriverByName(b"MEM"), b"", w, h, 1, _GDT_BYTE, None)
    if not ds:
        raise RuntimeError("GDAL could not create an in-memory raster")
    band = lib.GDALGetRasterBand(ds, 1)
    a = np.ascontiguousarray(arr, dtype=np.uint8)
    if lib.GDALRasterIO(band, _GF_WRITE, 0, 0, w, h, a.ctypes.data, w, h, _GDT_BYTE, 0, 0) != 0:
        lib.GDALClose(ds)
        raise RuntimeError("GDAL could not fill an in-memory raster")
    lib.GDALSetGeoTransform(ds, (ctypes.c_double * 6)(col_off, 1.0, 0.0, row_off, 0.0, 1.0))
    return ds, band


def polygonize_arrays(
    arr: np.ndarray, valid: np.ndarray | None, connectivity: int, col_off: int = 0, row_off: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The polygons of uint8 ``arr`` (pixels where ``valid``, all when None) as coords (N, 2) int32 in pixel
    corners offset by (col_off, row_off), ring and polygon offsets, and each polygon's value: what
    ``polygonize.shapes_arrays`` returns through rasterio, element for element."""
    lib = _gdal()
    if lib is None:
        raise RuntimeError("GDAL's C API is not reachable here (check polygonize.ogr.available() first)")
    handles = []
    opts = None
    try:
        ds, band = _mem_band(lib, arr, col_off, row_off)
        handles.append(ds)
        mask_band = None
        if valid is not None:
            mds, mask_band = _mem_band(lib, valid, col_off, row_off)  # 0/1 bytes (_mem_band makes uint8)
            handles.append(mds)
        vds = lib.GDALCreate(lib.GDALGetDriverByName(lib.vector_driver), b"", 0, 0, 0, 0, None)
        if not vds:
            raise RuntimeError("GDAL could not create an in-memory vector dataset")
        handles.append(vds)
        layer = lib.GDALDatasetCreateLayer(vds, b"polygons", None, _WKB_POLYGON, None)
        if not layer:  # a null handle passed on would crash the process, not raise
            raise RuntimeError("GDAL could not create an in-memory polygon layer")
        field = lib.OGR_Fld_Create(b"value", _OFT_INTEGER)
        created = lib.OGR_L_CreateField(layer, field, 1)
        lib.OGR_Fld_Destroy(field)
        if created != 0:
            raise RuntimeError("GDAL could not add the value field to the polygon layer")
        if connectivity == 8:
            opts = lib.CSLSetNameValue(None, b"8CONNECTED", b"8")
        if lib.GDALPolygonize(band, mask_band, layer, 0, opts, None, None) != 0:
            raise RuntimeError("GDALPolygonize failed")
        stream = _ArrowArrayStream()
        if not lib.OGR_L_GetArrowStream(layer, ctypes.addressof(stream), None):
            raise RuntimeError("GDAL could not read the polygon layer as Arrow")
        # GDAL's rule: the stream and its batches are not used once the layer is gone (only released), so
        # everything is copied out here, and the reader (which owns the stream now) and its batches are
        # released before the datasets close.
        reader = pa.RecordBatchReader._import_from_c(ctypes.addressof(stream))
        table = reader.read_all()
        values = table.column("value").to_numpy().astype(arr.dtype)
        wkb = next(table.column(i).to_numpy(zero_copy_only=False) for i, f in enumerate(table.schema)
                   if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))
        del table, reader
    finally:
        if opts:
            lib.CSLDestroy(opts)
        for h in reversed(handles):
            lib.GDALClose(h)
    if not len(values):
        z = np.zeros(1, dtype=np.int64)
        return np.zeros((0, 2), np.int32), z, z.copy(), values
    _, coords, (ring_off, poly_off) = shapely.to_ragged_array(shapely.from_wkb(wkb))
    return coords.astype(np.int32), ring_off.astype(np.int64), poly_off.astype(np.int64), values
