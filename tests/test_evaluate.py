"""geoseg eval: metrics by hand on small arrays, labels reprojected / rasterized onto the prediction grid, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geoseg.errors import InputError
from geoseg.evaluate import confusion, evaluate_files, instance_metrics, labels_on_grid, pixel_metrics, run_eval

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def val_dir(shared_data) -> Path:
    return shared_data / "buildings" / "area2" / "val"


def test_pixel_metrics_by_hand():
    truth = np.array([[0, 0, 1, 1], [0, 1, 1, 255], [2, 2, 2, 2]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 1, 0, 1], [2, 2, 0, 255]], np.uint8)
    cm = confusion(pred, truth, 3)
    # known on both sides: 10 pixels (one nodata truth, one nodata prediction)
    assert cm.tolist() == [[2, 1, 0], [1, 3, 0], [1, 0, 2]]
    m = pixel_metrics(cm, ["a", "b", "c"])
    assert m["pixels"] == 10 and math.isclose(m["overall_accuracy"], 7 / 10)
    b = m["classes"]["b"]
    assert math.isclose(b["iou"], 3 / 5) and math.isclose(b["precision"], 3 / 4) and math.isclose(b["recall"], 3 / 4)
    assert math.isclose(b["f1"], 0.75)
    c = m["classes"]["c"]
    assert math.isclose(c["iou"], 2 / 3) and math.isclose(c["precision"], 1.0) and math.isclose(c["recall"], 2 / 3)
    assert math.isclose(m["classes"]["a"]["iou"], 2 / 5)
    assert math.isclose(m["miou"], np.mean([2 / 5, 3 / 5, 2 / 3]))


def test_instance_metrics_match_at_iou_half():
    truth = np.zeros((20, 40), np.uint8)
    pred = np.zeros_like(truth)
    truth[2:8, 2:8] = 1  # A: 36 px
    pred[2:8, 3:8] = 1  # 30 px inside A: IoU 30/36 -> match
    truth[2:8, 20:26] = 1  # B: 36 px
    pred[2:5, 20:26] = 1  # 18 px: IoU 0.5 -> match (>=)
    truth[12:18, 2:8] = 1  # C: 36 px
    pred[12:14, 2:8] = 1  # 12 px: IoU 1/3 -> no match
    pred[12:16, 30:36] = 1  # false positive
    m = instance_metrics(pred, truth, 1)
    assert (m["matched"], m["predicted"], m["truth"]) == (2, 4, 3)
    assert math.isclose(m["precision"], 0.5) and math.isclose(m["recall"], 2 / 3)
    assert math.isclose(m["f1"], 2 * 2 / 7)


def test_nodata_truth_does_not_count_against_predicted_objects():
    truth = np.full((10, 10), 255, np.uint8)
    truth[:, :5] = 0
    pred = np.zeros_like(truth)
    pred[2:6, 6:9] = 1  # predicted object entirely where the truth is unknown
    m = instance_metrics(pred, truth, 1)
    assert m["predicted"] == 0 and m["truth"] == 0


def test_polygon_labels_are_rasterized_onto_the_prediction_grid(shared_data):
    a2 = shared_data / "buildings" / "area2"
    stem = sorted(p.stem for p in (a2 / "polygons").glob("*.geojson"))[0]
    r = evaluate_files([(str(a2 / "train" / "masks" / f"{stem}.mask.tif"), str(a2 / "polygons" / f"{stem}.geojson"))],
                       class_names=["background", "building"], object_classes=["building"])
    assert r["classes"]["building"]["iou"] == 1.0 and r["instances"]["building"]["f1"] == 1.0
    assert r["pixels"] == 256 * 256


def test_label_raster_in_another_crs_is_reprojected_onto_the_prediction(val_dir, tmp_path):
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    mask = sorted((val_dir / "masks").glob("*.tif"))[0]
    with rasterio.open(mask) as src:
        tr, w, h = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height, *src.bounds)
        prof = src.profile | {"crs": "EPSG:3857", "transform": tr, "width": w, "height": h, "nodata": 255}
        with rasterio.open(tmp_path / "labels_3857.tif", "w", **prof) as dst:
            reproject(rasterio.band(src, 1), rasterio.band(dst, 1), resampling=Resampling.nearest, dst_nodata=255)
        profile = {"crs": src.crs, "transform": src.transform, "shape": (src.height, src.width)}
        truth = src.read(1)
    back = labels_on_grid(str(tmp_path / "labels_3857.tif"), profile)
    assert back.shape == truth.shape
    known = back != 255
    assert known.mean() > 0.95 and (back[known] == truth[known]).mean() > 0.97


def test_report_files_and_errors(val_dir, tmp_path):
    mask = str(sorted((val_dir / "masks").glob("*.tif"))[0])
    r = run_eval([mask, mask], out=str(tmp_path / "r.json"), object_classes=["1"])
    j = json.loads((tmp_path / "r.json").read_text())
    assert j["classes"]["class_1"]["iou"] == 1.0 and j["confusion_matrix"] == r["confusion_matrix"]
    run_eval([mask, mask], out=str(tmp_path / "r.md"))
    assert "| class_1 | 1.0000 |" in (tmp_path / "r.md").read_text()
    with pytest.raises(InputError, match=r"nothere\.tif: label file not found"):
        run_eval([mask, str(tmp_path / "nothere.tif")])
    with pytest.raises(InputError, match=r"r\.txt: report must end in \.json or \.md"):
        run_eval([mask, mask], out=str(tmp_path / "r.txt"))


def test_eval_with_model_predicts_then_scores(val_dir, tmp_path):
    """`geoseg eval --model M --images ... --labels ...` on an RGB bundle (tiny, untrained: mechanics only)."""
    from geoseg.models import ClassInfo, ModelCard, Normalization, get_model, save_bundle

    card = ModelCard(
        name="tiny-rgb", version="0", architecture="unet",
        arch_params={"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2}, bands=["r", "g", "b"],
        input_dtype="uint8", normalization=Normalization(name="standardize", params={"mean": 120.0, "std": 50.0}),
        gsd_m=0.075, classes=[ClassInfo(id=0, name="background", color="#000000"),
                            ClassInfo(id=1, name="building", color="#FF0000")],
        output_stride=4, halo_px=16, license="test", attribution="test",
    )
    torch.manual_seed(0)
    bundle = save_bundle(get_model("unet", **card.arch_params), card, tmp_path / "tiny")
    imgs = sorted((val_dir / "images").glob("*-21.tif"))[:2]  # web zoom 21: 0.075 m, the card's GSD
    p = subprocess.run(
        [sys.executable, "-m", "geoseg.cli", "eval", "--model", str(bundle), "--images", str(imgs[0]),
         "--images", str(imgs[1]), "--labels", str(val_dir / "masks" / "{stem}.mask.tif"),
         "--out", str(tmp_path / "rep.json"), "--set", "runtime.engine=local"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["pixels"] == 2 * 256 * 256 and len(rep["files"]) == 2
    assert rep["class_names"] == ["background", "building"] and "building" in rep["instances"]
    assert rep["model"]["name"] == "tiny-rgb"
    assert "| building |" in p.stdout


def test_shipped_buildings_model_on_validation_chips(val_dir, tmp_path):
    """The registered `buildings` bundle: card filled from the data, and `geoseg predict` + eval on area2/val
    chips (a regression guard well below the full-set number in the README)."""
    from geoseg.api import predict
    from geoseg.models import list_models, load_model

    assert "buildings" in list_models()
    card = load_model("buildings").card
    assert card.bands == ["red", "green", "blue"] and card.class_names == ["background", "building"]
    assert card.normalization.name == "standardize" and len(card.normalization.params["mean"]) == 3
    assert card.halo_px % card.output_stride == 0 and card.halo_px > 0
    imgs = sorted((val_dir / "images").glob("*.tif"))[::7]  # 5 chips across the zoom levels
    predict([str(p) for p in imgs], str(tmp_path / "pred"), model="buildings",
            overrides=["runtime.engine=local", "vector.enabled=false"])
    pairs = [(str(tmp_path / "pred" / p.stem / "mask.tif"), str(val_dir / "masks" / f"{p.stem}.mask.tif"))
             for p in imgs]
    r = evaluate_files(pairs, object_classes=["building"])
    assert r["classes"]["building"]["iou"] > 0.55, r["classes"]["building"]


def test_instance_split_scores_touching_objects_separately():
    """An instance model (card.instances): two touching roofs are one connected region (no match at IoU 0.5) but
    two objects once their interiors are grown back to the footprint; boundary pixels count as building."""
    from geoseg.evaluate import evaluate_arrays, merge_reports
    from geoseg.models.card import InstanceSpec

    truth = np.zeros((8, 14), np.uint8)
    truth[1:7, 1:7] = 1
    truth[1:7, 7:13] = 1
    pred = np.zeros_like(truth)
    pred[1:7, 1:13] = 2  # boundary around ...
    pred[2:6, 2:6] = 1  # ... two interiors
    pred[2:6, 8:12] = 1
    spec = InstanceSpec(footprint_classes=[1, 2], seed_classes=[1])
    names = ["background", "building", "building_boundary"]
    part = evaluate_arrays(pred, truth, names, [1], instances=spec)
    r = merge_reports([part], names, [1], [])
    assert r["classes"]["building"]["iou"] == 1.0  # boundary counted as building
    assert (r["instances"]["building"]["predicted"], r["instances"]["building"]["truth"]) == (1, 1)
    split = r["instances_split"]["building"]
    # two halves with IoU exactly 0.5 against the one truth component: matched one-to-one, once
    assert split["predicted"] == 2 and split["truth"] == 1 and split["matched"] == 1
    # two truth roofs with a gap, the prediction one footprint over both (84 px): no connected region matches,
    # both split objects do
    truth2 = truth.copy()
    truth2[:, 7] = 0
    pred2 = pred.copy()
    pred2[1:7, 0] = pred2[1:7, 13] = 2
    part2 = evaluate_arrays(pred2, truth2, names, [1], instances=spec)
    assert (part2["instances"][1].tp, part2["instances"][1].predicted) == (0, 1)
    assert (part2["instances_split"][1].tp, part2["instances_split"][1].predicted) == (2, 2)
