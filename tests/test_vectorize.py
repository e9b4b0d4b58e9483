"""Block-wise vectorization equals one whole-mask polygonize; sieve, simplification and attributes.

The reference is always a single ``rasterio.features.shapes`` call on the whole mask (and ``gdal_polygonize``
when Debian's gdal-bin is installed). Polygons are matched by ``polygon_id`` (the linear index of a polygon's
top-left pixel), which is how a block split could be told apart from the whole.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyproj
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio import features
from rasterio.windows import Window

from geoseg.config import VectorConfig
from geoseg.errors import InputError
from geoseg.vectorize import (
    PolygonSet,
    SeamMerger,
    block_windows,
    polygon_table,
    polygonize_array,
    polygonize_block,
    read_with_context,
    resolve_classes,
    sieve_array,
    sieve_block,
    sieve_context_px,
    sieve_size_px,
    vectorize_file,
)

NAMES = ["", "developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]


# ------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="session")
def strata(shared_data) -> tuple[np.ndarray, dict]:
    """The real 7-class land-cover raster as a uint8 mask (255 = nodata) and its profile."""
    with rasterio.open(shared_data / "landcover_nc" / "strata.tif") as src:
        a = src.read(1)
        profile = src.profile
        nodata = src.nodata
    return np.where(a == nodata, 255, a).astype(np.uint8), profile


@pytest.fixture(scope="session")
def strata_tif(strata, tmp_path_factory) -> Path:
    mask, profile = strata
    path = tmp_path_factory.mktemp("strata") / "strata_mask.tif"
    prof = dict(profile, dtype="uint8", nodata=255, driver="GTiff", tiled=True, blockxsize=128, blockysize=128)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(mask, 1)
        dst.update_tags(GEOSEG_CLASS_NAMES=json.dumps(NAMES))
        dst.write_colormap(1, {1: (196, 40, 27, 255), 5: (57, 125, 73, 255), 6: (65, 155, 223, 255)})
    return path


def worst_case_mask() -> np.ndarray:
    """Synthetic worst case: a 1-px snake across every block border, nested holes, single-pixel diagonals,
    checkerboards, nodata islands (also inside polygons) and noise."""
    h, w = 150, 170
    rng = np.random.default_rng(7)
    m = np.zeros((h, w), np.uint8)
    for i, r in enumerate(range(2, 70, 4)):  # serpentine of class 1, one pixel wide
        m[r, 2 : w - 2] = 1
        c = w - 3 if i % 2 == 0 else 2
        m[r : r + 5, c] = 1
    for k, (r0, c0) in enumerate([(75, 5), (75, 60), (110, 20)]):  # nested rings: 2 > 3 > 2 > nodata
        m[r0 : r0 + 34, c0 : c0 + 34] = 2
        m[r0 + 3 : r0 + 31, c0 + 3 : c0 + 31] = 3
        m[r0 + 7 : r0 + 27, c0 + 7 : c0 + 27] = 2
        m[r0 + 12 : r0 + 22, c0 + 12 : c0 + 22] = 255 if k != 1 else 4
        m[r0 + 16, c0 + 16] = 5  # single pixel island
    yy, xx = np.mgrid[0:40, 0:50]
    m[75:115, 110:160] = np.where((yy + xx) % 2 == 0, 4, 5)  # checkerboard: diagonals everywhere
    for k in range(45):  # diagonal staircase lines of single pixels
        m[72 + k // 2 + (k % 2), 100 + k % 9] = 6
        m[118 + k % 30, 100 + k] = 6
    noise = rng.integers(0, 4, (25, 40)).astype(np.uint8)
    m[120:145, 125:165] = noise
    m[rng.random((h, w)) < 0.01] = 255  # nodata islands, single pixels
    m[5:9, 40:44] = 255
    return m


# ------------------------------------------------------------------------------------------ helpers


def reference_shapes(mask: np.ndarray, connectivity: int) -> dict[int, tuple[int, object]]:
    """{polygon_id: (class, shapely polygon)} from ONE rasterio.features.shapes of the whole mask."""
    cols = mask.shape[1]
    out = {}
    for geom, value in features.shapes(mask, mask=mask != 255, connectivity=connectivity, transform=Affine.identity()):
        ext = np.asarray(geom["coordinates"][0], dtype=np.int64)
        k = np.lexsort((ext[:, 0], ext[:, 1]))[0]
        pid = int(ext[k, 1]) * cols + int(ext[k, 0])
        assert pid not in out
        out[pid] = (int(value), shapely.geometry.shape(geom))
    return out


def blockwise(mask: np.ndarray, block_px: int, connectivity: int, seed: int | None = None,
              windows: list[Window] | None = None, flags: bool = False) -> PolygonSet:
    """The merger's output over ``mask``'s blocks (``flags``: with the workers' pinch flags, ``shared_vertices``)."""
    from geoseg.vectorize.polygonize import shared_vertices

    wins = list(windows) if windows is not None else block_windows(mask.shape, block_px)
    if seed is not None:
        random.Random(seed).shuffle(wins)
    merger = (SeamMerger(mask.shape, windows=wins, connectivity=connectivity) if windows is not None
              else SeamMerger(mask.shape, block_px=block_px, connectivity=connectivity))
    parts = []
    for w in wins:
        c, r, ww, hh = int(w.col_off), int(w.row_off), int(w.width), int(w.height)
        b = polygonize_block(mask[r : r + hh, c : c + ww], w, connectivity=connectivity)
        if flags:
            b.shared = shared_vertices(b)
        parts.append(merger.add(b))
    assert merger.open_polygons == 0
    parts.append(merger.finish())
    return PolygonSet.concat(parts)


def assert_equal_to_reference(got: PolygonSet, ref: dict[int, tuple[int, object]]) -> None:
    ids = got.polygon_ids.tolist()
    assert len(ids) == len(set(ids)), "duplicate polygon ids"
    assert sorted(ids) == sorted(ref), f"polygon count {len(ids)} vs whole-mask {len(ref)}"
    geoms = got.to_shapely()
    ref_geoms = np.array([ref[i][1] for i in ids], dtype=object)
    assert got.class_ids.tolist() == [ref[i][0] for i in ids]
    area, ref_area = shapely.area(geoms), shapely.area(ref_geoms)
    for c in np.unique(got.class_ids):
        sel = got.class_ids == c
        assert area[sel].sum() == ref_area[sel].sum()
    total = ref_area.sum()
    # 8-connected polygons pinch at vertices (OGC-invalid, GEOS overlay may refuse them): those are compared
    # ring by ring below; the symmetric difference is measured on all valid ones
    valid = shapely.is_valid(geoms) & shapely.is_valid(ref_geoms)
    diff = shapely.symmetric_difference(geoms[valid], ref_geoms[valid])
    assert shapely.area(diff).sum() < 1e-9 * total
    # identical rings, vertex for vertex: the seams left no collinear vertices and lost none
    assert shapely.equals_exact(shapely.normalize(geoms), shapely.normalize(ref_geoms)).all()


# ------------------------------------------------------------------------------------------ seam merge


@pytest.mark.parametrize("connectivity", [4, 8])
def test_real_mask_blockwise_equals_whole(strata, connectivity):
    mask, _ = strata
    ref = reference_shapes(mask, connectivity)
    assert len(ref) > 500
    for block_px, seed in ((64, None), (100, 3), (256, 5)):
        assert_equal_to_reference(blockwise(mask, block_px, connectivity, seed), ref)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_worst_case_blockwise_equals_whole(connectivity):
    mask = worst_case_mask()
    ref = reference_shapes(mask, connectivity)
    for block_px, seed in ((7, 1), (16, None), (33, 2)):
        for flags in (False, True):  # pinch vertices found by the merger, or flagged by the workers
            assert_equal_to_reference(blockwise(mask, block_px, connectivity, seed, flags=flags), ref)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_irregular_block_grid(connectivity):
    mask = worst_case_mask()
    cols, rows = [0, 5, 6, 40, 97, 98, 150, mask.shape[1]], [0, 1, 33, 34, 80, mask.shape[0]]
    wins = [Window(c0, r0, c1 - c0, r1 - r0) for r0, r1 in zip(rows, rows[1:]) for c0, c1 in zip(cols, cols[1:])]
    got = blockwise(mask, 0, connectivity, seed=4, windows=wins)
    assert_equal_to_reference(got, reference_shapes(mask, connectivity))


def test_random_masks_exact_rings():
    """Exact ring sequences (start vertex and order included) on random masks and tiny blocks."""
    rng = np.random.default_rng(11)
    for trial in range(10):
        h, w = rng.integers(3, 24, 2)
        mask = rng.integers(0, rng.integers(2, 5), (h, w)).astype(np.uint8)
        mask[rng.random((h, w)) < 0.08] = 255
        for connectivity in (4, 8):
            whole = polygonize_array(mask, connectivity=connectivity)
            want = {int(i): [r.tolist() for r in whole.rings(k)] for k, i in enumerate(whole.polygon_ids)}
            for block_px, flags in ((1, False), (3, False), (1, True), (3, True)):
                got = blockwise(mask, block_px, connectivity, seed=trial, flags=flags)
                have = {int(i): [r.tolist() for r in got.rings(k)] for k, i in enumerate(got.polygon_ids)}
                assert have.keys() == want.keys()
                for pid, rings in want.items():
                    assert have[pid][0] == rings[0]
                    assert sorted(have[pid][1:]) == sorted(rings[1:])


def test_merger_rejects_bad_blocks():
    mask = worst_case_mask()
    merger = SeamMerger(mask.shape, block_px=64)
    bp = polygonize_block(mask[:64, :64], Window(0, 0, 64, 64))
    merger.add(bp)
    with pytest.raises(InputError, match="twice"):
        merger.add(bp)
    with pytest.raises(InputError, match="grid"):
        merger.add(polygonize_block(mask[:32, :32], Window(0, 0, 32, 32)))


def test_merger_holds_only_open_seams(strata):
    """Row-major order: once a block row is done, at most the polygons touching the next row stay open."""
    mask, _ = strata
    merger = SeamMerger(mask.shape, block_px=64)
    peak, total = 0, 0
    for w in block_windows(mask.shape, 64):
        c, r = int(w.col_off), int(w.row_off)
        total += len(merger.add(polygonize_block(mask[r : r + 64, c : c + 64], w)))
        peak = max(peak, merger.open_polygons)
    total += len(merger.finish())
    assert peak < total / 3


@pytest.mark.skipif(shutil.which("gdal_polygonize.py") is None and shutil.which("gdal_polygonize") is None,
                    reason="gdal_polygonize not installed (apt-get install gdal-bin python3-gdal)")
@pytest.mark.parametrize("connectivity", [4, 8])
def test_against_gdal_polygonize(strata_tif, tmp_path, connectivity):
    import pyogrio

    exe = shutil.which("gdal_polygonize.py") or shutil.which("gdal_polygonize")
    out = tmp_path / "gdal.gpkg"
    cmd = [exe, "-q"] + (["-8"] if connectivity == 8 else []) + [str(strata_tif), "-f", "GPKG", str(out), "p", "cls"]
    subprocess.run(cmd, check=True)
    gdal = pyogrio.read_dataframe(out, layer="p")
    cfg = VectorConfig(formats=["parquet"], connectivity=connectivity)
    res = vectorize_file(strata_tif, tmp_path / "geoseg.parquet", cfg, block_px=100, workers=1)
    import geopandas as gpd

    ours = gpd.read_parquet(res.paths["parquet"])
    assert len(ours) == len(gdal)
    with rasterio.open(strata_tif) as src:
        t, cols = src.transform, src.width

    def pid(g) -> int:  # GDAL's map coordinates back to pixel corners (north-up grid)
        ring = g.exterior if g.geom_type == "Polygon" else g.geoms[0].exterior
        xy = shapely.get_coordinates(ring)
        xy = np.rint(np.column_stack([(xy[:, 0] - t.c) / t.a, (xy[:, 1] - t.f) / t.e])).astype(np.int64)
        k = np.lexsort((xy[:, 0], xy[:, 1]))[0]
        return int(xy[k, 1]) * cols + int(xy[k, 0])

    gdal["polygon_id"] = [pid(g) for g in gdal.geometry]
    gdal = gdal.set_index("polygon_id").loc[ours.polygon_id]
    assert (gdal["cls"].to_numpy() == ours["class_id"].to_numpy()).all()
    a, b = shapely.make_valid(np.asarray(ours.geometry.values)), shapely.make_valid(np.asarray(gdal.geometry.values))
    total = shapely.area(b).sum()
    assert abs(shapely.area(a).sum() - total) < 1e-9 * total
    assert shapely.area(shapely.symmetric_difference(a, b)).sum() < 1e-9 * total


# ------------------------------------------------------------------------------------------ sieve


def sieve_blockwise(mask: np.ndarray, size_px: int, connectivity: int, block_px: int) -> np.ndarray:
    ctx = sieve_context_px(size_px)
    padded = np.pad(mask, ctx, constant_values=255)  # what read_with_context returns at the raster edge
    out = np.empty_like(mask)
    for w in block_windows(mask.shape, block_px):
        c, r, ww, hh = int(w.col_off), int(w.row_off), int(w.width), int(w.height)
        out[r : r + hh, c : c + ww] = sieve_block(padded[r : r + hh + 2 * ctx, c : c + ww + 2 * ctx], ctx, size_px,
                                                  connectivity)
    return out


def region_sizes(mask: np.ndarray, connectivity: int) -> list[tuple[int, float]]:
    return [(int(v), shapely.geometry.shape(g).area)
            for g, v in features.shapes(mask, mask=mask != 255, connectivity=connectivity)]


@pytest.mark.parametrize("connectivity", [4, 8])
def test_sieve_blockwise_equals_whole(strata, connectivity):
    mask, _ = strata
    for size_px in (4, 12):
        whole = sieve_array(mask, size_px, connectivity)
        assert ((whole == 255) == (mask == 255)).all(), "nodata must neither grow nor shrink"
        assert (whole != mask).sum() > 30
        for block_px in (37, 64, 200):
            assert (sieve_blockwise(mask, size_px, connectivity, block_px) == whole).all()


def test_sieve_worst_case_and_rule():
    mask = worst_case_mask()
    for connectivity in (4, 8):
        whole = sieve_array(mask, 5, connectivity)
        for block_px in (9, 30):
            assert (sieve_blockwise(mask, 5, connectivity, block_px) == whole).all()
        assert ((whole == 255) == (mask == 255)).all()
    # the rule: a small region takes the class of its large neighbour with the most contacts
    m = np.full((9, 9), 1, np.uint8)
    m[:, 5:] = 2
    m[4, 4] = 3  # 1-px region touching class 1 on three sides and class 2 on one
    m[0, 0] = 255
    out = sieve_array(m, 2, 4)
    assert out[4, 4] == 1 and out[0, 0] == 255 and (out[m != 3] == m[m != 3]).all()


def test_sieve_reads_context_from_file(strata_tif, strata):
    mask, _ = strata
    size = 6
    ctx = sieve_context_px(size)
    whole = sieve_array(mask, size, 4)
    with rasterio.open(strata_tif) as src:
        for w in block_windows(mask.shape, 150):
            c, r, ww, hh = int(w.col_off), int(w.row_off), int(w.width), int(w.height)
            got = sieve_block(read_with_context(src, w, ctx), ctx, size, 4)
            assert (got == whole[r : r + hh, c : c + ww]).all()
    with pytest.raises(InputError, match="context"):
        sieve_block(mask, 2, size, 4)


def test_sieve_size_from_area(strata):
    _, profile = strata
    t = profile["transform"]
    assert sieve_size_px(0, 0.0, t, profile["crs"], (10, 10)) == 0
    assert sieve_size_px(3, 812.25 * 10, t, profile["crs"], (10, 10)) == 10  # 28.5 m pixels
    assert sieve_size_px(30, 812.25 * 10, t, profile["crs"], (10, 10)) == 30


def test_vectorize_file_with_sieve_matches_sieved_mask(strata_tif, strata, tmp_path):
    mask, profile = strata
    cfg = VectorConfig(formats=["parquet"], sieve_px=8)
    res = vectorize_file(strata_tif, tmp_path / "p.parquet", cfg, block_px=128, workers=1)
    t = pq.read_table(res.paths["parquet"], columns=["polygon_id", "class_id", "area_m2"])
    ref = polygonize_array(sieve_array(mask, 8, 4))
    assert sorted(t.column("polygon_id").to_pylist()) == sorted(ref.polygon_ids.tolist())


# ------------------------------------------------------------------------------------------ outputs


def test_vectorize_file_attributes_and_classes(strata_tif, strata, tmp_path):
    mask, profile = strata
    px_area = abs(profile["transform"].a * profile["transform"].e)
    cfg = VectorConfig(formats=["parquet", "geojson"])
    res = vectorize_file(strata_tif, tmp_path / "out", cfg, block_px=128, workers=2, model="m", model_version="1")
    assert sorted(p.name for p in res) == ["polygons.geojson", "polygons.parquet"]
    t = pq.read_table(res.paths["parquet"]).to_pandas()
    assert len(t) == res.polygons == len(reference_shapes(mask, 4))
    counts = np.bincount(mask[mask != 255], minlength=8)
    for c in range(1, 8):
        assert t.loc[t.class_id == c, "area_m2"].sum() == pytest.approx(counts[c] * px_area, rel=1e-12)
        assert set(t.loc[t.class_id == c, "class_name"]) == {NAMES[c]}
    assert set(t.scene) == {"strata_mask"} and set(t.model) == {"m"} and set(t.model_version) == {"1"}
    assert (t.perimeter_m > 0).all() and t.polygon_id.is_unique
    # keep only some classes, by name and id
    cfg = VectorConfig(formats=["parquet"], include_classes=["forest", 6], exclude_classes=["water"])
    res = vectorize_file(strata_tif, tmp_path / "forest.parquet", cfg, block_px=200, workers=1)
    t2 = pq.read_table(res.paths["parquet"]).to_pandas()
    assert set(t2.class_id) == {5} and len(t2) == (t.class_id == 5).sum()
    with pytest.raises(InputError, match="unknown class 'mangrove'"):
        resolve_classes(["mangrove"], [], NAMES)


def test_simplify_keeps_coverage_and_is_partition_invariant(strata_tif, tmp_path):
    import geopandas as gpd

    def run(block_px: int, band_px: int) -> np.ndarray:
        cfg = VectorConfig(formats=["parquet"], simplify_tolerance_m=40.0)
        res = vectorize_file(strata_tif, tmp_path / f"s{block_px}_{band_px}.parquet", cfg, block_px=block_px,
                             workers=1, band_px=band_px)
        return np.asarray(gpd.read_parquet(res.paths["parquet"]).sort_values("polygon_id").geometry.values)

    plain = vectorize_file(strata_tif, tmp_path / "plain.parquet", VectorConfig(formats=["parquet"]), workers=1)
    full = np.asarray(gpd.read_parquet(plain.paths["parquet"]).geometry.values)
    total = shapely.area(full).sum()
    one_band = run(200, 4096)  # the whole raster is one band: one coverage_simplify of every polygon
    banded = run(64, 100)  # 5 bands: edges between bands stay exact
    for g in (one_band, banded):
        assert shapely.coverage_is_valid(g)  # no overlaps, shared edges identical
        assert shapely.is_valid(g).all()
        # the outer boundary is kept, inner edges move together: no gaps, no overlaps
        assert shapely.area(g).sum() == pytest.approx(total, rel=1e-9)
        assert shapely.union_all(g).area == pytest.approx(total, rel=1e-9)
    assert shapely.get_num_coordinates(one_band).sum() < 0.6 * shapely.get_num_coordinates(full).sum()
    # the same bands give the same result for any block size and order
    assert shapely.equals_exact(banded, run(128, 100)).all()


def test_geographic_area_and_perimeter(s2_chip, tmp_path):
    """EPSG:4326 mask on the real Sentinel-2 chip's grid: geodesic attributes, not degrees."""
    import geopandas as gpd

    with rasterio.open(s2_chip) as src:
        nir = src.read(8).astype(np.float64)
        profile = src.profile
    assert profile["crs"].is_geographic
    valid = nir > 0
    classes = np.digitize(nir, np.quantile(nir[valid], [0.25, 0.5, 0.75])).astype(np.uint8)
    mask = np.where(valid, classes, 255).astype(np.uint8)
    path = tmp_path / "geo_mask.tif"
    prof = dict(profile, count=1, dtype="uint8", nodata=255)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(mask, 1)
    res = vectorize_file(path, tmp_path / "p.parquet", VectorConfig(formats=["parquet"]), block_px=128, workers=1)
    df = gpd.read_parquet(res.paths["parquet"])
    big = df.nlargest(150, "area_m2")
    geod = pyproj.Geod(ellps="WGS84")
    ref_area = np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in big.geometry])
    np.testing.assert_allclose(big.area_m2, ref_area, rtol=1e-4)  # cells vs geodesic edges
    # perimeter_m is the whole boundary (exterior and holes), like shapely's length
    ref_perimeter = [sum(geod.line_length(*r.xy) for r in [g.exterior, *g.interiors]) for g in big.geometry]
    np.testing.assert_allclose(big.perimeter_m, ref_perimeter, rtol=1e-9)
    # against an equal-area projection of the same polygons
    laea = df.to_crs("+proj=laea +lat_0={} +lon_0={} +datum=WGS84".format(*reversed(
        shapely.get_coordinates(df.geometry.iloc[0].centroid)[0])))
    np.testing.assert_allclose(df.area_m2.sum(), laea.area.sum(), rtol=1e-5)
    # and the pixel count times the cell area at the chip's centre
    t = profile["transform"]
    lat = t.f + t.e * mask.shape[0] / 2
    cell = geod.geometry_area_perimeter(shapely.box(t.c, lat, t.c + t.a, lat + abs(t.e)))[0]
    assert df.area_m2.sum() == pytest.approx(valid.sum() * abs(cell), rel=1e-3)


def test_polygon_table_projected_units(strata):
    """A CRS in US survey feet converts areas and perimeters to metres."""
    mask, _ = strata
    polys = polygonize_array(mask[:50, :50])
    t = Affine(10.0, 0, 1000.0, 0, -10.0, 5000.0)
    ft = pyproj.CRS.from_epsg(2264)  # NAD83 / North Carolina (ftUS)
    geoms = polys.to_shapely(t)
    cols = polygon_table(polys, geoms, transform=t, crs=ft, class_names=NAMES)
    k = 1200 / 3937
    np.testing.assert_allclose(cols["area_m2"], shapely.area(geoms) * k * k, rtol=1e-12)
    np.testing.assert_allclose(cols["perimeter_m"], shapely.length(geoms) * k, rtol=1e-12)
    assert cols["area_m2"].sum() == pytest.approx((mask[:50, :50] != 255).sum() * 100 * k * k)


def test_outputs_byte_identical_for_any_block_split(strata_tif, tmp_path):
    """Bands released in raster order and sorted by polygon_id: the same bytes for every split and order."""
    import hashlib

    cfg = VectorConfig(formats=["parquet", "gpkg", "geojson", "geojsonseq"])
    digests = []
    for block_px, workers in ((128, 1), (64, 2), (300, 1)):
        res = vectorize_file(strata_tif, tmp_path / f"b{block_px}", cfg, block_px=block_px, workers=workers,
                             band_px=100)
        digests.append({k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in res.paths.items()})
    assert digests[0] == digests[1] == digests[2]
    ids = pq.read_table(tmp_path / "b128" / "polygons.parquet", columns=["polygon_id"]).column(0).to_numpy()
    assert len(ids) == len(np.unique(ids))


def test_cli_vectorize_refuses_to_overwrite(strata_tif, tmp_path):
    from click.testing import CliRunner

    from geoseg.cli import main

    out = tmp_path / "p.parquet"
    args = ["vectorize", str(strata_tif), "--out", str(out), "--block-px", "128", "--workers", "1"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert str(out) in first.output and pq.read_metadata(out).num_rows > 0
    before = out.read_bytes()
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "exists" in again.output and str(out) in again.output
    assert out.read_bytes() == before and list(tmp_path.iterdir()) == [out]  # no temp file left behind
    forced = CliRunner().invoke(main, args + ["--overwrite"])
    assert forced.exit_code == 0, forced.output
    assert out.read_bytes() == before  # same mask, same settings: byte-identical


def test_write_slices_do_not_change_files(strata_tif, tmp_path):
    """Bands are written in slices of write_chunk polygons (bounded transients); the files stay the same bytes."""
    cfg = VectorConfig(formats=["parquet", "gpkg", "geojson"])
    whole = vectorize_file(strata_tif, tmp_path / "whole", cfg, block_px=128, workers=1, write_chunk=10**9)
    sliced = vectorize_file(strata_tif, tmp_path / "sliced", cfg, block_px=128, workers=1, write_chunk=7)
    assert whole.polygons == sliced.polygons > 7
    for a, b in zip(sorted(whole), sorted(sliced)):
        assert Path(a).read_bytes() == Path(b).read_bytes(), Path(a).name


def test_map_bounds_equal_bounds_of_mapped_coords(strata):
    """``PolygonSet.map_bounds`` (integer extremes, then the transform) is bit-identical to the bounds of the
    mapped coordinates for north-up grids of either axis direction, and declines a rotated grid."""
    mask, _ = strata
    polys = polygonize_array(mask[:200, :300], connectivity=4)
    starts = polys.ring_offsets[polys.poly_offsets[:-1]]
    for t in (Affine(28.5, 0, 630000.3, 0, -28.5, 228000.7), Affine(-0.001, 0, 12.34, 0, 0.002, -5.6)):
        xy = polys.map_coords(t)
        want = np.column_stack([np.minimum.reduceat(xy[:, 0], starts), np.minimum.reduceat(xy[:, 1], starts),
                                np.maximum.reduceat(xy[:, 0], starts), np.maximum.reduceat(xy[:, 1], starts)])
        assert np.array_equal(polys.map_bounds(t), want)
    assert polys.map_bounds(Affine(1, 0.5, 0, 0.5, -1, 0)) is None


def test_gdal_arrow_polygonize_equals_rasterio_shapes(strata, monkeypatch):
    """``vectorize.ogr`` (GDALPolygonize read back as Arrow WKB) gives rasterio ``shapes``' polygons element for
    element: coordinates, ring and polygon offsets, values, dtypes; with and without a validity mask, both
    connectivities, random and real masks. ``GEOSEG_POLYGONIZE=rasterio`` selects rasterio's path."""
    from geoseg.vectorize import ogr
    from geoseg.vectorize.polygonize import shapes_arrays

    assert ogr.available(), "GDAL's C API should be reachable through rasterio's wheel on Linux"
    rng = np.random.default_rng(5)
    cases = [(rng.integers(0, rng.integers(1, 5), tuple(rng.integers(1, 40, 2))).astype(np.uint8), trial)
             for trial in range(60)]
    mask, _ = strata
    cases.append((np.where(mask[:300, :400] == 255, 0, mask[:300, :400]).astype(np.uint8), 1))
    for arr, trial in cases:
        valid = None if trial % 3 == 0 else rng.random(arr.shape) > 0.1
        for connectivity in (4, 8):
            fast = ogr.polygonize_arrays(arr, valid, connectivity, 5, 7)
            monkeypatch.setenv("GEOSEG_POLYGONIZE", "rasterio")
            assert not ogr.available()
            slow = shapes_arrays(arr, valid, connectivity, 5, 7)
            monkeypatch.delenv("GEOSEG_POLYGONIZE")
            for a, b in zip(fast, slow):
                assert a.dtype == b.dtype and np.array_equal(a, b)
