"""Object instances: one polygon per object (issue 12), from a scene's final polygons. Pure functions, no Ray.

A model whose card declares ``instances`` (``footprint_classes``, ``seed_classes``; e.g. building interior +
building boundary, trained with ``train.boundary_px``) predicts the edge of every object as its own class, so two
touching roofs are one footprint with two interiors. This module splits such footprints:

1. **Footprints**: the scene's polygons of the footprint classes, grouped where they touch (an STRtree query),
   are rasterized on the scene's own pixel grid, in the group's pixel-aligned window. A footprint is a connected
   region (``vector.connectivity``) of footprint pixels.
2. **Seeds**: the connected components of each seed class inside a footprint (components smaller than the card's
   ``min_seed_px`` are not seeds). Each seed is one object.
3. **Growing back**: every other footprint pixel takes the label of the nearest seed *through the footprint*
   (geodesic; one ring of neighbours per step, ties resolved in the fixed order up, left, right, down (then the
   diagonals with 8-connectivity), so the result depends only on the footprint). A footprint without a seed
   (e.g. a small building predicted as boundary only) is one object of the first seed class.
4. **Polygons**: each object's pixels are polygonized (``rasterio.features.shapes``) with the window's transform,
   so its polygon lies exactly on the pixels it came from, and the objects of a footprint tile it exactly.
   Objects smaller than the card's ``min_instance_px`` (speckle) are not instances (they stay in the polygons).

Partition invariance: the input is the scene's seam-merged polygons, which are identical for any
``tiling.block_px`` or worker count, and nothing here depends on blocks: so are the instances. ``instance_id``
numbers the objects 1..n by their first pixel in row-major order over the scene.

Output (``instances.parquet``, GeoParquet, the scene's CRS): ``instance_id`` (int64), ``class_id`` (uint8, the
seed class), ``class_name``, ``area_m2`` (float64; planar in a projected CRS, ellipsoidal in a geographic one),
``score`` (float64: the mean over the object's pixels of the model's probability of each pixel's predicted class,
read from the scene's ``confidence.tif`` (``output.confidence``, on by default with instances; 1/254 steps), so as
partition-invariant as the mask; null only without that raster), ``geometry`` (the raw object on its
pixels: Polygon or, with 8-connectivity, MultiPolygon), ``geometry_regularized`` (a second GeoParquet geometry
column: the object's minimum rotated rectangle, right angles in the CRS's coordinates, when the object fills at
least ``RECTANGLE_FILL`` of it; otherwise the raw polygon simplified by one pixel, Douglas-Peucker). Memory: the
footprint polygons of one scene, and one footprint's window at a time (of the confidence raster too).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.conventions import to_pyproj

__all__ = ["split_footprints", "instances_from_polygons", "regularize", "write_instances", "scene_instances",
           "INSTANCES_FILE", "COLUMNS", "wants_instances"]

INSTANCES_FILE = "instances.parquet"
COLUMNS = ["instance_id", "class_id", "class_name", "area_m2", "score", "geometry", "geometry_regularized"]
# confidence.tif's tag holding the value that stands for probability 1 (geoseg.plan.CONFIDENCE_SCALE)
CONFIDENCE_SCALE_TAG = "GEOSEG_CONFIDENCE_SCALE"
# an object that fills at least this share of its minimum rotated rectangle is regularised to that rectangle
RECTANGLE_FILL = 0.8

_N4 = ((-1, 0), (0, -1), (0, 1), (1, 0))
_N8 = _N4 + ((-1, -1), (-1, 1), (1, -1), (1, 1))


def _structure(connectivity: int) -> np.ndarray | None:
    return np.ones((3, 3), bool) if connectivity == 8 else None


def _grow(labels: np.ndarray, region: np.ndarray, connectivity: int) -> np.ndarray:
    """Labels > 0 grown into the unlabelled pixels of ``region``, one ring of neighbours per step."""
    out = labels.copy()
    rows, cols = out.shape
    offsets = _N8 if connectivity == 8 else _N4
    todo = region & (out == 0)
    while todo.any():
        new = np.zeros_like(out)
        for dr, dc in offsets:  # first direction wins a tie: fixed order, result independent of anything else
            src = np.zeros_like(out)
            src[max(dr, 0):rows + min(dr, 0), max(dc, 0):cols + min(dc, 0)] = \
                out[max(-dr, 0):rows + min(-dr, 0), max(-dc, 0):cols + min(-dc, 0)]
            take = todo & (new == 0) & (src > 0)
            new[take] = src[take]
        if not new.any():
            break  # the rest of the region is not connected to any label
        out[new > 0] = new[new > 0]
        todo &= new == 0
    return out


def split_footprints(classes: np.ndarray, footprint_classes: Sequence[int], seed_classes: Sequence[int], *,
                     connectivity: int = 4, min_seed_px: int = 1, min_instance_px: int = 1
                     ) -> tuple[np.ndarray, dict[int, int]]:
    """Objects of a class raster (see the module docstring): ``(labels int32, {label: class id})``, labels
    1..n numbered in row-major order of each object's first pixel, 0 outside every footprint and for objects
    smaller than ``min_instance_px``.

    ``classes`` must hold whole footprints (a footprint cut by the array's edge is split as if it ended there).
    """
    from scipy import ndimage

    structure = _structure(connectivity)
    foot = np.isin(classes, list(footprint_classes))
    seeds = np.zeros(classes.shape, np.int32)
    seed_class: list[int] = [0]
    for cid in seed_classes:
        comp, n = ndimage.label(classes == cid, structure=structure)
        if not n:
            continue
        size = np.bincount(comp.ravel(), minlength=n + 1)
        keep = np.flatnonzero(size[1:] >= min_seed_px) + 1
        lut = np.zeros(n + 1, np.int32)
        lut[keep] = np.arange(len(seed_class), len(seed_class) + len(keep), dtype=np.int32)
        seeds = np.where(comp > 0, lut[comp], seeds)
        seed_class += [int(cid)] * len(keep)
    grown = _grow(seeds, foot, connectivity)
    rest, n_rest = ndimage.label(foot & (grown == 0), structure=structure)  # footprints without a seed
    if n_rest:
        grown = np.where(rest > 0, rest + len(seed_class) - 1, grown)
        seed_class += [int(seed_classes[0])] * n_rest
    # renumber by first pixel, row-major; objects under min_instance_px dropped
    flat = grown.ravel()
    ids, first, size = np.unique(flat, return_index=True, return_counts=True)
    order = [i for _, i in sorted((f, i) for i, f, n in zip(ids.tolist(), first.tolist(), size.tolist())
                                  if i > 0 and n >= min_instance_px)]
    lut = np.zeros(len(seed_class), np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[grown], {k + 1: seed_class[i] for k, i in enumerate(order)}


def _area_m2(geoms: np.ndarray, crs: Any) -> np.ndarray:
    import shapely

    pcrs = to_pyproj(crs)
    if pcrs is not None and pcrs.is_geographic:
        geod = pcrs.get_geod()
        return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in geoms], np.float64)
    k = 1.0
    if pcrs is not None:
        k = next((float(a.unit_conversion_factor) for a in pcrs.axis_info if a.unit_conversion_factor), 1.0)
    return shapely.area(geoms).astype(np.float64) * k * k


def regularize(geoms: np.ndarray, pixel: float) -> np.ndarray:
    """Regularised footprints (see the module docstring); ``pixel``: the pixel size in CRS units."""
    import shapely

    if not len(geoms):
        return np.asarray(geoms, dtype=object)
    rect = shapely.oriented_envelope(geoms)
    fill = shapely.area(geoms) / np.maximum(shapely.area(rect), 1e-300)
    simple = shapely.simplify(geoms, pixel, preserve_topology=True)
    return np.where(fill >= RECTANGLE_FILL, rect, simple)


def _groups(geoms: np.ndarray) -> list[np.ndarray]:
    """Indices of touching geometries, grouped (union-find over an STRtree query)."""
    import shapely

    parent = np.arange(len(geoms))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tree = shapely.STRtree(geoms)
    a, b = tree.query(geoms, predicate="intersects")
    for i, j in zip(a.tolist(), b.tolist()):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(len(geoms))])
    return [np.flatnonzero(roots == r) for r in np.unique(roots)]


def instances_from_polygons(geoms: np.ndarray, class_ids: np.ndarray, *, transform, crs, shape: tuple[int, int],
                            footprint_classes: Sequence[int], seed_classes: Sequence[int],
                            class_names: Sequence[str] = (), connectivity: int = 4, min_seed_px: int = 1,
                            min_instance_px: int = 1,
                            confidence: Callable[[int, int, int, int], np.ndarray] | None = None):
    """The objects of a scene from its footprint-class polygons (map coordinates on the grid ``transform``,
    ``shape``): a GeoDataFrame with ``COLUMNS`` (see the module docstring). ``confidence(r0, r1, c0, c1)``: that
    window of the scene's per-pixel probabilities of the predicted class (float, NaN where none), for ``score``;
    None: scores are null."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from affine import Affine
    from rasterio.features import rasterize, shapes

    keep = np.isin(class_ids, list(footprint_classes))
    geoms, class_ids = np.asarray(geoms)[keep], np.asarray(class_ids)[keep]
    inv = ~transform
    rows_out: list[tuple[int, int, Any, float]] = []  # (first pixel key, class id, geometry, score)
    width = int(shape[1])
    for idx in _groups(geoms) if len(geoms) else []:
        x0, y0, x1, y1 = shapely.total_bounds(geoms[idx])
        corners = [inv * (x, y) for x, y in ((x0, y0), (x0, y1), (x1, y0), (x1, y1))]
        c0 = max(int(np.floor(min(c for c, _ in corners) + 1e-6)) - 1, 0)
        r0 = max(int(np.floor(min(r for _, r in corners) + 1e-6)) - 1, 0)
        c1 = min(int(np.ceil(max(c for c, _ in corners) - 1e-6)) + 1, int(shape[1]))
        r1 = min(int(np.ceil(max(r for _, r in corners) - 1e-6)) + 1, int(shape[0]))
        wt = transform * Affine.translation(c0, r0)
        cls = rasterize(zip(geoms[idx], class_ids[idx].astype(int).tolist()), out_shape=(r1 - r0, c1 - c0),
                        transform=wt, fill=0, dtype="uint8")
        labels, label_class = split_footprints(cls, footprint_classes, seed_classes, connectivity=connectivity,
                                               min_seed_px=min_seed_px, min_instance_px=min_instance_px)
        if not label_class:
            continue
        flat = labels.ravel()
        ids, first = np.unique(flat, return_index=True)
        first_of = dict(zip(ids.tolist(), first.tolist()))
        score = _scores(flat, len(label_class), None if confidence is None else confidence(r0, r1, c0, c1))
        parts: dict[int, list] = {}
        for geom, value in shapes(labels, mask=labels > 0, connectivity=connectivity, transform=wt):
            parts.setdefault(int(value), []).append(shapely.geometry.shape(geom))
        for lab, cid in label_class.items():
            p = parts[lab]
            g = p[0] if len(p) == 1 else shapely.MultiPolygon(p)
            r, c = divmod(first_of[lab], c1 - c0)
            rows_out.append(((r0 + r) * width + (c0 + c), cid, g, float(score[lab])))
    rows_out.sort(key=lambda t: t[0])
    out_geoms = np.array([t[2] for t in rows_out], dtype=object)
    cids = np.array([t[1] for t in rows_out], np.uint8)
    names = [class_names[c] if c < len(class_names) else f"class_{c}" for c in cids.tolist()]
    df = pd.DataFrame({
        "instance_id": np.arange(1, len(rows_out) + 1, dtype=np.int64),
        "class_id": cids,
        "class_name": pd.Series(names, dtype=object),
        "area_m2": _area_m2(out_geoms, crs) if len(out_geoms) else np.zeros(0, np.float64),
        "score": np.array([t[3] for t in rows_out], np.float64),
    })
    pcrs = to_pyproj(crs)
    df["geometry"] = gpd.GeoSeries(out_geoms, crs=pcrs)
    pixel = float(np.sqrt(abs(transform.a * transform.e - transform.b * transform.d)))
    df["geometry_regularized"] = gpd.GeoSeries(regularize(out_geoms, pixel), crs=pcrs)
    return gpd.GeoDataFrame(df, geometry="geometry", crs=pcrs)


def _scores(labels: np.ndarray, n: int, prob: np.ndarray | None) -> np.ndarray:
    """Mean probability of labels 0..n over their pixels (NaN pixels left out); NaN without probabilities (or
    where a label has no pixel with one)."""
    if prob is None:
        return np.full(n + 1, np.nan)
    prob = prob.ravel()
    ok = ~np.isnan(prob)
    total = np.bincount(labels[ok], weights=prob[ok].astype(np.float64), minlength=n + 1)
    count = np.bincount(labels[ok], minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def write_instances(gdf, path: str | Path) -> Path:
    """GeoParquet at ``path`` (temporary name, then renamed), read back to verify its footer."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    gdf.to_parquet(tmp, index=False, schema_version="1.0.0")
    meta = pq.read_metadata(tmp)
    if meta.num_rows != len(gdf):
        raise OSError(f"{tmp}: wrote {meta.num_rows} rows of {len(gdf)}")
    os.replace(tmp, path)
    return path


def wants_instances(cfg, card) -> bool:
    """``vector.instances`` (default: when the card declares instances); needs polygons (``vector.enabled``)."""
    on = cfg.vector.instances if cfg.vector.instances is not None else card.instances is not None
    return bool(on and cfg.vector.enabled and card.instances is not None)


def _read_polygons(local: dict[str, Path], ids: list[int]):
    import geopandas as gpd

    if "parquet" in local:
        return gpd.read_parquet(local["parquet"], columns=["class_id", "geometry"], filters=[("class_id", "in", ids)])
    for kind in ("gpkg", "geojson", "geojsonseq"):
        if kind in local:
            gdf = gpd.read_file(local[kind], columns=["class_id"])
            return gdf[gdf["class_id"].astype(int).isin(ids)]
    raise ValueError(f"no polygon output among {sorted(local)} to split into instances")


def scene_instances(cfg, card, plan, local: dict[str, Path], work: Path) -> dict[str, Path]:
    """``SceneWriter``'s hook: ``{"instances": work/instances.parquet}`` from the scene's finished polygons
    (``local``: the completed outputs in the work directory), or ``{}`` when instances are off."""
    if not wants_instances(cfg, card):
        return {}
    spec = card.instances
    polys = _read_polygons(local, list(spec.footprint_classes))
    with contextlib.ExitStack() as stack:
        confidence = None
        if "confidence" in local:  # output.confidence: the score
            import rasterio
            from rasterio.windows import Window

            src = stack.enter_context(rasterio.open(local["confidence"]))
            if (src.height, src.width) != tuple(plan.info.shape) or src.transform != plan.info.transform:
                raise ValueError(f"{local['confidence']}: not on the scene's pixel grid")
            scale, nodata = float(src.tags()[CONFIDENCE_SCALE_TAG]), src.nodata

            def confidence(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
                raw = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
                return np.where(raw == nodata, np.nan, raw / scale)

        gdf = instances_from_polygons(
            np.asarray(polys.geometry.values), polys["class_id"].to_numpy().astype(int), transform=plan.info.transform,
            crs=plan.info.crs, shape=tuple(plan.info.shape), footprint_classes=spec.footprint_classes,
            seed_classes=spec.seed_classes, class_names=card.class_names, connectivity=cfg.vector.connectivity,
            min_seed_px=spec.min_seed_px, min_instance_px=spec.min_instance_px, confidence=confidence)
    return {"instances": write_instances(gdf, Path(work) / INSTANCES_FILE)}
