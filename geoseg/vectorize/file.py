"""``geoseg vectorize MASK.tif --out FILE``: worker processes read and polygonize blocks (with sieve context),
the parent merges seams and writes; local or ``s3://`` masks and outputs."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import rasterio
from rasterio.windows import Window

from geoseg.conventions import NODATA
from geoseg.errors import InputError, OutputError
from geoseg.vectorize.polygonize import BlockPolygons, polygonize_block, shared_vertices, window_tuple
from geoseg.vectorize.seams import block_windows
from geoseg.vectorize.sieve import read_with_context, sieve_block, sieve_context_px, sieve_size_px
from geoseg.vectorize.sink import PolygonSink, output_paths, read_class_names, read_palette


# ------------------------------------------------------------------------------------- vectorize_file


class VectorizeResult(list):
    """What ``vectorize_file`` wrote: a list of the written paths, plus ``paths`` ({format: path}),
    ``polygons`` (features written), ``blocks`` and ``seconds``."""

    def __init__(self, paths: dict[str, Path], polygons: int, blocks: int, seconds: float):
        super().__init__(paths.values())
        self.paths = paths
        self.polygons = polygons
        self.blocks = blocks
        self.seconds = seconds

    def __repr__(self) -> str:
        return (f"VectorizeResult(paths={self.paths!r}, polygons={self.polygons}, blocks={self.blocks}, "
                f"seconds={self.seconds:.2f})")


_WORKER_DS: dict[tuple, rasterio.DatasetReader] = {}


def _worker_dataset(path: str) -> rasterio.DatasetReader:
    """The worker's open dataset for ``path``, reopened when the file changed: keyed by path alone, a mask
    rewritten under the same name (a notebook's second run) was read from the stale handle."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    ds = _WORKER_DS.get(key)
    if ds is None:
        for old in [k for k in _WORKER_DS if k[0] == path]:
            _WORKER_DS.pop(old).close()
        ds = _WORKER_DS[key] = rasterio.open(path)
    return ds


def _block_task(
    path: str, window: tuple[int, int, int, int], nodata: int | None, connectivity: int, sieve_px: int,
    classes: tuple[int, ...] | None,
) -> BlockPolygons:
    """Worker: read one block (with sieve context), sieve, polygonize. Keeps its dataset open between tasks."""
    ds = _worker_dataset(path)
    fill = NODATA if nodata is None else nodata
    if sieve_px > 1:
        ctx = sieve_context_px(sieve_px)
        mask = sieve_block(read_with_context(ds, window, ctx, fill), ctx, sieve_px, connectivity, nodata=fill)
    else:
        mask = ds.read(1, window=Window(*window))
    block = polygonize_block(mask, window, nodata=nodata, connectivity=connectivity, classes=classes)
    block.shared = shared_vertices(block)  # the writer's seam merge cuts rings there without sorting them all
    return block


def vectorize_file(
    mask_path: str | os.PathLike,
    out: str | os.PathLike,
    cfg: Any,
    *,
    block_px: int = 1024,
    workers: int = 2,
    scene: str | None = None,
    model: str | None = None,
    model_version: str | None = None,
    overwrite: bool = False,
    band_px: int = 512,
    write_chunk: int = 4096,
    mp_context: str | None = None,
    storage: Any = None,
) -> VectorizeResult:
    """Polygonize a class mask GeoTIFF into ``out`` (a file whose suffix names the format, or a directory that
    receives ``cfg.formats`` as ``polygons.*``), block-parallel in ``workers`` processes.

    ``mask_path`` and ``out`` may be ``s3://`` URLs (``storage``: a ``StorageConfig``): the mask is fetched to a
    temporary file, the outputs are written locally and published through ``geoseg.io.store`` (one PUT each).

    ``cfg`` is a ``VectorConfig``. The mask is uint8 class ids; its nodata (255 when unset) gives no polygons.
    Class names come from the ``GEOSEG_CLASS_NAMES`` tag (else ``class_<id>``), colours from its colour table.
    With a sieve, polygons follow the sieved mask (the file itself is not rewritten). Iterating the result
    yields the written paths.
    """
    t0 = time.perf_counter()
    mask_path = str(mask_path)
    if str(out).startswith("s3://") or mask_path.startswith("s3://"):
        return _vectorize_via_local(mask_path, str(out), cfg, storage, overwrite=overwrite, scene=scene,
                                    kwargs=dict(block_px=block_px, workers=workers, model=model,
                                                model_version=model_version, band_px=band_px,
                                                write_chunk=write_chunk, mp_context=mp_context))
    try:
        ds = rasterio.open(mask_path)
    except rasterio.errors.RasterioError as e:
        raise InputError(f"{mask_path}: cannot open the mask ({e})") from None
    with ds:
        if ds.count < 1 or ds.dtypes[0] not in ("uint8", "int8", "uint16", "int16"):
            raise InputError(f"{mask_path}: a class mask is one band of integer class ids, got {ds.dtypes}")
        shape = (ds.height, ds.width)
        transform, crs = ds.transform, ds.crs
        nodata = NODATA if ds.nodata is None else int(ds.nodata)
        names = read_class_names(ds)
        palette = read_palette(ds, len(names))
    if scene is None:
        scene = Path(mask_path).stem
    sieve_px = sieve_size_px(cfg.sieve_px, cfg.min_area_m2, transform, crs, shape)
    paths = output_paths(out, cfg.formats)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    sink = PolygonSink(
        paths, shape=shape, transform=transform, crs=crs, cfg=cfg, block_px=block_px, class_names=names,
        palette=palette, scene=scene, model=model, model_version=model_version,
        band_px=band_px, overwrite=overwrite, write_chunk=write_chunk,
    )
    keep = sink.classes_at_polygonize
    classes = tuple(sorted(keep)) if keep is not None else None
    wins = [window_tuple(w) for w in block_windows(shape, block_px)]
    args = [(mask_path, w, nodata, cfg.connectivity, sieve_px, classes) for w in wins]
    try:
        if workers <= 1 or len(wins) == 1:
            try:
                for a in args:
                    sink.add(_block_task(*a))
            finally:  # in this process: do not keep the file open after the call
                for key in [k for k in _WORKER_DS if k[0] == mask_path]:
                    _WORKER_DS.pop(key).close()
        else:
            ctx = multiprocessing.get_context(mp_context) if mp_context else None
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                # In order, at most 2 per worker in flight: bounded memory and a deterministic row order.
                pending: collections.deque[cf.Future] = collections.deque()
                it = iter(args)
                for a in itertools.islice(it, 2 * workers):
                    pending.append(pool.submit(_block_task, *a))
                while pending:
                    block = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(_block_task, *nxt))
                    sink.add(block)
        written = sink.finish()
    except BaseException:
        sink.abort()
        raise
    return VectorizeResult(written, sink.count, len(wins), time.perf_counter() - t0)


def _vectorize_via_local(mask_path: str, out: str, cfg: Any, storage: Any, *, overwrite: bool, scene: str | None,
                         kwargs: dict[str, Any]) -> VectorizeResult:
    """``vectorize_file`` for ``s3://`` masks or outputs: stage locally, publish atomically through the store."""
    import shutil
    import tempfile
    from pathlib import PurePosixPath

    from geoseg.io import store

    work = Path(tempfile.mkdtemp(prefix="geoseg-vectorize-"))
    try:
        local_mask = mask_path
        if store.is_s3(mask_path):
            local_mask = str(work / PurePosixPath(mask_path).name)
            Path(local_mask).write_bytes(store.read_bytes(mask_path, storage))
        name = PurePosixPath(out.rstrip("/")).name if store.is_s3(out) else Path(out).name
        local_out = work / "out" / name if store.is_s3(out) else Path(out)
        if store.is_s3(out):
            dests = {fmt: (out if fmt_path == local_out else store.join(out, fmt_path.name))
                     for fmt, fmt_path in output_paths(local_out, cfg.formats).items()}
            if not overwrite:
                for d in dests.values():
                    if store.exists(d, storage):
                        raise OutputError(f"{d}: exists (set overwrite to replace it)")
        res = vectorize_file(local_mask, local_out, cfg, overwrite=overwrite,
                             scene=scene or PurePosixPath(mask_path).stem, **kwargs)
        if not store.is_s3(out):
            return res
        for fmt, local in res.paths.items():
            store.publish_file(str(local), dests[fmt], storage)
        return VectorizeResult({f: dests[f] for f in res.paths}, res.polygons, res.blocks, res.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
