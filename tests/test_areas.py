"""True class areas (geoseg.areas) against pyproj's geodesic areas, on real rasters in a degree CRS and in a
projected one."""

from __future__ import annotations

import json

import numpy as np
import pyproj
import pytest
import rasterio
import shapely
from affine import Affine

from geoseg import areas

WGS84 = pyproj.Geod(ellps="WGS84")


def _geod_area(poly_lonlat) -> float:
    return abs(WGS84.geometry_area_perimeter(poly_lonlat)[0])


def test_row_areas_match_geod_on_the_real_chip_grid(s2_chip):
    with rasterio.open(s2_chip) as ds:
        t, (rows, cols) = ds.transform, ds.shape
    per_row = areas.row_pixel_areas_m2(t, "EPSG:4326", 0, rows)
    x0, y0 = t * (0, 0)
    x1, y1 = t * (cols, rows)
    # edges along parallels: densify so the geodesic edges follow them
    box = shapely.segmentize(shapely.box(x0, y1, x1, y0), abs(t.a) / 4)
    assert per_row.sum() * cols == pytest.approx(_geod_area(box), rel=1e-9)
    # pixels shrink towards the pole: rows further north are smaller
    assert np.all(np.diff(per_row) > 0)
    one = shapely.segmentize(shapely.box(x0, y0 + t.e, x0 + t.a, y0), abs(t.a) / 8)
    assert per_row[0] == pytest.approx(_geod_area(one), rel=1e-6)


def test_cells_match_geod_in_utm_and_differ_from_planar():
    t = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_200_000.0)
    shape = (5000, 5000)
    cell = areas.cell_pixel_areas_m2(t, "EPSG:32630", shape, cell_px=256)
    edges = np.unique(np.r_[np.arange(0, 5000, 256), 5000])
    total = float((cell * np.outer(np.diff(edges), np.diff(edges))).sum())
    tr = pyproj.Transformer.from_crs("EPSG:32630", "EPSG:4326", always_xy=True)
    box = shapely.segmentize(shapely.box(500_000, 4_150_000, 550_000, 4_200_000), 100)
    ll = shapely.transform(box, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    assert total == pytest.approx(_geod_area(ll), rel=1e-7)
    # UTM's scale factor 0.9996 makes planar areas 0.08 % small near the central meridian
    assert abs(total / 50_000.0**2 - 1) > 5e-4


def test_geometry_areas_in_degrees_match_geod():
    polys = np.array([shapely.box(-0.78, 38.08, -0.74, 38.13), shapely.box(10, 60, 10.5, 60.2)], dtype=object)
    got = areas.geometry_areas_m2(polys, "EPSG:4326")
    for g, p in zip(got, polys):
        assert g == pytest.approx(_geod_area(shapely.segmentize(p, 1e-3)), rel=1e-6)
    assert areas.geometry_areas_m2(np.array([None, shapely.Polygon()], dtype=object), "EPSG:4326").tolist() == [0, 0]


def test_mask_areas_equal_exact_polygon_areas_geographic(s2_chip, dw_model, tmp_path):
    """The scene's class areas from pixel counts equal the sum of its polygons' exact ellipsoidal areas."""
    import geopandas as gpd

    from geoseg.api import predict

    (rec,) = predict([str(s2_chip)], str(tmp_path), overrides=["runtime.engine=local", "output.report=false",
                                                               "vector.formats=[parquet]"], loaded_model=dw_model)
    table = rec["class_areas"]
    assert table["method"] == areas.METHOD_ROWS
    df = gpd.read_parquet(rec["outputs"]["parquet"])
    by_class = df.groupby("class_name")["area_m2"].sum()
    assert set(by_class.index) == set(table["classes"])
    for name, row in table["classes"].items():
        assert row["area_m2"] == pytest.approx(by_class[name], rel=1e-9, abs=1e-3)  # rounded to mm2
        assert row["pixels"] == rec["class_pixel_counts"][name]
        assert row["area_ha"] == pytest.approx(row["area_m2"] / 1e4, abs=1e-6)
    assert sum(r["percent"] for r in table["classes"].values()) == pytest.approx(100, abs=1e-4)
    assert table["valid_m2"] == pytest.approx(sum(r["area_m2"] for r in table["classes"].values()), abs=0.01)


def test_mask_areas_projected_match_geodesic_polygons(shared_data, tmp_path):
    """A projected real raster (North Carolina land cover, EPSG:3358): class areas from the mask equal the
    geodesic areas of its polygons, and differ from planar ones by the projection's scale."""
    from geoseg.config import VectorConfig
    from geoseg.vectorize import vectorize_file

    src = shared_data / "landcover_nc" / "strata.tif"
    mask = tmp_path / "strata_u8.tif"
    with rasterio.open(src) as ds:
        data = ds.read(1)
        prof = ds.profile
    out = np.where(data > 0, data, 255).astype(np.uint8)
    prof.update(dtype="uint8", nodata=255, count=1)
    names = ["class_0", "developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]
    with rasterio.open(mask, "w", **prof) as dst:
        dst.write(out, 1)
        dst.update_tags(GEOSEG_CLASS_NAMES=json.dumps(names))
    table = areas.mask_class_areas(mask, names)
    assert table["method"].startswith("pixel area per 64x64")
    res = vectorize_file(mask, tmp_path / "p.parquet", VectorConfig(formats=["parquet"]), workers=1)
    import geopandas as gpd

    df = gpd.read_parquet(res.paths["parquet"])
    geo = areas.geometry_areas_m2(np.asarray(df.geometry.values), df.crs)
    for name, row in table["classes"].items():
        sel = (df["class_name"] == name).to_numpy()
        assert row["area_m2"] == pytest.approx(geo[sel].sum(), rel=2e-6), name  # see geoseg.areas
        planar = df.loc[sel, "area_m2"].sum()
        assert abs(row["area_m2"] / planar - 1) > 1e-5  # the state plane's scale is not 1 here


def test_area_table_and_sum():
    a = areas.area_table({"water": 30.0, "built": 10.0}, class_ids={"water": 0, "built": 6}, pixels={"water": 3,
                                                                                                 "built": 1})
    assert list(a["classes"]) == ["water", "built"]
    assert a["classes"]["water"]["percent"] == 75.0
    b = areas.area_table({"built": 60.0}, class_ids={"built": 6}, pixels={"built": 6})
    s = areas.sum_tables([a, b])
    assert s["valid_m2"] == 100.0
    assert s["classes"]["built"] == {"id": 6, "pixels": 7, "area_m2": 70.0, "area_ha": 0.007, "percent": 70.0}


@pytest.mark.parametrize("grid", ["s2_degrees", "strata_state_plane"])
@pytest.mark.parametrize("block", [(100, 130), (512, 512), (37, 1000)])
def test_counter_from_blocks_is_mask_class_areas_bit_for_bit(grid, block, s2_chip, shared_data, tmp_path):
    """``ClassAreaCounter`` fed with ``block_area_counts`` of blocks (sizes unrelated to its strips, in shuffled
    order) gives exactly the table ``mask_class_areas`` reads from the written mask: what run.json gets from
    the workers' counts instead of reading the mask COG back. Real grids: the Sentinel-2 chip (EPSG:4326, per-row
    areas) and landcover_nc's strata (a state plane, per-cell areas); a land-cover-like mask of real classes."""
    src = s2_chip if grid == "s2_degrees" else shared_data / "landcover_nc" / "strata.tif"
    with rasterio.open(src) as ds:
        prof, data = ds.profile, ds.read(1)
    rng = np.random.default_rng(1)
    mask = (np.abs(data.astype(np.int64)) % 7).astype(np.uint8)
    mask[rng.random(mask.shape) < 0.02] = 255  # some nodata
    prof.update(driver="GTiff", dtype="uint8", nodata=255, count=1)
    path = tmp_path / "mask.tif"
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(mask, 1)
    names = [f"c{i}" for i in range(7)]
    want = areas.mask_class_areas(path, names)
    rows, cols = mask.shape
    by_row, strip = areas.area_units(prof["transform"], prof["crs"])
    assert by_row == (grid == "s2_degrees")
    counter = areas.ClassAreaCounter(prof["transform"], prof["crs"], mask.shape)
    windows = [(r, c) for r in range(0, rows, block[0]) for c in range(0, cols, block[1])]
    rng.shuffle(windows)
    for i, (r, c) in enumerate(windows):
        assert not counter.complete or i == len(windows)
        counter.add(areas.block_area_counts(mask[r : r + block[0], c : c + block[1]], r, c, by_row, strip))
    assert counter.complete
    assert counter.table(names) == want
