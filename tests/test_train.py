"""geoseg train: data prep, split, augmentation, bad inputs (no Ray), and one CPU end-to-end run on Ray Train.

All on real data from ../shared/data (buildings chips, landcover_nc); small files derived from it are
written to tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from geoseg.config import config_from_dict
from geoseg.errors import ConfigError, InputError
from geoseg.train.augment import augment
from geoseg.train.data import IGNORE, band_stats, index_sources, load_labels, read_image, split_scenes
from geoseg.train.driver import epoch_chips, prepare_plan

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [{"id": 0, "name": "background", "color": "#000000"}, {"id": 1, "name": "building", "color": "#FF0000"}]


@pytest.fixture(scope="module")
def bld(shared_data) -> Path:
    return shared_data / "buildings"


def _cfg(sources, **train):
    return config_from_dict({"train": {"classes": CLASSES, "sources": sources, **train}})


def _area1(bld, n=None, **kw):
    imgs = sorted((bld / "area1" / "images").glob("*.png"))[: n or None]
    return {"kind": "chips", "images": [str(p) for p in imgs], "labels": str(bld / "area1" / "masks" / "{stem}.tif"),
            "label_map": {255: 1}, **kw}


def _area2(bld, side, n=None, **kw):
    imgs = sorted((bld / "area2" / side / "images").glob("*.tif"))[: n or None]
    return {"kind": "rasters", "images": [str(p) for p in imgs],
            "labels": str(bld / "area2" / side / "masks" / "{stem}.mask.tif"), **kw}


# ---------------------------------------------------------------------------------------------------------
# data preparation


def test_chip_grid_comes_from_the_mask(bld):
    t = _cfg([_area1(bld, 2)]).train
    scenes = index_sources(t)
    mask = bld / "area1" / "masks" / (Path(scenes[0].images[0]).name.replace(".png", ".tif"))
    with rasterio.open(mask) as m:
        assert scenes[0].transform == m.transform and scenes[0].crs == m.crs
        raw = m.read(1)
    lab = load_labels(scenes[0], [0, 1])
    assert set(np.unique(lab)) <= {0, 1}
    assert np.array_equal(lab == 1, raw == 255)  # label_map 255 -> 1
    data, valid = read_image(scenes[0])
    assert data.shape == (3, 256, 256) and valid.all()


def test_polygon_labels_rasterize_onto_the_image_grid_even_in_another_crs(bld, tmp_path):
    import geopandas as gpd

    stem = sorted(p.name for p in (bld / "area2" / "polygons").glob("*.geojson"))[0][: -len(".geojson")]
    gdf = gpd.read_file(bld / "area2" / "polygons" / f"{stem}.geojson")
    gdf.to_crs(3857).to_file(tmp_path / f"{stem}.gpkg")  # web mercator, the image is EPSG:4326
    src = {"kind": "polygons", "images": [str(bld / "area2" / "train" / "images" / f"{stem}.tif")],
           "labels": str(tmp_path / "{stem}.gpkg"), "class_value": 1}
    scene = index_sources(_cfg([src]).train)[0]
    lab = load_labels(scene, [0, 1])
    with rasterio.open(bld / "area2" / "train" / "masks" / f"{stem}.mask.tif") as m:
        truth = m.read(1)
    inter = ((lab == 1) & (truth == 1)).sum()
    union = ((lab == 1) | (truth == 1)).sum()
    assert truth.sum() > 1000 and inter / union > 0.97  # reprojection moves edges by < 1 px


def test_label_raster_in_another_crs_is_reprojected(shared_data):
    lc = shared_data / "landcover_nc"
    src = {"kind": "rasters", "stack_bands": True,
           "images": [str(lc / f"lsat7_2000_{b}.tif") for b in (10, 20, 30, 40, 50, 70)],
           "labels": str(lc / "strata.tif"), "label_map": {i: i - 1 for i in range(1, 8)}}
    classes = [{"id": i, "name": f"c{i}", "color": "#101010"} for i in range(7)]
    t = config_from_dict({"train": {"classes": classes, "sources": [src]}}).train
    scene = index_sources(t)[0]
    assert len(scene.bands) == 6 and scene.crs.to_epsg() == 32119
    lab = load_labels(scene, list(range(7)))
    with rasterio.open(lc / "strata.tif") as s:
        assert s.crs.to_epsg() == 3358  # a different CRS: the label raster really is reprojected
        raw = s.read(1)
    known = lab != IGNORE
    assert known.mean() > 0.9
    # the same ground, a datum variant apart: most pixels keep their class (shift below one 28.5 m pixel)
    same = (lab[known].astype(int) + 1 == raw[known]).mean()
    assert same > 0.8
    assert set(np.unique(lab[known])) <= set(range(7))


def test_block_split_keeps_neighbouring_chips_on_one_side(shared_data):
    lc = shared_data / "landcover_nc"
    src = {"kind": "rasters", "stack_bands": True,
           "images": [str(lc / f"lsat7_2000_{b}.tif") for b in (10, 20, 30, 40, 50, 70)],
           "labels": str(lc / "strata.tif"), "label_map": {i: i - 1 for i in range(1, 8)}}
    classes = [{"id": i, "name": f"c{i}", "color": "#101010"} for i in range(7)]
    t = config_from_dict({"train": {"classes": classes, "sources": [src],
                                    "val": {"by": "block", "block_px": 128, "fraction": 0.25}}}).train
    scenes = index_sources(t)
    split = split_scenes(scenes, t.val, 64)
    assert split.train and split.val

    def px(regions):
        m = np.zeros(scenes[0].shape, np.int32)
        for _, w in regions:
            m[int(w.row_off):int(w.row_off + w.height), int(w.col_off):int(w.col_off + w.width)] += 1
        return m

    tr, va = px(split.train), px(split.val)
    assert not ((tr > 0) & (va > 0)).any() and ((tr + va) == 1).all()
    from geoseg.train.data import grid_chips

    for c in grid_chips(split.train, 64):  # every training chip lies inside training blocks only
        assert not va[max(c.row, 0):c.row + 64, max(c.col, 0):c.col + 64].any()


def test_normalisation_stats_over_the_training_set(bld):
    t = _cfg([_area2(bld, "train", 3)]).train
    scenes = index_sources(t)
    regions = [(s.index, rasterio.windows.Window(0, 0, 256, 256)) for s in scenes]
    mean, std = band_stats(scenes, regions, step=1)
    stack = np.concatenate([read_image(s)[0].reshape(3, -1) for s in scenes], axis=1).astype(np.float64)
    assert np.allclose(mean, stack.mean(1), rtol=1e-6) and np.allclose(std, stack.std(1), rtol=1e-5)


def test_augmentation_keeps_image_and_labels_aligned(bld):
    t = _cfg([_area2(bld, "train", 1)]).train
    scene = index_sources(t)[0]
    img, valid = read_image(scene)
    lab = load_labels(scene, [0, 1])
    marker = (img[0] > np.median(img[0])).astype(np.uint8)  # labels that ARE a function of the image
    seen, chroma = set(), set()
    aug = t.augment.model_copy(update={"saturation": 0.6})
    for seed in range(12):
        rng = np.random.default_rng(seed)
        x, y = augment(img, marker, valid, rng, aug)
        assert x.shape == img.shape and y.shape == lab.shape
        # the geometric transform is shared: the marker still sits on the same (transformed) pixels
        ref_rng = np.random.default_rng(seed)
        x0, _ = augment(img, marker, valid, ref_rng, t.augment.model_copy(update={
            "brightness": 0.0, "contrast": 0.0, "channel_gain": 0.0}))
        assert np.array_equal(y, (x0[0] > np.median(img[0])).astype(np.uint8))
        seen.add(float(x.mean() / img.mean()))
        chroma.add(float(np.abs(x - x.mean(0)).mean() / np.abs(x0 - x0.mean(0)).mean()))
    assert max(seen) / min(seen) > 1.1  # brightness really varies
    assert min(chroma) < 0.75 and max(chroma) > 1.25  # and so does saturation (distance from each pixel's grey)


def test_epoch_chips_are_the_same_on_every_worker_and_change_per_epoch(bld):
    cfg = _cfg([_area2(bld, "train", 6, split="train"), _area2(bld, "val", 2, split="val")], chip_px=128)
    plan = prepare_plan(cfg)
    assert epoch_chips(plan, 1) == epoch_chips(plan, 1)
    assert epoch_chips(plan, 1) != epoch_chips(plan, 2)
    assert len(epoch_chips(plan, 0)) == 6 * 4
    assert len(plan["val_chips"]) == 2 * 4
    assert plan["band_names"] == ["b1", "b2", "b3"] and len(plan["mean"]) == 3


def test_source_weights_and_scale_range_sampling(bld):
    """Random sampling draws each source's share of the chips and cuts chips at chip_px / s, inside the regions."""
    sources = [_area1(bld, 6, split="train"), _area2(bld, "train", 6, split="train"), _area2(bld, "val", 2, split="val")]
    cfg = _cfg(sources, chip_px=128, sampling="random", chips_per_epoch=600, source_weights=[0.2, 0.8, 5.0],
               scale_range=[0.5, 2.0])
    plan = prepare_plan(cfg)
    chips = epoch_chips(plan, 3)
    assert chips == epoch_chips(plan, 3) and len(chips) == 600
    src = np.array([plan["scenes"][c.scene].source for c in chips])
    assert set(src) == {0, 1}  # the val source's weight is ignored: its images are not training regions
    assert abs((src == 1).mean() - 0.8) < 0.06
    sizes = np.array([c.size for c in chips])
    assert sizes.min() >= 64 and sizes.max() <= 256 and abs(np.median(sizes) - 128) <= 12
    assert (sizes < 96).mean() > 0.2 and (sizes > 170).mean() > 0.2
    for c in chips:  # the 256 px scenes hold every chip: none is padded
        assert 0 <= c.row and c.row + c.size <= 256 and 0 <= c.col and c.col + c.size <= 256
    plain = prepare_plan(_cfg([_area1(bld, 6, split="train"), _area2(bld, "val", 2, split="val")], chip_px=128,
                              sampling="random", chips_per_epoch=50))
    assert {c.size for c in epoch_chips(plain, 0)} == {128}


@pytest.mark.parametrize("train", [{"sampling": "grid", "scale_range": [0.5, 2.0]},
                                   {"sampling": "random", "source_weights": [1.0]},
                                   {"sampling": "random", "source_weights": [1.0, -1.0]},
                                   {"sampling": "random", "scale_range": [2.0, 0.5]}])
def test_sampling_options_are_checked(bld, train):
    with pytest.raises(ConfigError, match=r"train\.(source_weights|scale_range)"):
        _cfg([_area1(bld, 2, split="train"), _area2(bld, "val", 1, split="val")], **train)


CLASSES3 = CLASSES + [{"id": 2, "name": "building_boundary", "color": "#FD8D3C"}]


def test_boundary_labels_for_instance_training(bld):
    """train.boundary_px: building pixels within N px of a background pixel become the boundary class, on the whole
    scene (chip and raster edges make no boundary); the card declares the instance layout."""
    from scipy import ndimage

    from geoseg.train.card_fill import make_card
    from geoseg.train.loop import ChipStore

    src = _area2(bld, "val", 3, split="val")
    cfg = config_from_dict({"train": {"classes": CLASSES3, "sources": [src], "object_classes": ["building"],
                                      "boundary_px": 3, "boundary_class": "building_boundary"}})
    scenes = index_sources(cfg.train)
    store = ChipStore(scenes, [0, 1, 2], {c["name"]: c["id"] for c in CLASSES3})
    for s in scenes:
        with rasterio.open(s.labels) as m:
            truth = m.read(1)
        lab = store.labels(s.index)
        dist = ndimage.distance_transform_edt(truth != 0)  # to the nearest background pixel
        assert np.array_equal(lab == 2, (truth == 1) & (dist <= 3))
        assert np.array_equal(lab == 1, (truth == 1) & (dist > 3))
        assert np.array_equal(lab == 0, truth == 0)
        edge = np.zeros_like(truth, bool)
        edge[[0, -1], :] = edge[:, [0, -1]] = True
        assert (lab[edge & (truth == 1) & (dist > 3)] == 1).all()  # the raster's edge is not a boundary
    card = make_card(cfg.train, band_names=["red", "green", "blue"], mean=[0.0] * 3, std=[1.0] * 3, gsd_m=0.1,
                     dtype="uint8", output_stride=16, halo_px=0, arch_params={})
    spec = card.instances
    assert (spec.footprint_classes, spec.seed_classes, spec.boundary_px) == ([1, 2], [1], 3)
    with pytest.raises(ConfigError, match="boundary_px"):
        config_from_dict({"train": {"classes": CLASSES3, "sources": [src], "boundary_px": 3}})


def test_resampled_chips_keep_labels_on_their_pixels(bld):
    from geoseg.train.loop import ChipDataset, ChipStore, resample_chip

    t = _cfg([_area2(bld, "train", 1)]).train
    scene = index_sources(t)[0]
    img, valid = read_image(scene)
    lab = load_labels(scene, [0, 1])
    x2, v2, y2 = resample_chip(img[:, :64, :64].astype(np.float32), valid[:64, :64], lab[:64, :64], 128)
    assert np.array_equal(y2, np.kron(lab[:64, :64], np.ones((2, 2), np.uint8))) and v2.all()
    assert np.allclose(x2[:, ::2, ::2].mean(), img[:, :64, :64].mean(), rtol=0.02)
    x5, v5, y5 = resample_chip(img.astype(np.float32), valid, lab, 128)
    assert x5.shape == (3, 128, 128) and y5.shape == v5.shape == (128, 128)
    assert abs(float(y5.mean()) - float(lab.mean())) < 0.02 and abs(x5.mean() - img.mean()) < 0.01 * img.mean()
    store = ChipStore([scene], [0, 1])
    from geoseg.train.data import Chip

    ds = ChipDataset(store, [Chip(0, 10, 20, 200), Chip(0, 0, 0, 64)], [120.0] * 3, [50.0] * 3, out_px=128)
    for x, y in ds:
        assert tuple(x.shape) == (3, 128, 128) and tuple(y.shape) == (128, 128)


def test_bias_calibration_moves_the_decision_boundary_to_the_best_mIoU():
    from geoseg.train.loop import calibrate_bias

    class Shifted(torch.nn.Module):
        """Logits (0, x - 0.8): calls class 1 only where x > 0.8, while the truth is x > 0.5."""

        def forward(self, x):
            return torch.cat([torch.zeros_like(x), x - 0.8], dim=1)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 32, 32, generator=g)
    y = (x[:, 0] > 0.5).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    offsets, before, after = calibrate_bias(Shifted(), loader, 2, torch.device("cpu"))
    assert offsets[0] == 0 and abs(offsets[1] - 0.3) <= 0.05 + 1e-9, offsets
    assert before < 0.75 and after > 0.97


def test_logit_adjustment_decides_as_if_classes_were_equally_likely():
    from geoseg.train.loop import logit_adjustment, validate

    assert np.allclose(logit_adjustment([900, 100], 1.0), [0.0, np.log(9)])
    assert np.allclose(logit_adjustment([900, 100], 0.5), [0.0, 0.5 * np.log(9)])
    assert np.allclose(logit_adjustment([900, 100, 0], 1.0), [0.0, np.log(9), np.log(9)])  # unseen: finite
    assert not logit_adjustment([900, 100], 0.0).any()

    class Posterior(torch.nn.Module):
        """Bayes log-posteriors for 1-D Gaussians N(0, 1) (class 0, prior 0.9) and N(2, 1) (class 1, prior 0.1)."""

        def forward(self, x):
            return torch.cat([np.log(0.9) - x**2 / 2, np.log(0.1) - (x - 2) ** 2 / 2], dim=1)

    g = torch.Generator().manual_seed(0)
    y = (torch.rand(64, 32, 32, generator=g) < 0.5).long()  # where the model runs, the classes are even
    x = (torch.randn(64, 1, 32, 32, generator=g) + 2.0 * y[:, None]).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    plain = validate(Posterior(), loader, 2, torch.device("cpu"))
    adjusted = validate(Posterior(), loader, 2, torch.device("cpu"), bias=logit_adjustment([900, 100], 1.0))
    recall = lambda cm: cm[1, 1] / cm[1].sum()  # noqa: E731
    # the training prior (0.1) makes the model call class 1 only past x = 2.1; adjusted, the boundary is x = 1
    assert recall(plain) < 0.5 < 0.8 < recall(adjusted)
    assert np.trace(adjusted) > np.trace(plain)


def test_measured_halo_makes_tiled_equal_whole(bld):
    from geoseg.models import get_model
    from geoseg.train.card_fill import make_card, measure_halo, tiled_vs_whole_agreement

    t = _cfg([_area2(bld, "val", 2)], arch_params={"base_channels": 4, "depth": 2}).train
    scenes = index_sources(t)
    images = [read_image(s) for s in scenes]
    torch.manual_seed(0)
    m = get_model("unet", in_channels=3, num_classes=2, base_channels=4, depth=2)
    x = torch.from_numpy(np.stack([(d - 120.0) / 50.0 for d, _ in images])).float()
    with torch.no_grad():  # calibrate BatchNorm, then centre the head: the untrained net's classes vary in space
        m.train()
        for _ in range(3):
            m(x)
        m.eval()
        logits = m(x)
        m.head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
        assert 0.2 < float(m(x).argmax(1).float().mean()) < 0.8
    card = make_card(t, band_names=["r", "g", "b"], mean=[120.0] * 3, std=[50.0] * 3, gsd_m=0.3, dtype="uint8",
                     output_stride=4, halo_px=0, arch_params={"in_channels": 3, "num_classes": 2,
                                                              "base_channels": 4, "depth": 2})
    halo, agree, tile = measure_halo(m, card, images, max_halo_px=64)
    assert agree >= 1 - 1e-4 and 0 < halo <= 64 and halo % 4 == 0, (halo, agree)
    # a smaller halo really breaks the equality (the measurement is not a guess)
    assert tiled_vs_whole_agreement(m, card, images, tile, halo - 4) < 1 - 1e-4


# ---------------------------------------------------------------------------------------------------------
# bad inputs: one clear error naming the file


def test_labels_outside_the_image(bld, tmp_path):
    img = sorted((bld / "area2" / "val" / "images").glob("*.tif"))[0]
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"c": 1},
        "geometry": {"type": "Polygon", "coordinates": [[[10, 50], [10.001, 50], [10.001, 50.001], [10, 50]]]}}]}))
    scene = index_sources(_cfg([{"kind": "polygons", "images": [str(img)], "labels": str(far),
                                 "class_value": 1}]).train)[0]
    with pytest.raises(InputError, match=r"far\.geojson: label polygons do not overlap the image .*" + img.name):
        load_labels(scene, [0, 1])


def test_class_values_not_in_the_class_list(bld):
    masks = sorted((bld / "area1" / "masks").glob("*.tif"))
    with_buildings = next(p for p in masks if rasterio.open(p).read(1).max() == 255)
    src = {"kind": "chips", "images": [str(bld / "area1" / "images" / (with_buildings.stem + ".png"))],
           "labels": str(bld / "area1" / "masks" / "{stem}.tif")}  # no label_map: 255 is no class
    scene = index_sources(_cfg([src]).train)[0]
    with pytest.raises(InputError, match=r"masks/OAM-[0-9-]+\.tif: label values \[255\] are not in the class list"):
        load_labels(scene, [0, 1])


def test_empty_label_file(bld, tmp_path):
    img = sorted((bld / "area2" / "val" / "images").glob("*.tif"))[0]
    empty = tmp_path / "empty.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    cfg = _cfg([{"kind": "polygons", "images": [str(img)], "labels": str(empty), "class_value": 1}])
    with pytest.raises(InputError, match=r"empty\.geojson: label file has no features"):
        prepare_plan(cfg)


def test_images_with_different_band_counts(bld, shared_data):
    naip = sorted((shared_data / "rasters").glob("naip_*.tif"))[0]
    some_mask = sorted((bld / "area2" / "train" / "masks").glob("*.tif"))[0]
    cfg = _cfg([_area2(bld, "train", 2), {"kind": "rasters", "images": [str(naip)], "labels": str(some_mask)}])
    with pytest.raises(InputError, match=naip.name + r": has 4 bands but .* has 3"):
        index_sources(cfg.train)


def test_mask_size_differs_from_its_chip(bld, tmp_path):
    png = sorted((bld / "area1" / "images").glob("*.png"))[0]
    shutil.copy(png, tmp_path / png.name)
    with rasterio.open(bld / "area1" / "masks" / png.name.replace(".png", ".tif")) as m:
        prof = m.profile
        prof.update(width=128, height=128)
        with rasterio.open(tmp_path / png.name.replace(".png", ".tif"), "w", **prof) as out:
            out.write(m.read(1)[:128, :128], 1)
    cfg = _cfg([{"kind": "chips", "images": [str(tmp_path / png.name)], "labels": str(tmp_path / "{stem}.tif")}])
    with pytest.raises(InputError, match=r"\.tif: mask is 128x128 px but its chip .*\.png is 256x256 px"):
        index_sources(cfg.train)


def test_validation_split_leaving_one_side_empty(bld):
    cfg = _cfg([_area2(bld, "train", 3)], val={"by": "file", "fraction": 0.001})
    with pytest.raises(InputError, match=r"OAM-.*\.tif.*the validation split leaves the val side empty"):
        prepare_plan(cfg)
    cfg = _cfg([_area2(bld, "train", 3, split="val")])
    with pytest.raises(InputError, match=r"leaves the train side empty"):
        prepare_plan(cfg)


def test_class_ids_must_be_the_output_channels(bld):
    with pytest.raises(ConfigError, match=r"class ids must be 0\.\.1 in order"):
        prepare_plan(config_from_dict({"train": {
            "classes": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "sources": [_area2(bld, "train", 2)]}}))


def test_unknown_train_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'"):
        config_from_dict({"train": {"epoch": 3}})


# ---------------------------------------------------------------------------------------------------------
# end to end on Ray Train (2 CPU workers): train, interrupt, resume, bundle, predict


def _geoseg(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "geoseg.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for_registered_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    """Until Ray Train has registered a checkpoint of ``proc``'s run (its snapshot file lists one), so that a
    rerun resumes from it; ``proc`` must still be running."""
    deadline = time.monotonic() + 180
    while True:
        try:
            if json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text()).get("checkpoint_results"):
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_on_ray_interrupt_resume_bundle_predict(bld, ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "bundle"
    ckpt = tmp_path / "ckpt"
    job = {"train": {
        "name": "tiny-buildings", "classes": CLASSES, "band_names": ["red", "green", "blue"],
        "sources": [_area1(bld, 6, split="train"), _area2(bld, "train", 2, split="train"),
                    _area2(bld, "val", 2, split="val")],
        "arch_params": {"base_channels": 4, "depth": 2}, "chip_px": 128, "batch_size": 2,
        "epochs": 8, "max_steps_per_epoch": 3, "num_workers": 2, "use_gpu": False, "torch_threads": 1,
        "early_stopping_patience": 20, "halo_max_px": 48, "halo_images": 1, "out": str(out), "checkpoint_dir": str(ckpt),
        "calibrate_bias": True, "logit_adjustment": 1.0, "weights_dtype": "float16", "ema_decay": 0.9, "keep": "last",
    }, "runtime": {"address": address}}
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(job))

    # first run: killed (SIGKILL, no clean-up) as soon as its first checkpoint is on disk
    first = _geoseg("train", str(cfg_path))
    _wait_for_registered_checkpoint(first, ckpt / "geoseg-train")
    first.send_signal(signal.SIGKILL)
    log1 = first.communicate()[0]
    assert not out.exists() or not (out / "card.yaml").exists()

    # second run: resumes from the last checkpoint and finishes
    second = _geoseg("train", str(cfg_path))
    log2 = second.communicate(timeout=240)[0]
    assert second.returncode == 0, log2[-3000:]
    resumed = [ln for ln in log2.splitlines() if "resumed from checkpoint after epoch" in ln]
    assert resumed, log2[-3000:]
    done = int(resumed[0].split("after epoch")[1].split()[0])
    assert 1 <= done < 8
    assert f"epoch {done}/8  loss" not in log2  # finished epochs are not trained again
    assert "epoch 8/8  loss" in log2
    summary = json.loads((out / "training.json").read_text())
    assert [r["epoch"] for r in summary["history"]] == list(range(1, 9))
    # calibrate_bias: every epoch scored at its best logit offset (confusions summed over both workers), and the
    # bundle's head got the offset that the val chips choose for the best weights
    assert all(r["val_miou_calibrated"] >= r["val_miou"] and -3 <= r["logit_offset"] <= 3 for r in summary["history"])
    cal = summary["calibration"]
    assert cal["offsets"][0] == 0 and cal["miou_after"] >= cal["miou_before"]
    assert "epoch 1/8  loss" in log1 or done >= 1
    # logit_adjustment: each epoch validated with -log(prior) of the label pixels of every chip trained on so far,
    # counted over both workers and carried across the resume; the best epoch's offsets are in the bundle
    from geoseg.train.data import class_histogram
    from geoseg.train.driver import shard
    from geoseg.train.loop import ChipStore, logit_adjustment

    plan = prepare_plan(config_from_dict(job))
    store = ChipStore(plan["scenes"], plan["class_ids"], plan["class_names"])
    pixels = np.zeros(2, np.int64)
    for epoch in range(8):
        for rank in range(2):
            for c in shard(epoch_chips(plan, epoch), rank, 2, 2)[:3 * 2]:
                pixels += class_histogram(store.chip(c)[2])[:2]
    assert np.allclose(summary["history"][-1]["logit_adjustment"], logit_adjustment(pixels, 1.0), atol=1e-4)
    assert summary["logit_adjustment"] == summary["best_epoch"]["logit_adjustment"]
    # keep: last with ema_decay: the bundle has the weight average of the last epoch, which counted every step of
    # all 8 epochs (restored from the checkpoint across the SIGKILL, not restarted)
    assert summary["keep"] == "last" and summary["best_epoch"]["epoch"] == 8
    from geoseg.train.driver import last_weights, latest_checkpoint_state

    state = latest_checkpoint_state(config_from_dict(job))
    assert int(state["ema"]["n_averaged"]) == 8 * 3
    kept = last_weights(state)
    assert set(kept) == set(state["model"]) and not torch.equal(kept["inc.0.weight"], state["model"]["inc.0.weight"])
    assert summary["logit_adjustment"][0] == 0 and summary["logit_adjustment"][1] > 0  # buildings are the rarer

    from geoseg.models import load_model

    model = load_model(out)
    card = model.card
    from safetensors.torch import load_file

    stored = load_file(out / "weights.safetensors")
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert card.bands == ["red", "green", "blue"] and card.class_names == ["background", "building"]
    assert card.normalization.name == "standardize" and len(card.normalization.params["mean"]) == 3
    assert card.halo_px == summary["halo"]["halo_px"] and card.output_stride == 4
    assert "the last epoch's weights (8," in card.description and "moving average" in card.description
    # the head holds the last epoch's logit adjustment plus the calibrated offset, and the card says so
    assert np.allclose(card.logit_offsets, np.add(summary["logit_adjustment"], cal["offsets"]))
    expect = kept["head.bias"].float() + torch.tensor(card.logit_offsets, dtype=torch.float32)
    assert torch.allclose(model.module.head.bias, expect.half().float(), atol=1e-3)

    # geoseg predict with the new bundle writes a mask on the input's grid
    img = sorted((bld / "area2" / "val" / "images").glob("*.tif"))[0]
    pred = _geoseg("predict", str(img), "--model", str(out), "--out", str(tmp_path / "pred"),
                   "--set", "runtime.engine=local", "--set", "vector.enabled=false")
    logp = pred.communicate(timeout=120)[0]
    assert pred.returncode == 0, logp[-3000:]
    mask = tmp_path / "pred" / img.stem / "mask.tif"
    with rasterio.open(mask) as m, rasterio.open(img) as i:
        assert (m.crs, m.transform, m.shape) == (i.crs, i.transform, i.shape)
        assert set(np.unique(m.read(1))) <= {0, 1}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_of_train_keeps_its_checkpoint_and_says_so(bld, ray_local, tmp_path):
    """SIGINT (Ctrl-C) mid-training: exit 130, a line that says the checkpoint is kept (not predict's blocks), no
    bundle; the rerun resumes after the checkpointed epoch."""
    out, ckpt = tmp_path / "bundle", tmp_path / "ckpt"
    job = {"train": {
        "name": "tiny-buildings", "classes": CLASSES, "band_names": ["red", "green", "blue"],
        "sources": [_area1(bld, 4, split="train"), _area2(bld, "val", 1, split="val")],
        "arch_params": {"base_channels": 4, "depth": 2}, "chip_px": 128, "batch_size": 2, "epochs": 12,
        "max_steps_per_epoch": 2, "num_workers": 1, "use_gpu": False, "torch_threads": 1,
        "early_stopping_patience": 12, "halo_max_px": 32, "halo_images": 1, "out": str(out),
        "checkpoint_dir": str(ckpt),
    }, "runtime": {"address": ray_local.get_runtime_context().gcs_address}}
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(job))
    proc = _geoseg("train", str(cfg_path))
    _wait_for_registered_checkpoint(proc, ckpt / "geoseg-train")
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, log[-3000:]
    assert "geoseg: interrupted; the last epoch's checkpoint is kept: rerun the same command to resume" in log
    assert "finished blocks" not in log and not (out / "card.yaml").exists()
    again = _geoseg("train", str(cfg_path))
    log2 = again.communicate(timeout=180)[0]
    assert again.returncode == 0, log2[-3000:]
    assert "resumed from checkpoint after epoch" in log2 and (out / "card.yaml").exists()


@pytest.mark.parametrize("arch,params", [("unet", {"base_channels": 4, "depth": 2}),
                                         ("deeplabv3plus", {"base_channels": 8, "aspp_channels": 16,
                                                            "decoder_channels": 16})])
def test_loop_learns_on_real_chips_without_ray(bld, arch, params):
    """The loop's pieces (dataset, loss, AdamW + cosine, validation) on real chips, in-process."""
    from geoseg.train.loop import (ChipDataset, ChipStore, build_module, cosine_with_warmup, run_epoch,
                                   validate)

    cfg = _cfg([_area2(bld, "train", 2, split="train"), _area2(bld, "val", 1, split="val")], chip_px=64,
               architecture=arch, arch_params=params)
    plan = prepare_plan(cfg)
    store = ChipStore(plan["scenes"], plan["class_ids"], plan["class_names"])
    chips = epoch_chips(plan, 0)[:8]
    ds = ChipDataset(store, chips, plan["mean"], plan["std"])  # no augmentation: the same batch every pass
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    torch.manual_seed(0)
    m = build_module(arch, params, 3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(12, 2))
    dev = torch.device("cpu")
    first = run_epoch(m, loader, opt, sched, dev)["loss"]
    for _ in range(10):
        last = run_epoch(m, loader, opt, sched, dev)["loss"]
    assert last < 0.8 * first
    cm = validate(m, torch.utils.data.DataLoader(ChipDataset(store, plan["val_chips"], plan["mean"], plan["std"]),
                                                 batch_size=8), 2, dev)
    assert cm.sum() == len(plan["val_chips"]) * 64 * 64
