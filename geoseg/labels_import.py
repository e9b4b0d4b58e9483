"""``geoseg import-labels``: corrected chip annotations back to georeferenced label polygons for ``geoseg train``.

Input (the annotation tool's export of chips made by ``geoseg export-coco``, see ``geoseg.coco``):

- **COCO** JSON (``images``, ``annotations``, ``categories``): polygon segmentations (a list of flat
  ``[x1, y1, x2, y2, ...]`` rings, unioned as COCO tools do) or RLE masks (``{"counts": [...] | "...", "size":
  [h, w]}``, polygonized at pixel edges), in chip pixel coordinates (x = column, y = row, origin at the chip's
  top-left corner, y down).
- **GeoJSON** in pixel coordinates, as a Label Studio / CVAT export converted to GeoJSON carries them: a
  FeatureCollection (or a list of them, or one Feature) of Polygon / MultiPolygon features whose coordinates are
  chip pixels (x = column, y = row, y down); each feature's ``properties`` name the chip (``image``,
  ``file_name``, ``filename``, ``image_path`` or ``imagePath``; a collection-level ``image`` member applies to
  every feature) and the class (``label``, ``class_name``, ``class``, ``category``, ``category_name``, or Label
  Studio's ``polygonlabels`` list). ``"units": "percent"`` (on the collection or a feature) reads coordinates as
  Label Studio's percent of the chip's width / height instead of pixels. A GeoJSON names only the chips that
  have features, so only those become labelled chips (a COCO file lists every chip, empty ones too).

Chips are matched to their sidecar ``georef/<stem>.json`` under ``georef_from`` by file name stem: directories
and URL parts are dropped, as is the 8-hex-digit prefix Label Studio adds to uploaded files (``1a2b3c4d-``).
Categories are matched to the model's classes by name (tools renumber category ids); the classes are the ones
recorded in the sidecars, or ``model``'s. Categories no annotation uses are ignored. Invalid rings (self-
intersections from editing) are repaired with ``shapely.make_valid``; points up to half a pixel outside the chip
are clipped to it, further out is an error.

Output (GeoPackage, GeoParquet or GeoJSON by suffix), in the chips' CRS (the first chip's when they differ),
rows in this order: with ``chip_extents`` (the default) one polygon per imported chip with the background class
(the class named background; none when the model has no such class), then every annotation. Columns:
``class_id``, ``class_name``, ``kind`` (``chip`` or ``label``), ``image`` (the chip file), ``ann_id``,
``polygon_id`` (the run polygon a pre-label came from, when the tool kept it), ``instance_id`` when present.
Train on it with a ``kind: polygons`` source and ``class_column: class_id``: geoseg rasterizes features in order,
so the chip footprints make the annotated chips background, the labels paint over them, and pixels outside every
chip stay unlabelled (ignored), not background.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
import shapely.affinity
import shapely.geometry

from geoseg.coco import GEOREF_DIR, NON_OBJECT_NAMES, SIDECAR_KEY
from geoseg.config import StorageConfig
from geoseg.errors import InputError, OutputError
from geoseg.io import store

__all__ = ["ImportResult", "import_labels", "rle_decode", "OUT_FORMATS"]

OUT_FORMATS = {".gpkg": "gpkg", ".parquet": "parquet", ".geoparquet": "parquet", ".geojson": "geojson",
               ".json": "geojson"}
_EDGE_TOL_PX = 0.5
_LS_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")
_IMAGE_KEYS = ("image", "file_name", "filename", "image_path", "imagePath")
_CLASS_KEYS = ("label", "class_name", "class", "category", "category_name", "polygonlabels")


@dataclass
class ImportResult:
    """What ``import_labels`` wrote."""

    out: str
    labels: int
    chips: int
    crs: str
    classes: dict[str, int]


# ------------------------------------------------------------------------------------------- sidecars


def _stem(name: str) -> str:
    base = re.split(r"[/\\]", str(name).split("?")[0])[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _sidecars(root: str, storage: StorageConfig) -> dict[str, dict[str, Any]]:
    """Sidecars under ``root`` (itself, or its ``georef/``), by chip stem."""
    found: dict[str, dict[str, Any]] = {}
    for d in (store.join(root, GEOREF_DIR), root):
        for p in store.list_dir(d, storage):
            if not p.lower().endswith(".json"):
                continue
            try:
                side = json.loads(store.read_bytes(p, storage))
            except ValueError:
                continue
            if isinstance(side, dict) and SIDECAR_KEY in side:
                found.setdefault(_stem(side.get("file_name") or p), side)
    if not found:
        raise InputError(f"{root}: no chip georeference sidecars (georef/*.json written by geoseg export-coco)")
    return found


def _lookup(sides: dict[str, dict[str, Any]], name: str, src: str, root: str, what: str) -> dict[str, Any]:
    stem = _stem(name)
    m = _LS_PREFIX.match(stem)
    side = sides.get(stem) or (sides.get(m.group(1)) if m else None)
    if side is None:
        raise InputError(f"{src}: {what} {name!r} has no georeference sidecar in {root} (looked for "
                         f"{GEOREF_DIR}/{stem}.json); annotate chips written by geoseg export-coco")
    return side


def _classes(sides: dict[str, dict[str, Any]], model: str | None, root: str) -> dict[str, int]:
    if model:
        from geoseg.models import load_model

        return {c.name.lower(): int(c.id) for c in load_model(model).card.classes}
    seen: dict[str, int] = {}
    for side in sides.values():
        for c in side.get("classes", []):
            if seen.setdefault(str(c["name"]).lower(), int(c["id"])) != int(c["id"]):
                raise InputError(f"{root}: sidecars disagree on the id of class {c['name']!r}; pass the model")
    if not seen:
        raise InputError(f"{root}: the sidecars record no classes; pass the model (--model)")
    return seen


# ------------------------------------------------------------------------------------------- geometry


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (``counts`` as a list, or the compressed string) -> (h, w) uint8 mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (bytes, str)):
        s = counts.encode() if isinstance(counts, str) else counts
        cnts: list[int] = []
        p = 0
        while p < len(s):
            x, k, more = 0, 0, True
            while more:
                c = s[p] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << (5 * k)
            if len(cnts) > 2:
                x += cnts[-2]
            cnts.append(x)
        counts = cnts
    counts = [int(c) for c in counts]
    if sum(counts) != h * w or min(counts, default=0) < 0:
        raise ValueError(f"RLE counts sum to {sum(counts)}, not {h}x{w}")
    flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)
    return flat.reshape(w, h).T  # column-major, as COCO stores it


def _mask_geom(mask: np.ndarray):
    from rasterio import features

    parts = [shapely.geometry.shape(g) for g, _ in features.shapes(mask, mask=mask > 0, connectivity=4)]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _valid(g):
    g = shapely.make_valid(g) if not g.is_valid else g
    polys = [p for p in getattr(g, "geoms", [g]) if isinstance(p, (shapely.Polygon, shapely.MultiPolygon))]
    return shapely.union_all(polys) if polys else shapely.Polygon()


def _inside(g, side: dict[str, Any], src: str, what: str):
    """``g`` clipped to the chip; an error when it reaches more than half a pixel outside."""
    w, h = side["width"], side["height"]
    x0, y0, x1, y1 = g.bounds
    tol = _EDGE_TOL_PX
    if x0 < -tol or y0 < -tol or x1 > w + tol or y1 > h + tol:
        raise InputError(f"{src}: {what} on image {side['file_name']!r}: polygon outside the chip (x {x0:.6g}.."
                         f"{x1:.6g}, y {y0:.6g}..{y1:.6g}; the chip is {w} x {h} px, coordinates must be chip "
                         "pixels)")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        g = shapely.intersection(g, shapely.box(0, 0, w, h))
    return g


def _to_map(g, side: dict[str, Any]):
    a, b, c, d, e, f = side["transform"][:6]
    return shapely.transform(g, lambda xy: np.column_stack((a * xy[:, 0] + b * xy[:, 1] + c,
                                                            d * xy[:, 0] + e * xy[:, 1] + f)))


def _ring_polys(rings: list, src: str, what: str):
    out = []
    for r in rings:
        try:
            xy = np.asarray(r, dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            raise InputError(f"{src}: {what}: a segmentation polygon is not a flat list of x, y numbers") from None
        if len(xy) >= 3:
            out.append(_valid(shapely.Polygon(xy)))
    return shapely.union_all(out) if out else shapely.Polygon()


# ------------------------------------------------------------------------------------------- readers


def _coco_rows(doc: dict[str, Any], src: str, root: str, sides, classes) -> list[dict[str, Any]]:
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise InputError(f"{src}: not a COCO file: no {key!r} list")
    images = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise InputError(f"{src}: COCO image entry without id / file_name: {str(im)[:80]}")
        side = _lookup(sides, im["file_name"], src, root, f"image (id {im['id']})")
        if im.get("width") not in (None, side["width"]) or im.get("height") not in (None, side["height"]):
            raise InputError(f"{src}: image {im['file_name']!r} is {im.get('width')} x {im.get('height')} px but its "
                             f"chip is {side['width']} x {side['height']} px (resized in the tool?)")
        images[im["id"]] = side
    cats = {c.get("id"): str(c.get("name", "")) for c in doc["categories"] if isinstance(c, dict)}
    rows = [{"side": s, "image_id": k} for k, s in images.items()]  # every image, annotated or not
    for ann in doc["annotations"]:
        aid = ann.get("id") if isinstance(ann, dict) else None
        what = f"annotation {aid}"
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            ref = ann.get("image_id") if isinstance(ann, dict) else ann
            raise InputError(f"{src}: {what} refers to image id {ref!r}, which is not in 'images'")
        side = images[ann["image_id"]]
        name = cats.get(ann.get("category_id"))
        if name is None:
            raise InputError(f"{src}: {what} has category_id {ann.get('category_id')!r}, not in 'categories'")
        cid = classes.get(name.strip().lower())
        if cid is None:
            raise InputError(f"{src}: category {name!r} (id {ann.get('category_id')}) is not a class of the model "
                             f"({', '.join(sorted(classes, key=classes.get))})")
        seg = ann.get("segmentation")
        if isinstance(seg, dict) and "counts" in seg:
            try:
                g = _mask_geom(rle_decode(seg))
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"{src}: {what}: bad RLE segmentation ({e})") from None
        elif isinstance(seg, list) and seg:
            g = _ring_polys(seg, src, what)
        else:
            raise InputError(f"{src}: {what} on image {side['file_name']!r} has no segmentation (a box only?); "
                             "label polygons are needed")
        attrs = ann.get("attributes") if isinstance(ann.get("attributes"), dict) else {}
        rows.append({"side": side, "geom": _inside(g, side, src, what), "class_id": cid, "ann_id": aid,
                     "polygon_id": attrs.get("polygon_id"), "instance_id": ann.get("instance_id")})
    return rows


def _features(doc: Any, src: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(feature, collection members) pairs of a FeatureCollection, a list of them, or a Feature."""
    if isinstance(doc, list):
        return [f for d in doc for f in _features(d, src)]
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [(doc, {})]
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" and isinstance(doc.get("features"), list):
        return [(f, doc) for f in doc["features"]]
    raise InputError(f"{src}: neither a COCO file (images, annotations, categories) nor a GeoJSON FeatureCollection "
                     "in chip pixel coordinates")


def _geojson_rows(doc: Any, src: str, root: str, sides, classes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, (feat, coll) in enumerate(_features(doc, src)):
        props = feat.get("properties") or {}
        what = f"feature {feat.get('id', i)}"
        image = next((props[k] for k in _IMAGE_KEYS if props.get(k)), None) or coll.get("image")
        if not image:
            raise InputError(f"{src}: {what} names no image (properties {', '.join(_IMAGE_KEYS)})")
        side = _lookup(sides, image, src, root, f"{what}'s image")
        label = next((props[k] for k in _CLASS_KEYS if props.get(k)), None)
        label = label[0] if isinstance(label, list) and label else label
        cid = classes.get(str(label).strip().lower()) if label else None
        if cid is None:
            raise InputError(f"{src}: {what} has class {label!r}, not a class of the model "
                             f"({', '.join(sorted(classes, key=classes.get))})")
        try:
            g = _valid(shapely.geometry.shape(feat.get("geometry")))
        except Exception as e:  # noqa: BLE001 - shapely raises several types for a bad geometry
            raise InputError(f"{src}: {what}: not a GeoJSON polygon geometry ({e})") from None
        if (props.get("units") or coll.get("units")) == "percent":
            g = shapely.affinity.scale(g, side["width"] / 100.0, side["height"] / 100.0, origin=(0, 0))
        if side["file_name"] not in seen:
            seen.add(side["file_name"])
            rows.append({"side": side})
        rows.append({"side": side, "geom": _inside(g, side, src, what), "class_id": cid, "ann_id": feat.get("id", i),
                     "polygon_id": props.get("polygon_id"), "instance_id": props.get("instance_id")})
    return rows


# ------------------------------------------------------------------------------------------- import


def import_labels(
    labels: str, georef_from: str, out: str, *, model: str | None = None, chip_extents: bool = True,
    overwrite: bool = False, storage: StorageConfig | None = None,
) -> ImportResult:
    """Annotations of chips (COCO or pixel GeoJSON, see the module docstring) -> georeferenced label polygons in
    ``out`` (.gpkg, .parquet, .geojson; local or ``s3://``) for ``geoseg train``."""
    import geopandas as gpd
    from pyproj import CRS

    storage = storage or StorageConfig()
    labels, georef_from, out = str(labels), str(georef_from), str(out)
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in OUT_FORMATS:
        raise OutputError(f"{out}: unknown output format; use {', '.join(OUT_FORMATS)}")
    if store.exists(out, storage) and not overwrite:
        raise OutputError(f"{out}: exists; pass overwrite (--overwrite) to replace it")
    try:
        doc = json.loads(store.read_bytes(labels, storage))
    except ValueError as e:
        raise InputError(f"{labels}: malformed JSON ({e})") from None
    sides = _sidecars(georef_from, storage)
    classes = _classes(sides, model, georef_from)
    if isinstance(doc, dict) and "annotations" in doc and "images" in doc:
        rows = _coco_rows(doc, labels, georef_from, sides, classes)
    else:
        rows = _geojson_rows(doc, labels, georef_from, sides, classes)
    names = {v: k for k, v in classes.items()}
    for side in sides.values():  # the class names as the model spells them
        names.update({int(c["id"]): str(c["name"]) for c in side.get("classes", []) if int(c["id"]) in names})
    background = next((cid for cid, n in names.items() if n.strip().lower() in NON_OBJECT_NAMES[:1]), None)
    crs = CRS.from_user_input(next(r["side"] for r in rows)["crs_wkt"]) if rows else None
    if crs is None:
        raise InputError(f"{labels}: no images and no annotations; nothing to import")
    chips, lab = [], []
    for r in rows:
        if "geom" not in r:
            if chip_extents and background is not None:
                s = r["side"]
                chips.append({"geometry": _map_side(shapely.box(0, 0, s["width"], s["height"]), s, crs),
                              "class_id": background, "kind": "chip", "image": s["file_name"]})
            continue
        if r["geom"].is_empty:
            continue
        lab.append({"geometry": _map_side(r["geom"], r["side"], crs), "class_id": r["class_id"], "kind": "label",
                    "image": r["side"]["file_name"], "ann_id": r["ann_id"], "polygon_id": r["polygon_id"],
                    "instance_id": r["instance_id"]})
    table = chips + lab
    gdf = gpd.GeoDataFrame(
        {
            "class_id": np.array([t["class_id"] for t in table], dtype=np.int32),
            "class_name": [names.get(t["class_id"], str(t["class_id"])) for t in table],
            "kind": [t["kind"] for t in table],
            "image": [t["image"] for t in table],
            "ann_id": _nullable_int([t.get("ann_id") for t in table]),
            "polygon_id": _nullable_int([t.get("polygon_id") for t in table]),
        },
        geometry=gpd.GeoSeries([t["geometry"] for t in table], crs=crs),
    )
    if any(t.get("instance_id") is not None for t in table):
        gdf["instance_id"] = _nullable_int([t.get("instance_id") for t in table])
    gdf.geometry = shapely.force_2d(gdf.geometry.values)
    _write(gdf, out, OUT_FORMATS[suffix], storage)
    return ImportResult(out=out, labels=len(lab), chips=len(chips), crs=crs.to_string(),
                        classes={names[c]: c for c in sorted(set(gdf["class_id"]))})


def _map_side(g, side: dict[str, Any], crs):
    from pyproj import CRS, Transformer

    g = _to_map(g, side)
    src = CRS.from_user_input(side["crs_wkt"])
    if src != crs:
        tr = Transformer.from_crs(src, crs, always_xy=True)
        g = shapely.transform(g, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    return shapely.MultiPolygon(_parts(g)) if g.geom_type != "Polygon" else g


def _parts(g) -> list:
    return [p for p in getattr(g, "geoms", [g]) if isinstance(p, shapely.Polygon) and not p.is_empty]


def _nullable_int(values: list):
    import pandas as pd

    try:
        return pd.array([None if v is None else int(v) for v in values], dtype="Int64")
    except (TypeError, ValueError):
        return [None if v is None else str(v) for v in values]


def _write(gdf, out: str, fmt: str, storage: StorageConfig) -> None:
    from geoseg.errors import write_failure

    tmp = tempfile.mkdtemp(prefix=".geoseg-labels-")
    local = os.path.join(tmp, "labels" + os.path.splitext(out)[1])
    try:
        try:
            if fmt == "parquet":
                gdf.to_parquet(local)
            elif fmt == "gpkg":
                gdf.to_file(local, driver="GPKG", layer="labels")
            else:
                gdf.to_file(local, driver="GeoJSON")
        except Exception as e:  # noqa: BLE001 - pyogrio / arrow raise many types
            raise write_failure(out, e, "write the labels") from None
        if not store.is_s3(out) and os.path.dirname(os.path.abspath(out)):
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        store.publish_file(local, out, storage)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
