"""Run by tests/test_runner.py in its own process: a Ray cluster of a head and a GPU worker node, the worker
node removed mid-run and another added; the outputs must equal the local pipeline's byte for byte.

Prints one JSON line: {"removed_node_after_blocks": n, "identical": bool, ...}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from geoseg.api import predict
from geoseg.models import load_model


def main(chip: str, tmp: str) -> None:
    tmp_path = Path(tmp)
    model = load_model("dynamic-world")
    sets = ["tiling.block_px=128", "tiling.tile_px=128", "vector.enabled=true"]
    (ref,) = predict([chip], str(tmp_path / "ref"), overrides=["runtime.engine=local", *sets], loaded_model=model)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    state = {"blocks": 0, "removed_after": None}

    def on_result(result):
        state["blocks"] += 1
        if state["blocks"] == 3:
            cluster.remove_node(worker)
            cluster.add_node(num_cpus=1, num_gpus=1)
            state["removed_after"] = state["blocks"]

    try:
        (rec,) = predict([chip], str(tmp_path / "ray"), loaded_model=model, on_result=on_result, overrides=[
            "runtime.engine=ray", "runtime.workers=1", "runtime.num_gpus_per_worker=1",
            "output.shared_filesystem=true", *sets])  # every node of this test cluster is this machine
    finally:
        ray.shutdown()
        cluster.shutdown()
    keys = [k for k in ref["outputs"] if k not in ("manifest", "report", "item")]  # report.html and item.json hold times
    same = {k: Path(ref["outputs"][k]).read_bytes() == Path(rec["outputs"][k]).read_bytes() for k in keys}
    print(json.dumps({"removed_node_after_blocks": state["removed_after"], "identical": all(same.values()),
                      "per_output": same, "blocks": state["blocks"], "stats": rec["stats"]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
