"""Planning a scene: the validated input (the contract), its band mapping, tile grid, AOI and output location.

``plan_scene`` runs in the driver for every scene before anything starts; the ``ScenePlan`` it returns is
small and picklable and is all a worker needs to process any block of the scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from geoseg.config import DEFAULT_TILE_PX, JobConfig, StorageConfig
from geoseg.errors import ConfigError, InputError
from geoseg.grid import TileGrid
from geoseg.io import contract, raster, store

__all__ = ["ScenePlan", "plan_scene", "scene_stem", "aoi_mask", "partial_dir", "parts_dir", "SINGLE_FILE_MAX_PX",
           "wants_confidence", "CONFIDENCE_SCALE", "CONFIDENCE_NODATA", "DEFAULT_TILE_PX", "tile_size"]

#: confidence rasters (``output.confidence``): uint8 ``round(probability of the predicted class * 254)``, 255 nodata
CONFIDENCE_SCALE = 254
CONFIDENCE_NODATA = 255
#: ``vector.single_file`` unset: scenes up to this many pixels get one file per format from their writer.
SINGLE_FILE_MAX_PX = 8192 * 8192


def scene_stem(path: str) -> str:
    """The output sub-directory name of an input scene: its file name without the extension."""
    name = PurePosixPath(path.rstrip("/")).name
    for ext in (".tiff", ".tif", ".vrt", ".jp2", ".img"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass(frozen=True)
class ScenePlan:
    """Everything a worker needs to process blocks of one scene (small and picklable)."""

    index: int
    path: str
    stem: str
    info: raster.RasterInfo
    bands: list[int]
    grid: TileGrid
    out_dir: str
    storage: StorageConfig
    sieve_px: int = 0  # minimum mapping unit in pixels (0: none); needs a second pass over the mask
    fill_value: float = 0.0  # what the model sees in place of invalid input (the card's fill_value)
    scale: float = 1.0  # input.scale / input.offset: raw values -> the model's units
    offset: float = 0.0
    aoi_wkb: bytes | None = None  # input.aoi in the scene's CRS: pixels outside are nodata
    aoi_blocks: frozenset[str] | None = None  # ids of the blocks that touch the AOI (None: no AOI, all)
    vector_parts: bool = False  # workers write their blocks' final polygons (geoseg.vectorize.parts)
    class_names: tuple[str, ...] = ()  # the model's, for the polygons' attributes
    model: tuple[str, str] = ("", "")  # the model's name and version, for the same
    cog_blocksize: int = 512  # the mask COG's tile side
    cog_levels: int = 0  # levels of the mask COG each block's worker compresses (geoseg.write.cog_tiles)
    confidence: bool = False  # the model's per-pixel confidence is predicted, stored and written (confidence.tif)


def partial_dir(plan: ScenePlan) -> str:
    """Where a scene's unfinished state lives: block records, the workers' polygon parts, the writer's work."""
    return store.join(plan.out_dir, ".partial")


def parts_dir(plan: ScenePlan) -> str:
    """The workers' polygon parts of a scene (``geoseg.vectorize.parts``)."""
    return store.join(partial_dir(plan), "parts")


def wants_confidence(cfg: JobConfig, card) -> bool:
    """``output.confidence`` (default: when the scene gets ``instances.parquet``, whose ``score`` it gives)."""
    if cfg.output.confidence is not None:
        return bool(cfg.output.confidence)
    from geoseg.instances import wants_instances

    return wants_instances(cfg, card)


def cog_levels(cfg: JobConfig, shape: tuple[int, int], sieve_px: int) -> int:
    """How many levels of the mask COG the workers compress (0: the writer does; a sieve changes the mask after
    the blocks, and GDAL writes other compressions)."""
    from geoseg.write.cog_tiles import overview_count, worker_levels

    out = cfg.output
    if sieve_px > 1 or out.compress != "deflate" or not out.overviews:
        return 0
    return worker_levels(cfg.tiling.block_px, out.cog_blocksize_px, overview_count(shape, out.cog_blocksize_px))


def vector_parts(cfg: JobConfig, shape: tuple[int, int], sieve_px: int) -> bool:
    """Whether the scene's polygons are written by the workers in parts (``vector.single_file``)."""
    v = cfg.vector
    if not v.enabled:
        return False
    exact = sieve_px <= 1 and v.simplify_tolerance_m == 0
    if v.single_file is None:
        return exact and shape[0] * shape[1] > SINGLE_FILE_MAX_PX
    if not v.single_file and not exact:
        raise ConfigError(
            "vector.single_file=false needs pixel-exact polygons (each worker writes its block's own), but "
            "vector.sieve_px / min_area_m2 and simplify_tolerance_m work over the whole scene in its writer; "
            "set vector.single_file=true or leave it unset"
        )
    return not v.single_file


def tile_size(cfg: JobConfig, card) -> int:
    """``tiling.tile_px``, else the card's ``tile_px``, else ``DEFAULT_TILE_PX``; refused (naming where it came
    from) when ``tiling.block_px`` does not hold whole tiles of it."""
    tile = cfg.tiling.tile_px or card.tile_px or DEFAULT_TILE_PX
    if cfg.tiling.tile_px is None and card.tile_px and cfg.tiling.block_px % tile:
        raise ConfigError(
            f"tiling.block_px ({cfg.tiling.block_px}) must be a multiple of the tile side {tile} that model "
            f"{card.name!r} asks for (its card's tile_px); set tiling.block_px to a multiple of it, or tiling.tile_px"
        )
    return tile


def plan_scene(index: int, path: str, cfg: JobConfig, card) -> ScenePlan:
    """Open and validate ``path`` against the model card (the input contract) and the tiling config."""
    with raster.open_raster(path, cfg.storage) as src:
        info = raster.inspect(src, path)
        contract.enforce(path, contract.checks(src, info, card, cfg.input, cfg.runtime.max_pixels))
    bands = raster.resolve_bands(info, card.bands, cfg.input.bands)
    halo = card.halo_px if cfg.tiling.halo_px is None else cfg.tiling.halo_px
    grid = TileGrid(
        shape=info.shape, transform=info.transform, crs=info.crs_wkt, tile_px=tile_size(cfg, card),
        halo_px=halo, block_px=cfg.tiling.block_px, stride_px=card.output_stride,
    )
    out_dir = store.join(cfg.output.dir, scene_stem(path))
    sieve_px = 0
    if cfg.vector.sieve_px or cfg.vector.min_area_m2:
        from geoseg.vectorize import sieve_size_px  # a lazy import: vectorize is a later stage

        sieve_px = sieve_size_px(cfg.vector.sieve_px, cfg.vector.min_area_m2, info.transform, info.crs, info.shape)
    aoi_wkb, aoi_blocks = None, None
    if cfg.input.aoi:
        aoi_wkb, aoi_blocks = _aoi_blocks(cfg, info, grid, path)
    return ScenePlan(index, path, scene_stem(path), info, bands, grid, out_dir, cfg.storage, sieve_px,
                     fill_value=card.fill_value, scale=cfg.input.scale, offset=cfg.input.offset,
                     aoi_wkb=aoi_wkb, aoi_blocks=aoi_blocks, vector_parts=vector_parts(cfg, info.shape, sieve_px),
                     class_names=tuple(card.class_names), model=(card.name, card.version),
                     cog_blocksize=cfg.output.cog_blocksize_px, cog_levels=cog_levels(cfg, info.shape, sieve_px),
                     confidence=wants_confidence(cfg, card))


def _aoi_blocks(cfg: JobConfig, info: raster.RasterInfo, grid: TileGrid, path: str) -> tuple[bytes, frozenset[str]]:
    """The AOI in the scene's CRS (WKB) and the ids of the blocks whose window touches it."""
    import shapely

    from geoseg.region import read_aoi

    geom = read_aoi(cfg.input.aoi, cfg.input.aoi_crs).in_crs(info.crs_wkt)
    blocks = list(grid.blocks())
    t = info.transform
    boxes = []
    for b in blocks:
        w = b.window
        x0, y0 = t @ (w.col_off, w.row_off)
        x1, y1 = t @ (w.col_off + w.width, w.row_off + w.height)
        boxes.append(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    shapely.prepare(geom)
    # interiors must meet: a block the AOI only touches along an edge has no pixel centre in it
    hits = shapely.intersects(geom, boxes) & ~shapely.touches(geom, boxes)
    touching = frozenset(b.id for b, hit in zip(blocks, hits) if hit)
    if not touching:
        raise InputError(f"{path}: input.aoi {cfg.input.aoi!r} does not overlap the raster")
    return shapely.to_wkb(geom), touching


_AOI_CACHE: dict[int, Any] = {}


def aoi_mask(plan: ScenePlan, window) -> np.ndarray:
    """True where a pixel's centre lies in the AOI, over ``window`` of the scene."""
    import shapely
    from rasterio import features, windows

    key = hash(plan.aoi_wkb)
    geom = _AOI_CACHE.get(key)
    if geom is None:
        _AOI_CACHE.clear()
        geom = _AOI_CACHE[key] = shapely.from_wkb(plan.aoi_wkb)
    shape = (int(window.height), int(window.width))
    return features.geometry_mask([geom], shape, windows.transform(window, plan.info.transform), invert=True)
