"""``geoseg train`` on Ray Train: the driver's ``train`` and the per-worker loop (``TorchTrainer``, DDP; gloo on
CPU, NCCL on GPU). Workers each take their shard of every epoch's chips, report metrics and a checkpoint per epoch
through Ray Train, and resume from the last checkpoint when the same run (same ``checkpoint_dir``) starts again.
Everything without Ray (plan, chips, bundle) is ``geoseg.train.driver``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import ray
import torch

from geoseg.config import JobConfig
from geoseg.errors import ConfigError, GeosegError, ModelError
from geoseg.train.driver import (
    RUN_NAME, STATE_FILE, bundle_dir, checkpoint_root, epoch_chips, finish_bundle, prepare_plan, shard,
)

log = logging.getLogger("geoseg")

__all__ = ["train", "worker_loop"]


def worker_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: DDP training with per-epoch validation, checkpoints, early stop."""
    import ray.train
    import ray.train.torch
    from tqdm import tqdm

    from geoseg.config import TrainConfig
    from geoseg.train.loop import OFFSET_GRID, ChipDataset, ChipStore, best_offset, build_module
    from geoseg.train.loop import (
        cosine_with_warmup, iou_from_confusion, logit_adjustment, run_epoch, validate, weight_average,
    )

    plan = config["plan"]
    t = TrainConfig.model_validate(plan["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config["threads"])
    torch.manual_seed(t.seed)
    k = len(plan["class_ids"])
    in_ch = len(plan["band_names"])
    module = build_module(t.architecture, t.arch_params, in_ch, k)
    if plan.get("init_state") is not None:  # train.init_from (a resumed run loads its checkpoint below)
        module.load_state_dict(plan["init_state"])
    module = ray.train.torch.prepare_model(module)
    ema = weight_average(_unwrap(module), t.ema_decay) if t.ema_decay else None
    step_hook = None if ema is None else (lambda: ema.update_parameters(_unwrap(module)))
    judged = _unwrap(module) if ema is None else ema.module  # the weights validated, kept and shipped
    opt = torch.optim.AdamW(module.parameters(), lr=t.lr * (world if device.type == "cuda" else 1),
                            weight_decay=t.weight_decay)
    n0 = len(epoch_chips(plan, 0))
    steps_per_epoch = max(1, n0 // (world * t.batch_size))
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_with_warmup(steps_per_epoch * t.epochs, int(t.warmup_epochs * steps_per_epoch)))
    amp_dtype, scaler = None, None
    if device.type == "cuda" and t.amp:
        if torch.cuda.is_bf16_supported():
            amp_dtype = torch.bfloat16
        else:
            amp_dtype, scaler = torch.float16, torch.amp.GradScaler("cuda")
    start, best, bad, history, best_state = 0, -1.0, 0, [], None
    seen = np.zeros(k, np.int64)  # label pixels per class over every chip trained on so far (all workers)
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        if st["fingerprint"] != plan["fingerprint"]:
            raise ConfigError(
                f"{t.checkpoint_dir or t.out}: the checkpoint to resume is from another model/class/band setup; "
                "set train.resume=false (start over) or another train.checkpoint_dir"
            )
        _unwrap(module).load_state_dict(st["model"])
        if ema is not None:
            if st.get("ema") is None:
                raise ConfigError(f"{t.checkpoint_dir or t.out}: the checkpoint to resume has no weight average "
                                  "(train.ema_decay was off); set train.resume=false to start over")
            ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start, best, bad, history, best_state = st["epoch"] + 1, st["best"], st["bad"], st["history"], st["best_state"]
        seen = np.asarray(st.get("class_pixels", seen), np.int64)
        if rank == 0:
            _say(f"resumed from checkpoint after epoch {st['epoch'] + 1} (best val mIoU {best:.4f})")
    store = ChipStore(plan["scenes"], plan["class_ids"], plan["class_names"])
    val_ds = ChipDataset(store, plan["val_chips"][rank::world], plan["mean"], plan["std"])
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=t.batch_size)
    names = [c.name for c in t.classes]
    stopped = bad >= t.early_stopping_patience
    for epoch in range(start, t.epochs):
        if stopped:
            break
        chips = shard(epoch_chips(plan, epoch), rank, world, t.batch_size)
        ds = ChipDataset(store, chips, plan["mean"], plan["std"], aug=t.augment, seed=t.seed * 1_000_003 + epoch,
                         out_px=t.chip_px)
        loader = torch.utils.data.DataLoader(ds, batch_size=t.batch_size, shuffle=False, drop_last=True)
        bar = None
        if rank == 0:
            bar = tqdm(total=min(len(loader), steps_per_epoch), desc=f"epoch {epoch + 1}/{t.epochs}", ascii=True,
                       file=sys.stdout, mininterval=15, dynamic_ncols=False, ncols=100)
        r = run_epoch(module, loader, opt, sched, device, t.loss, scaler, amp_dtype, steps_per_epoch, bar,
                      after_step=step_hook)
        if bar is not None:
            bar.close()
        t_val = time.monotonic()
        counts = torch.from_numpy(r["class_pixels"][:k].copy()).to(device)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(counts)
        seen += counts.cpu().numpy()
        adjust = logit_adjustment(seen, t.logit_adjustment) if t.logit_adjustment else None
        grid = OFFSET_GRID if t.calibrate_bias else None
        cm = validate(judged, val_loader, k, device, amp_dtype, offsets=grid, bias=adjust)
        cm_t = torch.from_numpy(cm).to(device)
        stats = torch.tensor([r["loss"] * r["chips"], r["chips"], r["seconds"]], dtype=torch.float64, device=device)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(cm_t)
            dist.all_reduce(stats)
        cm = cm_t.cpu().numpy()
        offset, calibrated = 0.0, None
        if grid is not None:  # the epoch's score: val mIoU at its best logit offset
            offset, calibrated, _ = best_offset(cm, grid)
            cm = cm[int(np.argmin(np.abs(grid)))]
        iou = iou_from_confusion(cm)
        miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
        score = miou if calibrated is None else calibrated
        loss = float(stats[0] / max(stats[1], 1))
        seconds = float(stats[2]) / world + (time.monotonic() - t_val)
        improved = score > best + 1e-6
        if improved:
            best, bad = score, 0
            best_state = {kk: v.detach().cpu().clone() for kk, v in judged.state_dict().items()}
        else:
            bad += 1
        rec = {"epoch": epoch + 1, "loss": round(loss, 5), "val_miou": round(miou, 5),
               "val_iou": {n: (None if not np.isfinite(v) else round(float(v), 5)) for n, v in zip(names, iou)},
               "seconds": round(seconds, 2), "chips": int(stats[1]),
               "chips_per_s": round(float(stats[1]) / max(float(stats[2]) / world, 1e-9), 3)}
        if calibrated is not None:
            rec.update(val_miou_calibrated=round(calibrated, 5), logit_offset=offset)
        if adjust is not None:  # the best epoch's offsets go into the bundle's head bias: unrounded, as validated
            rec.update(logit_adjustment=[float(v) for v in adjust])
        history.append(rec)
        stopped = bad >= t.early_stopping_patience
        if rank == 0:
            per = " ".join(f"{n} {v:.3f}" for n, v in zip(names, iou) if np.isfinite(v))
            cal = "" if calibrated is None else f"  calibrated {calibrated:.4f} at offset {offset:+.1f}"
            _say(f"epoch {epoch + 1}/{t.epochs}  loss {loss:.4f}  val mIoU {miou:.4f} ({per}){cal}  "
                 f"{seconds:.1f} s  {rec['chips_per_s']:.2f} chips/s" + ("  *best" if improved else "")
                 + ("  early stop" if stopped else ""))
        metrics = {"epoch": epoch + 1, "loss": loss, "val_miou": miou, "val_score": score, "best_val_score": best,
                   "stopped": stopped, "chips_per_s": rec["chips_per_s"]}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save({
                    "fingerprint": plan["fingerprint"], "epoch": epoch, "best": best, "bad": bad,
                    "history": history, "model": _unwrap(module).state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "best_state": best_state, "confusion": cm, "class_pixels": seen,
                    "ema": None if ema is None else ema.state_dict(),
                }, os.path.join(tmp, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def _say(line: str) -> None:
    """One line to the driver's console (Ray Train's patched print would log it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _unwrap(module):
    return module.module if hasattr(module, "module") and isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def _geoseg_cause(e: BaseException) -> GeosegError | None:
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, GeosegError):
            return x
        stack.extend([x.__cause__, x.__context__, getattr(x, "cause", None)])
        for attr in ("worker_failures", "errors"):
            v = getattr(x, attr, None)
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
    return None


def _fit(trainer):
    """``trainer.fit()`` with Ctrl-C as the KeyboardInterrupt it is. On the main thread Ray Train installs its own
    SIGINT handler, which aborts the run (its workers stop, its checkpoints stay) and then raises SystemExit(1)
    out of ``fit`` with no message: that becomes a KeyboardInterrupt (exit 130, "rerun to resume"), and the
    process's own handler comes back (Ray leaves its handler installed, bound to the finished run)."""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if on_main else None
    try:
        return trainer.fit()
    except SystemExit as e:
        raise KeyboardInterrupt("Ray Train aborted the run") from e
    finally:
        if on_main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def train(cfg: JobConfig, *, overwrite: bool = False) -> dict:
    """Train on Ray Train and write the bundle to ``train.out``. Returns a summary (paths, history, card)."""
    t = cfg.train
    out = bundle_dir(t, overwrite)
    t0 = time.monotonic()
    plan = prepare_plan(cfg)
    log.info("training data: %d scenes, %d train regions, %d val regions, %d val chips, %d train chips/epoch",
             len(plan["scenes"]), len(plan["regions_train"]), len(plan["regions_val"]), len(plan["val_chips"]),
             len(epoch_chips(plan, 0)))
    storage = checkpoint_root(t)
    run_dir = storage / RUN_NAME
    if run_dir.exists() and not t.resume:
        shutil.rmtree(run_dir)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from geoseg.engines.ray import init_ray

    started = init_ray(cfg)
    try:
        use_gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = t.torch_threads or max(1, int(min(cpus, os.cpu_count() or 1)) // t.num_workers)
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"plan": plan, "threads": threads},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=None if use_gpu else {"CPU": 1}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=RUN_NAME, storage_path=str(storage),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=1),
            ),
        )
        try:
            result = _fit(trainer)
        except Exception as e:  # Ray wraps worker errors; surface ours unchanged
            cause = _geoseg_cause(e)
            if cause is not None:
                raise type(cause)(str(cause)) from None
            raise ModelError(f"{storage}: training failed: {e}") from None
        if result.checkpoint is None:
            raise ModelError(f"{storage}: training ended without a checkpoint")
        with result.checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
    finally:
        if started:
            ray.shutdown()
    return finish_bundle(cfg, plan, state, out, time.monotonic() - t0)

