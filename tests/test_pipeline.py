"""The pipeline on one machine (engine=local), on the real Sentinel-2 chip with the Dynamic World model.

Georeferencing, partition invariance (block and tile sizes), nodata handling, COG validity, bounded memory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tracemalloc

import numpy as np
import pytest
import rasterio
import torch

from geoseg.api import predict

DW_BANDS = [2, 3, 4, 5, 6, 7, 8, 12, 13]


@pytest.fixture(scope="module")
def dw(dw_model):
    return dw_model  # the session's one loaded Dynamic World (conftest)


@pytest.fixture(scope="module")
def whole_image_classes(s2_chip, dw):
    """Reference: the model run once on the whole chip, nodata pixels set to 255."""
    with rasterio.open(s2_chip) as src:
        data = src.read(DW_BANDS).astype(np.float32)
        valid = np.all(src.read_masks(DW_BANDS) > 0, axis=0)
    with torch.inference_mode():
        x = dw.card.normalization.apply(torch.from_numpy(data)[None])
        classes = dw.module(x).argmax(1)[0].to(torch.uint8).numpy()
    classes[~valid] = 255
    return classes


def run_local(src, out, dw, *sets):
    return predict([str(src)], str(out), model="dynamic-world",
                   overrides=["runtime.engine=local", "vector.enabled=false", *sets], loaded_model=dw)


def read_mask(rec):
    with rasterio.open(rec["outputs"]["mask"]) as m:
        return m.read(1), m.profile, m


def test_predict_georeferencing_and_whole_image_equality(tmp_path, s2_chip, dw, whole_image_classes):
    (rec,) = run_local(s2_chip, tmp_path, dw)
    assert rec["outputs"]["mask"] == str(tmp_path / "Spain_7370579_S2Hand" / "mask.tif")
    with rasterio.open(s2_chip) as src, rasterio.open(rec["outputs"]["mask"]) as m:
        assert m.crs == src.crs
        assert m.transform == src.transform
        assert (m.width, m.height) == (src.width, src.height)
        assert m.dtypes == ("uint8",) and m.nodata == 255
        mask = m.read(1)
    np.testing.assert_array_equal(mask, whole_image_classes)
    run_json = json.loads((tmp_path / "Spain_7370579_S2Hand" / "run.json").read_text())
    assert run_json["model"]["name"] == "dynamic-world"
    assert sum(run_json["class_pixel_counts"].values()) == 512 * 512
    assert run_json["geoseg_version"]
    (worker,) = run_json["inference_workers"]  # the local engine's one predictor
    assert worker["worker"] == "local" and worker["blocks"] == run_json["stats"]["blocks_computed"]
    assert 0 < worker["forward_s"] <= worker["span_s"] + 1e-3 and 0 < worker["busy_fraction"] <= 1


@pytest.mark.parametrize("sets", [
    ["tiling.block_px=128", "tiling.tile_px=128"],
    ["tiling.block_px=256", "tiling.tile_px=128"],
    ["tiling.block_px=1024", "tiling.tile_px=256"],
    ["tiling.block_px=192", "tiling.tile_px=64"],
    ["tiling.block_px=510", "tiling.tile_px=170"],
], ids=lambda s: "-".join(x.split("=")[1] for x in s))
def test_mask_bytes_identical_for_any_split(tmp_path, s2_chip, dw, whole_image_classes, sets):
    (ref,) = run_local(s2_chip, tmp_path / "a", dw, "tiling.block_px=512", "tiling.tile_px=256")
    (rec,) = run_local(s2_chip, tmp_path / "b", dw, *sets)
    a = open(ref["outputs"]["mask"], "rb").read()
    b = open(rec["outputs"]["mask"], "rb").read()
    assert a == b, "mask COG bytes differ between splits"
    mask, _, _ = read_mask(rec)
    np.testing.assert_array_equal(mask, whole_image_classes)


def test_nodata_stays_nodata_and_skips_model(tmp_path, s2_chip, dw, whole_image_classes):
    src_path = tmp_path / "holey.tif"
    with rasterio.open(s2_chip) as src:
        prof = src.profile
        data = src.read()
        names = src.descriptions
    data[:, :256, :256] = 0  # a whole 256 px tile of nodata (value 0 in every band)
    data[3, 300:310, 400:420] = 0  # nodata in one used band (B4) only
    with rasterio.open(src_path, "w", **prof) as dst:
        dst.write(data)
        dst.descriptions = names
    (rec,) = run_local(src_path, tmp_path / "out", dw, "tiling.tile_px=128", "tiling.block_px=256")
    mask, _, _ = read_mask(rec)
    assert (mask[:256, :256] == 255).all()
    assert (mask[300:310, 400:420] == 255).all()
    assert rec["stats"]["tiles_skipped_nodata"] == 4  # the four 128 px tiles inside the hole
    assert rec["stats"]["tiles_inferred"] == 16 - 4
    # outside the holes the prediction is the whole-image one, except within the halo of the edited pixels
    far = np.ones_like(mask, dtype=bool)
    far[: 256 + 40, : 256 + 40] = False
    far[300 - 40: 310 + 40, 400 - 40: 420 + 40] = False
    np.testing.assert_array_equal(mask[far], whole_image_classes[far])


def test_mask_is_a_valid_cog(tmp_path, s2_chip, dw):
    (rec,) = run_local(s2_chip, tmp_path, dw, "output.cog_blocksize_px=128")
    path = rec["outputs"]["mask"]
    with rasterio.open(path) as m:
        assert m.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert m.profile["tiled"] and m.block_shapes[0] == (128, 128)
        assert m.overviews(1), "no overviews"
        cmap = m.colormap(1)
        assert cmap[0][:3] == (0x41, 0x9B, 0xDF)  # water
        names = json.loads(m.tags()["GEOSEG_CLASS_NAMES"])
        assert names[6] == "built"
    assert not list(tmp_path.glob("**/.*.tmp")), "temporary files left behind"
    assert not (tmp_path / "Spain_7370579_S2Hand" / ".partial").exists()
    if shutil.which("gdalinfo"):
        out = subprocess.run(["gdalinfo", path], capture_output=True, text=True, check=True).stdout
        assert "LAYOUT=COG" in out and "Color Table" in out


def test_memory_flat_with_image_size(tmp_path, s2_chip, tiny_unet):
    """Peak traced allocations for a 4x larger input (VRT mosaics of the chip, 1024^2 vs 2048^2 px) stay at
    the smaller one's level: memory is bounded by the block, not the image."""
    from tools.vrt import tiled_vrt

    peaks = {}
    for k in (2, 4):
        vrt = tiled_vrt(s2_chip, tmp_path / f"x{k * k}.vrt", k)
        tracemalloc.start()
        predict([str(vrt)], str(tmp_path / f"out{k}"), overrides=[
            "runtime.engine=local", "vector.enabled=false", "tiling.block_px=256", "tiling.tile_px=128"],
            loaded_model=tiny_unet)
        peaks[k] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[4] <= 1.2 * peaks[2], peaks


def test_skip_complete_runs_only_new_scenes(tmp_path, s2_chip, tiny_unet):
    """A scheduled job over a growing prefix: finished scenes are skipped, new ones computed."""
    from geoseg.errors import ConfigError, OutputError

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(s2_chip, src / "a.tif")
    out = tmp_path / "out"
    sets = ["runtime.engine=local", "vector.enabled=false", "tiling.block_px=256"]
    (first,) = predict([str(src / "a.tif")], str(out), overrides=sets, loaded_model=tiny_unet)
    a_bytes = (out / "a" / "mask.tif").read_bytes()
    shutil.copy(s2_chip, src / "b.tif")  # new imagery arrives
    with pytest.raises(OutputError, match=r"outputs of scene 'a' already exist"):
        predict([str(src / "*.tif")], str(out), overrides=sets, loaded_model=tiny_unet)
    assert not (out / "b").exists()
    rec_a, rec_b = predict([str(src / "*.tif")], str(out), overrides=sets + ["output.skip_complete=true"],
                           loaded_model=tiny_unet)
    assert rec_a == first  # the stored record, untouched
    assert (out / "a" / "mask.tif").read_bytes() == a_bytes
    assert rec_b["stats"]["model_calls"] > 0 and (out / "b" / "run.json").exists()
    # b is a copy of a: same mask bytes apart from nothing (the scene name is not in the mask)
    assert (out / "b" / "mask.tif").read_bytes() == a_bytes
    again = predict([str(src / "*.tif")], str(out), overrides=sets + ["output.skip_complete=true"],
                    loaded_model=tiny_unet)
    assert again == [rec_a, rec_b]
    with pytest.raises(ConfigError, match="overwrite and skip_complete"):
        predict([str(src / "*.tif")], str(out), overrides=sets + ["output.skip_complete=true",
                                                                   "output.overwrite=true"], loaded_model=tiny_unet)
