"""Chip augmentation: flips, 90-degree rotations, brightness / contrast / colour balance, noise.

Pure numpy on one chip: ``image`` float32 (bands, rows, cols) of RAW values (before normalisation) and
``labels`` uint8 (rows, cols). Photometric changes act on raw values, so the model learns that a scene that
is brighter or flatter overall (another mosaic, another sun angle) is the same ground; the card's
normalisation stays one fixed per-band transform computed over the training set.
"""

from __future__ import annotations

import numpy as np

__all__ = ["augment"]


def augment(image: np.ndarray, labels: np.ndarray, valid: np.ndarray, rng: np.random.Generator, cfg,
            band_std: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A randomly transformed copy of (image, labels); ``valid`` marks real pixels (others stay 0)."""
    x = image.astype(np.float32, copy=True)
    y = labels
    if cfg.brightness or cfg.contrast or cfg.channel_gain:
        gain = 1.0 + rng.uniform(-cfg.brightness, cfg.brightness) if cfg.brightness else 1.0
        band_gain = (1.0 + rng.uniform(-cfg.channel_gain, cfg.channel_gain, size=(x.shape[0], 1, 1))
                     if cfg.channel_gain else 1.0)
        contrast = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast) if cfg.contrast else 1.0
        if valid.any():
            mean = x[:, valid].mean(axis=1).reshape(-1, 1, 1)
        else:
            mean = np.zeros((x.shape[0], 1, 1), np.float32)
        x = ((x - mean) * contrast + mean) * gain * band_gain
        x = np.maximum(x, 0.0) if image.min() >= 0 else x
    if cfg.noise and band_std is not None:
        x = x + rng.normal(0.0, cfg.noise, size=x.shape).astype(np.float32) * band_std.reshape(-1, 1, 1)
    x[:, ~valid] = 0
    if cfg.flips and rng.random() < 0.5:
        x, y = x[:, :, ::-1], y[:, ::-1]
    if cfg.flips and rng.random() < 0.5:
        x, y = x[:, ::-1, :], y[::-1, :]
    if cfg.rot90:
        k = int(rng.integers(0, 4))
        if k:
            x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)
