"""The bad-input corpus (tests/bad_inputs.py) through the real CLI, and the input contract's fixes that make
wrong maps impossible: NaN is filled like nodata, the scale that converts units gives the right map, relative
paths in a job file, ``geoseg info`` reports every check."""

from __future__ import annotations

import re

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.api import predict
from geoseg.cli import main
from geoseg.errors import EXIT_INPUT
from tests import bad_inputs
from tests.rasters import chip_copy

_RESULTS: dict[str, tuple[bad_inputs.Case, int, str]] = {}
_DIRS: list = []
_FINAL_NAMES = ("mask.tif", "run.json", "manifest.json", "polygons.parquet", "polygons.gpkg", "polygons.geojson")


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c.name for c in bad_inputs.CASES])
def test_bad_input(case, tmp_path, s2_chip):
    code, err, out = bad_inputs.run_case(case, tmp_path, s2_chip)
    _RESULTS[case.name] = (case, code, err)
    _DIRS.append(tmp_path)
    assert "Traceback" not in err + out, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert code == case.exit_code, f"exit {code}, expected {case.exit_code}: {err}"
    assert lines[0].startswith("geoseg: error: "), lines[0]
    assert re.search(case.pattern, lines[0]), f"{lines[0]!r} does not match {case.pattern!r}"
    assert case.names in lines[0], f"the message must name {case.names!r}: {lines[0]}"
    produced = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] if (tmp_path / "out").exists() else []
    assert not [p for p in produced if p.name in _FINAL_NAMES], produced
    if code == EXIT_INPUT:  # refused before any work: not even a scratch file
        assert not produced, produced


def test_errors_doc_is_current(s2_chip):
    """docs/errors.md is the table generated from this run of the corpus (``python -m tests.bad_inputs``)."""
    if len(_RESULTS) != len(bad_inputs.CASES):
        pytest.skip("needs the whole corpus in this run")
    table = bad_inputs.table([_RESULTS[c.name] for c in bad_inputs.CASES], _DIRS, s2_chip)
    assert bad_inputs.DOC.read_text() == table, "docs/errors.md is stale: run python -m tests.bad_inputs"


def _mask(rec) -> np.ndarray:
    with rasterio.open(rec["outputs"]["mask"]) as ds:
        return ds.read(1)


def _run(path, out, model, *sets):
    (rec,) = predict([str(path)], str(out), overrides=["runtime.engine=local", "vector.enabled=false",
                                                       "tiling.block_px=256", *sets], loaded_model=model)
    return rec


def test_nan_and_inf_are_filled_like_nodata(tmp_path, s2_chip, dw_model):
    """NaN / inf pixels must not leak into their neighbours' classes: the mask equals a run where those pixels
    were nodata from the start (before the fix, 7,169 valid pixels around NaNs turned into water)."""
    def with_value(v):
        def f(d):
            d = d.astype(np.float32)
            d[:, 200:230, 300:340] = v
            d[4, 100:104, 50:60] = v  # one band only (B5)
            return d
        return f

    prof = {"dtype": "float32", "nodata": 0.0}
    nan = chip_copy(s2_chip, tmp_path / "nan.tif", profile=prof, transform_data=with_value(np.nan))
    inf = chip_copy(s2_chip, tmp_path / "inf.tif", profile=prof, transform_data=with_value(np.inf))
    nodata = chip_copy(s2_chip, tmp_path / "nodata.tif", profile=prof, transform_data=with_value(0.0))
    ref = _mask(_run(nodata, tmp_path / "o_nodata", dw_model))
    assert (ref[200:230, 300:340] == 255).all()
    np.testing.assert_array_equal(_mask(_run(nan, tmp_path / "o_nan", dw_model)), ref)
    np.testing.assert_array_equal(_mask(_run(inf, tmp_path / "o_inf", dw_model)), ref)


def test_input_scale_converts_units(tmp_path, s2_chip, dw_model):
    """Reflectance 0-1 is refused (corpus); with ``input.scale=10000`` it maps as the digital numbers do."""
    refl = chip_copy(s2_chip, tmp_path / "refl.tif", profile={"dtype": "float32", "nodata": 0.0},
                     transform_data=lambda d: d.astype(np.float32) / 10000)
    ref = _mask(_run(s2_chip, tmp_path / "o_dn", dw_model))
    got = _mask(_run(refl, tmp_path / "o_refl", dw_model, "input.scale=10000"))
    agree = (got == ref).mean()
    assert agree > 0.999, agree  # float32 rounding of x / 10000 * 10000 flips a few boundary pixels at most


def test_info_reports_every_check(tmp_path, s2_chip):
    refl = chip_copy(s2_chip, tmp_path / "refl.tif", profile={"dtype": "float32", "nodata": 0.0},
                     transform_data=lambda d: d.astype(np.float32) / 10000)
    res = CliRunner().invoke(main, ["info", str(refl), "--model", "dynamic-world"])
    assert res.exit_code == EXIT_INPUT
    out = res.stdout
    assert "dynamic-world: does NOT fit (1 failed checks)" in out
    for name in ("size", "bands", "gsd", "value_range"):
        assert re.search(rf"(ok  |FAIL) {name}", out), out
    assert "FAIL value_range" in out and "input.scale=10000" in res.stderr
    res = CliRunner().invoke(main, ["info", str(s2_chip), "--model", "dynamic-world"])
    assert res.exit_code == 0 and "dynamic-world: fits" in res.stdout and "FAIL" not in res.stdout


def test_job_file_paths_relative_to_the_file(tmp_path, s2_chip, monkeypatch):
    from geoseg.config import load_config

    (tmp_path / "jobs").mkdir()
    chip_copy(s2_chip, tmp_path / "scene.tif")
    job = tmp_path / "jobs" / "job.yaml"
    job.write_text("input:\n  paths: [../scene.tif, s3://bucket/x.tif]\noutput:\n  dir: out\n")
    monkeypatch.chdir("/")
    cfg = load_config(job, ["input.bands=[2,3,4,5,6,7,8,12,13]"])
    assert cfg.input.paths == [str(tmp_path / "jobs" / ".." / "scene.tif"), "s3://bucket/x.tif"]
