"""Chip augmentation: flips, 90-degree rotations, brightness / contrast / colour balance / saturation, noise.

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
    # every draw happens whatever the settings, so the geometry of a seed does not depend on them
    u_gain, u_contrast = rng.uniform(-1, 1, size=2)
    u_band = rng.uniform(-1, 1, size=(x.shape[0], 1, 1))
    flip_lr, flip_ud, k = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(0, 4))
    noise_seed = int(rng.integers(0, 2**31))
    u_sat = rng.uniform(-1, 1)
    if cfg.brightness or cfg.contrast or cfg.channel_gain:
        gain = 1.0 + cfg.brightness * u_gain
        contrast = 1.0 + cfg.contrast * u_contrast
        band_gain = 1.0 + cfg.channel_gain * u_band
        if valid.any():
            mean = x[:, valid].mean(axis=1).reshape(-1, 1, 1)
        else:
            mean = np.zeros((x.shape[0], 1, 1), np.float32)
        x = ((x - mean) * contrast + mean) * gain * band_gain
        x = np.maximum(x, 0.0) if image.min() >= 0 else x
    if cfg.saturation and x.shape[0] > 1:
        # towards (or away from) the chip's grey: roofs of one material come in many colours
        grey = x.mean(axis=0, keepdims=True)
        x = grey + (x - grey) * (1.0 + cfg.saturation * u_sat)
        x = np.maximum(x, 0.0) if image.min() >= 0 else x
    if cfg.noise and band_std is not None:
        noise = np.random.default_rng(noise_seed).normal(0.0, cfg.noise, size=x.shape).astype(np.float32)
        x = x + noise * band_std.reshape(-1, 1, 1)
    x[:, ~valid] = 0
    if cfg.flips and flip_lr:
        x, y = x[:, :, ::-1], y[:, ::-1]
    if cfg.flips and flip_ud:
        x, y = x[:, ::-1, :], y[::-1, :]
    if cfg.rot90 and k:
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)
