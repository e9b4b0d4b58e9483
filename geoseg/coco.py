"""``geoseg export-coco``: a finished run's objects as COCO pre-labels on georeferenced image chips.

The way back (corrected annotations -> georeferenced label polygons) is ``geoseg.labels_import``.

Source: a scene directory of a finished run (``OUT/<scene>/`` with ``run.json``, ``mask.tif`` and
``polygons.parquet``; local or ``s3://``), a run directory holding several such scenes, or a class-mask GeoTIFF
(a geoseg ``mask.tif``: class ids, nodata 255, class names in its ``GEOSEG_CLASS_NAMES`` tag).

What is written under ``out_dir`` (local or ``s3://``):

- ``images/<scene>_r<row>_c<col>.png`` (or ``.jpg``): 8-bit RGB chips cut on a regular grid of the scene's mask,
  ``chip_px`` a side, starting at the mask's top-left pixel; chips on the right and bottom edges are cropped to the
  scene (smaller), and chips without one valid (not nodata) mask pixel are skipped. Pixels come from the input
  images on the mask's pixel grid (same CRS and pixel size, origin a whole number of pixels away; several images
  mosaic, the first valid pixel wins; pixels no image covers are black). Bands: ``rgb_bands`` (1-based), else
  the bands described red/green/blue (or Sentinel-2 B4/B3/B2), else bands 1-3, else band 1 as grey.
  Stretch: uint8 bands are copied unchanged; any other type is stretched linearly, per band, from its 2nd..98th
  percentile over the scene's valid pixels (one sample of at most 1024 px a side per image, so every chip of a
  scene gets the same stretch) to 0..255, clipped. The values used are in each sidecar.
- ``georef/<chip stem>.json``: the chip's georeference: ``crs_wkt``, ``epsg``, ``transform`` (the chip's affine,
  rasterio order a, b, c, d, e, f), ``window`` (the chip in the mask's grid), ``sources`` (each image path and its
  window), the stretch, the model and its classes. ``geoseg import-labels`` needs only this folder.
- ``annotations.json``: COCO (``images``, ``annotations``, ``categories``). Objects are the polygons of the object
  classes (``classes``; default: every class but background / nodata); a polygon crossing chips is clipped to
  each chip, one annotation per piece set. Segmentation: polygons in chip pixel coordinates (x = column, y = row,
  origin at the chip's top-left corner). COCO polygons cannot hold holes, so a polygon with holes is cut by
  vertical lines through its holes into hole-free pieces that share edges; their union (what COCO tools rasterize)
  is the polygon. ``area`` is the polygon area in chip pixels, ``bbox`` its bounds ``[x, y, w, h]``. Category ids are
  the model's class ids and names. ``score`` is the polygon's mean class probability where the run's polygons carry
  a ``score`` column (``instances.parquet``: from ``confidence.tif``); otherwise there is no ``score`` key (the COCO
  ``info`` says so). ``instance_id`` is copied when the polygons carry one; ``attributes.polygon_id`` names the
  run polygon each annotation came from (CVAT keeps ``attributes`` through its COCO round trip). A scene with
  ``instances.parquet`` (a model whose card declares instances, ``geoseg.instances``) exports its objects
  instead: one polygon per object, ``instance_id`` (also in ``attributes``), default classes the seed classes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import shapely
import shapely.affinity
import shapely.geometry
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from geoseg.config import StorageConfig
from geoseg.errors import InputError, OutputError
from geoseg.io import raster, store

__all__ = [
    "COCO_FILE",
    "GEOREF_DIR",
    "IMAGES_DIR",
    "SIDECAR_KEY",
    "NON_OBJECT_NAMES",
    "CocoExport",
    "export_coco",
    "object_classes",
    "cut_holes",
]

COCO_FILE = "annotations.json"
IMAGES_DIR = "images"
GEOREF_DIR = "georef"
SIDECAR_KEY = "geoseg_chip"  # a sidecar is a JSON object with this key (its format version)
SIDECAR_VERSION = 1
NON_OBJECT_NAMES = ("background", "nodata", "no data", "no_data", "unlabeled", "unlabelled", "ignore")
MASK_NODATA = 255
_STRETCH_PCT = (2.0, 98.0)
_SAMPLE_PX = 1024
_RGB_NAMES = (("red", "green", "blue"), ("b4", "b3", "b2"), ("b04", "b03", "b02"))


@dataclass
class CocoExport:
    """What ``export_coco`` wrote."""

    coco: str
    images: int
    annotations: int
    categories: list[dict[str, Any]]
    skipped_chips: int
    scenes: list[str]
    seconds: float
    chip_files: list[str] = field(default_factory=list)


@dataclass
class _Scene:
    name: str
    mask: str
    polygons: str | None
    model: dict[str, Any]
    classes: list[dict[str, Any]]
    default_images: list[str]
    default_objects: list[int] | None = None  # instances.parquet: its seed classes


# --------------------------------------------------------------------------------------------- sources


def _read_json(path: str, storage: StorageConfig) -> Any:
    try:
        return json.loads(store.read_bytes(path, storage))
    except ValueError as e:
        raise InputError(f"{path}: malformed JSON ({e})") from None


def _scene_from_dir(d: str, storage: StorageConfig) -> _Scene:
    run = _read_json(store.join(d, "run.json"), storage)
    card = run.get("model") or {}
    classes = [{"id": int(c["id"]), "name": str(c["name"])} for c in card.get("classes", [])]
    polys = store.join(d, "polygons.parquet")
    seeds = None
    inst = store.join(d, "instances.parquet")  # objects of an instance model: one polygon per object
    if isinstance(card.get("instances"), dict) and store.exists(inst, storage):
        polys, seeds = inst, [int(c) for c in card["instances"]["seed_classes"]]
    inp = (run.get("input") or {}).get("path")
    return _Scene(
        name=os.path.basename(str(d).rstrip("/")), mask=store.join(d, "mask.tif"),
        polygons=polys if store.exists(polys, storage) else None,
        model={"name": card.get("name"), "version": card.get("version")}, classes=classes,
        default_images=[inp] if isinstance(inp, str) else [], default_objects=seeds,
    )


def _scene_from_mask(path: str, storage: StorageConfig) -> _Scene:
    from geoseg import vectorize

    with raster.open_raster(path, storage) as ds:
        names = vectorize.read_class_names(ds)
        tags = ds.tags()
    if not names:
        raise InputError(f"{path}: mask has no class names (tag GEOSEG_CLASS_NAMES); export a geoseg mask.tif")
    stem = os.path.basename(path.rstrip("/")).rsplit(".", 1)[0]
    name = os.path.basename(os.path.dirname(path.rstrip("/"))) if stem == "mask" else stem
    return _Scene(
        name=name or stem, mask=path, polygons=None,
        model={"name": tags.get("GEOSEG_MODEL"), "version": tags.get("GEOSEG_MODEL_VERSION")},
        classes=[{"id": i, "name": n} for i, n in enumerate(names) if n], default_images=[],
    )


def _find_scenes(source: str, storage: StorageConfig) -> list[_Scene]:
    if store.exists(store.join(source, "run.json"), storage):
        return [_scene_from_dir(source, storage)]
    if source.lower().endswith((".tif", ".tiff", ".vrt")):
        return [_scene_from_mask(source, storage)]
    subs = [d for d in store.list_dir(source, storage) if store.exists(store.join(d, "run.json"), storage)]
    if not subs:
        raise InputError(f"{source}: neither a finished run's scene directory (no run.json), a run directory with "
                         "scenes, nor a mask GeoTIFF")
    return [_scene_from_dir(d, storage) for d in subs]


def object_classes(classes: Sequence[dict[str, Any]], wanted: Iterable[int | str] | None, where: str
                   ) -> list[dict[str, Any]]:
    """The object classes: ``wanted`` (ids or names), else every class whose name is not background / nodata."""
    if wanted is None:
        return [c for c in classes if c["name"].strip().lower() not in NON_OBJECT_NAMES]
    by_name = {c["name"].lower(): c for c in classes}
    by_id = {c["id"]: c for c in classes}
    out = []
    for w in wanted:
        s = str(w).strip()
        c = by_id.get(int(s)) if s.isdigit() else by_name.get(s.lower())
        if c is None:
            known = ", ".join(f"{k['id']} {k['name']}" for k in classes)
            raise InputError(f"{where}: class {s!r} is not a class of the model ({known})")
        out.append(c)
    return out


# --------------------------------------------------------------------------------------------- images


def _pick_bands(src, rgb_bands: Sequence[int] | None) -> list[int]:
    if rgb_bands:
        bad = [b for b in rgb_bands if not 1 <= int(b) <= src.count]
        if len(rgb_bands) not in (1, 3) or bad:
            raise InputError(f"{src.name}: rgb_bands {list(rgb_bands)} must be 1 or 3 bands of 1..{src.count}")
        return [int(b) for b in rgb_bands] * (3 if len(rgb_bands) == 1 else 1)
    desc = [(raster.band_name(d) or "").lower() for d in src.descriptions]
    for names in _RGB_NAMES:
        if all(n in desc for n in names):
            return [desc.index(n) + 1 for n in names]
    return [1, 2, 3] if src.count >= 3 else [1, 1, 1]


def _stretch(datasets: list, bands: list[int]) -> dict[str, Any]:
    """Per-band (low, high) for 0..255: identity for uint8, else the 2..98 percentiles of a decimated sample."""
    if all(ds.dtypes[b - 1] == "uint8" for ds in datasets for b in bands):
        return {"method": "none (uint8 copied)", "low": [0.0] * 3, "high": [255.0] * 3}
    samples: list[list[np.ndarray]] = [[] for _ in bands]
    for ds in datasets:
        f = max(1, math.ceil(max(ds.width, ds.height) / _SAMPLE_PX))
        shape = (max(1, ds.height // f), max(1, ds.width // f))
        data = ds.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest)
        ok = np.all(ds.read_masks(bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest) > 0, axis=0)
        for i in range(len(bands)):
            v = data[i][ok].astype(np.float64)
            samples[i].append(v[np.isfinite(v)])
    low, high = [], []
    for s in samples:
        v = np.concatenate(s) if s else np.zeros(0)
        lo, hi = (np.percentile(v, _STRETCH_PCT) if v.size else (0.0, 1.0))
        low.append(float(lo))
        high.append(float(hi) if hi > lo else float(lo) + 1.0)
    return {"method": f"linear, per band, percentiles {_STRETCH_PCT[0]:g}..{_STRETCH_PCT[1]:g} to 0..255",
            "low": low, "high": high}


def _to_uint8(data: np.ndarray, st: dict[str, Any]) -> np.ndarray:
    if data.dtype == np.uint8 and st["method"].startswith("none"):
        return data
    lo = np.asarray(st["low"], np.float64)[:, None, None]
    hi = np.asarray(st["high"], np.float64)[:, None, None]
    out = (data.astype(np.float64) - lo) / (hi - lo) * 255.0
    return np.clip(np.nan_to_num(out, nan=0.0), 0, 255).round().astype(np.uint8)


def _grid_offset(ds, mask_ds, path: str) -> tuple[int, int] | None:
    """(col, row) of the image's origin in the mask's grid, or None when the image is on another grid."""
    t, m = ds.transform, mask_ds.transform
    if ds.crs is None or mask_ds.crs is None or ds.crs != mask_ds.crs:
        return None
    if not (math.isclose(t.a, m.a, rel_tol=1e-7) and math.isclose(t.e, m.e, rel_tol=1e-7) and t.b == m.b == 0
            and t.d == m.d == 0):
        return None
    col, row = (t.c - m.c) / m.a, (t.f - m.f) / m.e
    if abs(col - round(col)) > 1e-3 or abs(row - round(row)) > 1e-3:
        return None
    return int(round(col)), int(round(row))


def _read_chip(sources: list, win: Window, bands: list[int], st: dict[str, Any]) -> tuple[np.ndarray, list]:
    """(rows, cols, 3) uint8 RGB of mask window ``win`` from the images, and the windows read from each."""
    h, w = int(win.height), int(win.width)
    rgb = np.zeros((3, h, w), np.uint8)
    filled = np.zeros((h, w), bool)
    used = []
    for path, ds, (dc, dr) in sources:
        c0, r0 = int(win.col_off) - dc, int(win.row_off) - dr
        a0, b0 = max(c0, 0), max(r0, 0)
        a1, b1 = min(c0 + w, ds.width), min(r0 + h, ds.height)
        if a1 <= a0 or b1 <= b0:
            continue
        iw = Window(a0, b0, a1 - a0, b1 - b0)
        data, valid = raster.read_window(ds, iw, bands)
        sl = (slice(b0 - r0, b1 - r0), slice(a0 - c0, a1 - c0))
        take = valid & ~filled[sl]
        rgb[:, sl[0], sl[1]][:, take] = _to_uint8(data, st)[:, take]
        filled[sl] |= take
        used.append({"path": path, "window": _win(iw)})
    return np.moveaxis(rgb, 0, -1), used


def _win(w: Window) -> dict[str, int]:
    return {"col_off": int(w.col_off), "row_off": int(w.row_off), "width": int(w.width), "height": int(w.height)}


# --------------------------------------------------------------------------------------------- polygons


def cut_holes(poly: shapely.Polygon) -> list[shapely.Polygon]:
    """Hole-free polygons whose union is ``poly``: vertical cuts through each hole (pieces share edges)."""
    if not poly.interiors:
        return [poly]
    minx, miny, maxx, maxy = poly.bounds
    xs = set()
    for ring in poly.interiors:
        a, _, b, _ = ring.bounds
        mid = (a + b) / 2.0
        xs.add(math.floor(mid) if math.floor(mid) > a else mid)  # a whole pixel column when there is one
    edges = [minx, *sorted(xs), maxx]
    out = []
    for x0, x1 in zip(edges[:-1], edges[1:]):
        piece = shapely.intersection(poly, shapely.box(x0, miny - 1, x1, maxy + 1))
        out.extend(_polygons(piece))
    return [q for p in out for q in cut_holes(p)]  # a hole touching a cut line at one point only: cut again


def _polygons(g) -> list[shapely.Polygon]:
    if g is None or g.is_empty:
        return []
    if isinstance(g, shapely.Polygon):
        return [g] if g.area > 0 else []
    return [p for part in getattr(g, "geoms", []) for p in _polygons(part)]


def _num(v: float) -> float | int:
    r = round(float(v), 3)
    return int(r) if r == int(r) else r


def _segmentation(g, dx: float, dy: float) -> list[list[float | int]]:
    seg = []
    for part in _polygons(g):
        for piece in cut_holes(part):
            xy = np.asarray(piece.exterior.coords)[:-1]
            if len(xy) >= 3:
                seg.append([_num(v) for v in (xy - (dx, dy)).ravel()])
    return seg


def _load_polygons(scene: _Scene, mask_ds, ids: set[int], storage: StorageConfig):
    """The scene's object polygons in the mask's global pixel coordinates, with their attributes."""
    import geopandas as gpd

    try:
        gdf = gpd.read_parquet(io.BytesIO(store.read_bytes(scene.polygons, storage)))
    except Exception as e:  # noqa: BLE001 - arrow / geopandas raise many types; all mean an unreadable file
        raise InputError(f"{scene.polygons}: cannot read the run's polygons ({e})") from None
    if "class_id" not in gdf.columns:
        raise InputError(f"{scene.polygons}: no class_id column; not a geoseg polygons file")
    gdf = gdf[gdf["class_id"].astype(int).isin(ids) & gdf.geometry.notna()]
    if gdf.crs is not None and mask_ds.crs is not None and gdf.crs != mask_ds.crs:
        gdf = gdf.to_crs(mask_ds.crs.to_wkt())
    inv = ~mask_ds.transform
    geoms = shapely.transform(gdf.geometry.values, lambda xy: np.round(np.column_stack(inv * (xy[:, 0], xy[:, 1])), 6))
    return gdf, np.asarray(geoms)


def _mask_polygons(mask: np.ndarray, ids: set[int]):
    from rasterio import features

    out = []
    for cid in sorted(ids):
        sel = mask == cid
        if sel.any():
            for geom, _ in features.shapes(sel.astype(np.uint8), mask=sel, connectivity=4):
                out.append((cid, shapely.geometry.shape(geom)))
    return out


# --------------------------------------------------------------------------------------------- export


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _abs(path: str) -> str:
    return path if store.is_s3(path) else os.path.abspath(path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scene"


@dataclass
class _Acc:
    """The export being built: staged files and the COCO lists."""

    stage: str
    ext: str
    jpeg_quality: int
    images: list[dict[str, Any]] = field(default_factory=list)
    anns: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    has_score: bool = False


def _open_sources(stack: ExitStack, scene: _Scene, paths: list[str], mask_ds, storage: StorageConfig) -> list:
    srcs = []
    for p in paths:
        ds = stack.enter_context(raster.open_raster(p, storage))
        off = _grid_offset(ds, mask_ds, p)
        if off is not None:
            srcs.append((p, ds, off))
    if not srcs:
        more = " ..." if len(paths) > 3 else ""
        raise InputError(
            f"{scene.mask}: none of the images ({', '.join(paths[:3])}{more}) is on the mask's grid (CRS "
            f"{mask_ds.crs}, pixel {mask_ds.transform.a:.6g} x {-mask_ds.transform.e:.6g}); give the images the "
            "scene was predicted from")
    return srcs


def _annotations(acc: _Acc, pieces: list, gdf, image_id: int, c0: int, r0: int) -> None:
    """COCO annotations of one chip's (class id, geometry in global pixels, polygon row or None) pieces."""
    for cid, g, i in pieces:
        seg = _segmentation(g, c0, r0)
        if not seg:
            continue
        bx0, by0, bx1, by1 = g.bounds
        ann = {"id": len(acc.anns) + 1, "image_id": image_id, "category_id": cid, "segmentation": seg,
               "area": round(float(g.area), 3),
               "bbox": [_num(bx0 - c0), _num(by0 - r0), _num(bx1 - bx0), _num(by1 - by0)], "iscrowd": 0}
        if i is not None:
            row = gdf.iloc[i]
            if "score" in gdf.columns and _present(row["score"]):
                ann["score"] = round(float(row["score"]), 6)
            if "instance_id" in gdf.columns and _present(row["instance_id"]):
                ann["instance_id"] = int(row["instance_id"])
                ann["attributes"] = {"instance_id": int(row["instance_id"])}
            if "polygon_id" in gdf.columns:
                ann["attributes"] = {"polygon_id": int(row["polygon_id"])}
        acc.anns.append(ann)


def _export_scene(acc: _Acc, scene: _Scene, paths: list[str], ids: set[int], chip_px: int,
                  rgb_bands: Sequence[int] | None, storage: StorageConfig) -> None:
    """Chips, sidecars and annotations of one scene into ``acc``."""
    from PIL import Image

    with ExitStack() as stack:
        mask_ds = stack.enter_context(raster.open_raster(scene.mask, storage))
        srcs = _open_sources(stack, scene, paths, mask_ds, storage)
        bands = _pick_bands(srcs[0][1], rgb_bands)
        st = _stretch([s[1] for s in srcs], bands)
        gdf, geoms, tree = None, None, None
        if scene.polygons is not None:
            gdf, geoms = _load_polygons(scene, mask_ds, ids, storage)
            tree = shapely.STRtree(geoms)
            acc.has_score = acc.has_score or ("score" in gdf.columns and bool(gdf["score"].notna().any()))
        crs = mask_ds.crs
        for r0 in range(0, mask_ds.height, chip_px):
            for c0 in range(0, mask_ds.width, chip_px):
                win = Window(c0, r0, min(chip_px, mask_ds.width - c0), min(chip_px, mask_ds.height - r0))
                m = mask_ds.read(1, window=win)
                valid = (mask_ds.read_masks(1, window=win) > 0) & (m != MASK_NODATA)
                if not valid.any():
                    acc.skipped += 1
                    continue
                name = f"{_safe(scene.name)}_r{r0:06d}_c{c0:06d}.{acc.ext}"
                rgb, used = _read_chip(srcs, win, bands, st)
                opts = {"quality": acc.jpeg_quality} if acc.ext == "jpg" else {}
                Image.fromarray(rgb, "RGB").save(os.path.join(acc.stage, IMAGES_DIR, name), **opts)
                image_id = len(acc.images) + 1
                h, w = int(win.height), int(win.width)
                acc.images.append({"id": image_id, "file_name": name, "width": w, "height": h})
                t = mask_ds.transform * Affine.translation(c0, r0)
                side = {
                    SIDECAR_KEY: SIDECAR_VERSION, "file_name": name, "width": w, "height": h,
                    "crs_wkt": crs.to_wkt() if crs else None, "epsg": crs.to_epsg() if crs else None,
                    "transform": [t.a, t.b, t.c, t.d, t.e, t.f], "scene": scene.name, "mask": _abs(scene.mask),
                    "window": _win(win), "sources": used, "bands": bands, "stretch": st,
                    "valid_fraction": round(float(valid.mean()), 6), "model": scene.model,
                    "classes": scene.classes, "object_classes": sorted(ids),
                }
                with open(os.path.join(acc.stage, GEOREF_DIR, name.rsplit(".", 1)[0] + ".json"), "w") as f:
                    json.dump(side, f, indent=1)
                box = shapely.box(c0, r0, c0 + w, r0 + h)
                if tree is not None:
                    hits = np.sort(tree.query(box, predicate="intersects"))
                    pieces = [(int(gdf["class_id"].iloc[i]), shapely.intersection(geoms[i], box), i) for i in hits]
                else:
                    pieces = [(cid, shapely.affinity.translate(g, c0, r0), None) for cid, g in _mask_polygons(m, ids)]
                _annotations(acc, pieces, gdf, image_id, c0, r0)


def _publish(stage: str, out_dir: str, coco_dest: str, storage: StorageConfig) -> list[str]:
    """Move the staged chips and sidecars to ``out_dir`` (replacing a previous export), the COCO file last."""
    if store.exists(coco_dest, storage):  # overwrite: the previous export's chips go first
        store.remove(coco_dest, storage)
        for sub in (IMAGES_DIR, GEOREF_DIR):
            store.remove_tree(store.join(out_dir, sub), storage)
    published = []
    for sub in (IMAGES_DIR, GEOREF_DIR):
        for name in sorted(os.listdir(os.path.join(stage, sub))):
            dest = store.join(out_dir, sub, name)
            if not store.is_s3(out_dir):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
            store.publish_file(os.path.join(stage, sub, name), dest, storage)
            published.append(dest)
    store.publish_file(os.path.join(stage, COCO_FILE), coco_dest, storage)  # last: its presence = complete
    return published


def export_coco(
    source: str, images: Sequence[str] | None = None, *, out_dir: str, chip_px: int = 512,
    classes: Iterable[int | str] | None = None, fmt: str = "png", jpeg_quality: int = 90,
    rgb_bands: Sequence[int] | None = None, overwrite: bool = False, storage: StorageConfig | None = None,
) -> CocoExport:
    """Cut image chips of ``source``'s scenes with a georeference sidecar each and write one COCO JSON of the
    predicted objects (see the module docstring). ``images``: the input rasters (paths or globs, local or
    ``s3://``; default: the scene's input named in ``run.json``)."""
    t0 = time.perf_counter()
    storage = storage or StorageConfig()
    source, out_dir = str(source), str(out_dir)
    fmt = {"jpg": "jpeg"}.get(fmt.lower(), fmt.lower())
    if fmt not in ("png", "jpeg"):
        raise InputError(f"{fmt}: chip format must be png or jpeg")
    if chip_px < 16:
        raise InputError(f"chip_px {chip_px}: chips must be at least 16 px a side")
    coco_dest = store.join(out_dir, COCO_FILE)
    if store.exists(coco_dest, storage) and not overwrite:
        raise OutputError(f"{coco_dest}: exists; pass overwrite (--overwrite) to replace the export")
    scenes = _find_scenes(source, storage)
    given = [_abs(p) for p in store.expand_inputs(list(images), storage)] if images else None
    if not store.is_s3(out_dir):
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out_dir}: cannot create the output directory ({e})") from None
    acc = _Acc(stage=tempfile.mkdtemp(prefix=".geoseg-coco-", dir=None if store.is_s3(out_dir) else out_dir),
               ext="png" if fmt == "png" else "jpg", jpeg_quality=jpeg_quality)
    cats: dict[int, dict[str, Any]] = {}
    try:
        os.makedirs(os.path.join(acc.stage, IMAGES_DIR))
        os.makedirs(os.path.join(acc.stage, GEOREF_DIR))
        for scene in scenes:
            wanted = classes if classes is not None else scene.default_objects
            objs = object_classes(scene.classes, wanted, scene.mask)
            for c in objs:
                cats.setdefault(c["id"], {"id": c["id"], "name": c["name"],
                                          "supercategory": scene.model.get("name") or "geoseg"})
            paths = given if given is not None else scene.default_images
            if not paths:
                raise InputError(f"{scene.mask}: no images given (--images) and no input path in run.json")
            _export_scene(acc, scene, paths, {c["id"] for c in objs}, chip_px, rgb_bands, storage)
        info = {
            "description": f"geoseg pre-labels of {', '.join(s.name for s in scenes)} ({chip_px} px chips)",
            "version": "1.0", "year": time.gmtime().tm_year,
            "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "contributor": "geoseg",
            "score": "mean class probability of each polygon" if acc.has_score else
            "absent: the run's polygons carry no probability (geoseg masks store class ids only)",
            "segmentation": "chip pixel coordinates; polygons with holes are cut into hole-free pieces; objects "
                            "crossing chips are clipped per chip",
        }
        coco = {"info": info, "licenses": [], "images": acc.images, "annotations": acc.anns,
                "categories": [cats[k] for k in sorted(cats)]}
        with open(os.path.join(acc.stage, COCO_FILE), "w") as f:
            json.dump(coco, f)
        published = _publish(acc.stage, out_dir, coco_dest, storage)
    finally:
        shutil.rmtree(acc.stage, ignore_errors=True)
    return CocoExport(coco=coco_dest, images=len(acc.images), annotations=len(acc.anns),
                      categories=[cats[k] for k in sorted(cats)], skipped_chips=acc.skipped,
                      scenes=[s.name for s in scenes], seconds=time.perf_counter() - t0,
                      chip_files=[p for p in published if f"/{IMAGES_DIR}/" in p.replace(os.sep, "/")])
