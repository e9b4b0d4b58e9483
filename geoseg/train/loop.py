"""The training loop's pieces, without Ray: chip store, dataset, model, loss, one epoch, validation.

``geoseg.engines.ray_train`` runs these inside Ray Train workers (DDP); tests run them in-process.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.windows import Window

from geoseg.train.augment import augment
from geoseg.train.data import IGNORE, Chip, Scene, load_labels, read_image

__all__ = [
    "ChipStore",
    "ChipDataset",
    "resample_chip",
    "calibrate_bias",
    "best_offset",
    "OFFSET_GRID",
    "build_module",
    "segmentation_loss",
    "confusion_matrix",
    "iou_from_confusion",
    "cosine_with_warmup",
    "run_epoch",
    "validate",
    "logit_adjustment",
    "weight_average",
]


class ChipStore:
    """Reads chips (raw image, labels) of scenes, caching whole scenes up to ``max_bytes`` (LRU)."""

    def __init__(self, scenes: list[Scene], class_ids: list[int], class_names: dict[str, int] | None = None,
                 max_bytes: int = 1 << 30):
        self.scenes = scenes
        self.class_ids = class_ids
        self.class_names = class_names or {}
        self.max_bytes = max_bytes
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0

    def _scene(self, i: int):
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        s = self.scenes[i]
        data, valid = read_image(s)
        labels = load_labels(s, self.class_ids, self.class_names)
        labels = np.where(valid, labels, IGNORE).astype(np.uint8)
        item = (data, valid, labels)
        size = data.nbytes + valid.nbytes + labels.nbytes
        self._cache[i] = item
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= sum(a.nbytes for a in old)
        return item

    def labels(self, i: int) -> np.ndarray:
        return self._scene(i)[2]

    def chip(self, c: Chip) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image float32 (bands, size, size), valid, labels uint8) of chip ``c``; outside the scene is IGNORE."""
        data, valid, labels = self._scene(c.scene)
        rows, cols = labels.shape
        n = c.size
        img = np.zeros((data.shape[0], n, n), np.float32)
        v = np.zeros((n, n), bool)
        lab = np.full((n, n), IGNORE, np.uint8)
        r0, c0 = max(c.row, 0), max(c.col, 0)
        r1, c1 = min(c.row + n, rows), min(c.col + n, cols)
        if r1 > r0 and c1 > c0:
            dst = (slice(r0 - c.row, r1 - c.row), slice(c0 - c.col, c1 - c.col))
            img[(slice(None), *dst)] = data[:, r0:r1, c0:c1]
            v[dst] = valid[r0:r1, c0:c1]
            lab[dst] = labels[r0:r1, c0:c1]
        return img, v, lab


def resample_chip(img: np.ndarray, valid: np.ndarray, lab: np.ndarray, size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, valid, labels) resampled to ``size`` x ``size``: bilinear image (antialiased when shrinking),
    nearest labels and validity (scale augmentation)."""
    n = img.shape[-1]
    if img.shape[-2:] == (size, size):
        return img, valid, lab
    x = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < n)[0]
    masks = torch.from_numpy(np.stack([valid.astype(np.float32), lab.astype(np.float32)]))[None]
    masks = F.interpolate(masks, size=(size, size), mode="nearest")[0]
    return x.numpy(), masks[0].numpy() > 0.5, masks[1].numpy().astype(np.uint8)


class ChipDataset(torch.utils.data.Dataset):
    """Chips as normalised float32 tensors and int64 labels (IGNORE = 255), augmented when ``aug`` is given.

    Chips of another side than ``out_px`` (scale augmentation) are resampled to ``out_px`` first.
    """

    def __init__(self, store: ChipStore, chips: list[Chip], mean: list[float], std: list[float], aug=None,
                 seed: int = 0, out_px: int | None = None):
        self.store, self.chips, self.aug, self.seed, self.out_px = store, chips, aug, seed, out_px
        self.mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, i: int):
        img, valid, lab = self.store.chip(self.chips[i])
        if self.out_px is not None:
            img, valid, lab = resample_chip(img, valid, lab, self.out_px)
        if self.aug is not None:
            rng = np.random.default_rng([self.seed, i])
            img, lab = augment(img, lab, valid, rng, self.aug, self.std.ravel())
            valid = None
        x = (img - self.mean) / self.std
        if valid is not None:
            x[:, ~valid] = 0
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(lab.astype(np.int64))


def build_module(architecture: str, arch_params: dict, in_channels: int, num_classes: int) -> torch.nn.Module:
    from geoseg.models import get_model

    params = dict(arch_params)
    params.update(in_channels=in_channels, num_classes=num_classes)
    return get_model(architecture, **params)


def _balanced_weights(target: torch.Tensor, k: int) -> torch.Tensor:
    """Per-class cross-entropy weights of one batch: (known pixels / (k * class pixels)) ** 0.5, at most 10, mean 1
    over the classes present (a thin class such as a 3 px building boundary is not drowned by background)."""
    counts = torch.bincount(target[target != IGNORE].reshape(-1), minlength=k)[:k].float()
    present = counts > 0
    w = torch.zeros(k, device=target.device)
    w[present] = (counts.sum() / (k * counts[present])).sqrt().clamp(max=10.0)
    return w / w[present].mean() if present.any() else torch.ones(k, device=target.device)


def lovasz_softmax(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovasz-softmax loss (Berman et al. 2018) over the classes present in ``target``, all pixels of the batch
    pooled, IGNORE skipped: the Lovasz extension of the Jaccard loss, so for hard 0/1 probabilities it is exactly
    the mean over those classes of 1 - IoU. ``probs``: (n, k, h, w) softmax; ``target``: (n, h, w)."""
    k = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, k)
    t = target.reshape(-1)
    known = t != IGNORE
    p, t = p[known], t[known]
    losses = []
    for c in torch.unique(t).tolist():
        fg = (t == c).float()
        errors = (fg - p[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        fg_sorted = fg[order]
        gts = fg_sorted.sum()
        intersection = gts - fg_sorted.cumsum(0)
        union = gts + (1.0 - fg_sorted).cumsum(0)
        jaccard = 1.0 - intersection / union
        grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])  # the Jaccard loss's increments, in order
        losses.append(torch.dot(errors_sorted, grad))
    return torch.stack(losses).mean() if losses else probs.sum() * 0.0


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce_dice") -> torch.Tensor:
    """Cross-entropy (ignoring IGNORE), plus soft Dice over the classes present when ``kind`` is ce_dice;
    ``ce_dice_balanced``: the cross-entropy weighted per class by ``_balanced_weights`` of the batch;
    ``ce_lovasz``: cross-entropy plus ``lovasz_softmax`` (a surrogate of IoU itself)."""
    if kind == "ce_dice_balanced":
        w = _balanced_weights(target, logits.shape[1])
        ce = F.cross_entropy(logits.float(), target, weight=w, ignore_index=IGNORE)
    else:
        ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
    if kind == "ce":
        return ce
    known = target != IGNORE
    if not known.any():
        return ce
    p = logits.float().softmax(dim=1)
    if kind == "ce_lovasz":
        return ce + lovasz_softmax(p, target)
    k = p.shape[1]
    t = F.one_hot(torch.where(known, target, 0), k).permute(0, 3, 1, 2).float()
    m = known.unsqueeze(1).float()
    inter = (p * t * m).sum(dim=(0, 2, 3))
    denom = (p * m).sum(dim=(0, 2, 3)) + (t * m).sum(dim=(0, 2, 3))
    present = (t * m).sum(dim=(0, 2, 3)) > 0
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1 - dice[present]).mean()


def confusion_matrix(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """k x k counts, rows = truth, columns = prediction; IGNORE truth is skipped."""
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(target).reshape(-1).long()
    keep = t != IGNORE
    idx = t[keep] * k + p[keep].clamp(0, k - 1)
    return torch.bincount(idx, minlength=k * k).reshape(k, k).cpu().numpy().astype(np.int64)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warmup, then cosine to 1% of the base learning rate."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def run_epoch(module, loader, optimizer, scheduler, device, loss_kind: str = "ce_dice", scaler=None,
              amp_dtype=None, max_steps: int | None = None, progress=None, after_step=None) -> dict:
    """One pass of training over ``loader``; returns mean loss, chips and seconds. ``after_step()`` runs after
    every optimiser step (e.g. a weight average's update)."""
    module.train()
    total, n, steps = 0.0, 0, 0
    counts = None
    t0 = time.monotonic()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        known = torch.bincount(y.flatten(), minlength=IGNORE + 1)[:IGNORE]  # label pixels per class, as trained
        counts = known if counts is None else counts + known
        optimizer.zero_grad(set_to_none=True)
        if amp_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=amp_dtype):
                logits = module(x)
            loss = segmentation_loss(logits, y, loss_kind)
        else:
            loss = segmentation_loss(module(x), y, loss_kind)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        total += float(loss.detach()) * x.shape[0]
        n += x.shape[0]
        steps += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{total / max(n, 1):.4f}", refresh=False)
        if max_steps and steps >= max_steps:
            break
    class_pixels = np.zeros(IGNORE, np.int64) if counts is None else counts.cpu().numpy().astype(np.int64)
    return {"loss": total / max(n, 1), "chips": n, "seconds": time.monotonic() - t0, "steps": steps,
            "class_pixels": class_pixels}


def weight_average(module: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``module``'s parameters and buffers (BatchNorm statistics too, so the
    average is a model that runs as it is); ``.update_parameters(module)`` after each step, ``.module`` is it."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def logit_adjustment(class_pixels: np.ndarray, tau: float) -> np.ndarray:
    """Per-class logit offsets ``-tau * log(prior)`` (Menon et al. 2021, post-hoc logit adjustment), shifted so
    class 0's is 0; ``class_pixels`` counts each class's label pixels in the chips trained on.

    A model trained on chips where a class covers 10% of the pixels learns that prior and under-calls the class
    where it is dense; with ``tau`` = 1 the argmax decides as if every class were equally likely. A class never
    seen gets the largest offset of the seen ones (a finite value, so it cannot take over every pixel).
    """
    c = np.asarray(class_pixels, np.float64)
    if tau == 0 or c.sum() <= 0:
        return np.zeros(len(c))
    seen = c > 0
    logp = np.full(len(c), np.nan)
    logp[seen] = np.log(c[seen] / c.sum())
    logp[~seen] = np.nanmin(logp)
    out = -tau * logp
    return out - out[0]


# logit offsets tried for the non-first classes (train.calibrate_bias): per-epoch selection and the bundle's head
OFFSET_GRID = np.round(np.arange(-3.0, 3.0 + 1e-9, 0.1), 2)


@torch.no_grad()
def validate(module, loader, num_classes: int, device, amp_dtype=None, offsets: np.ndarray | None = None,
             bias: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrix of ``module`` over ``loader`` (eval mode).

    ``bias`` (one value per class, e.g. from ``logit_adjustment``) is added to the logits first. With
    ``offsets``, one matrix per offset (shape (len(offsets), k, k)): the offset is added to the logits of
    every class but the first (class 0, e.g. background) before the argmax.
    """
    module.eval()
    k = num_classes
    cm = np.zeros((k, k) if offsets is None else (len(offsets), k, k), np.int64)
    shift_all = None if bias is None else torch.as_tensor(bias, dtype=torch.float32, device=device).view(1, k, 1, 1)
    for x, y in loader:
        x = x.to(device)
        if amp_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=amp_dtype):
                logits = module(x)
        else:
            logits = module(x)
        if shift_all is not None:
            logits = logits.float() + shift_all
        if offsets is None:
            cm += confusion_matrix(logits.argmax(1).cpu(), y, k)
            continue
        logits = logits.float().cpu()
        shift = torch.zeros(1, k, 1, 1)
        for i, v in enumerate(offsets):
            shift[:, 1:] = float(v)
            cm[i] += confusion_matrix((logits + shift).argmax(1), y, k)
    return cm


def best_offset(cms: np.ndarray, offsets: np.ndarray) -> tuple[float, float, float]:
    """(offset, mIoU there, mIoU at offset 0) from ``validate(..., offsets=offsets)``; ties: the smallest |offset|."""
    scores = []
    for cm in cms:
        iou = iou_from_confusion(cm)
        scores.append(float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0)
    scores = np.round(np.asarray(scores), 9)
    top = np.flatnonzero(scores == scores.max())
    i = int(top[np.argmin(np.abs(np.asarray(offsets)[top]))])
    zero = int(np.argmin(np.abs(np.asarray(offsets))))
    return float(offsets[i]), float(scores[i]), float(scores[zero])


def calibrate_bias(module, loader, num_classes: int, device) -> tuple[np.ndarray, float, float]:
    """Logit offsets (0 for class 0, one shared value for the others, from ``OFFSET_GRID``) that maximise mIoU
    over ``loader``. Returns (offsets per class, mIoU before, mIoU after); adding them to the head's bias moves
    the argmax boundary, e.g. back towards recall for a class the labels under-report."""
    cms = validate(module, loader, num_classes, device, offsets=OFFSET_GRID)
    v, after, before = best_offset(cms, OFFSET_GRID)
    out = np.full(num_classes, v)
    out[0] = 0.0
    return out, before, after


def whole_window(scene: Scene) -> Window:
    rows, cols = scene.shape
    return Window(0, 0, cols, rows)
