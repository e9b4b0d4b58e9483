"""Annotation round trip (issue 12): predict -> export-coco -> (annotation tool) -> import-labels -> geoseg train.

Real data only: the shipped ``buildings`` model on a real OpenAerialMap chip of area2/val (and a 2x2 mosaic of it
read from four georeferenced tiles), the real Sentinel-2 chip for the non-8-bit stretch. The COCO output is checked
with pycocotools; the imported polygons against the predicted ones in map coordinates.
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
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from geoseg.cli import main  # noqa: E402
from tests.conftest import SHARED_DATA, _require  # noqa: E402
from tools.vrt import tiled_vrt  # noqa: E402

CHIP = "OAM-1238424-1046544-21"
FAST = ("runtime.engine=local", "output.report=false", "vector.formats=[parquet]")


def _cli(*args: str):
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output  # stdout and stderr interleaved (click >= 8.2)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def chip_image() -> Path:
    return _require(SHARED_DATA / "buildings" / "area2" / "val" / "images" / f"{CHIP}.tif")


@pytest.fixture(scope="module")
def scene(work, chip_image) -> Path:
    """geoseg predict of the real chip with the shipped buildings model."""
    from geoseg.api import predict

    predict([str(chip_image)], str(work / "pred"), model="buildings", overrides=FAST)
    return work / "pred" / CHIP


@pytest.fixture(scope="module")
def exported(work, scene, chip_image) -> Path:
    """export-coco of the run's scene directory in 96 px chips (256 = 96 + 96 + 64: chip edges cut buildings)."""
    code, out = _cli("export-coco", str(scene), "--images", str(chip_image), "--chip-px", "96",
                     "--out", str(work / "coco"))
    assert code == 0, out
    return work / "coco"


def _buildings(scene: Path):
    import geopandas as gpd

    p = gpd.read_parquet(scene / "polygons.parquet")
    return p[p["class_id"] == 1].set_index("polygon_id")


def _to_px(geoms, transform: Affine):
    inv = ~transform
    return shapely.transform(np.asarray(geoms), lambda xy: np.column_stack(inv * (xy[:, 0], xy[:, 1])))


def _check_coco(coco_dir: Path, mask: np.ndarray, chip_px: int, image_check=None) -> COCO:
    """Validate a COCO export with pycocotools against the predicted mask (class 1 = building)."""
    coco = COCO(str(coco_dir / "annotations.json"))
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(1, "building")]
    for img in coco.dataset["images"]:
        side = json.loads((coco_dir / "georef" / (Path(img["file_name"]).stem + ".json")).read_text())
        w = side["window"]
        assert (img["width"], img["height"]) == (w["width"], w["height"])
        assert w["col_off"] % chip_px == 0 and w["row_off"] % chip_px == 0
        truth = mask[w["row_off"]:w["row_off"] + w["height"], w["col_off"]:w["col_off"] + w["width"]] == 1
        union = np.zeros(truth.shape, bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            seg = ann["segmentation"]
            assert isinstance(seg, list) and all(len(r) >= 6 and len(r) % 2 == 0 for r in seg)
            m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, img["height"], img["width"])))
            assert np.array_equal(m, coco.annToMask(ann))
            assert abs(int(m.sum()) - ann["area"]) <= 0.5, (ann["id"], m.sum(), ann["area"])  # within rounding
            rows, cols = np.nonzero(m)
            x, y, bw, bh = ann["bbox"]
            assert x <= cols.min() and cols.max() + 1 <= x + bw and y <= rows.min() and rows.max() + 1 <= y + bh
            assert not (union & (m > 0)).any(), "two annotations of one chip overlap"
            union |= m > 0
        assert np.array_equal(union, truth), f"{img['file_name']}: annotations differ from the predicted mask"
        if image_check:
            image_check(coco_dir / "images" / img["file_name"], side)
    return coco


def test_export_coco_validates_with_pycocotools(exported, scene, chip_image):
    with rasterio.open(scene / "mask.tif") as m:
        mask, transform = m.read(1), m.transform
    with rasterio.open(chip_image) as src:
        rgb = src.read([1, 2, 3])

    def same_pixels(png: Path, side: dict) -> None:
        w = side["window"]
        got = np.asarray(Image.open(png))
        assert got.dtype == np.uint8 and got.shape == (w["height"], w["width"], 3)
        want = rgb[:, w["row_off"]:w["row_off"] + w["height"], w["col_off"]:w["col_off"] + w["width"]]
        assert np.array_equal(np.moveaxis(got, -1, 0), want)  # uint8 bands are copied, not stretched
        t = transform * Affine.translation(w["col_off"], w["row_off"])
        assert np.allclose(side["transform"], [t.a, t.b, t.c, t.d, t.e, t.f], rtol=0, atol=1e-12)
        assert side["epsg"] == 4326 and side["sources"][0]["path"] == str(chip_image)

    coco = _check_coco(exported, mask, 96, same_pixels)
    anns = coco.dataset["annotations"]
    assert len(coco.dataset["images"]) == 9 and len(anns) > 20
    assert sum(a["area"] for a in anns) == int((mask == 1).sum())
    ids = [a["attributes"]["polygon_id"] for a in anns]
    cut = {i for i in ids if ids.count(i) > 1}
    assert cut, "no building crosses a chip edge: the test would not cover clipping"
    assert set(ids) == set(_buildings(scene).index)
    assert "score" not in anns[0] and "absent" in coco.dataset["info"]["score"]  # no probabilities stored
    print(f"\nCOCO: {len(coco.dataset['images'])} chips, {len(anns)} annotations of {len(set(ids))} polygons, "
          f"{len(cut)} cut by chip edges, {sum(len(a['segmentation']) > 1 for a in anns)} multi-ring")


def test_round_trip_gives_back_the_predicted_polygons(exported, scene, chip_image, work):
    import geopandas as gpd

    from geoseg.config import config_from_dict
    from geoseg.train.data import index_sources, load_labels

    with rasterio.open(scene / "mask.tif") as m:
        mask, transform = m.read(1), m.transform
    pred = _buildings(scene)
    for suffix in ("gpkg", "parquet", "geojson"):
        out = work / f"labels.{suffix}"
        code, msg = _cli("import-labels", str(exported / "annotations.json"), "--georef-from", str(exported),
                         "--out", str(out))
        assert code == 0, msg
        lab = gpd.read_parquet(out) if suffix == "parquet" else gpd.read_file(out)
        assert lab.crs.to_epsg() == 4326
        assert list(lab["kind"]) == ["chip"] * 9 + ["label"] * (len(lab) - 9)  # footprints first, labels over them
        assert set(lab.loc[lab["kind"] == "chip", "class_name"]) == {"background"}
        assert set(lab.loc[lab["kind"] == "label", "class_name"]) == {"building"}
        assert set(lab.loc[lab["kind"] == "label", "class_id"]) == {1}
    labels = lab[lab["kind"] == "label"].dissolve("polygon_id")  # chip pieces of one polygon back into one
    labels.index = labels.index.astype(int)
    assert sorted(labels.index) == sorted(pred.index)
    a = _to_px(labels.geometry.values, transform)
    b = _to_px(pred.loc[labels.index].geometry.values, transform)
    sym = shapely.area(shapely.symmetric_difference(a, b))
    haus = shapely.hausdorff_distance(a, b)
    print(f"\nround trip of {len(a)} polygons: max symmetric difference {sym.max():.3g} px^2, max Hausdorff "
          f"{haus.max():.3g} px")
    assert haus.max() <= 0.5 and sym.max() <= 0.5
    # ready for geoseg train: a polygons source rasterizes to exactly the predicted mask
    img = str(chip_image)
    cfg = config_from_dict({"train": {
        "sources": [{"kind": "polygons", "images": [img], "labels": str(work / "labels.gpkg"),
                     "class_column": "class_id"}],
        "classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "building"}]}}, source="test")
    (sc,) = index_sources(cfg.train)
    assert np.array_equal(load_labels(sc, [0, 1], {"background": 0, "building": 1}), mask)


def test_mosaic_of_tiles_and_mask_source(work, chip_image):
    """A 512 px scene predicted from a VRT, exported from four georeferenced tiles (the chips mosaic them) in
    200 px chips; then from the mask GeoTIFF with nodata in one chip, which is skipped."""
    from geoseg.api import predict

    with rasterio.open(chip_image) as src:
        prof, data, t = src.profile, src.read(), src.transform
    tiles = work / "tiles"
    tiles.mkdir()
    for i in range(2):
        for j in range(2):
            p = dict(prof, transform=t * Affine.translation(256 * j, 256 * i))
            with rasterio.open(tiles / f"t{i}{j}.tif", "w", **p) as dst:
                dst.write(data)
    vrt = tiled_vrt(chip_image, work / "mosaic.vrt", 2)
    predict([str(vrt)], str(work / "pred2"), model="buildings", overrides=FAST)
    scene = work / "pred2" / "mosaic"
    with rasterio.open(scene / "mask.tif") as m:
        mask, prof_m = m.read(1), m.profile
    with rasterio.open(vrt) as v:
        full = v.read()

    def same_pixels(png: Path, side: dict) -> None:
        w = side["window"]
        got = np.moveaxis(np.asarray(Image.open(png)), -1, 0)
        assert np.array_equal(got, full[:, w["row_off"]:w["row_off"] + w["height"],
                                        w["col_off"]:w["col_off"] + w["width"]])
        assert len(side["sources"]) == (4 if (w["col_off"], w["row_off"]) == (200, 200) else
                                        2 if 200 in (w["col_off"], w["row_off"]) else 1)

    code, msg = _cli("export-coco", str(scene), "--images", str(tiles / "*.tif"), "--chip-px", "200",
                     "--out", str(work / "coco2"))
    assert code == 0, msg
    coco = _check_coco(work / "coco2", mask, 200, same_pixels)
    assert len(coco.dataset["images"]) == 9  # 512 = 200 + 200 + 112
    # the mask as source, with the first chip all nodata: skipped; others polygonized per chip
    holed = mask.copy()
    holed[:200, :200] = 255
    with rasterio.open(scene / "mask.tif") as m:
        tags = m.tags()
    with rasterio.open(work / "holed.tif", "w", **dict(prof_m, driver="GTiff")) as dst:
        dst.write(holed, 1)
        dst.update_tags(**tags)
    code, msg = _cli("export-coco", str(work / "holed.tif"), "--images", str(vrt), "--chip-px", "200",
                     "--format", "jpeg", "--out", str(work / "coco3"))
    assert code == 0, msg
    assert "1 without valid pixels skipped" in msg
    coco3 = _check_coco(work / "coco3", np.where(holed == 255, 0, holed), 200)
    assert len(coco3.dataset["images"]) == 8 and all(i["file_name"].endswith(".jpg") for i in coco3.dataset["images"])
    assert len(list((work / "coco3" / "images").glob("*.jpg"))) == 8


def test_non_8bit_bands_are_stretched(work, s2_chip):
    """Sentinel-2 int16: bands B4, B3, B2 by name, each stretched from its 2..98 percentile to 0..255."""
    from geoseg.coco import export_coco

    with rasterio.open(s2_chip) as src:
        prof, bands = src.profile, src.read()
    water = (bands[2].astype(float) - bands[7]) > 0  # NDWI > 0: a real two-class mask on the scene's grid
    m = np.where(water, 1, 0).astype(np.uint8)
    prof.update(count=1, dtype="uint8", nodata=255)
    with rasterio.open(work / "water.tif", "w", **prof) as dst:
        dst.write(m, 1)
        dst.update_tags(GEOSEG_CLASS_NAMES=json.dumps(["other", "water"]))
    res = export_coco(str(work / "water.tif"), [str(s2_chip)], out_dir=str(work / "coco_s2"), chip_px=256,
                      classes=["water"])
    assert res.images == 4 and [c["name"] for c in res.categories] == ["water"]
    side = json.loads((work / "coco_s2" / "georef" / "water_r000256_c000000.json").read_text())
    assert side["bands"] == [4, 3, 2]
    ok = np.all(bands[[3, 2, 1]] != 0, axis=0)
    lo = [np.percentile(bands[b][ok], 2) for b in (3, 2, 1)]
    hi = [np.percentile(bands[b][ok], 98) for b in (3, 2, 1)]
    assert np.allclose(side["stretch"]["low"], lo) and np.allclose(side["stretch"]["high"], hi)
    got = np.moveaxis(np.asarray(Image.open(work / "coco_s2" / "images" / "water_r000256_c000000.png")), -1, 0)
    want = np.stack([np.clip((bands[b, 256:, :256] - lo[k]) / (hi[k] - lo[k]) * 255, 0, 255).round()
                     for k, b in enumerate((3, 2, 1))]).astype(np.uint8)
    assert np.abs(got.astype(int) - want).max() <= 1 and got.min() == 0 and got.max() == 255


def test_label_studio_geojson_and_rle_import(exported, work):
    """A Label Studio / CVAT style GeoJSON in chip pixels (upload-prefixed names, percent units) and a COCO RLE
    annotation come back as the same polygons as the COCO polygons."""
    import geopandas as gpd

    doc = json.loads((exported / "annotations.json").read_text())
    names = {i["id"]: i for i in doc["images"]}
    feats = []
    for ann in doc["annotations"]:
        img = names[ann["image_id"]]
        for ring in ann["segmentation"]:
            xy = np.asarray(ring, float).reshape(-1, 2)
            pct = len(feats) % 2 == 1
            if pct:
                xy = xy / (img["width"], img["height"]) * 100.0
            feats.append({"type": "Feature", "id": len(feats),
                          "geometry": {"type": "Polygon", "coordinates": [xy.tolist() + [xy[0].tolist()]]},
                          "properties": {"image": f"/data/upload/7/0a1b2c3d-{img['file_name']}",
                                         "polygonlabels": ["building"], **({"units": "percent"} if pct else {})}})
    gj = work / "ls.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    code, msg = _cli("import-labels", str(gj), "--georef-from", str(exported), "--out", str(work / "ls.gpkg"))
    assert code == 0, msg
    code, msg = _cli("import-labels", str(exported / "annotations.json"), "--georef-from", str(exported),
                     "--out", str(work / "ref.gpkg"), "--no-chip-extents")
    assert code == 0, msg
    ref = gpd.read_file(work / "ref.gpkg")
    got = gpd.read_file(work / "ls.gpkg")
    assert set(got["class_name"]) >= {"building"}
    with rasterio.open(exported.parent / "pred" / CHIP / "mask.tif") as m:
        t = m.transform
    a = _to_px([shapely.union_all(got.loc[got["kind"] == "label"].geometry.values)], t)[0]
    b = _to_px([shapely.union_all(ref.geometry.values)], t)[0]
    assert shapely.area(shapely.symmetric_difference(a, b)) < 1e-6 and shapely.hausdorff_distance(a, b) < 1e-6
    # RLE (compressed, as pycocotools writes it) for every annotation of the first chip
    first = doc["images"][0]
    rle_doc = dict(doc, images=[first], annotations=[])
    for ann in doc["annotations"]:
        if ann["image_id"] == first["id"]:
            rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], first["height"], first["width"]))
            rle_doc["annotations"].append(dict(ann, segmentation={"size": rle["size"],
                                                                  "counts": rle["counts"].decode()}))
    (work / "rle.json").write_text(json.dumps(rle_doc))
    code, msg = _cli("import-labels", str(work / "rle.json"), "--georef-from", str(exported), "--out",
                     str(work / "rle.parquet"), "--no-chip-extents")
    assert code == 0, msg
    rle_lab = gpd.read_parquet(work / "rle.parquet")
    want = ref[ref["image"] == first["file_name"]]
    a = _to_px([shapely.union_all(rle_lab.geometry.values)], t)[0]
    b = _to_px([shapely.union_all(want.geometry.values)], t)[0]
    assert len(rle_lab) == len(want) and shapely.area(shapely.symmetric_difference(a, b)) < 1e-6


def test_instance_id_and_score_are_carried(scene, chip_image, work):
    """Polygons that carry instance_id and score (the instance-split output) keep them in COCO and back."""
    import geopandas as gpd

    inst = work / "inst" / CHIP
    shutil.copytree(scene, inst)
    p = gpd.read_parquet(inst / "polygons.parquet")
    p["instance_id"] = np.arange(len(p)) + 1000
    p["score"] = np.linspace(0.5, 1.0, len(p))
    p.to_parquet(inst / "polygons.parquet")
    code, msg = _cli("export-coco", str(inst), "--images", str(chip_image), "--chip-px", "128", "--out",
                     str(work / "coco_inst"))
    assert code == 0, msg
    doc = json.loads((work / "coco_inst" / "annotations.json").read_text())
    want = p.set_index("polygon_id")
    for a in doc["annotations"]:
        row = want.loc[a["attributes"]["polygon_id"]]
        assert a["instance_id"] == row["instance_id"] and a["score"] == pytest.approx(row["score"], abs=1e-6)
    assert "mean class probability" in doc["info"]["score"]
    code, msg = _cli("import-labels", str(work / "coco_inst" / "annotations.json"), "--georef-from",
                     str(work / "coco_inst"), "--out", str(work / "inst.parquet"))
    assert code == 0, msg
    lab = gpd.read_parquet(work / "inst.parquet")
    got = lab[lab["kind"] == "label"]
    assert (got["instance_id"].to_numpy() == want.loc[got["polygon_id"].to_numpy(), "instance_id"].to_numpy()).all()


def test_s3_round_trip_equals_local(s3_server, scene, chip_image, exported, work):
    """Run directory, chips, sidecars and COCO on S3: the same export and labels as on local disk."""
    import geopandas as gpd

    from geoseg.coco import export_coco
    from geoseg.labels_import import import_labels

    storage = s3_server.storage_config()
    bucket = s3_server.make_bucket("geoseg-coco")
    client = s3_server.client()
    for p in scene.iterdir():
        client.put_object(Bucket=bucket, Key=f"run/{CHIP}/{p.name}", Body=p.read_bytes())
    res = export_coco(f"s3://{bucket}/run/{CHIP}", [str(chip_image)], out_dir=f"s3://{bucket}/coco", chip_px=96,
                      storage=storage)
    assert res.coco == f"s3://{bucket}/coco/annotations.json" and res.images == 9
    remote = json.loads(client.get_object(Bucket=bucket, Key="coco/annotations.json")["Body"].read())
    local = json.loads((exported / "annotations.json").read_text())
    assert remote["images"] == local["images"] and remote["annotations"] == local["annotations"]
    name = local["images"][4]["file_name"]
    assert client.get_object(Bucket=bucket, Key=f"coco/images/{name}")["Body"].read() == \
        (exported / "images" / name).read_bytes()
    import_labels(f"s3://{bucket}/coco/annotations.json", f"s3://{bucket}/coco", f"s3://{bucket}/labels.parquet",
                  storage=storage)
    (work / "s3labels.parquet").write_bytes(client.get_object(Bucket=bucket, Key="labels.parquet")["Body"].read())
    got = gpd.read_parquet(work / "s3labels.parquet")
    import_labels(str(exported / "annotations.json"), str(exported), str(work / "s3ref.parquet"))
    want = gpd.read_parquet(work / "s3ref.parquet")
    assert len(got) == len(want) and list(got["class_name"]) == list(want["class_name"])
    assert shapely.equals(got.geometry.values, want.geometry.values).all()


@pytest.mark.parametrize("case", ["no_sidecar", "bad_category", "malformed", "outside", "off_grid"])
def test_bad_inputs_are_one_clear_error(case, exported, work, s2_chip):
    doc = json.loads((exported / "annotations.json").read_text())
    bad = work / f"{case}.json"
    expect = []
    if case == "no_sidecar":
        doc["images"][1]["file_name"] = "elsewhere.png"
        expect = ["'elsewhere.png'", "no georeference sidecar", str(exported)]
    elif case == "bad_category":
        doc["categories"].append({"id": 7, "name": "car"})
        doc["annotations"][0]["category_id"] = 7
        expect = ["category 'car'", "not a class of the model", "building"]
    elif case == "outside":
        doc["annotations"][3]["segmentation"][0] = [v + 300 for v in doc["annotations"][3]["segmentation"][0]]
        expect = [f"annotation {doc['annotations'][3]['id']}", "polygon outside the chip", "96 x 96 px"]
    text = json.dumps(doc)
    if case == "malformed":
        text = text[: len(text) // 2]
        expect = ["malformed JSON"]
    bad.write_text(text)
    if case == "off_grid":  # the images must be on the mask's grid
        code, msg = _cli("export-coco", str(exported.parent / "pred" / CHIP), "--images", str(s2_chip),
                         "--out", str(work / "coco_bad"))
        expect = ["mask.tif", "is on the mask's grid"]
    else:
        code, msg = _cli("import-labels", str(bad), "--georef-from", str(exported), "--out", str(work / "x.gpkg"))
        expect.append(str(bad))
    assert code == 3, msg
    line = [ln for ln in msg.splitlines() if ln.startswith("geoseg: error:")]
    assert len(line) == 1, msg
    for e in expect:
        assert e in line[0], (e, line[0])
    assert not (work / "x.gpkg").exists()
