"""The per-block stages, shared by both engines: read, predict, polygonize, or read back a resumed block.

    read_block       -> (data, valid) for a block's read window          [CPU, any worker]
    Predictor.predict_block (geoseg.infer)                              [inference worker, GPU if any]
    postprocess_block -> BlockResult (mask, polygons)                    [CPU, any worker]

``process_item`` chains them in one call (the local engine); the Ray engine runs the same functions as a read
task, an actor method and a finish task. The writer (``geoseg.stitch``) receives every ``BlockResult``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg.config import JobConfig
from geoseg.conventions import NODATA
from geoseg.errors import GeosegError, StorageError
from geoseg.grid import Block
from geoseg.io import raster
from geoseg.plan import ScenePlan, aoi_mask

__all__ = ["WorkItem", "BlockResult", "BlockOutcome", "block_failure", "failed_result", "predicted_result",
           "read_block", "compute_block", "postprocess_block", "finish_block", "process_item"]


@dataclass(frozen=True)
class WorkItem:
    """One block of one scene; ``resume`` means its mask is read back from an earlier run's record."""

    scene: int
    row: int
    col: int
    resume: bool = False


@dataclass
class BlockResult:
    """What the writer receives for one block."""

    scene: int
    block_id: str
    row: int
    col: int
    mask: np.ndarray | None
    tiles_inferred: int = 0
    tiles_skipped: int = 0
    model_calls: int = 0
    polygons: Any = None
    error: str | None = None
    from_resume: bool = False
    node: str | None = None  # the Ray node that ran the model on it (None: this process)
    worker: str | None = None  # the inference worker that ran it ("local": this process)
    forward_s: float = 0.0  # that worker's seconds inside forward passes for this block
    started: float = 0.0  # wall clock (time.time()) at the start and end of the block's prediction
    ended: float = 0.0
    sha256: str | None = None  # set by the finish stage, which also stored the block's record
    class_counts: np.ndarray | None = None  # pixels per mask value (256), by the finish stage
    area_counts: list | None = None  # the same per area unit (geoseg.areas.block_area_counts), by the finish stage
    polygons_written: int = 0  # final polygons the finish stage wrote itself (vector parts)
    cog: Any = None  # the block's compressed COG tiles (geoseg.write.cog_tiles.BlockTiles); then mask is None
    confidence: np.ndarray | None = None  # with plan.confidence: the model's per-pixel confidence (geoseg.infer)


@dataclass
class BlockOutcome:
    """What the driver sees of a finished block: where it is and whether it failed. ``result`` is the
    ``BlockResult`` itself (local engine) or a reference the scene's writer resolves (Ray engine: the mask and
    polygons go from the worker to the writer without passing through the driver)."""

    scene: int
    block_id: str
    row: int
    col: int
    error: str | None
    result: Any


def block_failure(plan: ScenePlan, block: Block, e: BaseException | str) -> str:
    """``<file>: block <id>: <problem>`` (the problem without a repeated file name)."""
    msg = str(e).removeprefix(f"{plan.path}: ")
    if isinstance(e, BaseException) and not isinstance(e, GeosegError):
        msg = f"{type(e).__name__}: {msg}"
    return f"{plan.path}: block {block.id}: {msg}"


def failed_result(plan: ScenePlan, block: Block, e: BaseException | str) -> BlockResult:
    """The result of a block that failed (the run counts it against ``runtime.max_failed_blocks``)."""
    return BlockResult(plan.index, block.id, block.row, block.col, None, error=block_failure(plan, block, e))


def predicted_result(plan: ScenePlan, block: Block, pred, worker: str, node: str | None = None) -> BlockResult:
    """A computed block's result from its ``BlockPrediction``, with the worker's timings."""
    return BlockResult(plan.index, block.id, block.row, block.col, pred.mask, pred.tiles_inferred, pred.tiles_skipped,
                       pred.model_calls, node=node, worker=worker, forward_s=pred.forward_s, started=pred.started,
                       ended=pred.ended, confidence=pred.confidence)


def read_block(plan: ScenePlan, block: Block) -> tuple[np.ndarray, np.ndarray]:
    """Read a block's window (block + halo) in the model's bands: (data, valid)."""
    if plan.aoi_blocks is not None and block.id not in plan.aoi_blocks:
        # outside the AOI: never read; no valid pixel, so no tile reaches the model
        rows, cols = int(block.read.height), int(block.read.width)
        return np.zeros((len(plan.bands), rows, cols), np.uint8), np.zeros((rows, cols), bool)
    data, valid = raster.read_window(raster.cached_dataset(plan.path, plan.storage), block.read, plan.bands,
                                     fill=plan.fill_value, scale=plan.scale, offset=plan.offset)
    if plan.aoi_wkb is not None:
        valid &= aoi_mask(plan, block.read)  # the output outside the AOI is nodata; the input stays as read
    return data, valid


def compute_block(plan: ScenePlan, block: Block, predictor) -> BlockResult:
    """Read + predict one block (the model runs only here)."""
    try:
        data, valid = read_block(plan, block)
        pred = predictor.predict_block(block, data, valid, confidence=plan.confidence)
    except Exception as e:  # reported with the block id; the driver decides whether the run fails
        return failed_result(plan, block, e)
    return predicted_result(plan, block, pred, "local")


def postprocess_block(plan: ScenePlan, block: Block, result: BlockResult, vector_cfg=None) -> BlockResult:
    """CPU work after inference: polygonize the block's mask when vectors are requested; with vector parts,
    write the polygons that touch no internal block edge here and pass on only the others.

    With a sieve the polygons come from the sieved mask, which needs neighbouring blocks: the writer
    polygonizes in its sieve pass instead.
    """
    if vector_cfg is not None and vector_cfg.enabled and result.error is None and plan.sieve_px <= 1:
        from geoseg import vectorize

        result.polygons = vectorize.polygonize_block(
            result.mask, block.window, nodata=NODATA, connectivity=vector_cfg.connectivity
        )
        if plan.vector_parts:
            from geoseg.plan import parts_dir
            from geoseg.vectorize.parts import write_block_parts
            from geoseg.vectorize.parts import split_final

            final, result.polygons = split_final(result.polygons, plan.info.shape)
            result.polygons_written = write_block_parts(
                final, parts_dir(plan), block.id, vector_cfg=vector_cfg, shape=plan.info.shape,
                transform=plan.info.transform, crs=plan.info.crs, class_names=plan.class_names, scene=plan.stem,
                model=plan.model[0], model_version=plan.model[1], storage=plan.storage)
        from geoseg.vectorize.polygonize import shared_vertices

        result.polygons.shared = shared_vertices(result.polygons)  # where the writer's seam merge cuts rings
    return result


def finish_block(plan: ScenePlan, block: Block, result: BlockResult | None, cfg: JobConfig) -> BlockResult:
    """CPU stage after inference, or in place of it for a resumed block."""
    if result is None:  # resumed: read the stored mask back
        from geoseg.stitch import load_block_record

        stored = load_block_record(plan, block, confidence=plan.confidence)
        if stored is None:
            return failed_result(plan, block, "stored result missing or corrupt")
        mask, conf, sha = stored  # the record's checksum, verified against the mask as it was read
        result = BlockResult(plan.index, block.id, block.row, block.col, mask, from_resume=True, confidence=conf,
                             sha256=sha)
    if result.error is not None:
        return result
    try:
        if not result.from_resume:  # the block's record, for resume (per-pixel work, so here, not in the writer)
            from geoseg.stitch import save_block_record

            result.sha256 = save_block_record(plan, block.id, result.mask, result.confidence)
        from geoseg.areas import area_units, block_area_counts

        # pixel counts per class in the units the scene's area table weighs (the writer adds them up instead of
        # reading the finished mask back), and per class for the run record
        by_row, strip = area_units(plan.info.transform, plan.info.crs)
        result.area_counts = block_area_counts(result.mask, int(block.window.row_off), int(block.window.col_off),
                                               by_row, strip)
        result.class_counts = np.zeros(256, dtype=np.int64)
        for _, _, cls, counts in result.area_counts:
            result.class_counts[cls.astype(np.int64)] += counts.sum(axis=0)
        result = postprocess_block(plan, block, result, cfg.vector)
        if plan.cog_levels and result.error is None:  # compressed here; the writer copies bytes
            from geoseg.write.cog_tiles import block_tiles

            result.cog = block_tiles(result.mask, int(block.window.row_off), int(block.window.col_off),
                                     plan.info.shape, plan.cog_blocksize, plan.cog_levels, NODATA)
            result.mask = None
        return result
    except StorageError:  # the output location failed (a full disk), not the block: the run stops, resumable
        raise
    except Exception as e:
        return failed_result(plan, block, e)


def process_item(plans: list[ScenePlan], item: WorkItem, predictor, cfg: JobConfig) -> BlockResult:
    """The whole per-block work in one call (the local engine)."""
    plan = plans[item.scene]
    block = plan.grid.block(item.row, item.col)
    result = None if item.resume else compute_block(plan, block, predictor)
    return finish_block(plan, block, result, cfg)
