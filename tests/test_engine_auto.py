"""runtime.engine=auto (the default): a small job with no cluster address runs in this process, anything else on
Ray. Which engine ran is observed by wrapping the two (the Ray one is replaced by the local engine here, so no Ray
starts: test_runner.py proves both engines write identical outputs)."""

from __future__ import annotations

from pathlib import Path

import pytest

import geoseg.driver as driver
import geoseg.engines.local as local_engine
import geoseg.engines.ray as ray_engine
from geoseg.api import predict
from geoseg.config import JobConfig


@pytest.fixture()
def engines(monkeypatch):
    """Record which engine each run used; the 'ray' engine runs the local one (same outputs, no Ray start)."""
    used: list[str] = []
    local = local_engine.LocalEngine

    class FakeLocal(local):
        def __enter__(self):
            used.append("local")
            return super().__enter__()

    class FakeRay(local):
        def __enter__(self):
            used.append("ray")
            return super().__enter__()

    monkeypatch.setattr(local_engine, "LocalEngine", FakeLocal)
    monkeypatch.setattr(ray_engine, "RayEngine", FakeRay)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return used


def _run(chip, out, model, *sets):
    (rec,) = predict([str(chip)], str(out), overrides=["vector.enabled=false", "output.report=false", *sets],
                     loaded_model=model)
    return Path(rec["outputs"]["mask"]).read_bytes()


def test_auto_is_the_default():
    assert JobConfig().runtime.engine == "auto"


def test_small_job_runs_in_process(tmp_path, s2_chip, dw_model, engines):
    """The 512 x 512 chip is one block: no Ray; the mask is the forced-local engine's, byte for byte."""
    auto = _run(s2_chip, tmp_path / "auto", dw_model)
    forced = _run(s2_chip, tmp_path / "local", dw_model, "runtime.engine=local")
    assert engines == ["local", "local"]
    assert auto == forced


def test_many_blocks_go_to_ray(tmp_path, s2_chip, dw_model, engines):
    n = driver.AUTO_LOCAL_MAX_BLOCKS
    assert (512 // 128) ** 2 > n  # 16 blocks of 128 px
    _run(s2_chip, tmp_path / "a", dw_model, "tiling.block_px=128", "tiling.tile_px=128")
    assert engines == ["ray"]


@pytest.mark.parametrize("how", ["env", "config"])
def test_cluster_address_goes_to_ray(tmp_path, s2_chip, dw_model, engines, monkeypatch, how):
    sets = []
    if how == "env":
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    else:
        sets.append("runtime.address=ray://head:10001")
    _run(s2_chip, tmp_path / "a", dw_model, *sets)
    assert engines == ["ray"]


def test_forced_ray_stays_ray(tmp_path, s2_chip, dw_model, engines):
    _run(s2_chip, tmp_path / "a", dw_model, "runtime.engine=ray")
    assert engines == ["ray"]
