"""Region maps (geoseg map): an AOI over several scenes on one grid. Real data: the Sentinel-2 chip split into
two overlapping scenes, one of them warped to UTM; a 20 m copy for the resolution guard; STAC in and out."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.warp
import shapely
from rasterio.enums import Resampling
from rasterio.windows import Window

from geoseg.api import predict
from geoseg.errors import InputError
from geoseg.api import map_region

SETS = ["runtime.engine=local", "tiling.block_px=256", "vector.formats=[parquet]", "output.report=false"]


def _crop(src_path, dst, window: Window):
    with rasterio.open(src_path) as src:
        prof = src.profile
        prof.update(width=int(window.width), height=int(window.height), transform=src.window_transform(window))
        data = src.read(window=window)
        names = src.descriptions
    with rasterio.open(dst, "w", **prof) as ds:
        ds.write(data)
        ds.descriptions = names
    return dst


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, s2_chip):
    d = tmp_path_factory.mktemp("scenes")
    a = _crop(s2_chip, d / "scene_a.tif", Window(0, 0, 320, 512))
    b = _crop(s2_chip, d / "scene_b.tif", Window(192, 0, 320, 512))
    return a, b


@pytest.fixture(scope="module")
def aoi_file(tmp_path_factory, s2_chip):
    """A pentagon over both scenes and their overlap, in lon/lat."""
    with rasterio.open(s2_chip) as src:
        t = src.transform
    pts = [t @ (c, r) for c, r in [(90, 120), (300, 60), (430, 200), (380, 420), (120, 380)]]
    p = tmp_path_factory.mktemp("aoi") / "district.geojson"
    gpd.GeoDataFrame(geometry=[shapely.Polygon(pts)], crs="EPSG:4326").to_file(p)
    return p


@pytest.fixture(scope="module")
def whole(tmp_path_factory, s2_chip, dw_model):
    out = tmp_path_factory.mktemp("whole")
    (rec,) = predict([str(s2_chip)], str(out), overrides=SETS, loaded_model=dw_model)
    return rec


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.transform, ds.crs


def _aoi_pixels(aoi_path, transform, shape, crs):
    from rasterio import features

    geom = gpd.read_file(aoi_path).to_crs(crs).geometry.union_all()
    return features.geometry_mask([geom], shape, transform, invert=True)


def test_region_identical_to_whole_chip_inside_aoi(tmp_path, scenes, aoi_file, whole, dw_model):
    rec = map_region([str(p) for p in scenes], str(aoi_file), str(tmp_path), overrides=SETS, loaded_model=dw_model)
    assert rec["outputs"]["mask"] == str(tmp_path / "district" / "mask.tif")
    got, t, crs = _read(rec["outputs"]["mask"])
    ref, tref, _ = _read(whole["outputs"]["mask"])
    # the region grid is a window of the scenes' own grid: no resampling
    assert t.a == tref.a and t.e == tref.e
    c0, r0 = round((t.c - tref.c) / t.a), round((t.f - tref.f) / t.e)
    inside = _aoi_pixels(aoi_file, t, got.shape, crs)
    ref_win = ref[r0:r0 + got.shape[0], c0:c0 + got.shape[1]]
    np.testing.assert_array_equal(got[inside], ref_win[inside])
    assert (got[~inside] == 255).all()
    # the same polygons as the whole chip's map cut to the AOI's pixels (merged across the scene border)
    cut = np.where(inside, ref_win, 255).astype(np.uint8)
    ref_mask = tmp_path / "ref_cut.tif"
    with rasterio.open(ref_mask, "w", driver="GTiff", width=cut.shape[1], height=cut.shape[0], count=1,
                       dtype="uint8", crs=crs, transform=t, nodata=255) as ds:
        ds.write(cut, 1)
    from geoseg.config import VectorConfig
    from geoseg.vectorize import vectorize_file

    vectorize_file(ref_mask, tmp_path / "ref.parquet", VectorConfig(formats=["parquet"]), workers=1)
    a = gpd.read_parquet(rec["outputs"]["parquet"])
    b = gpd.read_parquet(tmp_path / "ref.parquet")
    assert len(a) == len(b) > 0
    assert list(a["class_id"]) == list(b["class_id"])
    assert all(x.equals_exact(y, 0) for x, y in zip(a.geometry, b.geometry))


def test_blocks_outside_the_aoi_cost_nothing(tmp_path, s2_chip, dw_model):
    """An AOI over a quarter of the scene reads and predicts about a quarter of the blocks."""
    with rasterio.open(s2_chip) as src:
        t = src.transform
    (x0, y0), (x1, y1) = t @ (0, 0), t @ (256, 256)
    bbox = f"{min(x0, x1)},{min(y0, y1)},{max(x0, x1)},{max(y0, y1)}"
    sets = ["runtime.engine=local", "tiling.block_px=128", "tiling.tile_px=128", "vector.enabled=false",
            "output.report=false"]
    (full,) = predict([str(s2_chip)], str(tmp_path / "full"), overrides=sets, loaded_model=dw_model)
    (part,) = predict([str(s2_chip)], str(tmp_path / "part"), overrides=sets + [f"input.aoi={bbox}"],
                      loaded_model=dw_model)
    assert full["stats"]["blocks_read"] == 16
    assert part["stats"]["blocks_read"] == 4
    assert part["stats"]["model_calls"] == full["stats"]["model_calls"] * 4 / 16
    m, _, _ = _read(part["outputs"]["mask"])
    assert (m[300:, :] == 255).all() and (m[:, 300:] == 255).all() and (m[:250, :250] != 255).mean() > 0.9


def _warp(src_path, dst, crs: str, res: float, resampling=Resampling.bilinear):
    from rasterio.warp import calculate_default_transform, reproject

    with rasterio.open(src_path) as src:
        transform, w, h = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds,
                                                      resolution=res)
        prof = src.profile
        prof.update(crs=crs, transform=transform, width=w, height=h)
        with rasterio.open(dst, "w", **prof) as ds:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(ds, b), resampling=resampling,
                          src_nodata=src.nodata, dst_nodata=src.nodata)
            ds.descriptions = src.descriptions
    return dst


def test_reprojected_scene_joins_the_region(tmp_path, scenes, aoi_file, s2_chip, dw_model):
    """Scene B in UTM 30N at 10 m, scene A in lon/lat: the region (the AOI's UTM zone at 10 m) agrees with
    the whole chip warped onto the same grid and mapped directly on >= 98% of the AOI's pixels, and a class
    region crossing the scenes' border is one polygon."""
    a, b = scenes
    b_utm = _warp(b, tmp_path / "scene_b_utm.tif", "EPSG:32630", 10.0)
    rec = map_region([str(a), str(b_utm)], str(aoi_file), str(tmp_path / "out"), overrides=SETS,
                     loaded_model=dw_model)
    got, t, crs = _read(rec["outputs"]["mask"])
    assert crs.to_epsg() == 32630 and t.a == 10.0
    # the direct map: the whole chip warped onto the region grid, mapped as one scene
    from rasterio.vrt import WarpedVRT
    import rasterio.shutil

    with rasterio.open(s2_chip) as src, WarpedVRT(src, crs=crs, transform=t, width=got.shape[1],
                                                  height=got.shape[0], resampling=Resampling.bilinear) as v:
        rasterio.shutil.copy(v, tmp_path / "chip_utm.tif", driver="GTiff")
    (direct,) = predict([str(tmp_path / "chip_utm.tif")], str(tmp_path / "direct"), overrides=SETS,
                        loaded_model=dw_model)
    ref, _, _ = _read(direct["outputs"]["mask"])
    inside = _aoi_pixels(aoi_file, t, got.shape, crs)
    agree = (got[inside] == ref[inside]).mean()
    print(f"region vs direct map of the warped chip: {agree:.4%} of {inside.sum()} AOI pixels agree")
    assert agree >= 0.98, agree
    # no seam: polygons crossing the border between the scenes are single polygons
    with rasterio.open(a) as src:
        border_x = src.bounds.right  # lon of scene A's east edge, inside scene B's extent
    from pyproj import Transformer

    bx, _ = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(border_x, 38.11)
    polys = gpd.read_parquet(rec["outputs"]["parquet"])
    crossing = polys[(polys.bounds.minx < bx - 50) & (polys.bounds.maxx > bx + 50)]
    assert len(crossing) > 0
    assert polys.geometry.is_valid.all()


def test_resolution_guard_and_resample(tmp_path, s2_chip, dw_model):
    """A 20 m scene is refused for a 10 m model, naming both and input.resample; with it, the scene maps."""
    coarse = _warp(s2_chip, tmp_path / "s2_20m.tif", "EPSG:32630", 20.0, Resampling.average)
    with pytest.raises(InputError, match=r"s2_20m\.tif: pixel size 20 m .* is 2x the model's 10 m .*"
                                          r"input\.resample=true"):
        predict([str(coarse)], str(tmp_path / "o"), overrides=SETS, loaded_model=dw_model)
    (rec,) = predict([str(coarse)], str(tmp_path / "o"), overrides=SETS + ["input.resample=true"],
                     loaded_model=dw_model)
    m, t, crs = _read(rec["outputs"]["mask"])
    assert t.a == 10.0 and crs.to_epsg() == 32630 and rec["outputs"]["mask"].endswith("s2_20m/mask.tif")
    assert (m != 255).mean() > 0.9


def test_stac_items_in_and_out(tmp_path, scenes, aoi_file, dw_model):
    """A saved ItemCollection of the two scenes (one multi-band asset each, eo:bands names) maps the AOI; the
    output Items (scene and region) and the run's Collection validate against the local STAC schemas."""
    from geoseg import stac

    items = []
    for i, p in enumerate(scenes):
        with rasterio.open(p) as ds:
            names = ds.descriptions
            bbox = list(rasterio.warp.transform_bounds(ds.crs, "EPSG:4326", *ds.bounds))
        items.append({
            "type": "Feature", "stac_version": "1.0.0", "id": p.stem,
            "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
            "bbox": bbox, "geometry": shapely.geometry.mapping(shapely.box(*bbox)),
            "properties": {"datetime": f"2019-0{i + 1}-15T10:30:00Z", "eo:cloud_cover": 10.0 * (2 - i)},
            "links": [],
            "assets": {"visual_and_more": {"href": str(p), "type": "image/tiff; application=geotiff",
                                           "eo:bands": [{"name": n} for n in names], "roles": ["data"]}},
        })
    coll = tmp_path / "items.json"
    coll.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    rec = map_region([], str(aoi_file), str(tmp_path / "out"), stac=str(coll), overrides=SETS + [
        "input.overlap=least_cloudy"], loaded_model=dw_model)
    item = json.loads((tmp_path / "out" / "district" / "item.json").read_text())
    assert item["properties"]["classification:classes"][0]["name"] == "water"
    assert item["assets"]["mask"]["href"] == "mask.tif"
    stac.validate(item)
    collection = json.loads((tmp_path / "out" / "collection.json").read_text())
    stac.validate(collection)
    assert rec["stats"]["blocks_read"] > 0


def test_map_cli_and_job(tmp_path, scenes, aoi_file):
    """``geoseg map`` and jobs/map_region.py --aoi write one region; a bad AOI is one clear error."""
    import importlib.util

    from click.testing import CliRunner

    from geoseg.cli import main

    args = ["map", *map(str, scenes), "--aoi", str(aoi_file), "--out", str(tmp_path / "cli"), "--name", "d1"]
    for s in SETS:
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "d1" / "run.json").exists() and (tmp_path / "cli" / "collection.json").exists()
    res = CliRunner().invoke(main, ["map", str(scenes[0]), "--aoi", str(tmp_path / "none.gpkg"), "--out",
                                    str(tmp_path / "x")])
    assert res.exit_code == 3 and "none.gpkg: AOI file not found" in res.stderr
    far = "10,10,10.01,10.01"  # the bbox lies far from the scenes
    res = CliRunner().invoke(main, ["map", str(scenes[0]), "--aoi", far, "--out", str(tmp_path / "x")])
    assert res.exit_code == 3 and "does not overlap" in res.stderr, res.stderr
    spec = importlib.util.spec_from_file_location("map_region_job", "jobs/map_region.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    sets = [x for s in SETS for x in ("--set", s)]
    assert job.main([*map(str, scenes), "--aoi", str(aoi_file), "--out", str(tmp_path / "job"), *sets]) == 0
    assert (tmp_path / "job" / "district" / "mask.tif").exists()
