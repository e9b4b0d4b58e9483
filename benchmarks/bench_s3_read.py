"""Windowed reads of a COG on S3: GDAL's /vsis3/ against an s3fs file object as rasterio opener.

Starts moto's S3 server on 127.0.0.1 (``tools/setup_s3_test_server.sh`` first), uploads a 2048x2048 13-band int16
COG built from the real Sentinel-2 chip (256-px blocks, deflate), and for each opener measures, on a fresh object
key each time (so no process-level cache helps):

* requests and bytes transferred, through a counting loopback proxy (one pass);
* wall time of ``open`` + reading 4 scattered 256x256 windows, and of one 1024x1024 window (median of --reps):
  straight to the server on loopback, and through the proxy emulating a network (default 20 ms per request,
  100 MB/s per stream), since loopback makes a whole-object download look free.

Run: ``.venv/bin/python benchmarks/bench_s3_read.py [--reps 3]``. The numbers are quoted in geoseg/io/store.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import rasterio
from rasterio.session import DummySession
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from geoseg.config import StorageConfig  # noqa: E402
from geoseg.io import raster, s3  # noqa: E402
from tools.s3server import ACCESS_KEY, REGION, SECRET_KEY, CountingProxy, S3Server  # noqa: E402

CHIP = Path(os.environ.get("GEOSEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "sentinel2" / (
    "Spain_7370579_S2Hand.tif"
)
BUCKET = "bench"
SMALL_WINDOWS = [Window(0, 0, 256, 256), Window(768, 1280, 256, 256), Window(1792, 256, 256, 256),
                 Window(1280, 1792, 256, 256)]
BIG_WINDOW = Window(512, 512, 1024, 1024)


def make_cog(chip: Path, dest: Path, size: int = 2048, block: int = 256) -> None:
    """The chip tiled up to ``size`` x ``size``, written as a COG with ``block``-px tiles."""
    with rasterio.open(chip) as src:
        data = src.read()
        profile = src.profile
    reps = (1, -(-size // data.shape[1]), -(-size // data.shape[2]))
    big = np.tile(data, reps)[:, :size, :size]
    for k in ("tiled", "blockxsize", "blockysize", "interleave", "compress", "photometric"):
        profile.pop(k, None)
    profile.update(driver="COG", width=size, height=size, blocksize=block, compress="deflate", predictor=2,
                   BIGTIFF="NO")
    with rasterio.open(dest, "w", **profile) as dst:
        dst.write(big)


Opener = Callable[[str, StorageConfig], AbstractContextManager]


def open_vsis3(url: str, storage: StorageConfig):
    """geoseg's choice: GDAL /vsis3/ with gdal_env_options."""
    return raster.open_raster(url, storage)


class _Plain:
    """A context manager opening ``target`` in a rasterio.Env with ``opts`` and rasterio.open ``kwargs``."""

    def __init__(self, target: str, opts: dict[str, str], **kwargs):
        self.target, self.opts, self.kwargs = target, opts, kwargs

    def __enter__(self):
        self.env = rasterio.Env(session=DummySession(), **self.opts)
        self.env.__enter__()
        self.ds = rasterio.open(self.target, **self.kwargs)
        return self.ds

    def __exit__(self, *exc):
        self.ds.close()
        self.env.__exit__(*exc)


def _endpoint_only(storage: StorageConfig) -> dict[str, str]:
    keep = ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING", "AWS_REGION")
    return {k: v for k, v in s3.gdal_env_options(storage).items() if k in keep}


def open_vsis3_defaults(url: str, storage: StorageConfig):
    """GDAL /vsis3/ with GDAL's defaults (endpoint settings only)."""
    return _Plain("/vsis3/" + url[5:], _endpoint_only(storage))


def open_s3fs_default(url: str, storage: StorageConfig):
    """rasterio opener = s3fs filesystem (file objects with s3fs's default 50 MiB read-ahead blocks)."""
    return _Plain(url, _endpoint_only(storage), opener=s3.filesystem(storage))


def open_s3fs_tuned(url: str, storage: StorageConfig):
    """rasterio opener = s3fs filesystem whose file objects cache 256 KiB blocks (LRU)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=storage.endpoint_url, config_kwargs={"s3": {"addressing_style": "path"}},
                           default_block_size=256 * 1024, default_cache_type="blockcache",
                           use_listings_cache=False)
    return _Plain(url, _endpoint_only(storage), opener=fs)


CASES: dict[str, Opener] = {
    "gdal /vsis3/ + geoseg options": open_vsis3,
    "gdal /vsis3/, GDAL defaults": open_vsis3_defaults,
    "s3fs opener, defaults": open_s3fs_default,
    "s3fs opener, 256 KiB blockcache": open_s3fs_tuned,
}


def workload_small(ds) -> np.ndarray:
    return np.stack([ds.read(window=w) for w in SMALL_WINDOWS])


def workload_big(ds) -> np.ndarray:
    return ds.read(window=BIG_WINDOW)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="emulated per-request latency")
    ap.add_argument("--mbps", type=float, default=100.0, help="emulated bandwidth per stream, MB/s")
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION=REGION)
    os.environ.pop("AWS_PROFILE", None)

    with tempfile.TemporaryDirectory() as tmp:
        cog = Path(tmp) / "cog.tif"
        make_cog(CHIP, cog)
        size = cog.stat().st_size
        with rasterio.open(cog) as ds:
            want_small, want_big = workload_small(ds), workload_big(ds)

        with S3Server.start() as server, CountingProxy(server.endpoint_url) as proxy:
            s3 = server.client()
            s3.create_bucket(Bucket=BUCKET)
            with open(cog, "rb") as f:
                s3.put_object(Bucket=BUCKET, Key="src.tif", Body=f)
            counter = 0

            def fresh_key() -> str:  # a new object each time: GDAL's per-process caches cannot help
                nonlocal counter
                counter += 1
                key = f"cog_{counter}.tif"
                s3.copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": "src.tif"})
                return f"s3://{BUCKET}/{key}"

            direct = server.storage_config()
            counted = server.storage_config(endpoint_url=proxy.endpoint_url)
            print(f"COG 2048x2048x13 int16, 256-px blocks, deflate: {size / 1e6:.1f} MB; moto on 127.0.0.1")
            print("A: open + 4 windows of 256x256 (one block each); B: open + one 1024x1024 window (16 blocks)")
            print(f"time: median of {args.reps}; 'loopback' straight to moto, 'emulated' through the proxy with "
                  f"{args.latency_ms:g} ms per request and {args.mbps:g} MB/s")
            cols = f"{'req':>4s} {'MB':>6s} {'loopback':>9s} {'emulated':>9s}"
            print(f"{'':32s} | {'A':^31s} | {'B':^31s} |")
            print(f"{'opener':32s} | {cols} | {cols} |")
            results: dict[str, list[float]] = {}
            for name, opener in CASES.items():
                row: list[float] = []
                for work, want in ((workload_small, want_small), (workload_big, want_big)):
                    proxy.latency_s, proxy.bandwidth_bps = 0.0, None
                    proxy.reset()
                    with opener(fresh_key(), counted) as ds:
                        got = work(ds)
                    assert np.array_equal(got, want), name
                    time.sleep(0.05)  # the proxy logs a request after answering it
                    row += [proxy.requests, proxy.bytes_out / 1e6]
                    for storage, latency, bandwidth in ((direct, 0.0, None),
                                                        (counted, args.latency_ms / 1e3, args.mbps * 1e6)):
                        proxy.latency_s, proxy.bandwidth_bps = latency, bandwidth
                        times = []
                        for _ in range(args.reps):
                            url = fresh_key()
                            t0 = time.perf_counter()
                            with opener(url, storage) as ds:
                                work(ds)
                            times.append(time.perf_counter() - t0)
                        row.append(statistics.median(times))
                results[name] = row
                cells = " | ".join(f"{int(r):4d} {mb:6.2f} {t1:8.3f}s {t2:8.3f}s"
                                   for r, mb, t1, t2 in (row[:4], row[4:]))
                print(f"{name:32s} | {cells} |")
            ours = results["gdal /vsis3/ + geoseg options"]
            for name, row in results.items():
                if row is not ours:
                    print(f"{name}: emulated-network time {row[3] / ours[3]:.1f}x (A), {row[7] / ours[7]:.1f}x (B) "
                          "that of /vsis3/ + geoseg options")


if __name__ == "__main__":
    main()
