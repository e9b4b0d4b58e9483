"""Compute the Dynamic World reference that tests/test_dynamic_world.py compares the torch port against.

    /tmp/tfvenv/bin/python tools/make_dw_reference.py [--chip TIF] [--saved-model DIR] [--out NPZ]

Runs with TensorFlow (not a geoseg dependency; CI never runs this). It reads the real Sentinel-2 chip, takes
Dynamic World's bands, normalises them with the formula from the Dynamic World notebook (float64, then
float32 as the SavedModel takes), runs the SavedModel on the whole 512x512 chip and writes a compressed
``.npz`` with: ``logits`` (a 128x128 crop at rows/cols given by ``crop``, float32, HWC, touching the bottom
and left edges so edge handling is covered), ``labels`` (argmax of the whole chip, uint8) and ``bands``. It
prints the smallest top-1 minus top-2 logit margin on the chip: how exact the port must be for 100% argmax
agreement (22 pixels have margins below 1e-4, the smallest 1.3e-5).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

# 1-based indexes of B2,B3,B4,B5,B6,B7,B8,B11,B12 in the chip's 13-band order B1..B8,B8A,B9..B12
DW_BANDS = [2, 3, 4, 5, 6, 7, 8, 12, 13]
PERCENTILES = np.array(
    [
        [1.7417268007636313, 2.023298706048351],
        [1.7261204997060209, 2.038905204308012],
        [1.6798346251414997, 2.179592821212937],
        [1.7734969472909623, 2.2890068333026603],
        [2.289154079164943, 2.6171674549378166],
        [2.382939712192371, 2.773418590375327],
        [2.3828939530384052, 2.7578332604178284],
        [2.1952484264967844, 2.789092484314204],
        [1.554812948247501, 2.4140534947492487],
    ]
)
CROP = (384, 0, 128)  # row, col, size


def normalize(x: np.ndarray) -> np.ndarray:
    """Dynamic World's log-sigmoid normalisation of HWC reflectance x 10000 (float64)."""
    x = np.log(x * 0.005 + 1.0)
    x = (x - PERCENTILES[:, 0]) / PERCENTILES[:, 1]
    x = np.exp(x * 5.0 - 1.0)
    return x / (x + 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chip", type=Path, default=SHARED / "sentinel2" / "Spain_7370579_S2Hand.tif")
    ap.add_argument("--saved-model", type=Path, default=SHARED / "dynamic_world" / "model" / "forward")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "dw_reference.npz")
    args = ap.parse_args()

    import rasterio
    import tensorflow as tf

    with rasterio.open(args.chip) as src:
        raw = src.read(DW_BANDS).astype(np.float64).transpose(1, 2, 0)  # HWC
    x = normalize(raw).astype(np.float32)[None]
    fn = tf.saved_model.load(str(args.saved_model)).signatures["serving_default"]
    (logits,) = fn(input_3=tf.constant(x)).values()
    logits = logits.numpy()[0]
    top2 = np.sort(logits, axis=-1)[..., -2:]
    r, c, n = CROP
    np.savez_compressed(
        args.out,
        logits=logits[r : r + n, c : c + n].astype(np.float32),
        crop=np.array(CROP),
        labels=logits.argmax(-1).astype(np.uint8),
        bands=np.array(DW_BANDS),
    )
    counts = np.bincount(logits.argmax(-1).ravel(), minlength=9)
    print(f"wrote {args.out} ({args.out.stat().st_size} B); class counts {counts.tolist()}")
    margin = top2[..., 1] - top2[..., 0]
    print(f"top-1 minus top-2 logit margin: min {margin.min():.3g}, pixels below 1e-4: {int((margin < 1e-4).sum())}")


if __name__ == "__main__":
    main()
