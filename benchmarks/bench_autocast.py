"""Effect of mixed precision (``model.autocast: bf16 | fp16``) on Dynamic World's output, on the real chip.

    python benchmarks/bench_autocast.py [--chip PATH] [--device auto|cpu|cuda] [--repeats 3]

Prints, per precision, the share of valid pixels whose class (argmax) equals the float32 result, the largest
logit difference, and the forward time relative to float32 in the same run. geoseg applies autocast on CUDA
only; on a machine without a GPU this runs the same autocast on CPU (bf16; fp16 where the CPU kernels exist) as
an estimate of the numeric effect -- the speed ratio on CPU says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHIP = ROOT.parent / "shared" / "data" / "sentinel2" / "Spain_7370579_S2Hand.tif"
if not DEFAULT_CHIP.exists():
    DEFAULT_CHIP = ROOT / "examples" / "Spain_7370579_S2Hand.tif"


def main() -> None:
    from geoseg.infer import select_device
    from geoseg.io.raster import inspect, resolve_bands
    from geoseg.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chip", type=Path, default=DEFAULT_CHIP)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = select_device(args.device)
    model = load_model("dynamic-world")
    with rasterio.open(args.chip) as src:
        bands = resolve_bands(inspect(src), model.card.bands, None)
        data = src.read(bands).astype(np.float32)
        valid = np.all(src.read_masks(bands) > 0, axis=0)
    net = model.module.to(device).eval()
    x = model.card.normalization.apply(torch.from_numpy(data)[None]).to(device)

    def forward(dtype):
        ctx = torch.autocast(device_type=device.type, dtype=dtype) if dtype else torch.autocast(device.type,
                                                                                                enabled=False)
        with torch.inference_mode(), ctx:
            out = net(x).float()
            best = float("inf")
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                net(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
        return out[0].cpu(), best

    ref, t_ref = forward(None)
    ref_cls = ref.argmax(0).numpy()
    print(f"device {device}; chip {args.chip.name} {data.shape[1]}x{data.shape[2]}, {int(valid.sum())} valid px")
    print(f"{'precision':>9} {'same class %':>13} {'max |dlogit|':>13} {'time / fp32':>12}")
    print(f"{'fp32':>9} {100.0:13.3f} {0.0:13.2e} {1.0:12.2f}")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        try:
            out, t = forward(dtype)
        except RuntimeError as e:  # e.g. no fp16 kernel for this op on this CPU
            print(f"{name:>9} not supported on {device.type}: {str(e).splitlines()[0][:80]}")
            continue
        same = (out.argmax(0).numpy() == ref_cls)[valid].mean() * 100
        diff = float((out - ref).abs().max())
        print(f"{name:>9} {same:13.3f} {diff:13.2e} {t / t_ref:12.2f}")


if __name__ == "__main__":
    main()
