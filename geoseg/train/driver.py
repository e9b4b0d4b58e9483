"""``geoseg train`` without Ray: the plan, the epoch's chips per worker, and the bundle from a checkpoint.

The driver validates every input and computes everything global (split, chip lists, normalisation
statistics) before Ray starts, so a bad file fails in seconds with one clear error. Workers (Ray Train's
``TorchTrainer``, DDP; gloo on CPU, NCCL on GPU) each take their shard of every epoch's chips, report
metrics and a checkpoint per epoch through Ray Train, and resume from the last checkpoint when the same run
(same ``checkpoint_dir``) starts again. Ray Train itself runs in ``geoseg.engines.ray_train``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from geoseg.config import JobConfig
from geoseg.errors import ConfigError, InputError
from geoseg.train.data import (
    Chip,
    balanced_weights,
    band_summary,
    class_histogram,
    grid_chips,
    index_sources,
    random_chips,
    read_image,
    scene_gsd_m,
    split_scenes,
)

log = logging.getLogger("geoseg")

__all__ = ["prepare_plan", "init_weights", "epoch_chips", "shard", "finish_bundle", "bundle_from_checkpoint", "bundle_dir",
           "checkpoint_root", "latest_checkpoint_state", "last_weights", "load_train_config", "RUN_NAME", "STATE_FILE"]

RUN_NAME = "geoseg-train"
STATE_FILE = "state.pt"


def _check_classes(t) -> None:
    if not t.classes:
        raise ConfigError("train.classes is empty: list the classes (id, name, color), ids 0..n-1")
    ids = [c.id for c in t.classes]
    if ids != list(range(len(ids))):
        raise ConfigError(
            f"train.classes: class ids must be 0..{len(ids) - 1} in order (they are the model's output "
            f"channels); got {ids}. Map other label values with sources[].label_map"
        )
    names = [c.name for c in t.classes]
    if len(set(names)) != len(names):
        raise ConfigError(f"train.classes: duplicate class names {names}")


def _band_names(t, scenes) -> list[str]:
    n = len(scenes[0].bands)
    if t.band_names is not None:
        if len(t.band_names) != n:
            raise ConfigError(f"train.band_names lists {len(t.band_names)} names for {n} input bands: {t.band_names}")
        return list(t.band_names)
    desc = [scenes[0].descriptions[b - 1] if b - 1 < len(scenes[0].descriptions) else None for b in scenes[0].bands]
    if all(desc) and len(set(desc)) == n:
        return [str(d) for d in desc]
    return [f"b{b}" for b in scenes[0].bands]


def prepare_plan(cfg: JobConfig) -> dict:
    """Everything the workers need, validated: scenes, chips per split, class counts, normalisation."""
    t = cfg.train
    _check_classes(t)
    if t.chip_px % 16:
        raise ConfigError(f"train.chip_px must be a multiple of 16 (the models' output strides); got {t.chip_px}")
    scenes = index_sources(t)
    class_ids = [c.id for c in t.classes]
    class_names = {c.name: c.id for c in t.classes}
    k = len(class_ids)
    from geoseg.train.loop import ChipStore

    store = ChipStore(scenes, class_ids, class_names, max_bytes=0)  # labels validated here, nothing kept
    whole_hist = {}
    for s in scenes:  # every label file is read and checked before anything else
        whole_hist[s.index] = class_histogram(store.labels(s.index))
    split = split_scenes(scenes, t.val, t.chip_px)
    hist = {"train": np.zeros(256, np.int64), "val": np.zeros(256, np.int64)}
    for side in ("train", "val"):
        for si, w in getattr(split, side):
            if (int(w.height), int(w.width)) == scenes[si].shape:
                hist[side] += whole_hist[si]
                continue
            lab = store.labels(si)
            r0, c0 = int(w.row_off), int(w.col_off)
            hist[side] += class_histogram(lab[r0:r0 + int(w.height), c0:c0 + int(w.width)])
    for side in ("train", "val"):
        if hist[side][:k].sum() == 0:
            raise InputError(
                f"{scenes[getattr(split, side)[0][0]].labels}: the {side} split has no labelled pixel "
                f"(all labels are ignore / nodata)"
            )
    train_grid = grid_chips(split.train, t.chip_px)
    val_chips = grid_chips(split.val, t.chip_px)
    if t.max_val_chips and len(val_chips) > t.max_val_chips:
        rng = np.random.default_rng(t.seed)
        val_chips = [val_chips[i] for i in sorted(rng.choice(len(val_chips), t.max_val_chips, replace=False))]
    weights = None
    candidates = train_grid
    if t.sampling == "balanced":
        candidates = grid_chips(split.train, t.chip_px, stride_px=max(16, t.chip_px // 2))
        hists = []
        for c in candidates:
            lab = store.labels(c.scene)
            hists.append(class_histogram(lab[max(c.row, 0):c.row + c.size, max(c.col, 0):c.col + c.size]))
        weights = balanced_weights(np.stack(hists), class_ids)
    region_weights = _region_weights(t, scenes, split.train)
    mean, std, vmin, vmax = band_summary(scenes, split.train)
    train_scenes = sorted({si for si, _ in split.train})
    gsds = [scene_gsd_m(scenes[i]) for i in train_scenes]
    gsd = float(math.sqrt(min(gsds) * max(gsds)))  # the middle (log scale) of the training pixel sizes
    gsd_range = list(t.gsd_range_m) if t.gsd_range_m else [min(gsds) / 1.5, max(gsds) * 1.5]
    if not gsd_range[0] <= gsd <= gsd_range[1]:
        raise ConfigError(f"train.gsd_range_m {gsd_range} does not contain the training pixel size {gsd:.4g} m")
    band_names = _band_names(t, scenes)
    init_state = None
    if t.init_from:  # fine-tuning: the weights expect the base model's normalisation, not this data's
        init_state, mean, std = init_weights(t, band_names)
    key = {"arch": t.architecture, "arch_params": t.arch_params, "classes": [c.model_dump() for c in t.classes],
           "bands": band_names, "chip_px": t.chip_px}
    if t.init_from:
        key["init_from"] = t.init_from
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "train": t.model_dump(mode="json"),
        "scenes": scenes,
        "regions_train": split.train,
        "regions_val": split.val,
        "train_grid": train_grid,
        "candidates": candidates,
        "weights": weights,
        "region_weights": region_weights,
        "val_chips": val_chips,
        "class_ids": class_ids,
        "class_names": class_names,
        "class_pixels": {"train": hist["train"][:k].tolist(), "val": hist["val"][:k].tolist()},
        "mean": mean,
        "std": std,
        "gsd_m": gsd,
        "gsd_range_m": gsd_range,
        "gsd_train_m": [min(gsds), float(np.median(gsds)), max(gsds)],
        "value_range": [vmin, vmax],
        "band_names": band_names,
        "dtype": scenes[0].dtype,
        "fingerprint": fingerprint,
        "init_state": init_state,
    }


def init_weights(t, band_names: list[str]) -> tuple[dict, list[float], list[float]]:
    """``train.init_from``: (float32 state dict with the card's logit offsets taken out of the head's bias,
    normalisation mean, std) of the base bundle, refused with the mismatch named when it cannot start this run."""
    from geoseg.models.registry import load_model

    base = load_model(t.init_from)
    card = base.card
    src = f"train.init_from {t.init_from!r}"
    if card.architecture != t.architecture:
        raise ConfigError(f"{src}: architecture {card.architecture!r}, but train.architecture is {t.architecture!r}")
    params = {k: v for k, v in card.arch_params.items() if k not in ("in_channels", "num_classes")}
    # a U-Net's averaging stem may become a space_to_depth one: same function to start from, finer texture to learn
    widen = (t.architecture == "unet" and params.get("stem", "avg") == "avg" and params.get("input_stride", 1) > 1
             and t.arch_params.get("stem") == "space_to_depth")
    if widen:
        params["stem"] = "space_to_depth"
    if params != dict(t.arch_params):
        raise ConfigError(f"{src}: arch_params {params}, but train.arch_params is {dict(t.arch_params)}")
    if list(card.bands) != list(band_names):
        raise ConfigError(f"{src}: bands {list(card.bands)}, but the training images give {band_names} "
                          "(set train.band_names / input_bands)")
    names = [c.name for c in t.classes]
    if [c.name for c in card.classes] != names:
        raise ConfigError(f"{src}: classes {[c.name for c in card.classes]}, but train.classes is {names}")
    norm = card.normalization
    if norm.name != "standardize" or not {"mean", "std"} <= set(norm.params):
        raise ConfigError(f"{src}: normalisation {norm.name!r}; fine-tuning needs a 'standardize' (mean, std) card")
    sd = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
          for k, v in base.module.state_dict().items()}
    if widen:
        from geoseg.models.unet import avg_stem_to_space_to_depth

        sd = avg_stem_to_space_to_depth(sd, params["input_stride"])
    if card.logit_offsets is not None and any(card.logit_offsets):  # trained logits, without post-hoc offsets
        key = "head.bias"
        if key not in sd:
            raise ConfigError(f"{src}: the card declares logit offsets but the model has no head.bias")
        sd[key] = sd[key] - torch.as_tensor(card.logit_offsets, dtype=torch.float32)
    return sd, [float(v) for v in norm.params["mean"]], [float(v) for v in norm.params["std"]]


def _region_weights(t, scenes, regions) -> np.ndarray | None:
    """Sampling weight per training region from ``train.source_weights``: each source's share split by area."""
    if t.source_weights is None:
        return None
    area = np.array([float(w.width * w.height) for _, w in regions])
    src = np.array([scenes[si].source for si, _ in regions])
    out = np.zeros(len(regions))
    for k, share in enumerate(t.source_weights):
        mine = src == k
        if mine.any():
            out[mine] = share * area[mine] / area[mine].sum()
    if out.sum() <= 0:
        raise ConfigError(f"train.source_weights {t.source_weights}: every source with training regions weighs 0")
    return out / out.sum()


def epoch_chips(plan: dict, epoch: int) -> list[Chip]:
    """This epoch's training chips, in order, the same on every worker (seeded by train.seed and epoch)."""
    t = plan["train"]
    rng = np.random.default_rng([t["seed"], epoch])
    if t["sampling"] == "grid":
        chips = list(plan["train_grid"])
        rng.shuffle(chips)
        return chips
    n = t["chips_per_epoch"] or len(plan["train_grid"])
    if t["sampling"] == "random":
        sizes = None
        if t.get("scale_range"):
            lo, hi = (math.log(v) for v in t["scale_range"])
            sizes = np.maximum(8, np.round(t["chip_px"] / np.exp(rng.uniform(lo, hi, size=n)))).astype(int)
        return random_chips(plan["regions_train"], t["chip_px"], n, rng, plan.get("region_weights"), sizes)
    idx = rng.choice(len(plan["candidates"]), size=n, p=plan["weights"] / plan["weights"].sum())
    return [plan["candidates"][i] for i in idx]


def shard(chips: list, rank: int, world: int, batch: int) -> list:
    """Rank's share: every world-th chip, cut so every rank runs the same number of full steps."""
    steps = max(1, len(chips) // (world * batch))
    mine = chips[rank::world]
    if len(mine) < steps * batch:  # fewer chips than one step per rank: repeat (tiny data sets, smoke tests)
        mine = (mine * (steps * batch // max(len(mine), 1) + 1)) if mine else chips[:1] * (steps * batch)
    return mine[: steps * batch]



def checkpoint_root(t) -> Path:
    if t.checkpoint_dir:
        return Path(t.checkpoint_dir).expanduser().resolve()
    return Path(str(Path(t.out).expanduser().resolve()) + ".ckpt")


def bundle_dir(t, overwrite: bool) -> Path:
    """``train.out``, refused when unset or when it holds files and ``overwrite`` is off."""
    if not t.out:
        raise ConfigError("train.out is not set: the directory where the model bundle is written")
    out = Path(t.out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: bundle directory exists and is not empty; pass --overwrite or another train.out")
    return out


def finish_bundle(cfg: JobConfig, plan: dict, state: dict, out: Path, seconds: float) -> dict:
    """Best weights -> measured halo -> filled card -> bundle (+ training.json with the history)."""
    from geoseg.models.registry import load_model, narrow_state_dict, save_bundle
    from geoseg.train.card_fill import make_card, measure_halo, recommended_tile_px
    from geoseg.train.loop import build_module

    t = cfg.train
    k = len(plan["class_ids"])
    module = build_module(t.architecture, t.arch_params, len(plan["band_names"]), k)
    hist = state["history"]
    if t.keep == "last":
        module.load_state_dict(last_weights(state))
        chosen = hist[-1] if hist else {}
    else:
        module.load_state_dict(state["best_state"] or state["model"])
        chosen = max(hist, key=lambda r: r.get("val_miou_calibrated", r["val_miou"])) if hist else {}
    module.eval()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    adjustment = chosen.get("logit_adjustment")
    if adjustment is not None:  # the offsets the best epoch was validated with become part of the model
        with torch.no_grad():
            _head(t, module, "train.logit_adjustment").bias += torch.as_tensor(adjustment)
    if t.weights_dtype == "float16":  # round first: calibration, halo and the bundle all see the stored weights
        module.load_state_dict(narrow_state_dict(module.state_dict(), torch.float16))
    calibration = _calibrate(t, plan, module) if t.calibrate_bias else None
    arch_params = dict(t.arch_params, in_channels=len(plan["band_names"]), num_classes=k)
    stride = int(getattr(module, "output_stride", 16))
    card = make_card(t, band_names=plan["band_names"], mean=plan["mean"], std=plan["std"], gsd_m=plan["gsd_m"],
                     dtype=plan["dtype"], output_stride=stride, halo_px=0, arch_params=arch_params,
                     gsd_range_m=plan.get("gsd_range_m"), value_range=plan.get("value_range"))
    images = []
    seen = []
    for si, w in plan["regions_val"]:
        if si in seen:
            continue
        seen.append(si)
        data, valid = read_image(plan["scenes"][si], w)
        images.append((data, valid))
        if len(images) >= t.halo_images:
            break
    offsets = np.zeros(k)
    if adjustment is not None:
        offsets += np.asarray(adjustment, np.float64)
    if calibration:
        offsets += np.asarray(calibration["offsets"], np.float64)
    if offsets.any():  # what the head's bias holds on top of the trained logits (fine-tuning removes it)
        card = card.model_copy(update={"logit_offsets": [float(v) for v in offsets]})
    halo, agree, tile = measure_halo(module, card, images, t.halo_max_px)
    best_score = chosen.get("val_miou_calibrated", chosen.get("val_miou"))
    if t.keep == "last":
        kept = f"the last epoch's weights ({chosen.get('epoch')}, val mIoU {best_score})"
    else:
        kept = f"best val mIoU {best_score} at epoch {chosen.get('epoch')}"
    if t.ema_decay:
        kept += ", a moving average of the weights"
    cal = ""
    if adjustment is not None:
        cal += (f" Logit adjustment (tau {t.logit_adjustment}, class priors of the training chips): offsets "
                f"{adjustment} in the head's bias.")
    if calibration:
        cal += (f" Logit offsets {calibration['offsets']} added to the head's bias (val mIoU "
               f"{calibration['miou_before']} -> {calibration['miou_after']}).")
    card = card.model_copy(update={
        "halo_px": halo, "tile_px": recommended_tile_px(halo, stride),
        "description": (card.description + " " if card.description else "")
        + f"Trained with geoseg train: {len(plan['scenes'])} images, {kept}. Halo measured: tiled ({tile} px tiles) vs whole-image inference agree on "
        f"{agree:.5f} of validation pixels at {halo} px." + cal,
    })
    out.mkdir(parents=True, exist_ok=True)
    save_bundle(module, card, out, dtype=torch.float16 if t.weights_dtype == "float16" else None)
    summary = {
        "bundle": str(out), "card": card.model_dump(mode="json"), "history": state["history"],
        "best_epoch": chosen, "keep": t.keep, "halo": {"halo_px": halo, "agreement": agree, "tile_px": tile},
        "class_pixels": plan["class_pixels"], "scenes": len(plan["scenes"]), "seconds": round(seconds, 1),
        "val_chips": len(plan["val_chips"]), "logit_adjustment": adjustment,
        "calibration": calibration,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    load_model(out)  # the bundle must load
    return summary


def last_weights(state: dict) -> dict:
    """The last epoch's weights of a checkpoint: its weight average when training kept one (train.ema_decay)."""
    ema = state.get("ema")
    if ema is None:
        return state["model"]
    return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}  # AveragedModel's keys


def _head(t, module: torch.nn.Module, option: str) -> torch.nn.Conv2d:
    head = getattr(module, "head", None)
    if not isinstance(head, torch.nn.Conv2d) or head.bias is None:
        raise ConfigError(f"{option}: the {t.architecture} model has no head convolution with a bias")
    return head


def _calibrate(t, plan: dict, module: torch.nn.Module) -> dict:
    """``train.calibrate_bias``: per-class logit offsets chosen on the val chips, folded into the head's bias."""
    from geoseg.train.loop import ChipDataset, ChipStore, calibrate_bias

    head = _head(t, module, "train.calibrate_bias")
    store = ChipStore(plan["scenes"], plan["class_ids"], plan["class_names"])
    ds = ChipDataset(store, plan["val_chips"], plan["mean"], plan["std"])
    loader = torch.utils.data.DataLoader(ds, batch_size=t.batch_size)
    offsets, before, after = calibrate_bias(module, loader, len(plan["class_ids"]), torch.device("cpu"))
    with torch.no_grad():
        head.bias += torch.as_tensor(offsets, dtype=head.bias.dtype)
    log.info("calibrated logit offsets %s: val mIoU %.4f -> %.4f", offsets.round(2).tolist(), before, after)
    return {"offsets": [round(float(v), 3) for v in offsets], "miou_before": round(before, 5),
            "miou_after": round(after, 5)}


def load_train_config(path: str | Path, overrides=()) -> JobConfig:
    """Read a training job file (paths in ``train:`` relative to the file), apply ``--set``, validate."""
    from geoseg.config import load_config

    return load_config(path, overrides)


def latest_checkpoint_state(cfg: JobConfig) -> dict:
    """The training state of the run's last checkpoint registered by Ray Train (read without Ray)."""
    run_dir = checkpoint_root(cfg.train) / RUN_NAME
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{run_dir}: no checkpoint of this training run to write a bundle from") from None
    return torch.load(run_dir / latest / STATE_FILE, map_location="cpu", weights_only=False)


def bundle_from_checkpoint(cfg: JobConfig, *, overwrite: bool = False) -> dict:
    """Write the bundle from the best weights of the run's last checkpoint, without training more."""
    t = cfg.train
    out = bundle_dir(t, overwrite)
    t0 = time.monotonic()
    state = latest_checkpoint_state(cfg)
    plan = prepare_plan(cfg)
    if state["fingerprint"] != plan["fingerprint"]:
        raise ConfigError(f"{checkpoint_root(t)}: the checkpoint is from another model/class/band setup than {t.name!r}")
    return finish_bundle(cfg, plan, state, out, time.monotonic() - t0)
