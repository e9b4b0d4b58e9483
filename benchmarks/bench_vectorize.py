"""Benchmark: block-parallel ``geoseg`` vectorize vs single-pass ``rasterio.features.shapes`` and ``gdal_polygonize``.

The mask is real land cover: ``landcover_nc/strata.tif`` (7 classes, 28.5 m, EPSG:3358) mirrored and tiled up to
``--size`` pixels a side (default 8192 x 8192 = 67 Mpx), written as a tiled, deflate-compressed uint8 GeoTIFF in a
temporary directory. Every tool runs in this one process run, on this machine, and the script checks that all of
them produce the same number of polygons and the same area per class.

    python benchmarks/bench_vectorize.py [--size 8192] [--block-px 1024] [--workers 2] [--connectivity 4]

Each tool's CPU-seconds (its process and the workers or subprocess it waits for) are measured with its wall
time. Goals (issue 16): geoseg >= 2x gdal_polygonize's throughput per CPU-second, and >= 3x faster in wall time
than ``gdal_polygonize`` to FlatGeobuf (GDAL's fastest output), on the same mask with the same polygons.

``gdal_polygonize`` (Debian ``gdal-bin`` + ``python3-gdal``) is timed writing a GeoPackage, as geoseg's GPKG run
does, and a FlatGeobuf (GDAL's fastest indexed vector output); geoseg's GeoParquet run is its default analyst
output. ``shapes`` only polygonizes into Python objects in memory (no output file), so it is a lower bound for any
single-process tool built on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import resource

import numpy as np
import pyogrio
import pyarrow.parquet as pq
import rasterio
import shapely
from affine import Affine
from rasterio import features

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._result import result  # noqa: E402
from geoseg.config import VectorConfig  # noqa: E402
from geoseg.vectorize import vectorize_file  # noqa: E402

STRATA = Path(os.environ.get("GEOSEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "landcover_nc" / "strata.tif"
CPU: dict[str, float] = {}  # CPU-seconds per run, keyed by output file name, then by row name
NAMES = [None, "developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]


def make_mask(path: Path, size: int) -> tuple[np.ndarray, float]:
    """strata.tif as uint8 (255 = nodata), mirrored/tiled to ``size`` x ``size``; returns (mask, pixel area m2)."""
    with rasterio.open(STRATA) as src:
        a = src.read(1)
        crs, t = src.crs, src.transform
    m = np.where(a == src.nodata, 255, a).astype(np.uint8)
    tile = np.concatenate([m, m[::-1]], axis=0)
    tile = np.concatenate([tile, tile[:, ::-1]], axis=1)
    reps = (size // tile.shape[0] + 1, size // tile.shape[1] + 1)
    big = np.ascontiguousarray(np.tile(tile, reps)[:size, :size])
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", nodata=255, crs=crs,
                   transform=t, tiled=True, blockxsize=512, blockysize=512, compress="deflate", bigtiff="IF_SAFER")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(big, 1)
        dst.update_tags(GEOSEG_CLASS_NAMES=json.dumps(NAMES))
    return big, abs(t.a * t.e)


def cpu_seconds() -> float:
    """CPU-seconds of this process and of the children it has waited for (worker pools, subprocesses)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def class_areas_from_table(class_ids: np.ndarray, areas: np.ndarray) -> dict[int, float]:
    return {int(c): float(areas[class_ids == c].sum()) for c in np.unique(class_ids)}


def run_geoseg(mask_path: Path, out: Path, fmt: str, args) -> tuple[float, int, dict[int, float]]:
    cfg = VectorConfig(formats=[fmt], connectivity=args.connectivity)
    c0, t0 = cpu_seconds(), time.perf_counter()
    res = vectorize_file(mask_path, out, cfg, block_px=args.block_px, workers=args.workers)
    dt = time.perf_counter() - t0
    CPU[out.name] = cpu_seconds() - c0
    path = res.paths[fmt]
    if fmt == "parquet":
        tab = pq.read_table(path, columns=["class_id", "area_m2"])
        cls, area = tab.column("class_id").to_numpy(), tab.column("area_m2").to_numpy()
    else:
        _, tab = pyogrio.read_arrow(path, layer="polygons", columns=["class_id", "area_m2"], read_geometry=False)
        cls, area = tab.column("class_id").to_numpy(), tab.column("area_m2").to_numpy()
    return dt, len(cls), class_areas_from_table(cls, area)


def run_shapes(mask: np.ndarray, px_area: float, connectivity: int) -> tuple[float, int, dict[int, float]]:
    """Single-pass whole-mask polygonize into Python objects (what most tools do). Timed: the polygonize
    alone; the per-class areas for the check come from a second, untimed pass."""
    valid = mask != 255
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = sum(1 for _ in features.shapes(mask, mask=valid, connectivity=connectivity, transform=Affine.identity()))
    dt = time.perf_counter() - t0
    CPU["shapes"] = cpu_seconds() - c0
    areas: dict[int, float] = {}
    for geom, value in features.shapes(mask, mask=valid, connectivity=connectivity, transform=Affine.identity()):
        a = 0.0
        for r in geom["coordinates"]:  # shoelace; GDAL orients holes against exteriors, so they subtract
            xy = np.asarray(r)
            a += 0.5 * float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))
        areas[int(value)] = areas.get(int(value), 0.0) + abs(a) * px_area
    return dt, n, areas


def run_gdal(mask_path: Path, out: Path, connectivity: int, fmt: str) -> tuple[float, int, dict[int, float]] | None:
    exe = shutil.which("gdal_polygonize.py") or shutil.which("gdal_polygonize")
    if exe is None:
        return None
    cmd = [exe, "-q", str(mask_path), "-f", fmt, str(out), "polygons", "class_id"]
    if connectivity == 8:
        cmd.insert(1, "-8")
    c0, t0 = cpu_seconds(), time.perf_counter()
    subprocess.run(cmd, check=True)
    dt = time.perf_counter() - t0
    CPU[out.name] = cpu_seconds() - c0
    _, tab = pyogrio.read_arrow(out, layer="polygons", columns=["class_id"])
    geom = shapely.from_wkb(tab.column(tab.schema.names[-1]).to_numpy(zero_copy_only=False))
    cls = tab.column("class_id").to_numpy()
    return dt, len(cls), class_areas_from_table(cls, shapely.area(geom))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--block-px", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connectivity", type=int, default=4, choices=(4, 8))
    ap.add_argument("--skip-gdal", action="store_true")
    ap.add_argument("--gdal-formats", default="GPKG,FlatGeobuf", help="gdal_polygonize outputs to time")
    ap.add_argument("--skip-gpkg", action="store_true", help="skip geoseg's GPKG run")
    ap.add_argument("--tmp", default=None, help="work directory (default: a temporary one, removed)")
    args = ap.parse_args()

    work = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="geoseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        mask_path = work / "mask.tif"
        mask, px_area = make_mask(mask_path, args.size)
        mpx = args.size * args.size / 1e6
        counts = np.bincount(mask.ravel(), minlength=256)
        ref_areas = {c: float(n) * px_area for c, n in enumerate(counts.tolist()) if n and c != 255}
        print(f"mask: {args.size} x {args.size} ({mpx:.1f} Mpx), {len(ref_areas)} classes, {os.cpu_count()} CPUs, "
              f"block_px={args.block_px}, workers={args.workers}, connectivity={args.connectivity}")
        rows = []
        dt, n, areas = run_geoseg(mask_path, work / "geoseg.parquet", "parquet", args)
        rows.append(("geoseg -> GeoParquet", dt, n, areas))
        if not args.skip_gpkg:
            dt, n, areas = run_geoseg(mask_path, work / "geoseg.gpkg", "gpkg", args)
            rows.append(("geoseg -> GPKG", dt, n, areas))
        dt, n, areas = run_shapes(mask, px_area, args.connectivity)
        rows.append(("rasterio shapes (1 pass, in memory)", dt, n, areas))
        for fmt in [] if args.skip_gdal else args.gdal_formats.split(","):
            suffix = {"GPKG": "gpkg", "FlatGeobuf": "fgb"}.get(fmt, fmt.lower())
            res = run_gdal(mask_path, work / f"gdal.{suffix}", args.connectivity, fmt)
            if res is None:
                print("gdal_polygonize not on PATH: skipped (apt-get install gdal-bin python3-gdal)")
                break
            rows.append((f"gdal_polygonize -> {fmt}", *res))
        files = {"geoseg -> GeoParquet": "geoseg.parquet", "geoseg -> GPKG": "geoseg.gpkg",
                 "rasterio shapes (1 pass, in memory)": "shapes"}
        for name, *_ in rows:
            key = files.get(name) or "gdal." + {"GPKG": "gpkg", "FlatGeobuf": "fgb"}.get(name.split("-> ")[-1],
                                                                                       name.split("-> ")[-1].lower())
            CPU[name] = CPU[key]
        base = rows[0][1]
        print(f"{'tool':38s} {'seconds':>8s} {'CPU-s':>7s} {'Mpx/s':>7s} {'Mpx/CPU-s':>9s} {'x geoseg-parquet':>17s} "
              f"{'polygons':>9s}  areas")
        counts = set()
        ok = True
        for name, dt, n, areas in rows:
            rel = max(abs(areas.get(c, 0.0) - a) / a for c, a in ref_areas.items())
            ok &= rel < 1e-9 and set(areas) == set(ref_areas)
            counts.add(n)
            cpu = CPU[name]
            print(f"{name:38s} {dt:8.2f} {cpu:7.2f} {mpx / dt:7.2f} {mpx / cpu:9.2f} {dt / base:17.2f} {n:9d}  "
                  f"max rel. class-area error {rel:.1e}")
        ok &= len(counts) == 1
        by = {r[0]: r[1] for r in rows}
        for gname in [n for n in by if n.startswith("gdal_polygonize")]:
            for name in ("geoseg -> GeoParquet", "geoseg -> GPKG"):
                if name in by:
                    print(f"speed-up of {name} over {gname}: {by[gname] / by[name]:.2f}x")
        print("identical polygon counts and class areas: " + ("yes" if ok else "NO"))
        g, f = "geoseg -> GeoParquet", "gdal_polygonize -> FlatGeobuf"
        if f in by:
            per_cpu = CPU[f] / CPU[g]  # same mask: the CPU-seconds ratio is the per-CPU-second throughput ratio
            print(f"per CPU-second, {g} vs {f}: {per_cpu:.2f}x; wall: {by[f] / by[g]:.2f}x")
            note = "" if ok else "; outputs DIFFER"
            result(f"vectorize per CPU-second vs gdal_polygonize ({args.size}x{args.size} mask)", round(per_cpu, 2),
                   ">=", 2.0, "x", f"geoseg {CPU[g]:.1f} CPU-s vs GDAL FlatGeobuf {CPU[f]:.1f} CPU-s{note}")
            result(f"vectorize wall vs gdal_polygonize to FlatGeobuf ({os.cpu_count()} CPUs)", round(by[f] / by[g], 2),
                   ">=", 3.0, "x", f"geoseg {by[g]:.1f} s vs GDAL {by[f]:.1f} s, workers={args.workers}{note}")
        else:
            for name in ("vectorize per CPU-second vs gdal_polygonize", "vectorize wall vs gdal_polygonize to FlatGeobuf"):
                result(name, None, ">=", 2.0 if "CPU" in name else 3.0, "x", "gdal_polygonize not run")
        if not ok:
            sys.exit(1)
    finally:
        if not args.tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
