"""``geoseg eval``: score a class mask against labels (rasters or polygons).

Pixel metrics come from one confusion matrix (rows truth, columns prediction) over pixels where both the
prediction and the labels are known (nodata on either side is skipped): per-class IoU, precision, recall, F1,
their means, and overall accuracy. Object classes (e.g. buildings) are also scored per instance: connected
components of the class in prediction and truth, a prediction matching a truth object when their IoU >= 0.5
(at that threshold a match is unique), giving instance precision / recall / F1. For a model whose card declares
``instances`` (e.g. building interior + boundary) the footprint classes count as their first seed class in the
pixel and connected-region metrics, and the objects of ``geoseg.instances.split_footprints`` (what
``instances.parquet`` holds) are scored too (``instances_split``).

Labels are put on the prediction's grid: label rasters are reprojected (nearest neighbour), polygons
rasterized. Pure functions over arrays plus two file helpers; no Ray.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from geoseg.conventions import CLASS_NAMES_TAG, NODATA
from geoseg.errors import InputError

__all__ = [
    "confusion",
    "pixel_metrics",
    "instance_metrics",
    "labels_on_grid",
    "evaluate_files",
    "merge_reports",
    "write_report",
    "format_markdown",
]

_VECTOR = (".geojson", ".json", ".gpkg", ".parquet", ".geoparquet", ".shp", ".fgb")


def confusion(pred: np.ndarray, truth: np.ndarray, k: int, nodata: int = NODATA) -> np.ndarray:
    """k x k counts (rows truth, columns prediction) over pixels known on both sides."""
    p = np.asarray(pred).ravel().astype(np.int64)
    t = np.asarray(truth).ravel().astype(np.int64)
    keep = (p != nodata) & (t != nodata) & (p < k) & (t < k)
    return np.bincount(t[keep] * k + p[keep], minlength=k * k).reshape(k, k)


def _div(a, b):
    return float(a) / float(b) if b else float("nan")


def pixel_metrics(cm: np.ndarray, names: list[str]) -> dict:
    """Per-class IoU / precision / recall / F1 / support, mIoU, mean F1 and overall accuracy."""
    per = {}
    for i, n in enumerate(names):
        tp = int(cm[i, i])
        fp = int(cm[:, i].sum() - tp)
        fn = int(cm[i, :].sum() - tp)
        p, r = _div(tp, tp + fp), _div(tp, tp + fn)
        f1 = _div(2 * tp, 2 * tp + fp + fn)
        per[n] = {"iou": _div(tp, tp + fp + fn), "precision": p, "recall": r, "f1": f1, "support": tp + fn,
                  "predicted": tp + fp}
    ious = [v["iou"] for v in per.values() if v["support"] > 0 and not math.isnan(v["iou"])]
    f1s = [v["f1"] for v in per.values() if v["support"] > 0 and not math.isnan(v["f1"])]
    total = int(cm.sum())
    return {
        "classes": per,
        "miou": float(np.mean(ious)) if ious else float("nan"),
        "mean_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "overall_accuracy": _div(np.trace(cm), total),
        "pixels": total,
        "confusion_matrix": cm.astype(int).tolist(),
        "class_names": list(names),
    }


@dataclass
class InstanceCounts:
    tp: int = 0
    predicted: int = 0
    truth: int = 0

    def add(self, o: InstanceCounts) -> None:
        self.tp += o.tp
        self.predicted += o.predicted
        self.truth += o.truth

    def as_dict(self) -> dict:
        p, r = _div(self.tp, self.predicted), _div(self.tp, self.truth)
        f1 = _div(2 * self.tp, self.predicted + self.truth)
        return {"precision": p, "recall": r, "f1": f1, "matched": self.tp, "predicted": self.predicted,
                "truth": self.truth, "iou_threshold": 0.5}


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    lab, n = ndimage.label(mask, structure=structure)
    return lab, int(n)


def instance_counts(pred: np.ndarray, truth: np.ndarray, cls: int, nodata: int = NODATA, connectivity: int = 8,
                    min_px: int = 1, iou_threshold: float = 0.5, pred_objects: np.ndarray | None = None
                    ) -> InstanceCounts:
    """Objects of class ``cls`` (connected components) in prediction and truth, matched at IoU >= 0.5.

    Pixels unknown in the truth (nodata) do not count against a predicted object; components smaller than
    ``min_px`` are dropped on both sides. ``pred_objects``: the predicted objects of class ``cls`` as a label
    image (0 = none, e.g. ``geoseg.instances.split_footprints``) instead of the components of ``pred == cls``.
    """
    known = truth != nodata
    if pred_objects is None:
        pl, npred = _components((pred == cls) & known, connectivity)
    else:
        ids, inv = np.unique(np.where(known, pred_objects, 0), return_inverse=True)
        pl = inv.reshape(pred_objects.shape) if ids[0] == 0 else inv.reshape(pred_objects.shape) + 1
        npred = int(pl.max())
    tl, ntruth = _components(truth == cls, connectivity)
    parea = np.bincount(pl.ravel(), minlength=npred + 1)
    tarea = np.bincount(tl.ravel(), minlength=ntruth + 1)
    pkeep = np.flatnonzero(parea[1:] >= min_px) + 1
    tkeep = np.flatnonzero(tarea[1:] >= min_px) + 1
    both = (pl > 0) & (tl > 0)
    pairs = pl[both].astype(np.int64) * (ntruth + 1) + tl[both]
    uniq, inter = np.unique(pairs, return_counts=True)
    pi, ti = uniq // (ntruth + 1), uniq % (ntruth + 1)
    iou = inter / (parea[pi] + tarea[ti] - inter)
    ok = (iou >= iou_threshold) & (parea[pi] >= min_px) & (tarea[ti] >= min_px)
    # with IoU > 0.5 each prediction matches at most one truth object and vice versa; at exactly 0.5 two halves
    # of an object could both match it: pairs are taken one-to-one, best IoU first
    used_p, used_t = set(), set()
    for k in np.lexsort((ti[ok], pi[ok], -iou[ok])):
        a, b = int(pi[ok][k]), int(ti[ok][k])
        if a not in used_p and b not in used_t:
            used_p.add(a)
            used_t.add(b)
    tp = len(used_p)
    return InstanceCounts(tp=tp, predicted=len(pkeep), truth=len(tkeep))


def instance_metrics(pred: np.ndarray, truth: np.ndarray, cls: int, **kw) -> dict:
    return instance_counts(pred, truth, cls, **kw).as_dict()


# ---------------------------------------------------------------------------------------------------------
# files


def _read_mask(path: str):
    import rasterio
    from rasterio.errors import RasterioError

    if not os.path.exists(path):
        raise InputError(f"{path}: prediction file not found")
    try:
        with rasterio.open(path) as src:
            if src.count < 1:
                raise InputError(f"{path}: prediction has no bands")
            mask = src.read(1)
            tags = src.tags()
            known = src.read_masks(1) > 0
            profile = {"crs": src.crs, "transform": src.transform, "shape": (src.height, src.width)}
    except RasterioError as e:
        raise InputError(f"{path}: not a readable raster ({e})") from None
    if mask.dtype.kind == "f":
        known &= np.isfinite(mask)
    mask = np.where(known, mask, NODATA)
    if mask.min() < 0 or mask.max() > 255:
        raise InputError(f"{path}: prediction values must be class ids 0..254 (found {mask.min()}..{mask.max()})")
    names = None
    if CLASS_NAMES_TAG in tags:
        try:
            names = list(json.loads(tags[CLASS_NAMES_TAG]))
        except (ValueError, TypeError):
            names = None
    return mask.astype(np.uint8), profile, names


def labels_on_grid(labels: str, profile: dict, *, label_map: dict[int, int] | None = None,
                   class_column: str | None = None, class_value: int | None = None,
                   class_names: list[str] | None = None, ignore_values: tuple = ()) -> np.ndarray:
    """Labels as uint8 class ids on the prediction grid (NODATA where unknown)."""
    import rasterio
    from rasterio.errors import RasterioError

    shape, transform, crs = profile["shape"], profile["transform"], profile["crs"]
    if not os.path.exists(labels):
        raise InputError(f"{labels}: label file not found")
    lut = dict(label_map or {})
    if labels.lower().endswith(_VECTOR):
        return _rasterize_labels(labels, profile, class_column, class_value, class_names or [], lut)
    try:
        with rasterio.open(labels) as lab:
            same = (lab.height, lab.width) == tuple(shape) and lab.transform.almost_equals(transform) and (
                lab.crs == crs or lab.crs is None)
            if same:
                raw = lab.read(1)
                known = lab.read_masks(1) > 0
            else:
                if lab.crs is None or crs is None:
                    raise InputError(f"{labels}: label raster is not on the prediction's grid and has no CRS")
                from rasterio.warp import Resampling, reproject, transform_bounds

                b = transform_bounds(lab.crs, crs, *lab.bounds, densify_pts=21)
                pb = rasterio.transform.array_bounds(*shape, transform)
                if not (b[0] < pb[2] and pb[0] < b[2] and b[1] < pb[3] and pb[1] < b[3]):
                    raise InputError(f"{labels}: labels do not overlap the prediction (bounds {b} vs {pb})")
                raw = np.zeros(shape, np.float64)
                kn = np.zeros(shape, np.uint8)
                reproject(rasterio.band(lab, 1), raw, dst_transform=transform, dst_crs=crs,
                          resampling=Resampling.nearest)
                reproject(lab.read_masks(1), kn, src_transform=lab.transform, src_crs=lab.crs,
                          dst_transform=transform, dst_crs=crs, resampling=Resampling.nearest, dst_nodata=0)
                known = kn > 0
    except RasterioError as e:
        raise InputError(f"{labels}: not a readable raster ({e})") from None
    out = np.full(shape, NODATA, np.uint8)
    for v in np.unique(raw[known]).tolist():
        if v in ignore_values:
            continue
        cid = lut.get(int(v), int(v)) if float(v).is_integer() else None
        if cid is None or not 0 <= cid < 255:
            raise InputError(f"{labels}: label value {v:g} is not a class id (map it with --label-map)")
        out[known & (raw == v)] = cid
    return out


def _rasterize_labels(path, profile, class_column, class_value, class_names, lut) -> np.ndarray:
    import geopandas as gpd
    from rasterio.features import rasterize

    try:
        gdf = gpd.read_parquet(path) if path.lower().endswith((".parquet", ".geoparquet")) else gpd.read_file(path)
    except Exception as e:  # many reader error types
        raise InputError(f"{path}: cannot read label polygons ({e})") from None
    shape = profile["shape"]
    if len(gdf) and gdf.crs is None:
        raise InputError(f"{path}: label polygons have no CRS")
    if len(gdf) and profile["crs"] is not None and gdf.crs != profile["crs"]:
        gdf = gdf.to_crs(profile["crs"])
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty] if len(gdf) else gdf
    if class_column:
        if class_column not in gdf.columns:
            raise InputError(f"{path}: no column {class_column!r} (columns: {list(gdf.columns)})")
        vals = []
        for v in gdf[class_column]:
            if isinstance(v, str):
                if v not in class_names:
                    raise InputError(f"{path}: class {v!r} is not one of {class_names}")
                vals.append(class_names.index(v))
            else:
                vals.append(lut.get(int(v), int(v)))
    else:
        vals = [1 if class_value is None else class_value] * len(gdf)
    # polygon labels say where objects are; everywhere else is background (class 0)
    if not len(gdf):
        return np.zeros(shape, np.uint8)
    return rasterize(zip(gdf.geometry.values, vals), out_shape=shape, transform=profile["transform"], fill=0,
                     dtype="uint8")


def _as_seed_class(pred: np.ndarray, spec) -> np.ndarray:
    """Footprint classes (e.g. building boundary) counted as the first seed class (building)."""
    out = pred.copy()
    out[np.isin(pred, [c for c in spec.footprint_classes if c not in spec.seed_classes])] = spec.seed_classes[0]
    return out


def evaluate_arrays(pred: np.ndarray, truth: np.ndarray, names: list[str], object_classes: list[int],
                    min_object_px: int = 1, instances=None, connectivity: int = 4) -> dict:
    """Per-image partial results (confusion matrix and instance counts) that sum over images. ``instances``: a
    card's ``InstanceSpec``; its objects (``geoseg.instances.split_footprints`` with ``connectivity``) are
    scored as ``instances_split``."""
    k = len(names)
    part: dict = {}
    if instances is not None:
        from geoseg.instances import split_footprints

        objects, label_class = split_footprints(pred, instances.footprint_classes, instances.seed_classes,
                                                connectivity=connectivity, min_seed_px=instances.min_seed_px,
                                                min_instance_px=instances.min_instance_px)
        of_class = np.zeros(len(label_class) + 1, np.int64)
        for lab, c in label_class.items():
            of_class[lab] = c
        part["instances_split"] = {
            c: instance_counts(pred, truth, c, min_px=min_object_px,
                               pred_objects=np.where(of_class[objects] == c, objects, 0))
            for c in object_classes
        }
        pred = _as_seed_class(pred, instances)
    part["cm"] = confusion(pred, truth, k)
    part["instances"] = {c: instance_counts(pred, truth, c, min_px=min_object_px) for c in object_classes}
    return part


def merge_reports(parts: list[dict], names: list[str], object_classes: list[int], files: list[dict]) -> dict:
    k = len(names)
    cm = np.zeros((k, k), np.int64)
    inst = {c: InstanceCounts() for c in object_classes}
    split = {c: InstanceCounts() for c in object_classes} if any("instances_split" in p for p in parts) else None
    for p in parts:
        cm += p["cm"]
        for c, v in p["instances"].items():
            inst[c].add(v)
        for c, v in p.get("instances_split", {}).items():
            split[c].add(v)
    report = pixel_metrics(cm, names)
    report["instances"] = {names[c]: inst[c].as_dict() for c in object_classes}
    if split is not None:
        report["instances_split"] = {names[c]: split[c].as_dict() for c in object_classes}
    report["files"] = files
    return report


def _resolve_objects(object_classes, names: list[str]) -> list[int]:
    out = []
    for c in object_classes or []:
        if isinstance(c, str) and not c.isdigit():
            if c not in names:
                raise InputError(f"object class {c!r} is not one of the classes {names}")
            out.append(names.index(c))
        else:
            c = int(c)
            if not 0 <= c < len(names):
                raise InputError(f"object class {c} is not a class id 0..{len(names) - 1}")
            out.append(c)
    return out


def evaluate_files(pairs: list[tuple[str, str]], *, class_names: list[str] | None = None,
                   object_classes=None, label_map: dict[int, int] | None = None, class_column: str | None = None,
                   class_value: int | None = None, ignore_values: tuple = (), min_object_px: int = 1,
                   instances=None, connectivity: int = 4) -> dict:
    """Score (prediction, labels) file pairs together; returns the report dict.

    ``min_object_px``: objects (connected components) smaller than this many pixels are not counted, on either
    side, in the instance metrics (pixel metrics are unaffected). ``instances``: the model card's
    ``InstanceSpec`` (see ``evaluate_arrays``)."""
    parts, files, names = [], [], class_names
    for pred_path, lab_path in pairs:
        pred, profile, tag_names = _read_mask(pred_path)
        names = names or tag_names
        if names is None:
            top = int(pred[pred != NODATA].max()) if (pred != NODATA).any() else 1
            names = [f"class_{i}" for i in range(max(top, 1) + 1)]
        truth = labels_on_grid(lab_path, profile, label_map=label_map, class_column=class_column,
                               class_value=class_value, class_names=names, ignore_values=ignore_values)
        bad = np.unique(truth[(truth != NODATA) & (truth >= len(names))])
        if bad.size:
            raise InputError(f"{lab_path}: label classes {bad.tolist()} are not among the classes {names}")
        objs = _resolve_objects(object_classes, names)
        parts.append(evaluate_arrays(pred, truth, names, objs, min_object_px, instances, connectivity))
        files.append({"prediction": pred_path, "labels": lab_path, "pixels": int(parts[-1]["cm"].sum())})
    report = merge_reports(parts, names, _resolve_objects(object_classes, names), files)
    for v in [*report["instances"].values(), *report.get("instances_split", {}).values()]:
        v["min_object_px"] = min_object_px
    for v in report.get("instances_split", {}).values():
        v["objects"] = f"geoseg.instances.split_footprints ({connectivity}-connected), as in instances.parquet"
    return report


def format_markdown(report: dict) -> str:
    def f(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    lines = ["| class | IoU | precision | recall | F1 | support px |", "|---|---|---|---|---|---|"]
    for n, v in report["classes"].items():
        lines.append(f"| {n} | {f(v['iou'])} | {f(v['precision'])} | {f(v['recall'])} | {f(v['f1'])} | {v['support']} |")
    lines += ["", f"mIoU {f(report['miou'])}, mean F1 {f(report['mean_f1'])}, overall accuracy "
              f"{f(report['overall_accuracy'])} over {report['pixels']} pixels in {len(report['files'])} files"]
    def object_table(scores: dict, kind: str) -> list[str]:
        rows = ["", f"| object class | {kind} precision | {kind} recall | {kind} F1 | matched / predicted / truth |",
                "|---|---|---|---|---|"]
        return rows + [f"| {n} | {f(v['precision'])} | {f(v['recall'])} | {f(v['f1'])} | "
                       f"{v['matched']} / {v['predicted']} / {v['truth']} |" for n, v in scores.items()]

    if report.get("instances"):
        lines += object_table(report["instances"], "instance")
        mo = next(iter(report["instances"].values())).get("min_object_px", 1)
        lines += ["", f"objects: connected components (8-connected) of at least {mo} px, matched at IoU >= 0.5"]
    if report.get("instances_split"):
        lines += object_table(report["instances_split"], "split")
        lines += ["", "split: predicted objects of geoseg.instances (interiors grown back to the footprint), as in "
                  "instances.parquet; truth objects as above"]
    names = report["class_names"]
    lines += ["", "confusion matrix (rows truth, columns prediction):", "",
              "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for n, row in zip(names, report["confusion_matrix"]):
        lines.append(f"| {n} | " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_report(report: dict, out: str) -> None:
    if out.lower().endswith(".md"):
        text = format_markdown(report)
    elif out.lower().endswith(".json"):
        text = json.dumps(_jsonable(report), indent=1)
    else:
        raise InputError(f"{out}: report must end in .json or .md")
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, out)


def _parse_label_map(text: str | None) -> dict[int, int]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        try:
            a, b = part.split(":")
            out[int(a)] = int(b)
        except ValueError:
            raise InputError(f"--label-map {text!r}: expected RAW:CLASS pairs, e.g. 255:1,0:0") from None
    return out


def expand_images(images) -> list[str]:
    """``--images`` paths or globs, in order; a pattern that matches nothing is an error."""
    import glob

    files = []
    for pat in images:
        hits = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not hits:
            raise InputError(f"{pat}: no images match")
        files.extend(hits)
    return files


def score_predictions(files: list[str], pred_dir: str, labels: str, card, *, object_classes=(),
                      label_map: str | None = None, class_column: str | None = None, min_object_px: int = 1) -> dict:
    """Score the masks a predict run wrote for ``files`` into ``pred_dir`` against ``labels`` (a file or a
    ``{stem}`` template); the model half of ``geoseg eval --model`` (``geoseg.driver.evaluate_model``)."""
    from geoseg.plan import scene_stem

    pairs = [(os.path.join(pred_dir, scene_stem(f), "mask.tif"), labels.replace("{stem}", scene_stem(f)))
             for f in files]
    spec = getattr(card, "instances", None)
    objs = list(object_classes) or (list(spec.seed_classes) if spec is not None else
                                    [1] if len(card.class_names) == 2 else [])
    report = evaluate_files(pairs, class_names=card.class_names, object_classes=objs,
                            label_map=_parse_label_map(label_map), class_column=class_column,
                            min_object_px=min_object_px, instances=spec)
    report["model"] = {"name": card.name, "version": card.version}
    return report


def run_eval(paths=(), *, out: str | None = None, object_classes=(), label_map: str | None = None,
             class_column: str | None = None, min_object_px: int = 1) -> dict:
    """``geoseg eval PRED LABELS`` as a function (see the CLI help; ``--model`` is ``driver.evaluate_model``)."""
    lut = _parse_label_map(label_map)
    if len(paths) != 2:
        raise InputError(f"geoseg eval takes PRED LABELS (2 paths), got {len(paths)}: {list(paths)}")
    pred, lab = paths
    objs = list(object_classes)
    if not objs:
        _, _, tag_names = _read_mask(pred)
        if tag_names is not None and len(tag_names) == 2:
            objs = [1]
    report = evaluate_files([(pred, lab)], object_classes=objs, label_map=lut, class_column=class_column,
                            min_object_px=min_object_px)
    if out:
        write_report(report, out)
    return report
