"""CPU forward time of Dynamic World on a 512x512 input: geoseg's torch port vs Google's SavedModel.

    python benchmarks/bench_model.py [--size 512] [--repeats 10] [--threads N] [--tf-python PY]

Both run on the same random normalised input, with the same thread count, in alternating rounds (so a
busy machine slows both alike); each reports its best time. The port runs its fused C kernels
(``geoseg/models/_native.py``) when they compiled; the PyTorch-ops path (what runs without a C compiler) is
timed in the same rounds for reference. TensorFlow runs in a subprocess started with ``--tf-python`` (default:
$GEOSEG_TF_PYTHON, else /work/tfvenv or /tmp/tfvenv when present; TensorFlow is not a geoseg dependency:
``python3 -m venv /work/tfvenv && /work/tfvenv/bin/pip install tensorflow-cpu``). Without it only the torch
times are printed. Goal: torch <= 1.0x the SavedModel's time.
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
sys.path.insert(0, str(ROOT))
from benchmarks._result import result  # noqa: E402

SAVED_MODEL = ROOT.parent / "shared" / "data" / "dynamic_world" / "model" / "forward"
GOAL = 1.0
_CANDIDATES = [os.environ.get("GEOSEG_TF_PYTHON", ""), "/work/tfvenv/bin/python", "/tmp/tfvenv/bin/python"]
DEFAULT_TF_PYTHON = next((p for p in _CANDIDATES if p and Path(p).exists()), None)

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
    ap.add_argument("--repeats", type=int, default=10, help="alternating rounds; each side's best is reported")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for both")
    ap.add_argument(
        "--tf-python",
        default=DEFAULT_TF_PYTHON,
        help="an interpreter with tensorflow (default $GEOSEG_TF_PYTHON, /work/tfvenv or /tmp/tfvenv)",
    )
    ap.add_argument("--no-fallback", action="store_true", help="skip timing the PyTorch-ops path")
    args = ap.parse_args()

    import torch

    from geoseg.models import _native, load_model
    from geoseg.models import dynamic_world as dw

    torch.set_num_threads(args.threads)
    model = load_model("dynamic-world").module
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (1, 9, args.size, args.size)).astype(np.float32))
    native = _native.available()
    use_native = dw._use_native

    def torch_round(fallback: bool = False) -> float:
        dw._use_native = (lambda t: False) if fallback else use_native
        try:
            with torch.inference_mode():
                t = time.perf_counter()
                model(x)
                return time.perf_counter() - t
        finally:
            dw._use_native = use_native

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

    fallback = native and not args.no_fallback
    torch_round()  # warm-up (oneDNN primitive creation)
    if fallback:
        torch_round(fallback=True)
    t_torch, t_tf, t_fb = float("inf"), float("inf"), float("inf")
    for _ in range(args.repeats):
        t_torch = min(t_torch, torch_round())
        if fallback:
            t_fb = min(t_fb, torch_round(fallback=True))
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
    kernels = "fused C kernels" if native else "PyTorch ops: no C compiler, the fused kernels are not built"
    print(f"  torch (geoseg)     {t_torch:8.3f} s   (torch {torch.__version__}, {kernels})")
    if fallback:
        print(f"  torch ops only     {t_fb:8.3f} s   (the path without a C compiler)")
    name = f"Dynamic World CPU forward, torch / TF ({args.size}x{args.size}, {args.threads} threads)"
    if tf_proc:
        print(f"  SavedModel (TF)    {t_tf:8.3f} s")
        print(f"  ratio torch / TF   {t_torch / t_tf:8.2f}   (goal <= {GOAL})")
        if fallback:
            print(f"  ratio torch ops only / TF {t_fb / t_tf:5.2f}")
        result(name, round(t_torch / t_tf, 2), "<=", GOAL, "x",
               f"torch {t_torch:.3f} s, TF {t_tf:.3f} s" + (f", torch ops only {t_fb:.3f} s" if fallback else ""))
    else:
        print("  SavedModel (TF)    not run: no --tf-python interpreter with tensorflow (or no SavedModel)")
        result(name, None, "<=", GOAL, "x", "no TensorFlow interpreter (see --tf-python)")


if __name__ == "__main__":
    main()
