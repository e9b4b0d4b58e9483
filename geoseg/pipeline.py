"""One scene from raster to outputs: planning, per-block compute, and the single writer with resume.

The stages are plain functions so that the runner (Ray) and the local engine schedule exactly the same code:

    plan_scene  -> ScenePlan (validated input, band mapping, tile grid, output location)
    read_block  -> (data, valid) for a block's read window          [CPU, any worker]
    Predictor.predict_block (geoseg.infer)                         [inference worker, GPU if any]
    postprocess_block -> BlockResult (mask, polygons)               [CPU, any worker]
    SceneWriter.add(BlockResult) ... finish()                      [one writer per scene]

Durability and resume: each finished block's mask is stored atomically under ``<scene>/.partial/blocks``
with its checksum, next to ``job.json`` that fingerprints the config, model and input. A rerun with the same
fingerprint reads those blocks back instead of predicting them; a different fingerprint refuses to mix
(``--overwrite`` starts fresh). The run record ``run.json`` is written last: its presence means the
scene's outputs are complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from geoseg import __version__
from geoseg.areas import mask_class_areas
from geoseg.config import JobConfig, StorageConfig
from geoseg.errors import OutputError, write_failure
from geoseg.grid import Block, TileGrid
from geoseg.write.cog import NODATA
from geoseg.io import raster, store

__all__ = [
    "ScenePlan",
    "BlockResult",
    "SceneWriter",
    "plan_scene",
    "load_run_record",
    "read_block",
    "postprocess_block",
    "scene_stem",
    "fingerprint",
    "load_block_record",
]


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


def plan_scene(index: int, path: str, cfg: JobConfig, card) -> ScenePlan:
    """Open and validate ``path`` against the model card (the input contract) and the tiling config."""
    from geoseg.io import contract

    with raster.open_raster(path, cfg.storage) as src:
        info = raster.inspect(src, path)
        contract.enforce(path, contract.checks(src, info, card, cfg.input, cfg.runtime.max_pixels))
    bands = raster.resolve_bands(info, card.bands, cfg.input.bands)
    halo = card.halo_px if cfg.tiling.halo_px is None else cfg.tiling.halo_px
    grid = TileGrid(
        shape=info.shape, transform=info.transform, crs=info.crs_wkt, tile_px=cfg.tiling.tile_px,
        halo_px=halo, block_px=cfg.tiling.block_px, stride_px=card.output_stride,
    )
    out_dir = store.join(cfg.output.dir, scene_stem(path))
    sieve_px = 0
    if cfg.vector.sieve_px or cfg.vector.min_area_m2:
        from geoseg.vectorize import sieve_size_px

        sieve_px = sieve_size_px(cfg.vector.sieve_px, cfg.vector.min_area_m2, info.transform, info.crs, info.shape)
    aoi_wkb, aoi_blocks = None, None
    if cfg.input.aoi:
        aoi_wkb, aoi_blocks = _aoi_blocks(cfg, info, grid, path)
    return ScenePlan(index, path, scene_stem(path), info, bands, grid, out_dir, cfg.storage, sieve_px,
                     fill_value=card.fill_value, scale=cfg.input.scale, offset=cfg.input.offset,
                     aoi_wkb=aoi_wkb, aoi_blocks=aoi_blocks)


def _aoi_blocks(cfg: JobConfig, info: raster.RasterInfo, grid: TileGrid, path: str) -> tuple[bytes, frozenset[str]]:
    """The AOI in the scene's CRS (WKB) and the ids of the blocks whose window touches it."""
    import shapely

    from geoseg.errors import InputError
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


def _aoi_mask(plan: ScenePlan, window) -> np.ndarray:
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


# Worker processes keep their datasets open between blocks of the same scene (one open per scene, not per
# block: on S3 each open costs header requests).
_OPEN: dict[str, Any] = {}


def _dataset(plan: ScenePlan):
    ds = _OPEN.get(plan.path)
    if ds is None or ds.closed:
        if len(_OPEN) >= 4:
            for old in list(_OPEN.values()):
                old.close()
            _OPEN.clear()
        cm = raster.open_raster(plan.path, plan.storage)
        ds = cm.__enter__()
        ds._geoseg_cm = cm  # keep the context (and any GDAL env) alive with the dataset
        _OPEN[plan.path] = ds
    return ds


def read_block(plan: ScenePlan, block: Block) -> tuple[np.ndarray, np.ndarray]:
    """Read a block's window (block + halo) in the model's bands: (data, valid)."""
    if plan.aoi_blocks is not None and block.id not in plan.aoi_blocks:
        # outside the AOI: never read; no valid pixel, so no tile reaches the model
        rows, cols = int(block.read.height), int(block.read.width)
        return np.zeros((len(plan.bands), rows, cols), np.uint8), np.zeros((rows, cols), bool)
    data, valid = raster.read_window(_dataset(plan), block.read, plan.bands, fill=plan.fill_value,
                                     scale=plan.scale, offset=plan.offset)
    if plan.aoi_wkb is not None:
        valid &= _aoi_mask(plan, block.read)  # the output outside the AOI is nodata; the input stays as read
    return data, valid


@dataclass
class BlockResult:
    """What the writer receives for one block."""

    scene: int
    block_id: str
    row: int
    col: int
    mask: np.ndarray
    tiles_inferred: int = 0
    tiles_skipped: int = 0
    model_calls: int = 0
    polygons: Any = None
    error: str | None = None
    from_resume: bool = False
    node: str | None = None  # the Ray node that ran the model on it (None: this process)


def postprocess_block(plan: ScenePlan, block: Block, result: BlockResult, vector_cfg=None) -> BlockResult:
    """CPU work after inference: polygonize the block's mask when vectors are requested.

    With a sieve the polygons come from the sieved mask, which needs neighbouring blocks: the writer
    polygonizes in its sieve pass instead.
    """
    if vector_cfg is not None and vector_cfg.enabled and result.error is None and plan.sieve_px <= 1:
        from geoseg import vectorize

        result.polygons = vectorize.polygonize_block(
            result.mask, block.window, nodata=NODATA, connectivity=vector_cfg.connectivity
        )
    return result


def fingerprint(cfg: JobConfig, card, info: raster.RasterInfo, plan_bands: list[int]) -> dict[str, Any]:
    """What must match for partial results of an earlier run to be reused."""
    keep = cfg.to_dict()
    # Scheduling and presentation settings do not change outputs; everything else does.
    keep.pop("runtime", None)
    keep["output"].pop("overwrite", None)
    keep["input"].pop("paths", None)
    keep["tiling"].pop("block_px", None)  # outputs are identical for any block size...
    return {
        "config": keep,
        "block_px": cfg.tiling.block_px,  # ...but stored blocks are keyed by it
        "model": {"name": card.name, "version": card.version},
        "input": {"path": info.path, "shape": list(info.shape), "transform": list(info.transform)[:6]},
        "bands": plan_bands,
    }


def _partial_dir(plan: ScenePlan) -> str:
    return store.join(plan.out_dir, ".partial")


def _run_record_path(plan: ScenePlan) -> str:
    return store.join(plan.out_dir, "run.json")


def load_run_record(plan: ScenePlan) -> dict[str, Any] | None:
    """The run record of a scene whose outputs are complete (``run.json`` is written last), else None."""
    path = _run_record_path(plan)
    if not store.exists(path, plan.storage):
        return None
    return json.loads(store.read_bytes(path, plan.storage))


def load_block_record(plan: ScenePlan, block: Block) -> np.ndarray | None:
    """A block mask stored by an earlier run, or None when missing or its checksum fails (then recompute)."""
    path = store.join(_partial_dir(plan), "blocks", f"{block.id}.npz")
    try:
        with np.load(io.BytesIO(store.read_bytes(path, plan.storage))) as z:
            mask, sha = z["mask"], str(z["sha256"])
    except Exception:
        return None
    if _sha256(mask) != sha or mask.shape != (int(block.window.height), int(block.window.width)):
        return None
    return mask


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


class SceneWriter:
    """The single writer of one scene: mask COG, vectors, block records, run record.

    Output files are assembled in a local work directory and published (rename locally, one PUT on S3);
    ``run.json`` goes last.
    """

    def __init__(self, plan: ScenePlan, cfg: JobConfig, card, *, overwrite: bool = False):
        self.plan = plan
        self.cfg = cfg
        self.card = card
        self.storage = cfg.storage
        self.out_dir = plan.out_dir
        self.partial = _partial_dir(plan)
        self.run_record = _run_record_path(plan)
        self.fp = fingerprint(cfg, card, plan.info, plan.bands)
        self.t0 = time.time()
        self.stats = {"model_calls": 0, "tiles_inferred": 0, "tiles_skipped_nodata": 0, "blocks_resumed": 0,
                      "blocks_computed": 0, "blocks_read": 0}
        self.failed: dict[str, str] = {}
        self.done: dict[str, str] = {}  # block id -> sha256 of its mask
        self._prepare(overwrite)
        if store.is_s3(self.out_dir):
            self.work = Path(tempfile.mkdtemp(prefix=f"geoseg-{plan.stem}-"))
        else:
            self.work = Path(self.partial) / "work"
            self.work.mkdir(parents=True, exist_ok=True)
        from geoseg.write.cog import MaskWriter

        self.mask_writer = MaskWriter(
            self.work / "mask.scratch.tif", plan.info.shape, plan.info.transform, plan.info.crs,
            class_names=card.class_names, palette=card.palette, nodata=NODATA,
            blocksize_px=cfg.output.cog_blocksize_px, compress=cfg.output.compress,
            overviews=cfg.output.overviews,
            tags={"GEOSEG_MODEL": card.name, "GEOSEG_MODEL_VERSION": card.version, "GEOSEG_VERSION": __version__},
        )
        self.vectors = None
        if cfg.vector.enabled:
            from geoseg.vectorize import PolygonSink, output_paths

            info = plan.info
            try:
                self.vectors = PolygonSink(
                    output_paths(self.work, cfg.vector.formats), shape=info.shape, transform=info.transform,
                    crs=info.crs, cfg=cfg.vector, block_px=plan.grid.block_px, class_names=card.class_names,
                    palette=card.palette, scene=plan.stem, model=card.name, model_version=card.version,
                )
            except BaseException:
                self.mask_writer.abort()  # no scratch file left behind by a setting refused here
                raise

    # -- resume -------------------------------------------------------------------------------------------
    def _prepare(self, overwrite: bool) -> None:
        s = self.storage
        if store.exists(self.run_record, s):
            if not overwrite:
                raise OutputError(
                    f"{self.run_record}: outputs of scene {self.plan.stem!r} already exist; "
                    "pass --overwrite (output.overwrite=true) to replace them"
                )
            store.remove_tree(self.out_dir, s)
        job_path = store.join(self.partial, "job.json")
        if store.exists(job_path, s):
            old = json.loads(store.read_bytes(job_path, s))
            if old != _jsonable(self.fp):
                if not overwrite:
                    raise OutputError(
                        f"{self.partial}: holds partial results of a different configuration or model; "
                        "pass --overwrite (output.overwrite=true) to discard them and start fresh"
                    )
                store.remove_tree(self.out_dir, s)
            elif overwrite:
                store.remove_tree(self.out_dir, s)
        store.write_bytes(job_path, json.dumps(_jsonable(self.fp), indent=1).encode(), s)

    def resumable_blocks(self) -> set[str]:
        """Block ids with a stored result from an earlier run of the same job."""
        prefix = store.join(self.partial, "blocks")
        names = store.list_dir(prefix, self.storage) if store.exists(prefix, self.storage) else []
        return {PurePosixPath(n).name[: -len(".npz")] for n in names if n.endswith(".npz")}

    def _record_block(self, block_id: str, mask: np.ndarray, sha: str) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, mask=mask, sha256=np.array(sha))
        store.write_bytes(store.join(self.partial, "blocks", f"{block_id}.npz"), buf.getvalue(), self.storage)

    # -- writing ------------------------------------------------------------------------------------------
    def add(self, block: Block, result: BlockResult) -> None:
        """Take one finished block (any order)."""
        if result.error is not None:
            self.failed[block.id] = result.error
            return
        try:
            self._add(block, result)
        except Exception as e:  # a full disk under the scratch mask or the block records
            raise write_failure(self.out_dir, e, f"write block {block.id}") from None

    def _add(self, block: Block, result: BlockResult) -> None:
        sha = _sha256(result.mask)
        if result.from_resume:
            self.stats["blocks_resumed"] += 1
        else:
            self._record_block(block.id, result.mask, sha)
            self.stats["blocks_computed"] += 1
            if self.plan.aoi_blocks is None or block.id in self.plan.aoi_blocks:
                self.stats["blocks_read"] += 1
        self.done[block.id] = sha
        self.stats["tiles_inferred"] += result.tiles_inferred
        self.stats["tiles_skipped_nodata"] += result.tiles_skipped
        self.stats["model_calls"] += result.model_calls
        if result.node is not None:
            by_node = self.stats.setdefault("blocks_by_node", {})
            by_node[result.node] = by_node.get(result.node, 0) + 1
        self.mask_writer.write_block(block.window, result.mask)
        if self.vectors is not None and self.plan.sieve_px <= 1:
            self.vectors.add(result.polygons)

    def _sieve_pass(self) -> None:
        """Minimum mapping unit over the finished raw mask, block by block with context (identical to a
        whole-mask sieve); the sieved mask replaces the raw one and feeds the polygons."""
        import rasterio

        from geoseg import vectorize
        from geoseg.write.cog import MaskWriter

        raw_path = self.mask_writer.close_scratch()
        size, conn = self.plan.sieve_px, self.cfg.vector.connectivity
        ctx = vectorize.sieve_context_px(size)
        info = self.plan.info
        sieved = MaskWriter(
            self.work / "mask.sieved.tif", info.shape, info.transform, info.crs,
            class_names=self.card.class_names, palette=self.card.palette, nodata=NODATA,
            blocksize_px=self.cfg.output.cog_blocksize_px, compress=self.cfg.output.compress,
            overviews=self.cfg.output.overviews, tags=self.mask_writer.tags,
        )
        with rasterio.open(raw_path) as raw:
            for block in self.plan.grid.blocks():
                mask = vectorize.sieve_block(vectorize.read_with_context(raw, block.window, ctx), ctx, size, conn)
                sieved.write_block(block.window, mask)
                if self.vectors is not None:
                    self.vectors.add(vectorize.polygonize_block(mask, block.window, nodata=NODATA, connectivity=conn))
        raw_path.unlink(missing_ok=True)
        self.mask_writer = sieved

    def abort(self) -> None:
        """Leave block records for resume; drop scratch files and outputs finished in the work directory (a
        rerun rebuilds them from the block records, and a full disk gets its space back)."""
        self.mask_writer.abort()
        if self.vectors is not None:
            self.vectors.abort()
        shutil.rmtree(self.work, ignore_errors=True)

    def finish(self, timings: dict[str, float] | None = None) -> dict[str, Any]:
        """Complete every output in the work directory, verify it, then publish them all with ``run.json``
        last. Any failure (a full disk included) leaves nothing under a final name and keeps the block
        records, so a rerun resumes."""
        try:
            local, files = self._complete_outputs(timings)
        except BaseException as e:
            self.abort()
            if isinstance(e, Exception):
                raise write_failure(self.out_dir, e, "write the outputs") from None
            raise
        published: list[str] = []
        try:
            for kind, path in local.items():  # run.json is the last key
                store.publish_file(str(path), files[kind], self.storage)
                published.append(files[kind])
        except BaseException:
            for dest in published:  # best effort: a scene is either complete or has no final outputs
                with contextlib.suppress(Exception):
                    store.remove(dest, self.storage)
            self.abort()
            raise
        store.remove_tree(self.partial, self.storage)
        if self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        return self._record

    def _complete_outputs(self, timings: dict[str, float] | None) -> tuple[dict[str, Path], dict[str, str]]:
        """Every output finished and verified in the work directory: ``({kind: local path}, {kind: dest})``."""
        if self.plan.sieve_px > 1:
            self._sieve_pass()
        local: dict[str, Path] = {"mask": self.mask_writer.finish(self.work / "mask.tif")}
        if self.vectors is not None:
            local.update(self.vectors.finish())
        files = {kind: store.join(self.out_dir, Path(p).name) for kind, p in local.items()}
        files["manifest"] = store.join(self.out_dir, "manifest.json")
        manifest = {"blocks": dict(sorted(self.done.items())), "failed": dict(sorted(self.failed.items()))}
        local["manifest"] = self.work / "manifest.json"
        local["manifest"].write_bytes(json.dumps(manifest, indent=1).encode())
        self._record = record = {
            "geoseg_version": __version__,
            "input": {
                "path": self.plan.path, "shape_rows_cols": list(self.plan.info.shape),
                "bands": self.plan.bands, "crs": self.plan.info.crs.to_string(),
                "transform": list(self.plan.info.transform)[:6], "dtype": self.plan.info.dtype,
                "nodata": self.plan.info.nodata,
            },
            "config": self.cfg.to_dict(),
            "model": json.loads(self.card.model_dump_json()),
            "tiling": {
                "tile_px": self.plan.grid.tile_px, "halo_px": self.plan.grid.halo_px,
                "block_px": self.plan.grid.block_px, "stride_px": self.plan.grid.stride_px,
                "blocks": self.plan.grid.num_blocks,
            },
            "stats": dict(self.stats, blocks_failed=len(self.failed)),
            "failed_blocks": dict(sorted(self.failed.items())),
            "class_pixel_counts": self.mask_writer.class_pixel_counts(),
            "class_areas": mask_class_areas(local["mask"], self.card.class_names, nodata=NODATA),
            "timings_s": dict(timings or {}, wall=round(time.time() - self.t0, 3)),
            "outputs": dict(files),
        }
        if self.cfg.output.report:  # report.html + preview.png, from the local mask; linked from run.json
            from geoseg.report import write_scene_report

            for kind, path in write_scene_report(self.work, record, mask=local["mask"], storage=self.storage).items():
                local[kind] = path
                files[kind] = record["outputs"][kind] = store.join(self.out_dir, path.name)
        from geoseg.stac import scene_item  # the STAC Item, so catalogs (and QGIS's STAC browser) find it

        local["item"] = self.work / "item.json"
        files["item"] = record["outputs"]["item"] = store.join(self.out_dir, "item.json")
        item = scene_item(record, self.plan.stem, self.card)
        local["item"].write_bytes(json.dumps(item, indent=1).encode())
        local["run"] = self.work / "run.json"
        local["run"].write_bytes(json.dumps(record, indent=1).encode())
        files["run"] = self.run_record
        return local, files


def _jsonable(obj):
    return json.loads(json.dumps(obj))
