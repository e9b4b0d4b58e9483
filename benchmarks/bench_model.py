"""CPU forward time of Dynamic World on a 512x512 input: geoseg's torch port vs Google's SavedModel.

    python benchmarks/bench_model.py [--size 512] [--repeats 5] [--threads N] [--tf-python PY]

Both run on the same random normalised input, with the same thread count, in alternating rounds (so a
busy machine slows both alike); each reports its best time. TensorFlow runs in a subprocess started with
``--tf-python`` (default /tmp/tfvenv/bin/python when present; TensorFlow is not a geoseg dependency).
Without it only the torch time is printed. Goal: torch <= 1.5x the SavedModel's time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAVED_MODEL = ROOT.parent / "shared" / "data" / "dynamic_world" / "model" / "forward"
DEFAULT_TF_PYTHON = "/tmp/tfvenv/bin/python"

# The TensorFlow side: reads "N" lines on stdin, answers each with the seconds N forward passes took (best).
_TF_WORKER = r"""
import json, sys, time, numpy as np, tensorflow as tf
saved_model, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(1)
fn = tf.saved_model.load(saved_model).signatures["serving_default"]
x = tf.constant(np.random.default_rng(0).uniform(0, 1, (1, size, size, 9)).astype(np.float32))
fn(input_3=x)  # warm-up (graph build)
print("ready", flush=True)
for line in sys.stdin:
    best = float("inf")
    for _ in range(int(line)):
        t = time.perf_counter(); fn(input_3=x)["functional_1"].numpy(); best = min(best, time.perf_counter() - t)
    print(json.dumps(best), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds; each side's best is reported")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for both")
    ap.add_argument(
        "--tf-python",
        default=DEFAULT_TF_PYTHON if Path(DEFAULT_TF_PYTHON).exists() else None,
        help="an interpreter with tensorflow (default /tmp/tfvenv/bin/python if present)",
    )
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(ROOT))
    from geoseg.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model("dynamic-world").module
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (1, 9, args.size, args.size)).astype(np.float32))

    def torch_round() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            model(x)
            return time.perf_counter() - t

    tf_proc = None
    if args.tf_python and SAVED_MODEL.exists():
        tf_proc = subprocess.Popen(
            [args.tf_python, "-c", _TF_WORKER, str(SAVED_MODEL), str(args.size), str(args.threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if tf_proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the TensorFlow worker ({args.tf_python}) failed to start")

    torch_round()  # warm-up (oneDNN primitive creation)
    t_torch, t_tf = float("inf"), float("inf")
    for _ in range(args.repeats):
        t_torch = min(t_torch, torch_round())
        if tf_proc:
            tf_proc.stdin.write("1\n")
            tf_proc.stdin.flush()
            t_tf = min(t_tf, json.loads(tf_proc.stdout.readline()))
    if tf_proc:
        tf_proc.stdin.close()
        tf_proc.wait()

    print(
        f"Dynamic World forward, 1x{args.size}x{args.size}x9 float32, CPU, {args.threads} threads, "
        f"best of {args.repeats}"
    )
    print(f"  torch (geoseg)     {t_torch:8.3f} s   (torch {torch.__version__})")
    if tf_proc:
        print(f"  SavedModel (TF)    {t_tf:8.3f} s")
        print(f"  ratio torch / TF   {t_torch / t_tf:8.2f}   (goal <= 1.5)")
    else:
        print("  SavedModel (TF)    not run: no --tf-python interpreter with tensorflow (or no SavedModel)")


if __name__ == "__main__":
    main()
