"""Training throughput of ``geoseg train`` on Ray Train: chips per second with 1 and with 2 (or N) workers.

    python benchmarks/bench_train.py [--workers 1 2] [--steps 12] [--base 16] [--batch 8] [--gpu]

Trains the buildings setup (real chips from ../shared/data/buildings; the chip size, sampling and U-Net of
configs/train_buildings.yaml, the U-Net's width changed by --base) for two short epochs per worker count through the
real driver (``geoseg.engines.ray_train.train``: Ray Train, DDP, gloo on CPU) and prints the second epoch's
aggregate training throughput (chips/s over all workers; the first epoch pays for reading and caching the
chips). On CPU the machine's cores are split between the workers (torch threads = cores / workers), so the
ratio says what data parallelism buys on one box; on GPUs (--gpu) each worker gets one GPU and mixed precision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=12, help="steps per epoch per worker")
    ap.add_argument("--base", type=int, default=None, help="U-Net base channels (default: the config's)")
    ap.add_argument("--batch", type=int, default=8, help="chips per step per worker")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()

    import torch

    from geoseg.engines.ray_train import train
    from geoseg.train.driver import load_train_config

    cores = os.cpu_count() or 1
    results = {}
    for n in args.workers:
        with tempfile.TemporaryDirectory(prefix="geoseg-bench-train-") as tmp:
            threads = max(1, cores // n)
            cfg = load_train_config(ROOT / "configs" / "train_buildings.yaml", [
                f"train.num_workers={n}", f"train.use_gpu={'true' if args.gpu else 'false'}",
                f"train.torch_threads={threads}", "train.epochs=2", f"train.max_steps_per_epoch={args.steps}",
                f"train.batch_size={args.batch}",
                *([f"train.arch_params.base_channels={args.base}"] if args.base else []),
                "train.max_val_chips=8", "train.halo_max_px=0", "train.halo_images=1",
                f"train.out={tmp}/bundle", "train.early_stopping_patience=5", "runtime.num_cpus=" + str(max(cores, n)),
            ])
            t0 = time.monotonic()
            summary = train(cfg)
            wall = time.monotonic() - t0
            ep = summary["history"][-1]
            results[n] = ep["chips_per_s"]
            device = "GPU" if args.gpu else f"CPU, {threads} torch threads each"
            print(f"{n} worker(s) ({device}): {ep['chips_per_s']:.2f} chips/s in epoch 2 "
                  f"({ep['chips']} chips of {cfg.train.chip_px} px, U-Net base "
                  f"{cfg.train.arch_params.get('base_channels')}, batch {args.batch}/worker); whole run {wall:.0f} s",
                  flush=True)
    base = results[args.workers[0]]
    for n, v in results.items():
        print(f"throughput {n} vs {args.workers[0]} worker(s): {v / base:.2f}x")
    print(json.dumps({"chips_per_s": results, "cores": cores, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
