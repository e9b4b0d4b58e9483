"""``PolygonSink``: the single-writer half of vectorizing a scene.

merger (``seams``) -> row bands released in raster order (``_Bands``: a canonical output order and the
simplification batches) -> simplification -> class filter -> attributes -> the format writers (``geoseg.write``).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from geoseg.conventions import CLASS_NAMES_TAG, to_pyproj
from geoseg.errors import InputError, OutputError
from geoseg.vectorize.attributes import polygon_table, resolve_classes, scene_extent, simplify_tolerance
from geoseg.vectorize.polygonize import BlockPolygons, PolygonSet
from geoseg.vectorize.seams import SeamMerger
from geoseg.vectorize.simplify import simplify_polygons


# ------------------------------------------------------------------------------------------- sink


_FORMAT_FILES = {
    "parquet": "polygons.parquet",
    "gpkg": "polygons.gpkg",
    "geojson": "polygons.geojson",
    "geojsonseq": "polygons.geojsonl",
}
_SUFFIX_FORMAT = {
    ".parquet": "parquet",
    ".geoparquet": "parquet",
    ".gpkg": "gpkg",
    ".geojson": "geojson",
    ".json": "geojson",
    ".geojsonl": "geojsonseq",
    ".geojsons": "geojsonseq",
    ".geojsonseq": "geojsonseq",
    ".ndjson": "geojsonseq",
}


def output_paths(out: str | os.PathLike, formats: Sequence[str]) -> dict[str, Path]:
    """``{format: path}``: a file with a known suffix is that one format; anything else is a directory."""
    out = Path(out)
    fmt = _SUFFIX_FORMAT.get(out.suffix.lower())
    if fmt is not None:
        return {fmt: out}
    if out.suffix and not out.is_dir():
        known = ", ".join(sorted(_SUFFIX_FORMAT))
        raise InputError(f"{out}: unknown vector format suffix {out.suffix!r} (known: {known}; or a directory)")
    return {f: out / _FORMAT_FILES[f] for f in formats}


class _Bands:
    """Holds finished polygons until their row band is complete, then releases bands in raster order.

    A polygon belongs to the band of its last (bottom) pixel row. Once every block of rows ``<= band end`` was
    added, the merger has emitted all polygons of that band (a polygon ending above a seam is final when the
    blocks below it are seen). Released bands are sorted by ``polygon_id``, so the output order -- and the
    batches coverage simplification sees -- are the same for every block size and arrival order, and memory
    holds about one band of polygons (a giant polygon that spans the raster belongs to the last band, so it
    delays nothing). Bands are fixed raster rows (``band_px``), independent of the blocks.
    """

    def __init__(self, rows: int, band_px: int):
        self.rows = rows
        self.band_px = max(int(band_px), 1)
        self.n = max(1, -(-rows // self.band_px))
        self.held: dict[int, list[PolygonSet]] = collections.defaultdict(list)
        self.next = 0  # first band not yet released

    def add(self, polys: PolygonSet) -> list[PolygonSet]:
        """Take finished polygons; returns any that belong to an already released band (blocks that
        never arrived until ``finish``), to be written as they are."""
        if not len(polys):
            return []
        bottom = np.maximum.reduceat(polys.coords[:, 1], polys.ring_offsets[polys.poly_offsets[:-1]]) - 1
        band = np.minimum(bottom.astype(np.int64) // self.band_px, self.n - 1)
        late = []
        for k in np.unique(band).tolist():
            sub = polys.take(band == k) if len(polys) and (band != k).any() else polys
            (late.append(sub) if k < self.next else self.held[k].append(sub))
        return late

    def ready(self, rows_complete: int) -> list[PolygonSet]:
        """Complete bands, in order (``rows_complete``: all blocks of rows below it were added)."""
        out = []
        while self.next < self.n:
            hi = min((self.next + 1) * self.band_px, self.rows)
            if not (rows_complete > hi or rows_complete >= self.rows):
                break
            out.append(_sorted_by_id(PolygonSet.concat(self.held.pop(self.next, []))))
            self.next += 1
        return [p for p in out if len(p)]

def _sorted_by_id(polys: PolygonSet) -> PolygonSet:
    """The same polygons in ``polygon_id`` order (a canonical order; GEOS simplifies edges in input order)."""
    order = np.argsort(polys.polygon_ids, kind="stable")
    return polys.take(order)


class PolygonSink:
    """The single-writer half of vectorization for one scene: merge, simplify, filter, attribute, write.

    Feed it ``BlockPolygons`` in any order with ``add``; ``finish`` publishes every output atomically and
    returns ``{format: path}``; ``abort`` removes the temporary files. ``outputs`` maps formats
    (parquet, gpkg, geojson, geojsonseq) to paths. Polygons are written in row bands of ``band_px`` raster
    rows, each sorted by ``polygon_id`` (see ``_Bands``; ``ordered=False`` writes them as they are finished
    instead): the files are byte-identical for every block size and
    arrival order, and simplification is partition-invariant (edges between polygons of different bands are
    kept exact, so bands fit together without gaps).
    """

    def __init__(
        self,
        outputs: dict[str, str | os.PathLike],
        *,
        shape: tuple[int, int],
        transform: Affine,
        crs: Any,
        cfg: Any,
        block_px: int | None = None,
        windows: Sequence[Window] | None = None,
        class_names: Sequence[str] = (),
        palette: dict[int, tuple[int, int, int, int]] | None = None,
        scene: str | None = None,
        model: str | None = None,
        model_version: str | None = None,
        band_px: int = 512,
        ordered: bool = True,
        overwrite: bool = True,
        write_chunk: int = 4096,
    ):
        from geoseg.write.vectors import open_vector_writer

        self.shape = (int(shape[0]), int(shape[1]))
        self.transform = transform
        self.crs = to_pyproj(crs)  # once: polygon_table would parse a rasterio CRS's WKT on every batch
        self.cfg = cfg
        self.class_names = list(class_names)
        self.meta = dict(scene=scene, model=model, model_version=model_version)
        self.keep = resolve_classes(cfg.include_classes, cfg.exclude_classes, self.class_names)
        self.tolerance = simplify_tolerance(cfg.simplify_tolerance_m, crs) if cfg.simplify_tolerance_m > 0 else 0.0
        self.merger = SeamMerger(self.shape, block_px=block_px, windows=windows, connectivity=cfg.connectivity)
        # ordered=False (the seam part of a partitioned output, whose content depends on the block grid anyway):
        # polygons are written as the merger finishes them, without holding and sorting bands
        self.bands = _Bands(self.shape[0], band_px) if ordered else None
        self.write_chunk = max(1, int(write_chunk))
        self.count = 0
        extent = scene_extent(self.shape, transform)
        pal = palette or default_palette(len(self.class_names) or 16)
        self.writers = {}
        try:
            for fmt, path in outputs.items():
                if Path(path).exists() and not overwrite:
                    raise OutputError(f"{path}: exists (set overwrite to replace it)")
                self.writers[fmt] = open_vector_writer(
                    path, fmt, crs, palette=pal, class_names=self.class_names, extent=extent,
                    geometry_type="MultiPolygon" if (self.tolerance and cfg.connectivity == 8) else "Polygon",
                )
        except BaseException:
            self.abort()
            raise

    @property
    def classes_at_polygonize(self) -> set[int] | None:
        """Classes a block may drop already when polygonizing (all are needed to simplify a coverage)."""
        return None if self.tolerance else self.keep

    def add(self, block: BlockPolygons) -> int:
        """Merge one block and write what became final; returns the number of polygons written."""
        final = self.merger.add(block)
        return self._route(final, self.merger.rows_complete_until())

    def _route(self, final: PolygonSet, rows_complete: int) -> int:
        if self.bands is None:
            return self._write_chunked(final)
        n = sum(self._write_chunked(p) for p in self.bands.add(final))
        return n + sum(self._write_chunked(p) for p in self.bands.ready(rows_complete))

    def _write_chunked(self, polys: PolygonSet) -> int:
        """Write a band in slices of ``write_chunk`` polygons when that cannot change the output.

        A band spans the raster's width, so its attribute table, WKB and GeoJSON text would grow with the image;
        slices keep those transients at a fixed size. Pixel-exact polygons are written one by one anyway (the
        files are the same for any slicing); a simplified band must stay whole, it is one coverage.
        """
        if self.tolerance or len(polys) <= self.write_chunk:
            return self._write(polys)
        return sum(self._write(polys.take(np.arange(i, min(i + self.write_chunk, len(polys)))))
                   for i in range(0, len(polys), self.write_chunk))

    def _write(self, polys: PolygonSet) -> int:
        """Simplify (optional), filter classes, attribute and write one released band."""
        if not len(polys):
            return 0
        from geoseg.write.vectors import FeatureBatch

        pixel_exact = not self.tolerance

        geoms = None if pixel_exact else simplify_polygons(polys, self.transform, self.tolerance)
        if self.keep is not None:
            sel = np.isin(polys.class_ids, np.fromiter(self.keep, dtype=np.int64))
            polys = polys.take(sel)
            geoms = None if geoms is None else geoms[sel]
            if not len(polys):
                return 0
        cols = polygon_table(
            polys, geoms, transform=self.transform, crs=self.crs, class_names=self.class_names,
            pixel_exact=pixel_exact, arrow_strings=True, **self.meta,
        )
        if geoms is None:  # exact pixel polygons: WKB and bboxes straight from the arrays
            batch = FeatureBatch.from_ragged(polys.map_coords(self.transform), polys.ring_offsets,
                                             polys.poly_offsets, cols, polys.map_bounds(self.transform))
        else:
            batch = FeatureBatch(geoms, cols)
        for w in self.writers.values():
            w.write(batch)
        self.count += len(polys)
        return len(polys)

    def finish(self) -> dict[str, Path]:
        """Write the remaining polygons and publish every output; returns ``{format: path}``."""
        try:
            self._route(self.merger.finish(), self.shape[0])
            return {fmt: w.close() for fmt, w in self.writers.items()}
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def default_palette(n: int) -> dict[int, tuple[int, int, int, int]]:
    """A fixed qualitative palette for masks that carry no colour table."""
    base = [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
        (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
        (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
    ]
    return {i: (*base[i % len(base)], 255) for i in range(max(n, 1))}


def read_class_names(ds: rasterio.DatasetReader) -> list[str]:
    """Class names from the mask's ``GEOSEG_CLASS_NAMES`` tag (JSON list by class id); else empty."""
    raw = ds.tags().get(CLASS_NAMES_TAG) or ds.tags(1).get(CLASS_NAMES_TAG)
    if not raw:
        return []
    try:
        names = json.loads(raw)
    except ValueError:
        raise InputError(f"{ds.name}: tag {CLASS_NAMES_TAG} is not a JSON list ({raw[:80]!r})") from None
    if not isinstance(names, list):
        raise InputError(f"{ds.name}: tag {CLASS_NAMES_TAG} is not a JSON list ({raw[:80]!r})")
    return [str(n) if n is not None else "" for n in names]


def read_palette(ds: rasterio.DatasetReader, n_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """The mask's colour table for its classes if it has one, else ``default_palette``."""
    try:
        cmap = ds.colormap(1)
    except ValueError:
        cmap = None
    if not cmap:
        return default_palette(n_classes or 16)
    if n_classes:
        return {int(k): tuple(int(c) for c in v) for k, v in cmap.items() if int(k) < n_classes}
    # no class list: the entries the table actually sets (GDAL pads tables with transparent black)
    return {int(k): tuple(int(c) for c in v) for k, v in cmap.items() if int(k) < 255 and tuple(v) != (0, 0, 0, 0)}
