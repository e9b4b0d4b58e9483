"""The Ray engine: same outputs as the local pipeline for any worker count and block size, logical-GPU
scheduling, per-block failures, resume after an interruption, node loss (in a subprocess cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rasterio

from geoseg.api import predict
from geoseg.errors import BlockError
from tests.rasters import corrupt_tile_copy

ROOT = Path(__file__).resolve().parent.parent


def _run(src, out, model, *sets, **kw):
    return predict([str(src)], str(out), overrides=list(sets), loaded_model=model, **kw)


def _outputs(rec) -> dict[str, bytes]:
    files = {k: v for k, v in rec["outputs"].items() if k not in ("manifest", "report", "item")}  # report, item: times
    return {k: Path(v).read_bytes() for k, v in files.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, s2_chip, dw_model):
    """The pipeline without Ray."""
    out = tmp_path_factory.mktemp("ref")
    (rec,) = _run(s2_chip, out, dw_model, "runtime.engine=local", "tiling.block_px=512")
    return _outputs(rec)


@pytest.mark.parametrize("workers,block_px", [(1, 256), (2, 256), (2, 512), (1, 1024)])
def test_ray_outputs_identical(tmp_path, s2_chip, dw_model, ray_local, reference, workers, block_px):
    (rec,) = _run(s2_chip, tmp_path, dw_model, "runtime.engine=ray", f"runtime.workers={workers}",
                  f"tiling.block_px={block_px}", "runtime.num_gpus_per_worker=0", "runtime.cpus_per_worker=0.5")
    got = _outputs(rec)
    assert got.keys() == reference.keys()
    for k in got:
        assert got[k] == reference[k], f"{k} differs (workers={workers}, block_px={block_px})"
    # run.json records each inference worker's busy time: every computed block once, by at most `workers` actors
    busy = rec["inference_workers"]
    assert 1 <= len(busy) <= workers and len({w["worker"] for w in busy}) == len(busy)
    assert sum(w["blocks"] for w in busy) == rec["stats"]["blocks_computed"] == (-(-512 // block_px)) ** 2
    for w in busy:
        assert 0 < w["forward_s"] <= w["span_s"] + 1e-3 and 0 < w["busy_fraction"] <= 1


def test_logical_gpu_scheduling(tmp_path, s2_chip, dw_model, ray_local, reference):
    """Two actors share the one logical GPU (0.5 each); without CUDA the model falls back to the CPU."""
    seen = []
    gpu_free = []

    def on_result(result):
        seen.append(result)
        gpu_free.append(ray_local.available_resources().get("GPU", 0.0))  # while both actors are alive

    assert ray_local.cluster_resources().get("GPU") == 1
    (rec,) = _run(s2_chip, tmp_path, dw_model, "runtime.engine=ray", "runtime.workers=2",
                  "runtime.num_gpus_per_worker=0.5", "runtime.cpus_per_worker=0.5", "tiling.block_px=256",
                  on_result=on_result)
    assert _outputs(rec)["mask"] == reference["mask"]
    assert len(seen) == 4
    # Both halves of the one GPU were held at once: two actors shared it.
    assert gpu_free and max(gpu_free) < 1e-9, gpu_free
    deadline = time.monotonic() + 10
    while ray_local.available_resources().get("GPU") != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_local.available_resources().get("GPU") == 1  # and given back after the job


def test_many_scenes_share_one_pool(tmp_path, s2_chip, dw_model, ray_local, reference):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.write_bytes(s2_chip.read_bytes())
    b.write_bytes(s2_chip.read_bytes())
    recs = predict([str(tmp_path / "*.tif")], str(tmp_path / "out"), loaded_model=dw_model,
                   overrides=["runtime.engine=ray", "runtime.workers=1", "tiling.block_px=256"])
    assert [Path(r["input"]["path"]).name for r in recs] == ["a.tif", "b.tif"]
    for r in recs:
        assert _outputs(r)["mask"] == reference["mask"]


class _Stop(Exception):
    pass


def test_resume_after_interruption(tmp_path, s2_chip, dw_model, ray_local, reference):
    seen = []

    def stop_after_3(result):
        seen.append(result.block_id)
        if len(seen) == 3:
            raise _Stop("simulated interruption")

    sets = ["runtime.engine=ray", "runtime.workers=2", "runtime.cpus_per_worker=0.5", "tiling.block_px=128",
            "tiling.tile_px=128"]
    with pytest.raises(_Stop):
        _run(s2_chip, tmp_path, dw_model, *sets, on_result=stop_after_3)
    scene = tmp_path / "Spain_7370579_S2Hand"
    assert not (scene / "run.json").exists() and not (scene / "mask.tif").exists()
    # Block records are stored by the workers that finished the blocks: every block the writer took has one, and
    # blocks finished while the driver stopped may have one too (they are not computed again either).
    stored = sorted(p.stem for p in (scene / ".partial" / "blocks").glob("*.npz"))
    assert set(seen) <= set(stored) and len(stored) < 16
    (rec,) = _run(s2_chip, tmp_path, dw_model, *sets)
    st = rec["stats"]
    n = len(stored)
    assert st["blocks_resumed"] == n and st["blocks_computed"] == 16 - n
    # one forward pass per 128 px tile: only the remaining blocks reached the model
    assert st["model_calls"] == 16 - n and st["tiles_inferred"] == 16 - n
    assert sum(w["blocks"] for w in rec["inference_workers"]) == 16 - n  # resumed blocks had no inference worker
    assert _outputs(rec) == reference


def test_writer_lost_mid_run(tmp_path, s2_chip, dw_model, ray_local, reference):
    """The scene's writer actor dies after 5 of 16 blocks (as when its node is lost): a new writer takes over,
    reading the blocks the old one had taken from their block records; the outputs are identical."""
    killed = []

    def kill_writer(outcome):
        if len(killed) == 0 and outcome.block_id:
            names = [a["name"] if isinstance(a, dict) else a for a in ray_local.util.list_named_actors()]
            writers = [n for n in names if n.startswith("geoseg-writer-")]
            if len(killed) == 0 and writers and sum(1 for _ in seen) >= 4:
                ray_local.kill(ray_local.get_actor(writers[0]))
                killed.append(writers[0])
        seen.append(outcome.block_id)

    seen: list[str] = []
    (rec,) = _run(s2_chip, tmp_path, dw_model, "runtime.engine=ray", "runtime.workers=2",
                  "runtime.cpus_per_worker=0.5", "tiling.block_px=128", "tiling.tile_px=128", on_result=kill_writer)
    assert killed and len(seen) == 16
    assert rec["stats"]["blocks_computed"] + rec["stats"]["blocks_resumed"] == 16
    assert rec["stats"]["blocks_resumed"] >= 1  # the blocks the lost writer had taken came from their records
    assert _outputs(rec) == reference


def test_changed_config_refuses_to_mix(tmp_path, s2_chip, dw_model, ray_local):
    from geoseg.errors import OutputError

    def stop(result):
        raise _Stop()

    with pytest.raises(_Stop):
        _run(s2_chip, tmp_path, dw_model, "runtime.engine=local", "tiling.block_px=256", on_result=stop)
    with pytest.raises(OutputError, match="different configuration"):
        _run(s2_chip, tmp_path, dw_model, "runtime.engine=local", "tiling.block_px=256", "tiling.tile_px=128")
    (rec,) = _run(s2_chip, tmp_path, dw_model, "runtime.engine=local", "tiling.block_px=256",
                  "tiling.tile_px=128", "output.overwrite=true")
    assert rec["stats"]["blocks_resumed"] == 0


def test_block_failure_fails_run_or_is_recorded(tmp_path, s2_chip, dw_model, ray_local):
    bad = corrupt_tile_copy(s2_chip, tmp_path / "bad.tif", (0, 3), band=2, seed=1)
    sets = ["runtime.engine=ray", "tiling.block_px=256", "tiling.tile_px=128", "vector.enabled=false"]
    with pytest.raises(BlockError, match=r"bad\.tif: block r00000c00001: .*ZIPDecode"):
        _run(bad, tmp_path / "strict", dw_model, *sets)
    assert not (tmp_path / "strict" / "bad" / "run.json").exists()
    (rec,) = _run(bad, tmp_path / "lenient", dw_model, *sets, "runtime.max_failed_blocks=1")
    assert list(rec["failed_blocks"]) == ["r00000c00001"]
    assert rec["stats"]["blocks_failed"] == 1
    with rasterio.open(rec["outputs"]["mask"]) as m:
        mask = m.read(1)
    assert (mask[:256, 256:] == 255).all()  # the skipped block stays nodata
    assert (mask[256:, :] != 255).any()


def test_unschedulable_pool_is_a_clear_error(tmp_path, s2_chip, dw_model, ray_local):
    from geoseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"runtime.writers=1 x runtime.cpus_per_writer=0.5 plus "
                                          r"runtime.cpus_per_task=1 need 3.5 CPUs; the Ray cluster has 3"):
        _run(s2_chip, tmp_path, dw_model, "runtime.engine=ray", "runtime.workers=2")
    with pytest.raises(ConfigError, match=r"need 2 GPUs; the Ray cluster has 1"):
        _run(s2_chip, tmp_path, dw_model, "runtime.engine=ray", "runtime.workers=2", "runtime.cpus_per_worker=0.5",
             "runtime.num_gpus_per_worker=1")


def test_node_loss_mid_run(tmp_path, s2_chip):
    """A head + a worker node holding the (logical) GPU; the worker is removed mid-run and another added."""
    script = ROOT / "tests" / "ray_fault_job.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(script), str(s2_chip), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["removed_node_after_blocks"] >= 1
    assert report["identical"], report


def test_waits_for_resources_then_refuses(tmp_path, s2_chip, dw_model, ray_local):
    """With runtime.wait_for_resources_s the pool waits for an autoscaler to add what it lacks, then refuses
    with the same clear error (here nothing adds the 0.3 missing CPUs)."""
    import time

    from geoseg.errors import ConfigError

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"need 3\.3 CPUs; the Ray cluster has 3\. .* \(after waiting 3 s"):
        _run(s2_chip, tmp_path, dw_model, "runtime.engine=ray", "runtime.workers=2", "runtime.cpus_per_worker=0.9",
             "runtime.num_gpus_per_worker=0", "runtime.wait_for_resources_s=3")
    assert time.monotonic() - t0 >= 3
    assert not list(tmp_path.rglob("run.json"))
