"""End-to-end pipeline benchmark on the Ray engine, all ratios measured within this one run.

1. Memory: a VRT repeating the real Sentinel-2 chip 1x1, 2x2 and 4x4 (1x, 4x, 16x the pixels, no extra disk)
   goes through ``geoseg predict`` (a local Ray started by the job) in a child process; the peak memory of the
   whole process tree (driver, GCS, raylet, workers) is sampled. Goal: peak at 16x <= 1.2 x peak at 1x.
   Reported as the sum of RSS and the sum of PSS (PSS splits shared pages, e.g. Ray's object store, fairly).
2. Throughput: end-to-end megapixels/s of one inference worker vs the model-only forward time of the same
   tiles (blocks read beforehand, same thread count). Goal: end-to-end / model-only <= 1.10 on CPU.
3. Scaling: the speedup of 2 workers over 1 (on a 2-core machine both numbers share the same two cores).

    python benchmarks/bench_pipeline.py [--chip PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._result import result  # noqa: E402
from tools.vrt import tiled_vrt  # noqa: E402

DEFAULT_CHIP = ROOT.parent / "shared" / "data" / "sentinel2" / "Spain_7370579_S2Hand.tif"
if not DEFAULT_CHIP.exists():
    DEFAULT_CHIP = ROOT / "examples" / "Spain_7370579_S2Hand.tif"


def _label(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py",
                "default_worker", "geoseg.cli"):
        if key in cmd:
            return key
    return p.name()


def _high_water_mark(p: psutil.Process) -> int:
    """The kernel's own peak RSS of one process (VmHWM): catches spikes between two samples."""
    try:
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_memory(root: psutil.Process, per_proc: dict | None = None) -> tuple[int, int]:
    rss = pss = 0
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            m = p.memory_full_info()
            rss += m.rss
            pss += getattr(m, "pss", m.rss)
            if per_proc is not None:
                peak, hwm, labels = per_proc.get(p.pid, (0, 0, set()))
                labels.add(_label(p))
                per_proc[p.pid] = (max(peak, getattr(m, "pss", m.rss)), max(hwm, _high_water_mark(p)), labels)
        except psutil.Error:
            pass
    return rss, pss


def run_with_peak(cmd: list[str], env: dict[str, str], per_proc: dict | None = None) -> tuple[float, int, int]:
    """Run ``cmd``; return (seconds, peak RSS sum, peak PSS sum) over its process tree. ``per_proc`` collects
    each process's own peak PSS by (pid, label), to see where memory goes."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss = _tree_memory(root, per_proc)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            done.wait(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return dt, peak[0], peak[1]


def geoseg_cmd(src: Path, out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "geoseg.cli", "predict", str(src), "--model", "dynamic-world", "--out", str(out),
           "--overwrite", "--set", "runtime.progress=none", "--set", "runtime.engine=ray"]  # auto would run small
    # jobs in-process: this benchmark is about the Ray engine
    for s in sets:
        cmd += ["--set", s]
    return cmd


def model_only_seconds(src: Path, block_px: int, tile_px: int, threads: int) -> float:
    """Forward passes alone over the same tiles (reads done beforehand, not timed)."""
    import torch

    from geoseg.config import config_from_dict
    from geoseg.infer import Predictor
    from geoseg.models import load_model
    from geoseg.blocks import read_block
    from geoseg.plan import plan_scene

    torch.set_num_threads(threads)
    model = load_model("dynamic-world")
    cfg = config_from_dict({"input": {"paths": [str(src)]}, "output": {"dir": "unused"},
                            "tiling": {"block_px": block_px, "tile_px": tile_px}})
    plan = plan_scene(0, str(src), cfg, model.card)
    blocks = [(b, *read_block(plan, b)) for b in plan.grid.blocks()]
    pred = Predictor(model, "cpu", cfg.runtime.batch_size)
    pred.predict_block(*blocks[0])  # warm-up
    t0 = time.perf_counter()
    for b, data, valid in blocks:
        pred.predict_block(b, data, valid)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chip", type=Path, default=DEFAULT_CHIP)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reps", type=int, nargs="+", default=[1, 2, 4], help="k for k x k mosaics")
    ap.add_argument("--per-process", action="store_true", help="print each process's own peak PSS")
    ap.add_argument("--tile-px", type=int, default=128,
                    help="tile side in the memory runs: 128 gives the 1x chip inner tiles with a full halo")
    ap.add_argument("--marginal", action="store_true",
                    help="also run the 16x job for the fixed-cost-free marginal throughput ratio (slow)")
    ap.add_argument("--only", choices=["memory", "throughput"], help="run one part")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="geoseg-bench-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    results: dict = {"machine": {"cpus": os.cpu_count()}, "memory": [], "throughput": {}}
    common = ["tiling.block_px=512", f"tiling.tile_px={args.tile_px}", "vector.enabled=true", "runtime.workers=1"]

    if args.only != "throughput":
        print("== memory: peak of the whole process tree (driver + local Ray) ==")
        print(f"{'input':>10} {'Mpx':>7} {'seconds':>8} {'peak RSS MiB':>13} {'peak PSS MiB':>13} {'sum VmHWM MiB':>14}")
        for k in args.reps:
            vrt = tiled_vrt(args.chip, tmp / f"x{k * k}.vrt", k)
            per_proc: dict = {}
            dt, rss, pss = run_with_peak(geoseg_cmd(vrt, tmp / f"mem{k}", *common), env, per_proc)
            mpx = (512 * k) ** 2 / 1e6
            # Sampled sums miss spikes shorter than the sampling period (a forward pass), so the chance of catching
            # one grows with run length; the per-process kernel high-water marks do not: their sum bounds the peak.
            hwm = sum(v[1] for v in per_proc.values())
            results["memory"].append({"area_x": k * k, "mpx": mpx, "seconds": dt, "peak_rss": rss, "peak_pss": pss,
                                      "sum_hwm": hwm})
            print(f"{f'{k * k}x':>10} {mpx:7.2f} {dt:8.1f} {rss / 2**20:13.0f} {pss / 2**20:13.0f} {hwm / 2**20:14.0f}")
            if args.per_process:
                for pid, (peak, hwm, labels) in sorted(per_proc.items(), key=lambda kv: -kv[1][0])[:6]:
                    name = ",".join(sorted(x.removeprefix("ray::") for x in labels if x != "ray::IDLE")) or "idle"
                    print(f"{'':>12}peak PSS {peak / 2**20:5.0f} MiB, VmHWM {hwm / 2**20:5.0f} MiB  pid {pid:<8} "
                          f"{name[:50]}")
        m = results["memory"]
        ratio_rss = m[-1]["peak_rss"] / m[0]["peak_rss"]
        ratio_pss = m[-1]["peak_pss"] / m[0]["peak_pss"]
        ratio_hwm = m[-1]["sum_hwm"] / m[0]["sum_hwm"]
        print(f"peak at {m[-1]['area_x']}x / peak at {m[0]['area_x']}x: RSS {ratio_rss:.3f}, PSS {ratio_pss:.3f}, "
              f"sum of VmHWM {ratio_hwm:.3f} (goal <= 1.2)")
        results["memory_ratio_rss"], results["memory_ratio_pss"] = ratio_rss, ratio_pss
        results["memory_ratio_hwm"] = ratio_hwm
        result(f"pipeline peak memory {m[-1]['area_x']}x / {m[0]['area_x']}x pixels (RSS, Ray engine)",
               round(ratio_rss, 3), "<=", 1.2, "x", f"PSS {ratio_pss:.3f}, sum of VmHWM {ratio_hwm:.3f}")

    if args.only == "memory":
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return
    print("\n== throughput on the 4x mosaic (1024 x 1024 px) ==")
    vrt = tmp / "x4.vrt" if (tmp / "x4.vrt").exists() else tiled_vrt(args.chip, tmp / "x4.vrt", 2)
    mpx = 1024 * 1024 / 1e6
    threads = max(1, (os.cpu_count() or 2))
    t_model = model_only_seconds(vrt, 512, 256, threads)
    # One worker holding all CPUs for its threads (Ray sets OMP threads = the actor's CPUs); tasks take little.
    one = ["runtime.workers=1", f"runtime.cpus_per_worker={threads}"]
    two = ["runtime.workers=2", f"runtime.cpus_per_worker={threads / 2:g}"]

    def job(src: Path, name: str, *sets: str) -> float:
        return run_with_peak(geoseg_cmd(src, tmp / name, "tiling.block_px=512", "tiling.tile_px=256",
                                        "runtime.cpus_per_task=0.25", f"runtime.num_cpus={threads + 1}", *sets),
                             env)[0]

    # The job's wall time includes starting Ray and the workers; a 1x run (one block) measures that fixed cost.
    tiny = tiled_vrt(args.chip, tmp / "x1.vrt", 1)
    t_model_tiny = model_only_seconds(tiny, 512, 256, threads)
    # Marginal cost instead: the 16x job minus the 4x job against the same difference of model-only time. The
    # fixed cost cancels, no separate (noisy) estimate of it is needed.
    big = tmp / "x16.vrt" if (tmp / "x16.vrt").exists() else tiled_vrt(args.chip, tmp / "x16.vrt", 4)
    t_model_big = model_only_seconds(big, 512, 256, threads) if args.marginal else None
    rows = {}
    for label, vec in (("mask + polygons", "true"), ("mask only", "false")):
        e2e1 = job(vrt, "t1", *one, f"vector.enabled={vec}")
        e2e2 = job(vrt, "t2", *two, f"vector.enabled={vec}")
        fixed = max(0.0, job(tiny, "t0", *one, f"vector.enabled={vec}") - t_model_tiny)
        rows[label] = {"e2e_1_worker_s": e2e1, "e2e_2_workers_s": e2e2, "fixed_cost_s": fixed,
                       "ratio_e2e_over_model": e2e1 / t_model, "ratio_steady_over_model": (e2e1 - fixed) / t_model,
                       "speedup_2_over_1": e2e1 / e2e2}
        if t_model_big is not None:
            e2e_big = job(big, "t16", *one, f"vector.enabled={vec}")
            rows[label]["e2e_16x_s"] = e2e_big
            rows[label]["ratio_marginal"] = (e2e_big - e2e1) / (t_model_big - t_model)
    print(f"model-only forward ({threads} threads): {t_model:.2f} s = {mpx / t_model:.3f} Mpx/s")
    for label, r in rows.items():
        print(f"-- {label}:")
        print(f"   end-to-end, 1 worker:  {r['e2e_1_worker_s']:.2f} s = {mpx / r['e2e_1_worker_s']:.3f} Mpx/s "
              f"(incl. Ray start and outputs)")
        print(f"   end-to-end, 2 workers: {r['e2e_2_workers_s']:.2f} s; speedup 2 over 1: "
              f"{r['speedup_2_over_1']:.2f}x")
        print(f"   fixed per-job cost (start Ray + actor + model, from a 1x run): {r['fixed_cost_s']:.2f} s")
        print(f"   end-to-end / model-only: {r['ratio_e2e_over_model']:.2f} whole job; "
              f"{r['ratio_steady_over_model']:.2f} without the fixed per-job cost (goal <= 1.10)")
        if "ratio_marginal" in r:
            print(f"   marginal, 16x job - 4x job over the same model-only difference: {r['ratio_marginal']:.2f} "
                  f"(goal <= 1.10)")
    results["throughput"] = {"mpx": mpx, "model_only_s": t_model, **rows}
    why = "not measured: needs the pipeline to record each inference worker's time inside the forward pass " \
          "(run.json); not built yet"
    result("inference worker busy fraction (CPU)", None, ">=", 0.90, "", why)
    result("whole job at 64x pixels / model-only time of the same tiles", None, "<=", 1.25, "x",
           f"{why}; the 4x job here: {rows['mask + polygons']['ratio_e2e_over_model']:.2f} incl. Ray start")
    result("time vs pixels exponent, 1x..64x", None, "<=", 1.05, "", "not measured: the 1x..64x fit is not built "
           "(goal 1.00 +- 0.05)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
