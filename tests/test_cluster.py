"""A real multi-node Ray cluster, as an operator runs one: a head and a worker node started with ``ray start``
(tests/cluster.py), the job entrypoints in jobs/ submitted with ``ray job submit`` (the Jobs API), outputs in
one local directory that both nodes share (they are on this machine: ``output.shared_filesystem: true``).

Each node has 2 CPUs and the pool asks 1.5 per inference actor (plus 0.5 per read/finish task), so exactly one
actor fits per node and both nodes compute blocks. Checked for ``jobs/scheduled_mapping.py`` and
``jobs/map_region.py``: the job SUCCEEDED, ``stats.blocks_by_node`` names exactly the two nodes' ids (as the
GCS lists them), every output is in the output directory, and the outputs equal, byte for byte, those of the
same job on the local engine. A local output directory without ``output.shared_filesystem`` is refused before
any compute (exit 3, the key named). Last, a spare node joins and the raylet of a worker node whose actor has
computed blocks is SIGKILLed mid-job: the job still SUCCEEDS with identical outputs.

Nodes are on 127.0.0.2 (loopback; see tests/cluster.py), with Ray's token authentication on a token of their
own. ``ray stop`` is never run (it would stop every Ray on the machine): the harness ends its own processes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import rasterio
import yaml
from rasterio.windows import Window

from tests.cluster import RayCluster
from tools.vrt import tiled_vrt

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
NODE_CPUS = 2
# one inference actor per node (1.5 of its 2 CPUs), the rest for one read / finish task at a time
POOL = {"engine": "ray", "workers": 2, "cpus_per_worker": 1.5, "cpus_per_task": 0.5}
SETTINGS = {
    "model": {"name": "dynamic-world"},
    "tiling": {"block_px": 256, "tile_px": 256},  # 4 blocks per 512 x 512 chip
    "output": {"report": False},
    "vector": {"formats": ["parquet", "gpkg"]},
}
# run.json holds durations, paths and Ray node ids, item.json / collection.json times: compared apart
VARYING = {"run.json", "item.json", "collection.json"}
TIME_KEYS = {"datetime", "created", "updated", "interval"}
RUN_KEYS = ("geoseg_version", "model", "tiling", "failed_blocks", "class_pixel_counts", "class_areas")


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _files(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()}


def _without(obj, keys: set[str]):
    if isinstance(obj, dict):
        return {k: _without(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_without(v, keys) for v in obj]
    return obj


def _assert_same_outputs(out: Path, ref: Path) -> None:
    """Every file the local engine wrote, and no other, byte-identical; run.json's results and STAC files equal
    but for times."""
    got, want = _files(out), _files(ref)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    differ = [k for k in want if Path(k).name not in VARYING and got[k].read_bytes() != want[k].read_bytes()]
    assert not differ, f"outputs differ from the local engine's: {differ}"
    for k in (k for k in want if Path(k).name in VARYING):
        a, b = json.loads(got[k].read_text()), json.loads(want[k].read_text())
        if Path(k).name == "run.json":
            stats = [{s: v for s, v in r["stats"].items() if s != "blocks_by_node"} for r in (a, b)]
            assert stats[0] == stats[1], (k, stats)
            assert {x: a[x] for x in RUN_KEYS} == {x: b[x] for x in RUN_KEYS}, k
        else:
            assert _without(a, TIME_KEYS) == _without(b, TIME_KEYS), k


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))]


def _assert_outputs_in(out: Path, rec: dict) -> None:
    for key, path in rec["outputs"].items():
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(out.resolve()), (key, path)
    assert not list(out.rglob(".partial")), "block records left behind"


def _submit(cluster: RayCluster, job_id: str, args: list[str], timeout: float = 240) -> tuple[dict, str]:
    cluster.submit([PY, *args], job_id)
    info = cluster.wait_job(job_id, timeout)
    return info, cluster.job_logs(job_id)


@pytest.fixture(scope="module")
def cluster_starting():
    """The cluster, starting in a thread (while the local references are computed); stopped at the end."""
    c = RayCluster()
    box: dict = {}

    def start():
        t0 = time.monotonic()
        try:
            box["nodes"] = c.start(head_cpus=NODE_CPUS, workers={"worker1": NODE_CPUS})
            box["seconds"] = time.monotonic() - t0
        except BaseException as e:  # raised in the test that waits for the cluster
            box["error"] = e

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    try:
        yield c, thread, box
    finally:
        thread.join(timeout=180)
        stubborn = c.stop()
        print(f"cluster stopped; SIGKILLed after the grace period: {stubborn}")
    assert not c.processes(), [p.pid for p in c.processes()]


@pytest.fixture(scope="module")
def cluster(cluster_starting) -> RayCluster:
    c, thread, box = cluster_starting
    thread.join(timeout=180)
    if "error" in box:
        raise box["error"]
    assert "nodes" in box, "the cluster did not start within 180 s"
    print(f"cluster of {len(box['nodes'])} nodes up in {box['seconds']:.1f} s")
    return c


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, s2_chip):
    """Two overlapping scenes cut from the real chip (one region grid), and a 3 x 3 mosaic of it (36 blocks)."""
    d = tmp_path_factory.mktemp("scenes")
    out = []
    for name, win in (("west", Window(0, 0, 320, 512)), ("east", Window(192, 0, 320, 512))):
        with rasterio.open(s2_chip) as src:
            prof = src.profile | {"width": win.width, "height": win.height, "transform": src.window_transform(win)}
            data, names = src.read(window=win), src.descriptions
        with rasterio.open(d / f"{name}.tif", "w", **prof) as dst:
            dst.write(data)
            dst.descriptions = names
        out.append(d / f"{name}.tif")
    big = tiled_vrt(s2_chip, d / "mosaic3x3.vrt", 3)
    return {"west": out[0], "east": out[1], "big": big}


def _scheduled_config(path: Path, inputs: list[Path], out: Path, **output) -> Path:
    cfg = json.loads(json.dumps(SETTINGS))
    cfg["input"] = {"paths": [str(p) for p in inputs]}
    cfg["runtime"] = dict(POOL)
    cfg["output"] |= {"dir": str(out), **output}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _node_ids(cluster: RayCluster) -> dict[str, str]:
    return {n["node_id"]: n["state"] for n in cluster.list_nodes()}


@pytest.fixture(scope="module")
def scheduled_job(tmp_path_factory, scenes, cluster_starting):
    """The scheduled job's inputs (two scenes: a crop of the chip and a 3 x 3 mosaic of it, 4 + 36 blocks: long
    enough for a node to be killed mid-job) and its outputs on the local engine."""
    d = tmp_path_factory.mktemp("scheduled")
    inputs = [scenes["west"], scenes["big"]]
    cfg = _scheduled_config(d / "local.yaml", inputs, d / "ref")
    cfg_text = yaml.safe_load(cfg.read_text())
    cfg_text["runtime"] = {"engine": "local"}
    cfg.write_text(yaml.safe_dump(cfg_text))
    assert _job("scheduled_mapping").main([str(cfg)]) == 0
    return inputs, d / "ref"


def test_scheduled_mapping_on_two_nodes(scheduled_job, cluster, tmp_path):
    inputs, ref = scheduled_job
    out = tmp_path / "out"
    cfg = _scheduled_config(tmp_path / "job.yaml", inputs, out, shared_filesystem=True)
    t0 = time.monotonic()
    info, logs = _submit(cluster, "scheduled", [str(ROOT / "jobs" / "scheduled_mapping.py"), str(cfg)])
    print(f"scheduled_mapping on the cluster: {time.monotonic() - t0:.1f} s")
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    assert info["driver_exit_code"] == 0
    _assert_same_outputs(out, ref)
    nodes = _node_ids(cluster)
    assert sorted(nodes) == sorted(n.node_id for n in cluster.nodes)
    total = {}
    for rec in _records(out):
        _assert_outputs_in(out, rec)
        by_node = rec["stats"]["blocks_by_node"]
        assert sum(by_node.values()) == rec["stats"]["blocks_computed"] > 0, rec["stats"]
        assert set(by_node) <= set(nodes), (by_node, nodes)
        for k, v in by_node.items():
            total[k] = total.get(k, 0) + v
    names = {n.node_id: n.name for n in cluster.nodes}
    print(f"blocks by node: { {names[k]: v for k, v in total.items()} }")
    assert set(total) == set(nodes), f"not every node computed blocks: {total}"


def test_map_region_on_two_nodes(cluster, scenes, tmp_path):
    with rasterio.open(scenes["west"]) as a:
        # 300 x 300 px across the west scene, the overlap and the east scene: 2 x 2 blocks with the halo
        x0, y0 = a.bounds.left + 150 * a.res[0], (a.bounds.top + a.bounds.bottom) / 2
        bounds = (x0, y0 - 150 * a.res[1], x0 + 300 * a.res[0], y0 + 150 * a.res[1])
    aoi = ",".join(repr(v) for v in bounds)
    args = [str(scenes["west"]), str(scenes["east"]), f"--aoi={aoi}", "--name", "district"]
    sets = [f"tiling.block_px={SETTINGS['tiling']['block_px']}", f"tiling.tile_px={SETTINGS['tiling']['tile_px']}",
            "output.report=false", "vector.formats=[parquet,gpkg]"]
    pool = [f"runtime.{k}={v}" for k, v in POOL.items()]
    out = tmp_path / "out"
    t0 = time.monotonic()
    info, logs = _submit(cluster, "region", [str(ROOT / "jobs" / "map_region.py"), *args, "--out", str(out),
                                             *[x for s in [*sets, *pool, "output.shared_filesystem=true"]
                                               for x in ("--set", s)]])
    print(f"map_region on the cluster: {time.monotonic() - t0:.1f} s")
    assert info["status"] == "SUCCEEDED", logs[-6000:]

    ref = tmp_path / "ref"
    assert _job("map_region").main([*args, "--out", str(ref), *[x for s in [*sets, "runtime.engine=local"]
                                                                for x in ("--set", s)]]) == 0
    _assert_same_outputs(out, ref)
    (rec,) = _records(out)
    _assert_outputs_in(out, rec)
    by_node = rec["stats"]["blocks_by_node"]
    print(f"blocks by node: { {n.name: by_node.get(n.node_id) for n in cluster.nodes} }")
    assert set(by_node) == set(_node_ids(cluster)), by_node
    assert sum(by_node.values()) == rec["stats"]["blocks_computed"]


def test_local_output_without_shared_filesystem_is_refused(cluster, s2_chip, tmp_path):
    """Two nodes, a local output directory, no output.shared_filesystem: refused before any block is computed,
    exit code 3 (bad configuration: a retry cannot help), the key named."""
    out = tmp_path / "out"
    info, logs = _submit(cluster, "refused", [str(ROOT / "jobs" / "map_region.py"), str(s2_chip), "--out", str(out),
                                              *[x for k, v in POOL.items() for x in ("--set", f"runtime.{k}={v}")]])
    assert info["status"] == "FAILED", logs[-4000:]
    assert info["driver_exit_code"] == 3, (info, logs[-4000:])
    assert "output.shared_filesystem" in logs and "2 nodes" in logs, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    assert not list(out.rglob("*.npz")) and not list(out.rglob("mask.tif")), _files(out) if out.exists() else None


def _predicts_by_node(cluster: RayCluster, job_id: str) -> dict[str, int]:
    """The job's finished InferenceActor.predict calls per node (the state API's task events)."""
    out: dict[str, int] = {}
    for t in cluster.list_state("tasks", job_id=job_id, name="InferenceActor.predict", state="FINISHED"):
        out[t["node_id"]] = out.get(t["node_id"], 0) + 1
    return out


def test_worker_node_killed_mid_job(scheduled_job, cluster, tmp_path):
    """A spare node joins while the job starts; once a worker node's inference actor has computed blocks, that
    node's raylet is SIGKILLed (a machine lost mid-job). Ray restarts the actor on a node with room, and
    reruns the lost tasks; the job SUCCEEDS with outputs identical to the local engine's."""
    inputs, ref = scheduled_job
    total = sum(r["stats"]["blocks_computed"] for r in _records(ref))
    out = tmp_path / "out"
    cfg = _scheduled_config(tmp_path / "job.yaml", inputs, out, shared_filesystem=True)
    head = cluster.nodes[0]
    t0 = time.monotonic()
    cluster.submit([PY, str(ROOT / "jobs" / "scheduled_mapping.py"), str(cfg)], "node-kill")
    spare = cluster.add_node("spare", num_cpus=NODE_CPUS, wait=False)  # joins while the driver starts
    cluster.await_node(spare)

    def blocks_recorded() -> int:
        return sum(len(list(p.glob("*.npz"))) for p in out.glob("*/.partial/blocks"))

    def running() -> None:
        info = cluster.job_info("node-kill")
        assert info["status"] in ("PENDING", "RUNNING"), (info, cluster.job_logs("node-kill")[-4000:])
        assert time.monotonic() - t0 < 180, "no worker node computed blocks within 180 s"

    victim, seen = None, None
    while True:  # a worker node (not the head) whose actor has finished a block, and the blocks done by then recorded
        running()
        job_id = cluster.job_info("node-kill").get("job_id")
        if not job_id:  # the driver has not connected yet
            time.sleep(0.2)
            continue
        done = _predicts_by_node(cluster, job_id)
        if victim is None:
            workers = [n for n in cluster.nodes if n is not head and done.get(n.node_id, 0) >= 1]
            if workers:
                victim, seen = workers[0], sum(done.values())
        if victim is not None and blocks_recorded() >= seen:
            break
        time.sleep(0.2)
    at_kill = blocks_recorded()
    cluster.kill_raylet(victim)
    print(f"killed {victim.name}'s raylet after {at_kill} block records, {time.monotonic() - t0:.1f} s in; "
          f"predicts by node then: {done}")
    assert at_kill < total and not list(out.glob("*/run.json")), "the job had finished before the kill"
    info = cluster.wait_job("node-kill", 240)
    logs = cluster.job_logs("node-kill")
    print(f"node-kill job: {time.monotonic() - t0:.1f} s")
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    _assert_same_outputs(out, ref)
    by_node: dict[str, int] = {}
    for rec in _records(out):
        _assert_outputs_in(out, rec)
        assert sum(rec["stats"]["blocks_by_node"].values()) == rec["stats"]["blocks_computed"]
        for k, v in rec["stats"]["blocks_by_node"].items():
            by_node[k] = by_node.get(k, 0) + v
    names = {n.node_id: n.name for n in cluster.nodes}
    print(f"blocks by node: { {names.get(k, k): v for k, v in by_node.items()} } (victim: {victim.name})")
    assert set(by_node) <= set(names), by_node
    assert sum(by_node.values()) == total
    t1 = time.monotonic()  # the GCS marks a node dead once its health checks fail
    while _node_ids(cluster)[victim.node_id] != "DEAD":
        assert time.monotonic() - t1 < 60, "the killed node is still ALIVE for the GCS"
        time.sleep(0.5)
    victim.proc.wait(timeout=30)  # its `ray start --block` saw the raylet die and ended the node's processes
    assert not cluster.node_processes(victim), cluster.node_processes(victim)
