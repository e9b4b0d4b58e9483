"""`buildings` on CPU: what the card's tile side and test-time augmentation cost, in one run.

    python benchmarks/bench_buildings.py [--rounds 2] [--threads 2]

A real 1024 x 1024 px scene (4 x 4 contiguous zoom-21 area2/val chips of ../shared/data/buildings, 0.075 m) is
predicted through ``geoseg.api.predict`` (local engine, mask only) with the shipped ``buildings`` model three ways,
alternating rounds, the best round of each kept:

- 256 px tiles (the default before cards had ``tile_px``) without test-time augmentation;
- the card's tiles (``tile_px``, set from the measured halo) without test-time augmentation;
- the card's tiles with the card's default (``tta``; d4 = 8 views).

It prints megapixels per second and the ratios; a smaller halo overhead per tile is what the card's tile side buys.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._result import result  # noqa: E402

VAL = ROOT.parent / "shared" / "data" / "buildings" / "area2" / "val" / "images"
XS, YS = range(1238424, 1238428), range(1046544, 1046548)


def mosaic(path: Path) -> Path:
    import numpy as np
    import rasterio

    rows, profile = [], None
    for y in YS:
        row = []
        for x in XS:
            with rasterio.open(VAL / f"OAM-{x}-{y}-21.tif") as src:
                row.append(src.read())
                if profile is None:
                    profile = src.profile
        rows.append(np.concatenate(row, axis=2))
    data = np.concatenate(rows, axis=1)
    profile.update(width=data.shape[2], height=data.shape[1], driver="GTiff", tiled=True, blockxsize=256,
                   blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from geoseg.api import predict
    from geoseg.models import load_model

    torch.set_num_threads(args.threads)
    card = load_model("buildings").card
    tile = card.tile_px or 256
    setups = {
        "256 px tiles, no tta": ("tiling.tile_px=256", "model.tta=none"),
        f"card tiles ({tile} px), no tta": ("model.tta=none",),
        f"card tiles ({tile} px), tta {card.tta or 'none'}": (),
    }
    best = {k: float("inf") for k in setups}
    with tempfile.TemporaryDirectory(prefix="geoseg-bench-buildings-") as tmp:
        scene = mosaic(Path(tmp) / "scene.tif")
        mp = 1024 * 1024 / 1e6
        for r in range(args.rounds):
            for name, extra in setups.items():
                out = Path(tmp) / f"out{r}-{len(extra)}"
                t0 = time.perf_counter()
                predict([str(scene)], str(out), model="buildings",
                        overrides=("runtime.engine=local", "vector.enabled=false", "output.report=false",
                                   "tiling.block_px=1024", *extra))
                best[name] = min(best[name], time.perf_counter() - t0)
    names = list(setups)
    for name in names:
        print(f"{name}: {best[name]:.2f} s, {mp / best[name]:.3f} MP/s", flush=True)
    speedup = best[names[0]] / best[names[1]]
    cost = best[names[2]] / best[names[1]]
    print(f"card tiles vs 256 px tiles: {speedup:.2f}x faster (halo {card.halo_px} px)")
    print(f"tta {card.tta or 'none'} vs none at the card's tiles: {cost:.2f}x the time")
    result("buildings: card tile side vs 256 px tiles, speed-up", round(speedup, 3), ">=", 1.0, "x")
    result(f"buildings: tta {card.tta or 'none'} cost at the card's tiles", round(cost, 3), "<=", 9.0, "x",
           note="8 views should cost about 8x")
    print(json.dumps({"seconds": best, "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
