"""Stitching a scene: the single writer that assembles finished blocks into the mask and vectors, with resume.

Durability and resume: each finished block's mask is stored atomically under ``<scene>/.partial/blocks``
with its checksum, next to ``job.json`` that fingerprints the config, model and input. A rerun with the same
fingerprint reads those blocks back instead of predicting them; a different fingerprint refuses to mix
(``--overwrite`` starts fresh). Outputs are completed and verified in a work directory and then published,
``run.json`` last: its presence means the scene's outputs are complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from geoseg._memory import release_free_memory
from geoseg.areas import mask_class_areas
from geoseg.config import JobConfig
from geoseg.conventions import NODATA, VERSION
from geoseg.errors import OutputError, write_failure
from geoseg.grid import Block
from geoseg.io import raster, store
from geoseg.plan import CONFIDENCE_NODATA, CONFIDENCE_SCALE, ScenePlan, partial_dir

__all__ = ["SceneWriter", "prepare_scene", "stored_blocks", "fingerprint", "load_run_record", "load_block_record",
           "save_block_record", "block_sha256"]


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




def _run_record_path(plan: ScenePlan) -> str:
    return store.join(plan.out_dir, "run.json")


def load_run_record(plan: ScenePlan) -> dict[str, Any] | None:
    """The run record of a scene whose outputs are complete (``run.json`` is written last), else None."""
    path = _run_record_path(plan)
    if not store.exists(path, plan.storage):
        return None
    return json.loads(store.read_bytes(path, plan.storage))


def load_block_record(plan: ScenePlan, block: Block, confidence: bool = False):
    """``(mask, confidence or None, the mask's sha256)`` stored by an earlier run, or None when missing or its
    checksum fails (then recompute). With ``confidence``, None also when the record holds no valid confidence."""
    path = store.join(partial_dir(plan), "blocks", f"{block.id}.npz")
    shape = (int(block.window.height), int(block.window.width))
    try:
        with np.load(io.BytesIO(store.read_bytes(path, plan.storage))) as z:
            mask, sha = z["mask"], str(z["sha256"])
            conf, conf_sha = (z["confidence"], str(z["confidence_sha256"])) if confidence else (None, None)
    except Exception:
        return None
    if block_sha256(mask) != sha or mask.shape != shape:
        return None
    if confidence and (block_sha256(conf) != conf_sha or conf.shape != shape or conf.dtype != np.uint8):
        return None
    return mask, conf, sha


def block_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def save_block_record(plan: ScenePlan, block_id: str, mask: np.ndarray, confidence: np.ndarray | None = None) -> str:
    """Store a computed block's mask (and its confidence, when predicted) for resume (by the worker that finished
    it: compressing it is per-pixel work the scene's writer should not do); returns the mask's sha256."""
    sha = block_sha256(mask)
    extra = {} if confidence is None else {"confidence": confidence,
                                           "confidence_sha256": np.array(block_sha256(confidence))}
    buf = io.BytesIO()
    np.savez_compressed(buf, mask=mask, sha256=np.array(sha), **extra)
    store.write_bytes(store.join(partial_dir(plan), "blocks", f"{block_id}.npz"), buf.getvalue(), plan.storage)
    return sha


def prepare_scene(plan: ScenePlan, cfg: JobConfig, card, *, overwrite: bool = False) -> set[str]:
    """Before a scene's writer opens (in the driver): refuse finished outputs unless ``overwrite``, refuse partial
    results of another configuration, record this job's fingerprint (``job.json``). Returns the ids of the
    blocks an earlier run of the same job stored (they are read back, not predicted)."""
    s = cfg.storage
    run_record, partial = _run_record_path(plan), partial_dir(plan)
    fp = _jsonable(fingerprint(cfg, card, plan.info, plan.bands))
    if store.exists(run_record, s):
        if not overwrite:
            raise OutputError(
                f"{run_record}: outputs of scene {plan.stem!r} already exist; "
                "pass --overwrite (output.overwrite=true) to replace them"
            )
        store.remove_tree(plan.out_dir, s)
    job_path = store.join(partial, "job.json")
    if store.exists(job_path, s):
        old = json.loads(store.read_bytes(job_path, s))
        if old != fp:
            if not overwrite:
                raise OutputError(
                    f"{partial}: holds partial results of a different configuration or model; "
                    "pass --overwrite (output.overwrite=true) to discard them and start fresh"
                )
            store.remove_tree(plan.out_dir, s)
        elif overwrite:
            store.remove_tree(plan.out_dir, s)
    store.write_bytes(job_path, json.dumps(fp, indent=1).encode(), s)
    return _block_ids(plan, s)


def stored_blocks(plan: ScenePlan, cfg: JobConfig, card) -> set[str]:
    """The ids of the blocks an earlier run of this same job stored (empty when its fingerprint differs);
    reads only."""
    job_path = store.join(partial_dir(plan), "job.json")
    if not store.exists(job_path, cfg.storage):
        return set()
    if json.loads(store.read_bytes(job_path, cfg.storage)) != _jsonable(fingerprint(cfg, card, plan.info, plan.bands)):
        return set()
    return _block_ids(plan, cfg.storage)


def _block_ids(plan: ScenePlan, storage) -> set[str]:
    prefix = store.join(partial_dir(plan), "blocks")
    names = store.list_dir(prefix, storage) if store.exists(prefix, storage) else []
    return {PurePosixPath(n).name[: -len(".npz")] for n in names if n.endswith(".npz")}


class SceneWriter:
    """The single writer of one scene: mask COG (and ``confidence.tif`` with ``plan.confidence``), vectors, block
    records, run record.

    Output files are assembled in a local work directory and published (rename locally, one PUT on S3);
    ``run.json`` goes last.
    """

    def __init__(self, plan: ScenePlan, cfg: JobConfig, card):
        self.plan = plan
        self.cfg = cfg
        self.card = card
        self.storage = cfg.storage
        self.out_dir = plan.out_dir
        self.partial = partial_dir(plan)
        self.run_record = _run_record_path(plan)
        self.t0 = time.time()
        self.stats = {"model_calls": 0, "tiles_inferred": 0, "tiles_skipped_nodata": 0, "blocks_resumed": 0,
                      "blocks_computed": 0, "blocks_read": 0}
        self.failed: dict[str, str] = {}
        self.done: dict[str, str] = {}  # block id -> sha256 of its mask
        self.workers: dict[str, list] = {}  # inference worker -> [blocks, forward s, first start, last end]
        self._taken = 0
        self.own_process = False  # set by a writer actor: this process does nothing but write
        self._cpu_first: float | None = None  # process CPU time at the first block
        if store.is_s3(self.out_dir):
            self.work = Path(tempfile.mkdtemp(prefix=f"geoseg-{plan.stem}-"))
        else:
            self.work = Path(self.partial) / "work"
            self.work.mkdir(parents=True, exist_ok=True)
        self.mask_writer = self._mask_writer("mask", plan.cog_levels)
        self.areas = self._area_counter()
        self.confidence_writer = self._confidence_writer() if plan.confidence else None
        self.vectors = None
        if cfg.vector.enabled:
            from geoseg.vectorize import PolygonSink, output_paths

            info = plan.info
            outputs = output_paths(self.work, cfg.vector.formats)
            if plan.vector_parts:  # the writer's own polygons: those that touch a seam (geoseg.vectorize.parts)
                from geoseg.vectorize.parts import SEAMS_PART

                (self.work / "polygons.parquet").mkdir(exist_ok=True)
                outputs = {"parquet": self.work / "polygons.parquet" / SEAMS_PART}
                if {"geojson", "geojsonseq"} & set(cfg.vector.formats):
                    outputs["geojsonseq"] = self.work / "seams.geojsonl"
            try:
                self.vectors = PolygonSink(
                    outputs, shape=info.shape, transform=info.transform,
                    crs=info.crs, cfg=cfg.vector, block_px=plan.grid.block_px, class_names=card.class_names,
                    palette=card.palette, scene=plan.stem, model=card.name, model_version=card.version,
                    ordered=not plan.vector_parts,
                )
            except BaseException:
                self.mask_writer.abort()  # no scratch file left behind by a setting refused here
                if self.confidence_writer is not None:
                    self.confidence_writer.abort()
                raise

    # -- writing ------------------------------------------------------------------------------------------
    def add(self, block: Block, result) -> None:
        """Take one finished block (any order)."""
        if self._cpu_first is None:
            self._cpu_first = time.process_time()
        if result.error is not None:
            self.failed[block.id] = result.error
            return
        try:
            self._add(block, result)
        except Exception as e:  # a full disk under the scratch mask or the block records
            raise write_failure(self.out_dir, e, f"write block {block.id}") from None
        self._taken += 1
        if self._taken % 8 == 0:  # freed block buffers go back to the OS (benchmarks/README.md); a trim costs ms
            release_free_memory()

    def _add(self, block: Block, result) -> None:
        # The finish stage (blocks.finish_block) hashed the block, counted its classes and stored its record.
        sha = result.sha256
        if result.from_resume:
            self.stats["blocks_resumed"] += 1
        else:
            self.stats["blocks_computed"] += 1
            if self.plan.aoi_blocks is None or block.id in self.plan.aoi_blocks:
                self.stats["blocks_read"] += 1
        self.done[block.id] = sha
        self.stats["tiles_inferred"] += result.tiles_inferred
        self.stats["tiles_skipped_nodata"] += result.tiles_skipped
        self.stats["model_calls"] += result.model_calls
        if result.worker is not None:
            w = self.workers.setdefault(result.worker, [0, 0.0, result.started, result.ended])
            w[0], w[1] = w[0] + 1, w[1] + result.forward_s
            w[2], w[3] = min(w[2], result.started), max(w[3], result.ended)
        if result.node is not None:
            by_node = self.stats.setdefault("blocks_by_node", {})
            by_node[result.node] = by_node.get(result.node, 0) + 1
        if self.areas is not None:
            if result.area_counts is None:  # a result from elsewhere: the table is read from the mask instead
                self.areas = None
            else:
                self.areas.add(result.area_counts)
        if result.cog is not None:  # tiles the worker compressed
            self.mask_writer.add_tiles(result.cog, result.class_counts)
        else:
            self.mask_writer.write_block(block.window, result.mask, result.class_counts)
        if self.confidence_writer is not None:
            if result.confidence is None:
                raise ValueError(f"block {block.id} arrived without the confidence this scene writes")
            self.confidence_writer.write_block(block.window, result.confidence)
        if self.vectors is not None and self.plan.sieve_px <= 1:
            self.vectors.add(result.polygons)
            self.stats["polygons_by_workers"] = self.stats.get("polygons_by_workers", 0) + result.polygons_written

    def _area_counter(self):
        """The class-area table from the blocks' counts (``geoseg.areas.ClassAreaCounter``), or None: with a sieve
        the written mask is not the blocks' masks, so its table is read from it."""
        if self.plan.sieve_px > 1:
            return None
        from geoseg.areas import ClassAreaCounter

        info = self.plan.info
        try:
            return ClassAreaCounter(info.transform, info.crs, info.shape)
        except ValueError:  # no CRS: mask_class_areas says so in its own words
            return None

    def _mask_writer(self, name: str, levels: int):
        """The mask's writer: tiles compressed by the workers (``levels`` > 0) or by this writer, assembled into the
        COG; GDAL's COG driver for settings other than DEFLATE with overviews."""
        from geoseg.write.cog import MaskWriter, TiledMaskWriter

        info, out, card = self.plan.info, self.cfg.output, self.card
        tags = {"GEOSEG_MODEL": card.name, "GEOSEG_MODEL_VERSION": card.version, "GEOSEG_VERSION": VERSION}
        if out.compress == "deflate" and out.overviews:
            return TiledMaskWriter(self.work, info.shape, info.transform, info.crs, class_names=card.class_names,
                                   palette=card.palette, nodata=NODATA, blocksize_px=out.cog_blocksize_px,
                                   levels=levels, tags=tags, name=name)
        return MaskWriter(
            self.work / f"{name}.scratch.tif", info.shape, info.transform, info.crs, class_names=card.class_names,
            palette=card.palette, nodata=NODATA, blocksize_px=out.cog_blocksize_px, compress=out.compress,
            overviews=out.overviews, tags=tags,
        )

    def _confidence_writer(self):
        """``confidence.tif``'s writer (GDAL's COG driver, DEFLATE): a grey colour ramp, 255 nodata."""
        from geoseg.instances import CONFIDENCE_SCALE_TAG
        from geoseg.write.cog import MaskWriter

        info, out, card = self.plan.info, self.cfg.output, self.card
        tags = {"GEOSEG_MODEL": card.name, "GEOSEG_MODEL_VERSION": card.version, "GEOSEG_VERSION": VERSION,
                "GEOSEG_CONFIDENCE": f"probability of the predicted class * {CONFIDENCE_SCALE}, rounded",
                CONFIDENCE_SCALE_TAG: str(CONFIDENCE_SCALE)}
        grey = {i: (i, i, i, 255) for i in range(CONFIDENCE_SCALE + 1)}
        return MaskWriter(self.work / "confidence.scratch.tif", info.shape, info.transform, info.crs, class_names=[],
                          palette=grey, nodata=CONFIDENCE_NODATA, blocksize_px=out.cog_blocksize_px,
                          compress="deflate", overviews=out.overviews, tags=tags)

    def _sieve_pass(self) -> None:
        """Minimum mapping unit over the finished raw mask, block by block with context (identical to a
        whole-mask sieve); the sieved mask replaces the raw one and feeds the polygons."""
        import rasterio

        from geoseg import vectorize

        raw_path = self.mask_writer.close_scratch()
        size, conn = self.plan.sieve_px, self.cfg.vector.connectivity
        ctx = vectorize.sieve_context_px(size)
        sieved = self._mask_writer("mask.sieved", 0)
        with rasterio.open(raw_path) as raw:
            for block in self.plan.grid.blocks():
                mask = vectorize.sieve_block(vectorize.read_with_context(raw, block.window, ctx), ctx, size, conn)
                sieved.write_block(block.window, mask)
                if self.vectors is not None:
                    self.vectors.add(vectorize.polygonize_block(mask, block.window, nodata=NODATA, connectivity=conn))
        self.mask_writer.abort()  # the raw mask's scratch files
        self.mask_writer = sieved

    def abort(self) -> None:
        """Leave block records for resume; drop scratch files and outputs finished in the work directory (a
        rerun rebuilds them from the block records, and a full disk gets its space back)."""
        self.mask_writer.abort()
        if self.confidence_writer is not None:
            self.confidence_writer.abort()
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
        published: list[tuple[str, bool]] = []
        try:
            for kind, path in local.items():  # run.json is the last key
                tree = Path(path).is_dir()  # a partitioned dataset (polygons.parquet/)
                (store.publish_tree if tree else store.publish_file)(str(path), files[kind], self.storage)
                published.append((files[kind], tree))
        except BaseException:
            for dest, tree in published:  # best effort: a scene is either complete or has no final outputs
                with contextlib.suppress(Exception):
                    (store.remove_tree if tree else store.remove)(dest, self.storage)
            self.abort()
            raise
        store.remove_tree(self.partial, self.storage)
        if self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        release_free_memory()
        return self._record

    def _vector_outputs(self) -> dict[str, Path]:
        """The scene's vector files: the sink's, or, with vector parts, assembled from the workers' parts and the
        sink's seam polygons (GPKG then only when ``vector.formats`` lists it explicitly: one serial writer)."""
        own = self.vectors.finish()
        if not self.plan.vector_parts:
            return own
        from geoseg.plan import parts_dir
        from geoseg.vectorize.parts import assemble

        formats = list(self.cfg.vector.formats)
        if "gpkg" in formats and "formats" not in self.cfg.vector.model_fields_set:
            formats.remove("gpkg")
        return assemble({"parquet": own.get("parquet"), "geojsonl": own.get("geojsonseq")}, parts_dir(self.plan),
                        self.work, formats, crs=self.plan.info.crs, class_names=self.card.class_names,
                        palette=self.card.palette, storage=self.storage)

    def _complete_outputs(self, timings: dict[str, float] | None) -> tuple[dict[str, Path], dict[str, str]]:
        """Every output finished and verified in the work directory: ``({kind: local path}, {kind: dest})``."""
        if self.plan.sieve_px > 1:
            self._sieve_pass()
        local: dict[str, Path] = {"mask": self.mask_writer.finish(self.work / "mask.tif")}
        if self.confidence_writer is not None:  # before the instances: their score is read from it
            local["confidence"] = self.confidence_writer.finish(self.work / "confidence.tif")
        if self.vectors is not None:
            local.update(self._vector_outputs())
            from geoseg.instances import scene_instances  # issue 12: instances.parquet from the final polygons

            local.update(scene_instances(self.cfg, self.card, self.plan, local, self.work))
        files = {kind: store.join(self.out_dir, Path(p).name) for kind, p in local.items()}
        files["manifest"] = store.join(self.out_dir, "manifest.json")
        manifest = {"blocks": dict(sorted(self.done.items())), "failed": dict(sorted(self.failed.items()))}
        local["manifest"] = self.work / "manifest.json"
        local["manifest"].write_bytes(json.dumps(manifest, indent=1).encode())
        self._record = record = {
            "geoseg_version": VERSION,
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
            "class_areas": (self.areas.table(self.card.class_names, NODATA)
                            if self.areas is not None and self.areas.complete
                            else mask_class_areas(local["mask"], self.card.class_names, nodata=NODATA)),
            "timings_s": dict(timings or {}, wall=round(time.time() - self.t0, 3)),
            "inference_workers": inference_workers(self.workers),
            # in a writer process of its own: its CPU seconds from this scene's first block to its outputs (Ray
            # deserializing the blocks included; scenes it wrote at the same time too)
            "writer_cpu_s": (round(time.process_time() - self._cpu_first, 3)
                             if self.own_process and self._cpu_first is not None else None),
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


def inference_workers(workers: dict[str, list]) -> list[dict[str, Any]]:
    """Each inference worker's share of the scene: blocks, seconds inside forward passes, the span from the start
    of its first block to the end of its last, and its busy fraction (forward / span: 1.0 means the model never
    waited for input)."""
    out = []
    for name, (blocks, forward_s, first, last) in sorted(workers.items()):
        span = max(last - first, 1e-9)
        out.append({"worker": name[:16], "blocks": blocks, "forward_s": round(forward_s, 3),
                    "span_s": round(last - first, 3), "busy_fraction": round(min(1.0, forward_s / span), 4),
                    "started_at": round(first, 3)})  # epoch seconds: when its first block began
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj))
