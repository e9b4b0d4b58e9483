"""Inference on one block: cut tiles from the block's read array, normalise, batched forward, crop, stitch.

Pure compute over arrays: no Ray, no files. The runner's inference actor and the local pipeline both call
``Predictor.predict_block``. Normalisation comes from the model card and is the same elementwise transform
for every tile (never per-tile statistics), so a pixel's input does not depend on which tile carried it.
Tiles whose core has no valid pixel are never sent to the model.

On request (``predict_block(..., confidence=True)``) a block also gets a confidence raster: the model's probability
of each pixel's predicted class (max softmax) as uint8 ``round(p * 254)``, ``CONFIDENCE_NODATA`` where the mask is
nodata. It comes from the same tiles, halos and crops as the mask, so it is as partition-invariant as the mask.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from rasterio.windows import Window

from geoseg._memory import release_free_memory
from geoseg.conventions import NODATA
from geoseg.errors import ConfigError
from geoseg.grid import Block
from geoseg.plan import CONFIDENCE_NODATA, CONFIDENCE_SCALE

__all__ = ["select_device", "default_batch_size", "Predictor", "BlockPrediction", "NODATA", "TTA_VIEWS"]


def select_device(requested: str = "auto") -> torch.device:
    """``cuda`` when asked (it must exist) or when ``auto`` finds one; else ``cpu``."""
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("runtime.device is 'cuda' but no CUDA device is available (valid: auto, cpu, cuda)")
        return torch.device("cuda")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"runtime.device {requested!r} is not one of auto, cpu, cuda")


def default_batch_size(device: torch.device) -> int:
    """Tiles per forward pass when the config leaves it open.

    A GPU needs batches to fill it. On CPU a batch buys nothing: single tiles are faster (cache locality) and a
    pass's transient memory grows with the batch (numbers in benchmarks/README.md).
    """
    return 8 if device.type == "cuda" else 1


@dataclass
class BlockPrediction:
    """A block's class mask (uint8, ``NODATA`` where invalid) and what it cost."""

    mask: np.ndarray
    tiles_inferred: int
    tiles_skipped: int
    model_calls: int
    forward_s: float = 0.0  # seconds inside forward passes (device sync included)
    started: float = 0.0  # wall clock (time.time()) at the block's start and end, for the busy fraction
    ended: float = 0.0
    confidence: np.ndarray | None = None  # when asked: uint8 round(max softmax * 254), 255 where the mask is nodata


def _rel(inner: Window, outer: Window) -> tuple[slice, slice]:
    r0, c0 = int(inner.row_off - outer.row_off), int(inner.col_off - outer.col_off)
    return slice(r0, r0 + int(inner.height)), slice(c0, c0 + int(inner.width))


# test-time augmentation: (90-degree turns, then a left-right flip) per view; "flips" is the dihedral group's
# reflections and half turn (identity, left-right, up-down = half turn + left-right, half turn)
TTA_VIEWS = {
    "none": [(0, False)],
    "flips": [(0, False), (0, True), (2, True), (2, False)],
    "d4": [(k, f) for k in range(4) for f in (False, True)],
}


class Predictor:
    """A model placed on a device, ready to predict blocks. Build once per worker (the weights load once)."""

    def __init__(self, model, device: str | torch.device = "auto", batch_size: int | None = None,
                 autocast: str = "none", tta: str | None = None):
        self.model = model
        self.card = model.card
        self.tta = tta or self.card.tta or "none"
        if self.tta not in TTA_VIEWS:
            raise ConfigError(f"model.tta {self.tta!r}: not one of {', '.join(TTA_VIEWS)}")
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.module = model.module.to(self.device).eval()
        self.batch_size = batch_size or default_batch_size(self.device)
        self.autocast = autocast
        self.model_calls = 0  # forward passes, counted for tests of skipping and resume
        self.forward_s = 0.0  # time inside forward_classes, summed (the worker's busy time)

    def _amp(self):
        if self.device.type != "cuda" or self.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def forward_classes(self, batch: np.ndarray) -> np.ndarray:
        """Raw tiles (N, bands, rows, cols) -> class ids (N, rows, cols) uint8."""
        return self.forward(batch)[0]

    @torch.inference_mode()
    def forward(self, batch: np.ndarray, confidence: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw tiles (N, bands, rows, cols) -> (class ids (N, rows, cols) uint8, and with ``confidence`` the
        predicted class's probability as uint8 ``round(p * 254)``, else None)."""
        t0 = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, non_blocking=True)
        x = self.card.normalization.apply(x)
        self.model_calls += 1
        if self.tta == "none":
            with self._amp():
                logits = self.module(x)
            classes = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()  # .cpu() waits for the device
            conf = None
            if confidence:  # float32 softmax whatever the autocast; max over classes is the argmax class's p
                p = torch.softmax(logits.float(), dim=1).amax(dim=1)
                conf = torch.round(p * CONFIDENCE_SCALE).to(torch.uint8).cpu().numpy()
            self.forward_s += time.perf_counter() - t0
            return classes, conf
        prob = None
        for turns, flip in TTA_VIEWS[self.tta]:  # each view's probabilities, turned back onto the tile's pixels
            v = torch.rot90(x, turns, dims=(2, 3))
            v = v.flip(3) if flip else v
            with self._amp():
                logits = self.module(v)
            p = torch.softmax(logits.float(), dim=1)
            p = torch.rot90(p.flip(3) if flip else p, -turns, dims=(2, 3))
            prob = p if prob is None else prob + p
        prob /= len(TTA_VIEWS[self.tta])
        top, classes_t = prob.max(dim=1)
        classes = classes_t.to(torch.uint8).cpu().numpy()
        conf = torch.round(top * CONFIDENCE_SCALE).to(torch.uint8).cpu().numpy() if confidence else None
        self.forward_s += time.perf_counter() - t0
        return classes, conf

    def predict_block(self, block: Block, data: np.ndarray, valid: np.ndarray,
                      confidence: bool = False) -> BlockPrediction:
        """Predict every tile of ``block`` from its read array ``data`` (bands, rows, cols) over ``block.read``;
        with ``confidence`` also the block's confidence raster (see the module docstring)."""
        started, forward0 = time.time(), self.forward_s
        out = np.full((int(block.window.height), int(block.window.width)), NODATA, dtype=np.uint8)
        conf_out = np.full(out.shape, CONFIDENCE_NODATA, dtype=np.uint8) if confidence else None
        # Tiles with the same read shape batch together (edge tiles are clipped, so shapes vary there).
        groups: dict[tuple[int, int], list] = defaultdict(list)
        skipped = 0
        for tile in block.tiles:
            core_in_read = _rel(tile.core, block.read)
            if not valid[core_in_read].any():
                skipped += 1
                continue
            groups[(int(tile.read.height), int(tile.read.width))].append(tile)
        inferred = 0
        calls0 = self.model_calls
        for tiles in groups.values():
            for i in range(0, len(tiles), self.batch_size):
                chunk = tiles[i : i + self.batch_size]
                batch = np.stack([data[(slice(None), *_rel(t.read, block.read))] for t in chunk])
                classes, conf = self.forward(batch, confidence)
                for k, (t, cls) in enumerate(zip(chunk, classes)):
                    out[_rel(t.core, block.window)] = cls[_rel(t.core, t.read)]
                    if conf_out is not None:
                        conf_out[_rel(t.core, block.window)] = conf[k][_rel(t.core, t.read)]
                inferred += len(chunk)
        invalid = ~valid[_rel(block.window, block.read)]
        out[invalid] = NODATA
        if conf_out is not None:
            conf_out[invalid] = CONFIDENCE_NODATA
        if self.device.type == "cpu":
            release_free_memory()
        return BlockPrediction(out, inferred, skipped, self.model_calls - calls0, self.forward_s - forward0,
                               started, time.time(), conf_out)
