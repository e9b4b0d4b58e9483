"""The Ray job entrypoints in jobs/, run as a scheduler would (local engine here; Ray is tested in test_runner)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from geoseg.errors import EXIT_INPUT

ROOT = Path(__file__).resolve().parent.parent


def _job(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scheduled_rerun_computes_only_new_scenes(tmp_path, s2_chip):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(s2_chip, incoming / "day1.tif")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": "dynamic-world"},
        "input": {"paths": [str(incoming / "*.tif")]},
        "tiling": {"block_px": 512, "tile_px": 256},
        "runtime": {"engine": "local"},
        "output": {"dir": str(tmp_path / "out")},
        "vector": {"enabled": False},
    }))
    job = _job("scheduled_mapping")
    assert job.main([str(cfg)]) == 0
    day1 = (tmp_path / "out" / "day1" / "run.json").read_text()
    shutil.copy(s2_chip, incoming / "day2.tif")
    assert job.main([str(cfg)]) == 0  # night 2: day1 is done, day2 is new
    assert (tmp_path / "out" / "day1" / "run.json").read_text() == day1
    rec2 = json.loads((tmp_path / "out" / "day2" / "run.json").read_text())
    assert rec2["stats"]["model_calls"] > 0
    assert job.main([str(cfg), "--set", "output.overwrite=true"]) == 0  # redo everything on request
    assert (tmp_path / "out" / "day1" / "run.json").read_text() != day1  # new timings
    redo = tmp_path / "redo.yaml"  # overwrite set in the file itself, not only by --set
    redo.write_text(cfg.read_text().replace("dir: ", "overwrite: true\n  dir: "))
    assert "overwrite: true" in redo.read_text()
    assert job.main([str(redo)]) == 0
    assert job.main([str(tmp_path / "missing.yaml")]) == EXIT_INPUT  # never worth a retry


def test_export_vectors_job(tmp_path, s2_chip):
    assert _job("map_region").main([str(s2_chip), "--out", str(tmp_path / "out"), "--set", "runtime.engine=local",
                                    "--set", "vector.enabled=false"]) == 0
    mask = tmp_path / "out" / s2_chip.stem / "mask.tif"
    assert mask.exists() and not (tmp_path / "out" / s2_chip.stem / "polygons.parquet").exists()
    job = _job("export_vectors")
    dst = tmp_path / "built.parquet"
    args = [str(mask), "--out", str(dst), "--workers", "1", "--set", "vector.include_classes=[built]"]
    assert job.main(args) == 0
    table = pq.read_table(dst)
    assert table.num_rows > 0 and set(table.column("class_name").to_pylist()) == {"built"}
    assert job.main(args) == EXIT_INPUT  # exists: refused
    assert job.main(args + ["--overwrite"]) == 0
