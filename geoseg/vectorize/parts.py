"""Partitioned vector output: workers write the polygons of their own block, the writer only the seams'.

Why: one writer per scene funnelled every polygon of the scene through one process (seam merge, attributes,
encoding, the files), about 0.5 CPU-second per megapixel: one writer could not keep up with one GPU. But most
polygons touch no internal block edge (``split_final``) and are final in the block that saw them, with
their final ``polygon_id`` (the linear index of their first pixel, which needs no global numbering). So the
finish task of each block writes those itself (``write_block_parts``): a GeoParquet part and, when GeoJSON is
requested, a GeoJSONSeq text chunk, under the scene's ``.partial/parts/``. The writer merges only polygons that
touch a seam (work proportional to the blocks' perimeter) and, at the end, assembles the outputs
(``assemble``):

- ``polygons.parquet/``: a directory of GeoParquet 1.1 parts (one per block with final polygons, named by block,
  plus ``part-seams.parquet`` from the writer), each with its ``geo`` metadata and bbox covering column, and a
  ``_metadata`` summary (every part's footer, so readers plan range reads without opening each part).
  ``pyarrow.dataset``, geopandas and DuckDB read it as one table.
- ``polygons.geojson`` / ``polygons.geojsonl``: the chunks' bytes concatenated (no parsing).
- ``polygons.gpkg`` only on request: SQLite has one writer, so it is filled from the parts, serially.

The same polygons with the same ids and attributes for every block size and worker count; only the split into
parts and the row order differ (``vector.single_file`` writes one canonical file through the single writer).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from geoseg._ragged import take as take_ragged
from geoseg.io import store
from geoseg.vectorize.attributes import polygon_table, resolve_classes, scene_extent
from geoseg.vectorize.polygonize import CORNERS, BlockPolygons, E, N, PolygonSet, S, W, polygon_keys
from geoseg.vectorize.seams import corner_polygon

__all__ = ["split_final", "write_block_parts", "assemble", "part_kinds", "SEAMS_PART"]

SEAMS_PART = "part-seams.parquet"


def split_final(block: BlockPolygons, shape: tuple[int, int]) -> tuple[PolygonSet, BlockPolygons]:
    """(the block's polygons that touch no internal block edge -- final as they are, with their ids --, the block
    with only the others, for the seam merge). Which edges are internal follows from the block's window and the
    raster's ``shape`` alone, so a worker can split its own block: ``seams.SeamMerger.add`` of the rest emits exactly
    what it would have emitted for the whole block, less the final polygons."""
    rows, cols = int(shape[0]), int(shape[1])
    col_off, row_off, width, height = block.window
    internal = {W: col_off > 0, E: col_off + width < cols, N: row_off > 0, S: row_off + height < rows}
    touch = np.zeros(len(block), dtype=bool)
    for side, inside in internal.items():
        if inside:
            touch |= (block.sides & side) != 0
    if block.connectivity == 8:  # a diagonal neighbour exists where both sides at that corner are internal
        for di, dj in CORNERS:
            if internal[N if di < 0 else S] and internal[W if dj < 0 else E]:
                p = corner_polygon(block, di, dj)
                if p is not None:
                    touch[p] = True
    final = np.flatnonzero(~touch)
    keys = polygon_keys(block.coords, block.ring_offsets, block.poly_offsets, cols)
    coords, ring_off, poly_off = take_ragged(block.coords, block.ring_offsets, block.poly_offsets, final)
    return (PolygonSet(coords, ring_off, poly_off, block.class_ids[final], keys[final]),
            block.subset(np.flatnonzero(touch)))


def part_kinds(formats: Sequence[str]) -> list[str]:
    """What each block writes: always a GeoParquet part (the GPKG is filled from them too), GeoJSONSeq text when
    either GeoJSON format is requested."""
    return ["parquet"] + (["geojsonl"] if {"geojson", "geojsonseq"} & set(formats) else [])


def write_block_parts(polys: PolygonSet, parts_dir: str, name: str, *, vector_cfg, shape, transform, crs,
                      class_names: Sequence[str], scene: str, model: str, model_version: str,
                      storage=None) -> int:
    """Write a block's final polygons as ``{parts_dir}/parquet/part-{name}.parquet`` (and a GeoJSONSeq chunk
    ``{parts_dir}/geojsonl/part-{name}.geojsonl`` when GeoJSON is requested), each published whole. Polygons in
    ``polygon_id`` order, filtered to the kept classes. Returns the number written (no file when none)."""
    from geoseg.write.features import FeatureBatch
    from geoseg.write.geojson import GeoJSONWriter
    from geoseg.write.parquet import GeoParquetWriter

    keep = resolve_classes(vector_cfg.include_classes, vector_cfg.exclude_classes, list(class_names))
    if keep is not None and len(polys):
        polys = polys.take(np.isin(polys.class_ids, np.fromiter(keep, dtype=np.int64)))
    if not len(polys):
        return 0
    polys = polys.take(np.argsort(polys.polygon_ids, kind="stable"))
    cols = polygon_table(polys, None, transform=transform, crs=crs, class_names=list(class_names), scene=scene,
                         model=model, model_version=model_version, pixel_exact=True, arrow_strings=True)
    batch = FeatureBatch.from_ragged(polys.map_coords(transform), polys.ring_offsets, polys.poly_offsets, cols,
                                     polys.map_bounds(transform))
    with tempfile.TemporaryDirectory(prefix="geoseg-part-") as tmp:
        for kind in part_kinds(vector_cfg.formats):
            local = Path(tmp) / f"part-{name}.{kind}"
            w = (GeoParquetWriter(local, crs, extent=scene_extent(shape, transform)) if kind == "parquet"
                 else GeoJSONWriter(local, crs, seq=True))
            with w:
                w.write(batch)
            store.publish_file(local, store.join(parts_dir, kind, local.name), storage)
    return len(polys)


def _listed(parts_dir: str, kind: str, storage) -> list[str]:
    """The parts of one kind, sorted by name (block order: a deterministic assembly)."""
    names = store.list_dir(store.join(parts_dir, kind), storage)
    return sorted(p for p in names if os.path.basename(p).startswith("part-") and p.endswith(f".{kind}"))


def _fetch(path: str, dest: Path, storage) -> None:
    """A part into the writer's work directory: moved when local, downloaded from S3."""
    if store.is_s3(path):
        dest.write_bytes(store.read_bytes(path, storage))
    else:
        os.replace(path, dest)


def assemble(local: dict[str, Path], parts_dir: str, work: Path, formats: Sequence[str], *, crs,
             class_names: Sequence[str], palette, storage=None) -> dict[str, Path]:
    """The scene's vector outputs from the workers' parts and the writer's own seam polygons (``local``:
    ``{"parquet": work/polygons.parquet/part-seams.parquet, "geojsonl": work/seams.geojsonl}`` as the writer's
    ``PolygonSink`` finished them). Returns ``{format: path}`` like a single-file sink."""
    out: dict[str, Path] = {}
    dataset = work / "polygons.parquet"
    dataset.mkdir(exist_ok=True)
    seams = local.get("parquet")
    for path in _listed(parts_dir, "parquet", storage):
        _fetch(path, dataset / Path(path).name, storage)
    if seams is not None and _is_empty_parquet(seams):
        seams.unlink()  # no border polygons: no part (an empty part's schema would not be the others')
    write_metadata(dataset)
    if "parquet" in formats:
        out["parquet"] = dataset
    if {"geojson", "geojsonseq"} & set(formats):
        chunks = _listed(parts_dir, "geojsonl", storage)
        if "geojson" in formats:
            out["geojson"] = _concat_text(work / "polygons.geojson", chunks, local.get("geojsonl"), storage,
                                          collection=True)
        if "geojsonseq" in formats:
            out["geojsonseq"] = _concat_text(work / "polygons.geojsonl", chunks, local.get("geojsonl"), storage,
                                             collection=False)
    if local.get("geojsonl") is not None:
        local["geojsonl"].unlink(missing_ok=True)
    if "gpkg" in formats:
        out["gpkg"] = _gpkg_from_parts(dataset, work / "polygons.gpkg", crs, class_names, palette)
    if "parquet" not in formats:
        shutil.rmtree(dataset, ignore_errors=True)
    return out


def _is_empty_parquet(path: Path) -> bool:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows == 0


def write_metadata(dataset: Path) -> Path:
    """``_metadata``: every part's footer (row groups, column statistics incl. the bbox covering) with its file
    path, and the ``geo`` key whose bbox and geometry types cover all parts."""
    import pyarrow.parquet as pq

    parts = sorted(dataset.glob("part-*.parquet"))
    collected, schema, geo = [], None, None
    for part in parts:
        f = pq.ParquetFile(part)
        md = f.metadata
        md.set_file_path(part.name)
        collected.append(md)
        g = json.loads(f.schema_arrow.metadata[b"geo"]) if f.schema_arrow.metadata else None
        if schema is None:
            schema, geo = f.schema_arrow, g
        elif g is not None:
            col, other = geo["columns"]["geometry"], g["columns"]["geometry"]
            col["geometry_types"] = sorted(set(col["geometry_types"]) | set(other["geometry_types"]))
            if "bbox" in other:
                b, o = col.get("bbox", other["bbox"]), other["bbox"]
                col["bbox"] = [min(b[0], o[0]), min(b[1], o[1]), max(b[2], o[2]), max(b[3], o[3])]
    if schema is None:  # no polygon at all: an empty part carries the columns
        from geoseg.write.parquet import GeoParquetWriter

        with GeoParquetWriter(dataset / "part-empty.parquet", None):
            pass
        return write_metadata(dataset)
    schema = schema.with_metadata({**(schema.metadata or {}), b"geo": json.dumps(geo).encode()})
    tmp = dataset / "._metadata.tmp"
    pq.write_metadata(schema, tmp, metadata_collector=collected)
    os.replace(tmp, dataset / "_metadata")
    return dataset / "_metadata"


def _concat_text(dest: Path, chunks: list[str], own: Path | None, storage, *, collection: bool) -> Path:
    """GeoJSONSeq chunks (one feature per line) -> one GeoJSONSeq file, or one FeatureCollection (lines joined
    by ",\\n" between the header and the footer). Bytes only: nothing is parsed."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    first = True
    with open(tmp, "wb") as out:
        if collection:
            out.write(b'{"type":"FeatureCollection","features":[\n')
        for src in [*chunks, *([str(own)] if own is not None and own.exists() else [])]:
            data = store.read_bytes(src, storage) if store.is_s3(src) else Path(src).read_bytes()
            data = data.rstrip(b"\n")
            if not data:
                continue
            if collection:
                out.write((b"" if first else b",\n") + data.replace(b"\n", b",\n"))
            else:
                out.write(data + b"\n")
            first = False
        if collection:
            out.write(b"\n]}\n")
    os.replace(tmp, dest)
    return dest


def _gpkg_from_parts(dataset: Path, dest: Path, crs, class_names: Sequence[str], palette) -> Path:
    """The GeoPackage, filled from the parts in name order (SQLite: one writer; requested explicitly)."""
    import pyarrow.dataset as ds
    import shapely

    from geoseg.write.features import FeatureBatch
    from geoseg.write.gpkg import GPKGWriter

    with GPKGWriter(dest, crs, layer="polygons", palette=palette, class_names=list(class_names)) as w:
        for batch in ds.dataset(sorted(str(p) for p in dataset.glob("part-*.parquet")),
                                format="parquet").to_batches():
            cols = {k: batch.column(k).to_numpy(zero_copy_only=False)
                    for k in batch.schema.names if k not in ("geometry", "bbox")}
            w.write(FeatureBatch(shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False)), cols))
    return dest
