"""Object instances (issue 12): one polygon per building, partition-invariant, exported to COCO.

Real data only: the instance-aware buildings model (background / building interior / building boundary) on real
OpenAerialMap chips of area2/val, a 512 x 512 mosaic of four contiguous area2/val tiles (real imagery across the
tile seams, cut by 128 px blocks), and the real label masks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.features import rasterize, shapes
from scipy import ndimage

from geoseg.instances import COLUMNS, INSTANCES_FILE, instances_from_polygons, split_footprints
from geoseg.models import load_model
from geoseg.train.boundary import add_boundary
from tests.conftest import SHARED_DATA, _require

MODEL = "buildings-instances"
VAL = SHARED_DATA / "buildings" / "area2" / "val"
# four contiguous zoom-21 tiles (x 1238424-5, y 1046544-5): a real 512 x 512 image across their seams
MOSAIC = [["OAM-1238424-1046544-21", "OAM-1238425-1046544-21"],
          ["OAM-1238424-1046545-21", "OAM-1238425-1046545-21"]]
TOUCHING_CHIP = "OAM-1238426-1046546-21"  # the model's footprints here hold touching roofs
FAST = ("runtime.engine=local", "output.report=false", "vector.formats=[parquet]")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("instances")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def spec():
    card = load_model(MODEL).card
    assert card.instances is not None, f"{MODEL}: the card declares no instances"
    return card.instances


@pytest.fixture(scope="module")
def mosaic(work) -> Path:
    """The 2 x 2 tiles as one GeoTIFF on the top-left tile's grid (their pixel heights differ by 2e-8 %)."""
    rows = []
    for row in MOSAIC:
        arrs = []
        for name in row:
            with rasterio.open(_require(VAL / "images" / f"{name}.tif")) as src:
                arrs.append(src.read())
                if name == MOSAIC[0][0]:
                    profile = src.profile
        rows.append(np.concatenate(arrs, axis=2))
    data = np.concatenate(rows, axis=1)
    profile.update(width=data.shape[2], height=data.shape[1], driver="GTiff", tiled=False)
    for k in ("blockxsize", "blockysize", "compress", "interleave"):
        profile.pop(k, None)
    path = work / "mosaic.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _predict(image: Path, out: Path, *extra: str) -> Path:
    from geoseg.api import predict

    predict([str(image)], str(out), model=MODEL, overrides=FAST + extra)
    return out / image.stem


@pytest.fixture(scope="module")
def runs(work, mosaic) -> dict[int, Path]:
    return {bp: _predict(mosaic, work / f"block{bp}", "tiling.tile_px=128", f"tiling.block_px={bp}")
            for bp in (128, 1024)}


def _instances(scene: Path):
    import geopandas as gpd

    return gpd.read_parquet(scene / INSTANCES_FILE)


def _pixel_labels(gdf, transform: Affine, shape) -> np.ndarray:
    return rasterize(zip(gdf.geometry.values, gdf["instance_id"].astype(int)), out_shape=shape, transform=transform,
                     fill=0, dtype="int32")


def test_instances_identical_for_block_sizes_that_cut_buildings(runs, spec):
    a, b = _instances(runs[128]), _instances(runs[1024])
    assert len(a) > 10
    assert a["instance_id"].tolist() == list(range(1, len(a) + 1))
    assert a["instance_id"].tolist() == b["instance_id"].tolist()
    assert a["class_id"].tolist() == b["class_id"].tolist()
    assert all(shapely.equals_exact(a.geometry.values, b.geometry.values, tolerance=0))
    assert np.array_equal(a["area_m2"].to_numpy(), b["area_m2"].to_numpy())
    assert np.array_equal(a["score"].to_numpy(), b["score"].to_numpy())  # from confidence.tif, as invariant
    for name in ("mask.tif", "confidence.tif"):  # the rasters themselves: byte-identical for both block sizes
        assert (runs[128] / name).read_bytes() == (runs[1024] / name).read_bytes(), name
    # the 128 px blocks really cut objects: instances crossing a block border (in pixels of the mosaic)
    with rasterio.open(runs[128] / "mask.tif") as m:
        inv = ~m.transform
    px = shapely.transform(a.geometry.values, lambda xy: np.column_stack(inv * (xy[:, 0], xy[:, 1])))
    b0 = shapely.bounds(px)
    cut = [(x0 < k < x1) or (y0 < k < y1) for x0, y0, x1, y1 in b0 for k in (128, 256, 384)]
    assert sum(cut) >= 3
    for run in runs.values():
        rec = json.loads((run / "run.json").read_text())
        assert rec["outputs"]["instances"].endswith(INSTANCES_FILE)
        assert rec["outputs"]["confidence"].endswith("confidence.tif")  # on by default with instances
        assert rec["model"]["instances"]["seed_classes"] == spec.seed_classes


def test_instances_tile_the_footprints_on_their_pixels(runs, spec):
    """Schema; every footprint pixel of the mask in exactly one instance, nothing else; ids in row-major order."""
    scene = runs[128]
    gdf = _instances(scene)
    assert list(gdf.columns) == COLUMNS
    assert str(gdf["instance_id"].dtype) == "int64" and str(gdf["class_id"].dtype) == "uint8"
    assert str(gdf["area_m2"].dtype) == "float64" and str(gdf["score"].dtype) == "float64"
    score = gdf["score"].to_numpy()
    assert np.isfinite(score).all() and (score > 0).all() and (score <= 1).all()
    assert len(np.unique(score)) > len(score) // 2  # a real per-object mean, not a constant
    assert set(gdf["class_id"]) <= set(spec.seed_classes)
    assert (gdf["class_name"] == "building").all()
    assert (gdf["area_m2"] > 0).all()
    assert all(g.geom_type in ("Polygon", "MultiPolygon") and g.is_valid for g in gdf.geometry)
    reg = gdf["geometry_regularized"].values  # a second GeoParquet geometry column, in the same CRS
    assert gdf["geometry_regularized"].crs == gdf.crs and all(g.is_valid and not g.is_empty for g in reg)
    raw = gdf.geometry.values
    iou = shapely.area(shapely.intersection(reg, raw)) / shapely.area(shapely.union(reg, raw))
    assert iou.min() >= 0.7, iou.min()
    rect = shapely.area(reg) == shapely.area(shapely.oriented_envelope(reg))  # right-angled rectangles
    assert rect.any() and (shapely.get_num_coordinates(reg[rect]) == 5).all()
    import pyarrow.parquet as pq

    geo = json.loads(pq.read_metadata(scene / INSTANCES_FILE).metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and set(geo["columns"]) == {"geometry", "geometry_regularized"}
    with rasterio.open(scene / "mask.tif") as m:
        mask, transform, crs = m.read(1), m.transform, m.crs
    assert gdf.crs == crs
    lab = _pixel_labels(gdf, transform, mask.shape)
    # the instances are the split of the whole mask (ids included): the footprint-window path is exact
    want, want_class = split_footprints(mask, spec.footprint_classes, spec.seed_classes, min_seed_px=spec.min_seed_px,
                                        min_instance_px=spec.min_instance_px)
    assert np.array_equal(lab, want)
    assert dict(zip(gdf["instance_id"], gdf["class_id"])) == want_class
    with rasterio.open(scene / "confidence.tif") as c:  # the mask's grid; nodata exactly where the mask's is
        assert (c.height, c.width, c.transform, c.crs, c.nodata, c.dtypes[0]) == \
            (*mask.shape, transform, crs, 255, "uint8")
        conf = c.read(1)
    assert np.array_equal(conf == 255, mask == 255)
    n_classes = len(load_model(MODEL).card.class_names)
    assert conf[mask != 255].min() >= np.floor(254 / n_classes)  # a max softmax is at least 1 / classes
    # score: the mean confidence over each instance's pixels (whole-raster computation, independent of the code)
    ids = gdf["instance_id"].to_numpy()
    want_score = ndimage.mean(conf.astype(np.float64), labels=lab, index=ids) / 254
    assert np.allclose(score, want_score, rtol=0, atol=1e-12)
    if spec.min_instance_px == 1:
        assert np.array_equal(lab > 0, np.isin(mask, spec.footprint_classes))
    total = sum(int(rasterize([g], out_shape=mask.shape, transform=transform, dtype="uint8").sum())
                for g in gdf.geometry)
    assert total == int((lab > 0).sum())  # no pixel in two instances
    first = [int(np.flatnonzero((lab == i).ravel())[0]) for i in gdf["instance_id"]]
    assert first == sorted(first)  # ids by first pixel, row-major


def test_resumed_run_gives_the_same_scores_and_confidence(work, mosaic, runs):
    """A run interrupted after 5 of 16 blocks and resumed from its block records (which store the confidence too)
    publishes the same confidence.tif and instance scores as the uninterrupted run."""
    from geoseg.api import predict

    class Stop(Exception):
        pass

    seen = []

    def stop_after_5(result):
        seen.append(result.block_id)
        if len(seen) == 5:
            raise Stop

    out = work / "resumed"
    sets = list(FAST) + ["tiling.tile_px=128", "tiling.block_px=128"]
    with pytest.raises(Stop):
        predict([str(mosaic)], str(out), model=MODEL, overrides=sets, on_result=stop_after_5)
    scene = out / mosaic.stem
    assert not (scene / "confidence.tif").exists() and not (scene / INSTANCES_FILE).exists()
    records = sorted((scene / ".partial" / "blocks").glob("*.npz"))
    assert len(records) >= 5
    with np.load(records[0]) as z:
        assert z["confidence"].shape == z["mask"].shape
    (rec,) = predict([str(mosaic)], str(out), model=MODEL, overrides=sets)
    assert rec["stats"]["blocks_resumed"] == len(records) and rec["stats"]["blocks_computed"] == 16 - len(records)
    for name in ("mask.tif", "confidence.tif"):
        assert (scene / name).read_bytes() == (runs[128] / name).read_bytes(), name
    a, b = _instances(scene), _instances(runs[128])
    assert a["score"].notna().all()
    assert np.array_equal(a["score"].to_numpy(), b["score"].to_numpy())


def test_ray_engine_gives_the_same_confidence_and_scores(work, mosaic, runs, ray_local):
    """Confidences computed in Ray's inference actors and written beside the worker-compressed mask tiles."""
    scene = _predict(mosaic, work / "ray", "tiling.tile_px=128", "tiling.block_px=256", "runtime.engine=ray",
                     "runtime.workers=2", "runtime.cpus_per_worker=0.5")
    workers = json.loads((scene / "run.json").read_text())["inference_workers"]
    assert workers and all(w["worker"] != "local" for w in workers)  # Ray's actors ran the model
    for name in ("mask.tif", "confidence.tif"):
        assert (scene / name).read_bytes() == (runs[128] / name).read_bytes(), name
    assert np.array_equal(_instances(scene)["score"].to_numpy(), _instances(runs[128])["score"].to_numpy())


def test_touching_buildings_become_separate_instances(work, spec):
    scene = _predict(_require(VAL / "images" / f"{TOUCHING_CHIP}.tif"), work / "touching")
    gdf = _instances(scene)
    with rasterio.open(scene / "mask.tif") as m:
        mask, transform = m.read(1), m.transform
    foot, n_foot = ndimage.label(np.isin(mask, spec.footprint_classes))
    lab = _pixel_labels(gdf, transform, mask.shape)
    objects = {f: set(np.unique(lab[foot == f]).tolist()) - {0} for f in range(1, n_foot + 1)}  # per footprint
    split = [f for f, ids in objects.items() if len(ids) >= 2]
    assert split, "no connected footprint was split into instances"
    assert len(gdf) > sum(len(ids) >= 1 for ids in objects.values())  # more objects than footprints holding one
    for f in split:  # the instances of a split footprint are its seeds' regions: each holds interior pixels
        for i in objects[f]:
            assert np.isin(mask[lab == i], spec.seed_classes).any()


def test_split_from_polygons_equals_split_of_the_raster(spec):
    """The footprint-window path (polygons -> per-footprint rasters) gives the whole raster's split exactly, on a
    real label mask turned into interior / boundary classes as in training."""
    with rasterio.open(_require(VAL / "masks" / f"{TOUCHING_CHIP}.mask.tif")) as m:
        truth, transform, crs = m.read(1), m.transform, m.crs
    classes = add_boundary(truth, spec.boundary_px or 3, tuple(spec.seed_classes), 2)
    want, want_class = split_footprints(classes, spec.footprint_classes, spec.seed_classes)
    assert len(want_class) >= 5
    polys = [(shapely.geometry.shape(g), int(v)) for g, v in shapes(classes, mask=classes > 0, transform=transform)]
    gdf = instances_from_polygons(np.array([g for g, _ in polys], dtype=object), np.array([v for _, v in polys]),
                                  transform=transform, crs=crs, shape=classes.shape,
                                  footprint_classes=spec.footprint_classes, seed_classes=spec.seed_classes,
                                  class_names=["background", "building", "building_boundary"])
    assert np.array_equal(_pixel_labels(gdf, transform, classes.shape), want)
    assert dict(zip(gdf["instance_id"], gdf["class_id"])) == want_class


def test_vector_instances_false_writes_none(work):
    scene = _predict(_require(VAL / "images" / f"{TOUCHING_CHIP}.tif"), work / "off", "vector.instances=false")
    assert not (scene / INSTANCES_FILE).exists() and not (scene / "confidence.tif").exists()
    outputs = json.loads((scene / "run.json").read_text())["outputs"]
    assert "instances" not in outputs and "confidence" not in outputs


def test_export_coco_of_instances_validates_with_pycocotools(work, runs, mosaic, spec):
    pytest.importorskip("pycocotools")
    from click.testing import CliRunner
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from geoseg.cli import main

    scene = runs[128]
    res = CliRunner().invoke(main, ["export-coco", str(scene), "--images", str(mosaic), "--chip-px", "200",
                                    "--out", str(work / "coco")])
    assert res.exit_code == 0, res.output
    coco = COCO(str(work / "coco" / "annotations.json"))
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(1, "building")]
    with rasterio.open(scene / "mask.tif") as m:
        mask, transform = m.read(1), m.transform
    lab = _pixel_labels(_instances(scene), transform, mask.shape)
    seen = set()
    for img in coco.dataset["images"]:
        side = json.loads((work / "coco" / "georef" / (Path(img["file_name"]).stem + ".json")).read_text())
        w = side["window"]
        want = lab[w["row_off"]:w["row_off"] + w["height"], w["col_off"]:w["col_off"] + w["width"]]
        got = np.zeros(want.shape, np.int32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img["height"],
                                                                          img["width"])))
            assert abs(int(m.sum()) - ann["area"]) <= 0.5
            assert ann["attributes"]["instance_id"] == ann["instance_id"]
            assert not (got[m > 0]).any(), "two annotations of one chip overlap"
            got[m > 0] = ann["instance_id"]
            seen.add(ann["instance_id"])
        assert np.array_equal(got, want), f"{img['file_name']}: annotations differ from the instances"
    assert seen == set(np.unique(lab[lab > 0]).tolist())
