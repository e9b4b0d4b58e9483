"""Partitioned vector output (``vector.single_file: false``): workers write the polygons of their own block, the
scene's writer only those that touch a seam. The same polygons, ids and attributes as the single file, for any
block size and either engine, read back as one table by pyarrow.dataset, geopandas and DuckDB; the workers'
split of a block is exactly what the seam merge would have emitted."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from geoseg.api import predict
from geoseg.errors import ConfigError
from geoseg.vectorize import PolygonSet, SeamMerger, block_windows, polygonize_array, polygonize_block
from geoseg.vectorize.parts import split_final

BASE = ["runtime.progress=none", "output.report=false", "vector.formats=[parquet,geojson,geojsonseq,gpkg]"]


@pytest.mark.parametrize("flags", [False, True], ids=["writer-sorts", "worker-flags"])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_split_final_plus_merge_equals_whole_mask(connectivity, flags):
    """Blocks split by their worker (final polygons out, the rest to the merger) give exactly the polygons of one
    whole-mask polygonize: same ids, classes, rings and vertices; with the pinch vertices flagged by the worker
    (``shared_vertices``, as the pipeline's finish stage does) or found by the merger itself. Random masks:
    many diagonal contacts."""
    from geoseg.vectorize.polygonize import shared_vertices

    rng = np.random.default_rng(connectivity)
    for _ in range(12):
        rows, cols = (int(v) for v in rng.integers(20, 90, 2))
        mask = ((rng.random((rows, cols)) < 0.5).astype(np.uint8) + (rng.random((rows, cols)) < 0.2))
        mask = np.repeat(np.repeat(mask, 2, 0), 2, 1)[:rows, :cols].copy()  # regions larger than a pixel
        mask[rng.random(mask.shape) < 0.02] = 255
        block_px = int(rng.integers(5, 40))
        merger = SeamMerger((rows, cols), block_px=block_px, connectivity=connectivity)
        outs, n_final = [], 0
        wins = block_windows((rows, cols), block_px)
        rng.shuffle(wins)
        for w in wins:
            b = polygonize_block(mask[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width], w,
                                 connectivity=connectivity)
            final, rest = split_final(b, (rows, cols))
            if flags:
                rest.shared = shared_vertices(rest)
            assert len(final) + len(rest) == len(b)
            n_final += len(final)
            outs += [final, merger.add(rest)]
        outs.append(merger.finish())
        got, ref = PolygonSet.concat(outs), polygonize_array(mask, connectivity=connectivity)
        got, ref = got.take(np.argsort(got.polygon_ids)), ref.take(np.argsort(ref.polygon_ids))
        np.testing.assert_array_equal(got.polygon_ids, ref.polygon_ids)
        np.testing.assert_array_equal(got.class_ids, ref.class_ids)
        np.testing.assert_array_equal(got.ring_offsets, ref.ring_offsets)
        np.testing.assert_array_equal(got.coords, ref.coords)
        assert 0 < n_final < len(ref)  # both paths were exercised


@pytest.fixture(scope="module")
def single(tmp_path_factory, s2_chip, dw_model):
    out = tmp_path_factory.mktemp("single")
    (rec,) = predict([str(s2_chip)], str(out), loaded_model=dw_model,
                     overrides=[*BASE, "runtime.engine=local", "tiling.block_px=512", "vector.single_file=true"])
    return rec


def _table(path) -> pd.DataFrame:
    df = gpd.read_parquet(path)
    df["wkb"] = df.geometry.to_wkb()
    return pd.DataFrame(df.drop(columns="geometry")).sort_values("polygon_id").reset_index(drop=True)


def _equal_tables(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) == len(b) > 100
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("engine,block_px,tile_px", [("local", 128, 128), ("local", 192, 64), ("ray", 256, 128)])
def test_partitioned_equals_single_file(tmp_path, s2_chip, dw_model, single, engine, block_px, tile_px, request):
    sets = [*BASE, f"runtime.engine={engine}", f"tiling.block_px={block_px}", f"tiling.tile_px={tile_px}",
            "vector.single_file=false"]
    if engine == "ray":
        request.getfixturevalue("ray_local")
        sets += ["runtime.workers=2", "runtime.cpus_per_worker=0.5"]
    (rec,) = predict([str(s2_chip)], str(tmp_path), loaded_model=dw_model, overrides=sets)
    dataset = Path(rec["outputs"]["parquet"])
    assert dataset.is_dir() and (dataset / "_metadata").is_file()
    parts = sorted(p.name for p in dataset.glob("part-*.parquet"))
    assert len(parts) > 1 and "part-seams.parquet" in parts
    assert rec["stats"]["polygons_by_workers"] > 0
    ref = _table(single["outputs"]["parquet"])
    # geopandas on the directory, and pyarrow.dataset: one table equal to the single file
    _equal_tables(_table(dataset), ref)
    t = pads.dataset(dataset, format="parquet").to_table()
    assert t.num_rows == len(ref) and sorted(t.column("polygon_id").to_pylist()) == ref.polygon_id.tolist()
    # every part is GeoParquet 1.1 with a bbox covering; _metadata sums them
    md = pq.read_metadata(dataset / "_metadata")
    assert md.num_rows == len(ref) and md.num_row_groups == sum(pq.read_metadata(dataset / p).num_row_groups
                                                                 for p in parts)
    for p in parts:
        geo = json.loads(pq.read_schema(dataset / p).metadata[b"geo"])
        assert geo["version"] == "1.1.0" and "bbox" in geo["columns"]["geometry"]["covering"]
    geo = json.loads(pq.read_schema(dataset / "_metadata").metadata[b"geo"])
    single_geo = json.loads(pq.read_schema(single["outputs"]["parquet"]).metadata[b"geo"])
    assert geo["columns"]["geometry"]["bbox"] == single_geo["columns"]["geometry"]["bbox"]
    # GeoJSON, GeoJSONSeq and the GeoPackage (listed explicitly) hold the same features
    for kind in ("geojson", "geojsonseq", "gpkg"):
        a = gpd.read_file(single["outputs"][kind], layer="polygons" if kind == "gpkg" else None)
        b = gpd.read_file(rec["outputs"][kind], layer="polygons" if kind == "gpkg" else None)
        a, b = (x.sort_values("polygon_id").reset_index(drop=True) for x in (a, b))
        pd.testing.assert_frame_equal(pd.DataFrame(a.drop(columns="geometry")),
                                      pd.DataFrame(b.drop(columns="geometry")))
        assert a.geometry.geom_equals_exact(b.geometry, 0).all(), kind
    assert not (Path(rec["outputs"]["mask"]).parent / ".partial").exists()  # the parts were moved, not copied


def test_duckdb_reads_the_partitioned_dataset(tmp_path, s2_chip, dw_model, single):
    duckdb = pytest.importorskip("duckdb")
    (rec,) = predict([str(s2_chip)], str(tmp_path), loaded_model=dw_model, overrides=[
        *BASE, "runtime.engine=local", "tiling.block_px=128", "tiling.tile_px=128", "vector.single_file=false",
        "vector.formats=[parquet]"])
    con = duckdb.connect()
    n, ids, area = con.execute(
        f"SELECT count(*), sum(polygon_id), sum(area_m2) FROM read_parquet('{rec['outputs']['parquet']}/*.parquet')"
    ).fetchone()
    ref = _table(single["outputs"]["parquet"])
    assert n == len(ref) and ids == int(ref.polygon_id.sum())
    assert area == pytest.approx(float(ref.area_m2.sum()), rel=1e-12)
    assert "gpkg" not in rec["outputs"]


def test_default_formats_leave_out_gpkg_when_partitioned(tmp_path, s2_chip, dw_model):
    """GPKG has one writer (SQLite): for a partitioned scene it is written only when listed explicitly."""
    (rec,) = predict([str(s2_chip)], str(tmp_path), loaded_model=dw_model, overrides=[
        "runtime.engine=local", "runtime.progress=none", "output.report=false", "tiling.block_px=256",
        "vector.single_file=false"])
    assert {"parquet", "geojson"} <= set(rec["outputs"]) and "gpkg" not in rec["outputs"]


def test_partitioned_needs_pixel_exact_polygons(tmp_path, s2_chip, dw_model):
    with pytest.raises(ConfigError, match=r"vector.single_file=false needs pixel-exact polygons"):
        predict([str(s2_chip)], str(tmp_path), loaded_model=dw_model, overrides=[
            "runtime.engine=local", "vector.single_file=false", "vector.sieve_px=4"])
