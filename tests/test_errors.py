"""Bad input: one clear error naming the file and the problem, non-zero exit, nothing half-written."""

from __future__ import annotations

import os
import pickle

import pytest
from affine import Affine
from click.testing import CliRunner

from geoseg.api import predict
from geoseg.cli import main
from geoseg.errors import BlockError, ConfigError, GeosegError, InputError, OutputError
from tests.rasters import chip_copy, corrupt_tile_copy


def _predict(inp, out, model, *sets):
    return predict([str(inp)], str(out), overrides=["runtime.engine=local", *sets], loaded_model=model)


def _nothing_written(out):
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not leftovers, leftovers


@pytest.fixture()
def out(tmp_path):
    return tmp_path / "out"


def test_missing_file(tmp_path, out, tiny_unet):
    with pytest.raises(InputError, match=r"nope\.tif: input not found"):
        _predict(tmp_path / "nope.tif", out, tiny_unet)
    _nothing_written(out)


def test_not_a_raster(tmp_path, out, tiny_unet):
    p = tmp_path / "notes.tif"
    p.write_text("these are not pixels\n")
    with pytest.raises(InputError, match=r"notes\.tif: not a readable raster"):
        _predict(p, out, tiny_unet)
    _nothing_written(out)


def test_corrupt_geotiff_header(tmp_path, out, s2_chip, tiny_unet):
    p = tmp_path / "truncated.tif"
    p.write_bytes(s2_chip.read_bytes()[:3000])
    with pytest.raises(InputError, match=r"truncated\.tif: truncated or corrupt raster"):
        _predict(p, out, tiny_unet)
    _nothing_written(out)


def test_corrupt_block_names_file_and_block(tmp_path, out, s2_chip, tiny_unet):
    """A GeoTIFF whose header is fine but one compressed tile is garbage fails on that block, by name."""
    # band 2 (B2) is one the model reads; its tile (1, 1) is block r1c1 with 128 px blocks
    p = corrupt_tile_copy(s2_chip, tmp_path / "badtile.tif", (1, 1), band=2, seed=0)
    with pytest.raises(BlockError) as e:
        _predict(p, out, tiny_unet, "tiling.block_px=128", "tiling.tile_px=128", "vector.enabled=false")
    msg = str(e.value)
    # the first block whose read window (block + halo) reaches the broken tile is named
    assert msg.startswith(f"{p}: block r00000c00000: ") and "ZIPDecode" in msg
    assert not (out / "badtile" / "run.json").exists() and not (out / "badtile" / "mask.tif").exists()


def test_no_crs(tmp_path, out, s2_chip, tiny_unet):
    p = chip_copy(s2_chip, tmp_path / "nocrs.tif", profile={"crs": None})
    with pytest.raises(InputError, match=r"nocrs\.tif: has no CRS"):
        _predict(p, out, tiny_unet)


def test_rotated_transform(tmp_path, out, s2_chip, tiny_unet):
    p = chip_copy(s2_chip, tmp_path / "rotated.tif",
                   profile={"transform": Affine(10, 2, 500000, 1, -10, 4000000), "crs": "EPSG:32630"})
    with pytest.raises(InputError, match=r"rotated\.tif: rotated or sheared"):
        _predict(p, out, tiny_unet)


def test_too_few_bands(tmp_path, out, s2_chip, tiny_unet):
    p = chip_copy(s2_chip, tmp_path / "rgb.tif", transform_data=lambda d: d[1:4])
    with pytest.raises(InputError, match=r"rgb\.tif: has 3 bands but the model needs 9"):
        _predict(p, out, tiny_unet)


def test_unsupported_dtype(tmp_path, out, s2_chip, tiny_unet):
    p = chip_copy(s2_chip, tmp_path / "complex.tif", profile={"dtype": "complex64", "nodata": None})
    with pytest.raises(InputError, match=r"complex\.tif: unsupported data type complex64 \(supported: uint8"):
        _predict(p, out, tiny_unet)


def test_config_typo_and_bad_values(out, s2_chip, tiny_unet):
    with pytest.raises(ConfigError, match="unknown key 'tiling.tile_size'"):
        _predict(s2_chip, out, tiny_unet, "tiling.tile_size=256")
    with pytest.raises(ConfigError, match=r"tile_px \(250\) must be a multiple of the model's output stride \(4\)"):
        _predict(s2_chip, out, tiny_unet, "tiling.tile_px=250", "tiling.block_px=500")
    with pytest.raises(ConfigError, match="tiling.block_px"):
        _predict(s2_chip, out, tiny_unet, "tiling.block_px=-512")
    _nothing_written(out)


def test_unwritable_output_dir(tmp_path, s2_chip, tiny_unet):
    if os.geteuid() == 0:  # root ignores permission bits; /proc refuses everyone
        target, pattern = "/proc/geoseg-out", r"/proc/geoseg-out: cannot create the output directory"
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
        pattern = "not writable"
    with pytest.raises(OutputError, match=pattern):
        _predict(s2_chip, target, tiny_unet)


def test_output_dir_is_a_file(tmp_path, s2_chip, tiny_unet):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="file"):
        _predict(s2_chip, f / "sub", tiny_unet)


def test_output_exists_refused_unless_overwrite(tmp_path, out, s2_chip, tiny_unet):
    _predict(s2_chip, out, tiny_unet, "vector.enabled=false")
    mask = out / "Spain_7370579_S2Hand" / "mask.tif"
    before = mask.read_bytes()
    with pytest.raises(OutputError, match="already exist.*--overwrite"):
        _predict(s2_chip, out, tiny_unet, "vector.enabled=false")
    assert mask.read_bytes() == before
    polygons = out / "Spain_7370579_S2Hand" / "polygons.parquet"
    assert not polygons.exists()
    # With overwrite the scene is replaced by the new job's outputs (this one writes polygons too).
    (rec,) = _predict(s2_chip, out, tiny_unet, "output.overwrite=true")
    assert polygons.exists() and rec["config"]["vector"]["enabled"]
    assert mask.read_bytes() == before  # same model and input: the same mask


def test_cli_exit_code_and_one_line(tmp_path):
    res = CliRunner().invoke(main, ["predict", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o"),
                                    "--set", "runtime.engine=local"])
    assert res.exit_code == 3  # EXIT_INPUT: retrying cannot help
    assert f"geoseg: error: {tmp_path / 'missing.tif'}: input not found" in res.output
    assert "Traceback" not in res.output


def test_errors_pickle_across_workers():
    for cls in (InputError, ConfigError, OutputError, BlockError):
        e = pickle.loads(pickle.dumps(cls("a.tif: broken")))
        assert type(e) is cls and str(e) == "a.tif: broken" and isinstance(e, GeosegError)
