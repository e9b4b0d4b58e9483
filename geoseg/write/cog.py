"""The class-mask output: written block by block, published as a Cloud-Optimized GeoTIFF.

GDAL's COG driver only copies a finished dataset, so blocks go into a tiled scratch GeoTIFF as they arrive
(in any order; memory holds one block), and ``finish`` copies it once through the COG driver (internal
tiles, overviews by nearest/mode, the model's colour table and class names) to a temporary name that is
renamed into place. The scratch file's layout depends on arrival order; the COG does not, so the published
bytes are the same for every split of the work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.windows import Window

from geoseg.conventions import CLASS_NAMES_TAG, NODATA, class_label
from geoseg.errors import OutputError, write_failure

__all__ = ["MaskWriter", "TiledMaskWriter", "CLASS_NAMES_TAG", "NODATA"]


class MaskWriter:
    """Accepts ``(window, mask)`` blocks for one scene and publishes ``mask.tif`` as a COG."""

    def __init__(
        self,
        scratch_path: str | Path,
        shape: tuple[int, int],
        transform: Affine,
        crs,
        *,
        class_names: list[str],
        palette: dict[int, tuple[int, int, int, int]],
        nodata: int = NODATA,
        blocksize_px: int = 512,
        compress: str = "deflate",
        overviews: bool = True,
        tags: dict[str, str] | None = None,
    ):
        self._keep(shape, nodata, blocksize_px, class_names, palette, tags)
        self.scratch_path = Path(scratch_path)
        self.compress = compress
        self.overviews = overviews
        rows, cols = shape
        # Scratch tiles of 256 keep each write local; fast compression, the COG copy recompresses.
        profile = dict(
            driver="GTiff", width=cols, height=rows, count=1, dtype="uint8", crs=crs, transform=transform,
            nodata=nodata, tiled=True, blockxsize=256, blockysize=256, compress="zstd", zstd_level=1,
            bigtiff="IF_SAFER", sparse_ok=True,
        )
        try:
            self.scratch_path.parent.mkdir(parents=True, exist_ok=True)
            self._ds = rasterio.open(self.scratch_path, "w", **profile)
            # The colour table sets the TIFF's photometric tag, which libtiff refuses once data was written.
            self._ds.write_colormap(1, {i: palette.get(i, (0, 0, 0, 0)) for i in range(256)})
        except (OSError, rasterio.errors.RasterioError) as e:
            raise OutputError(f"{self.scratch_path}: cannot create the mask scratch file ({e})") from None

    def _keep(self, shape, nodata, blocksize_px, class_names, palette, tags) -> None:
        """What every mask writer keeps: the grid, nodata, tile size, classes, colours, tags and pixel counts."""
        self.shape = shape
        self.nodata = nodata
        self.blocksize_px = blocksize_px
        self.class_names = class_names
        self.palette = palette
        self.tags = dict(tags or {})
        self.counts = np.zeros(256, dtype=np.int64)

    def _dataset_tags(self) -> tuple[dict[str, str], dict[str, str]]:
        """(the dataset's tags: class names and ``tags``, the band's: ``CLASS_<id>`` names)."""
        return ({CLASS_NAMES_TAG: json.dumps(self.class_names), **self.tags},
                {f"CLASS_{i}": n for i, n in enumerate(self.class_names)})

    @staticmethod
    def _check_block(window: Window, mask: np.ndarray) -> None:
        if mask.dtype != np.uint8 or mask.shape != (int(window.height), int(window.width)):
            raise ValueError(f"block mask {mask.dtype}{mask.shape} does not fit window {window}")

    def _count(self, mask: np.ndarray | None, counts: np.ndarray | None) -> None:
        self.counts += np.bincount(mask.ravel(), minlength=256) if counts is None else counts

    def write_block(self, window: Window, mask: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Write one block's class mask (uint8, rows x cols of ``window``); ``counts``: its pixels per value
        (256), when the worker counted them already."""
        self._check_block(window, mask)
        try:
            self._ds.write(mask, 1, window=window)
        except Exception as e:
            raise write_failure(self.scratch_path, e, "write a block of the mask") from None
        self._count(mask, counts)

    def class_pixel_counts(self) -> dict[str, int]:
        """Pixels per class name over the written blocks (nodata under ``"nodata"``)."""
        out = {}
        for cid, n in enumerate(self.counts):
            if n:
                name = "nodata" if cid == self.nodata else (
                    class_label(self.class_names, cid)
                )
                out[name] = int(n)
        return out

    def close_scratch(self) -> Path:
        """Close the scratch file for reading (e.g. a sieve pass) and return its path."""
        if not self._ds.closed:
            try:
                self._ds.close()
            except Exception as e:
                raise write_failure(self.scratch_path, e, "finish the scratch mask") from None
        return self.scratch_path

    def abort(self) -> None:
        if not self._ds.closed:
            # Closing flushes; on a full disk that fails too, and libtiff would log one line per failed tile
            # after the run's one-line error. The file is deleted anyway.
            gdal_log = logging.getLogger("rasterio")
            level = gdal_log.level
            gdal_log.setLevel(logging.CRITICAL + 1)
            try:
                with contextlib.suppress(Exception):
                    self._ds.close()
            finally:
                gdal_log.setLevel(level)
        self.scratch_path.unlink(missing_ok=True)

    def verify(self, path: Path) -> None:
        """The finished COG opens with the scene's grid and its last tile (the end of the file) decodes: a
        write cut short by a full disk fails here, before the file is published."""
        rows, cols = self.shape
        with rasterio.open(path) as ds:
            if (ds.height, ds.width) != (rows, cols) or ds.count != 1:
                raise OSError(f"{path.name}: {ds.height} x {ds.width} px after writing, expected {rows} x {cols}")
            bs = self.blocksize_px
            r0, c0 = (rows - 1) // bs * bs, (cols - 1) // bs * bs
            ds.read(1, window=Window(c0, r0, cols - c0, rows - r0))
            for level in range(len(ds.overviews(1))):
                with rasterio.open(path, overview_level=level) as ov:
                    ov.read(1, window=Window(ov.width - 1, ov.height - 1, 1, 1))

    def finish(self, dst: str | Path) -> Path:
        """Close the scratch file, copy it as a COG to ``dst`` atomically, remove the scratch."""
        ds = self._ds
        try:
            tags, band_tags = self._dataset_tags()
            ds.update_tags(**tags)
            ds.update_tags(1, **band_tags)
            ds.set_band_description(1, "class")
            ds.close()
        except Exception as e:
            raise write_failure(self.scratch_path, e, "finish the scratch mask") from None
        dst = Path(dst)
        tmp = dst.with_name(f".{dst.name}.tmp")
        opts = dict(
            driver="COG", BLOCKSIZE=self.blocksize_px, COMPRESS=self.compress.upper(),
            OVERVIEWS="AUTO" if self.overviews else "NONE",
            # MODE keeps the majority class at coarse zooms; NEAREST never invents a class either.
            OVERVIEW_RESAMPLING="MODE", RESAMPLING="NEAREST", BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS",
        )
        if self.compress == "deflate":
            opts["LEVEL"] = 6
        try:
            rasterio.shutil.copy(self.scratch_path, tmp, **opts)
            self.verify(tmp)
            os.replace(tmp, dst)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise write_failure(dst, e, "write the mask COG") from None
        self.scratch_path.unlink(missing_ok=True)
        return dst


class TiledMaskWriter(MaskWriter):
    """``MaskWriter``'s interface over ``cog_tiles.COGAssembler``: blocks arrive as compressed tiles plus a coarse
    level (``add_tiles``, from the finish tasks) or as full masks (``write_block``, when ``levels`` is 0); the COG
    is written from the tiles' bytes. DEFLATE with overviews only (the defaults); other settings use ``MaskWriter``."""

    def __init__(self, work: str | Path, shape: tuple[int, int], transform: Affine, crs, *, class_names: list[str],
                 palette: dict[int, tuple[int, int, int, int]], nodata: int = NODATA, blocksize_px: int = 512,
                 levels: int = 0, tags: dict[str, str] | None = None, name: str = "mask"):
        from geoseg.write.cog_tiles import COGAssembler

        self._keep(shape, nodata, blocksize_px, class_names, palette, tags)
        all_tags, band_tags = self._dataset_tags()
        try:
            self.cog = COGAssembler(Path(work) / f"{name}.parts", shape, transform, crs, blocksize=blocksize_px,
                                    levels=levels, nodata=nodata, palette=palette, tags=all_tags,
                                    band_tags=band_tags)
        except (OSError, rasterio.errors.RasterioError) as e:
            raise OutputError(f"{work}: cannot create the mask's scratch files ({e})") from None
        self.scratch_path = self.cog.scratch_path

    @property
    def levels(self) -> int:
        return self.cog.levels

    def write_block(self, window: Window, mask: np.ndarray, counts: np.ndarray | None = None) -> None:
        self._check_block(window, mask)
        if self.cog.levels:
            raise ValueError("this mask writer takes tiles (add_tiles), not full blocks")
        try:
            self.cog.write_coarse(mask, int(window.row_off), int(window.col_off))
        except Exception as e:
            raise write_failure(self.scratch_path, e, "write a block of the mask") from None
        self._count(mask, counts)

    def add_tiles(self, tiles, counts: np.ndarray) -> None:
        """A block's ``cog_tiles.BlockTiles`` (its class counts made by the same worker)."""
        try:
            self.cog.add_tiles(tiles.tiles)
            if tiles.coarse is not None:
                self.cog.write_coarse(tiles.coarse, *tiles.coarse_offset)
        except Exception as e:
            raise write_failure(self.cog.data_path, e, "write a block of the mask") from None
        self.counts += counts

    def close_scratch(self) -> Path:
        try:
            return self.cog.close_scratch()
        except Exception as e:
            raise write_failure(self.scratch_path, e, "finish the scratch mask") from None

    def abort(self) -> None:
        self.cog.abort()

    def finish(self, dst: str | Path) -> Path:
        dst = Path(dst)
        try:
            self.cog.finish(dst)
            self.verify(dst)
        except Exception as e:
            dst.unlink(missing_ok=True)
            self.cog.abort()
            raise write_failure(dst, e, "write the mask COG") from None
        return dst
