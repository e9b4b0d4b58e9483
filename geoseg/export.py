"""``geoseg export``: one analyst layer from a finished run (local or ``s3://``).

Steps, in each scene's own CRS where the pixel grid is exact, then in the analyst's:

1. **Scenes**: every ``<run>/<scene>/run.json`` (or the run directory itself when it is one scene). Polygons come
   from the scene's ``polygons.parquet`` (bbox-filtered by the AOI), else its GeoPackage / GeoJSON, else the
   mask is polygonized.
2. **Merge across scenes**: scenes whose grids line up (same CRS, pixel size, rotation, origins a whole number of
   pixels apart) form one group. Their vertices are snapped to the group's common grid, and polygons of one
   class that touch across a scene border are unioned into one (corner contact keeps them apart, as 4-connected
   polygonize does). Scenes on different grids are exported side by side, unmerged.
3. **AOI** (``--aoi``: a vector file, local or ``s3://``, or ``minx,miny,maxx,maxy`` in EPSG:4326): polygons
   are clipped to it; pieces become separate polygons.
4. **Areas**: each polygon's true area (``geoseg.areas.geometry_areas_m2``, equal-area on the ellipsoid),
   measured before reprojection. The class-area table covers every class (percent of the valid area inside the
   AOI), then ``--classes`` and ``--min-area-m2`` select the features.
5. **CRS** (``--crs``, default: the scenes' CRS when they share one), ``--dissolve`` (one MultiPolygon per class),
   and the format: gpkg (with a QGIS ``layer_styles`` style in the model's colours and a ``class_areas``
   table), parquet (GeoParquet 1.1), fgb, geojson, shp (+ .prj, .cpg) or csv (the class-area table).

Every field name has at most 10 characters, so a Shapefile keeps the same names as every other format:
``class_id, class_name, area_m2, area_ha, percent, scenes, model, model_ver``.

Outputs are written locally and published through ``geoseg.io.store`` (atomic rename, or one PUT on S3).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from geoseg.config import StorageConfig
from geoseg.conventions import M2_PER_HA, class_label
from geoseg.errors import ConfigError, InputError, OutputError
from geoseg.io import store
from geoseg.runs import SceneOutputs, find_scenes, model_classes, read_polygons, scene_grid
from geoseg.scene_merge import clip_to_aoi, merge_across_scenes, same_grid, to_map, to_pixels

log = logging.getLogger("geoseg")

__all__ = ["export_run", "ExportResult", "find_scenes", "SceneOutputs", "EXPORT_FORMATS", "load_aoi"]

#: format -> file suffixes it accepts (the first is the default)
EXPORT_FORMATS: dict[str, tuple[str, ...]] = {
    "gpkg": (".gpkg",),
    "parquet": (".parquet", ".geoparquet"),
    "fgb": (".fgb",),
    "geojson": (".geojson", ".json"),
    "shp": (".shp",),
    "csv": (".csv",),
}
_SHP_SIDECARS = (".shx", ".dbf", ".prj", ".cpg")
LAYER = "landcover"


@dataclass
class ExportResult:
    """What ``export_run`` wrote."""

    paths: list[str]
    features: int
    areas: dict[str, Any]
    crs: str
    seconds: float
    scenes: list[str] = field(default_factory=list)
    merged: int = 0  # polygons that were joined across scene borders (count of polygons removed)


# ------------------------------------------------------------------------------------------ inputs


def parse_classes(spec: str | Sequence[str | int] | None, class_names: Sequence[str]) -> list[int] | None:
    """``"built,water"`` (names or ids) -> class ids; None keeps every class."""
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise ConfigError("--classes: empty list; give class names or ids, e.g. --classes built,water")
    ids = []
    valid = ", ".join(n for n in class_names if n) or "(none)"
    for it in items:
        if it.isdigit():
            cid = int(it)
            if cid >= len(class_names) or not class_names[cid]:
                raise ConfigError(f"--classes: class id {cid} is not a class of the model (valid names: {valid})")
        elif it in class_names:
            cid = list(class_names).index(it)
        else:
            raise ConfigError(f"--classes: unknown class {it!r} (valid names: {valid})")
        if cid not in ids:
            ids.append(cid)
    return ids


def parse_crs(spec: str | None):
    import pyproj

    if spec is None:
        return None
    try:
        return pyproj.CRS.from_user_input(spec)
    except pyproj.exceptions.CRSError as e:
        raise ConfigError(f"--crs {spec!r}: not a CRS pyproj knows ({e}); e.g. EPSG:3035 or EPSG:32630") from None


def load_aoi(aoi: str, storage: StorageConfig | None = None):
    """The AOI as one shapely geometry and its pyproj CRS: a vector file (every feature, unioned) local or
    ``s3://``, or ``minx,miny,maxx,maxy`` in EPSG:4326."""
    import pyproj
    import shapely

    parts = aoi.split(",")
    if len(parts) == 4:
        try:
            xmin, ymin, xmax, ymax = (float(p) for p in parts)
        except ValueError:
            xmin = None
        if xmin is not None:
            if not (xmin < xmax and ymin < ymax and -180 <= xmin and xmax <= 180 and -90 <= ymin and ymax <= 90):
                raise ConfigError(f"--aoi {aoi!r}: a bbox is minx,miny,maxx,maxy in degrees (EPSG:4326), min < max")
            return shapely.box(xmin, ymin, xmax, ymax), pyproj.CRS.from_epsg(4326)
    import pyogrio

    storage = storage or StorageConfig()
    try:
        if store.is_s3(aoi):
            data = store.read_bytes(aoi, storage)
            df = pyogrio.read_dataframe(data)
        else:
            if not os.path.exists(aoi):
                raise InputError(f"--aoi {aoi!r}: file not found (give a vector file or minx,miny,maxx,maxy)")
            df = pyogrio.read_dataframe(aoi)
    except pyogrio.errors.DataSourceError as e:
        raise InputError(f"--aoi {aoi!r}: not a vector file GDAL can read ({e})") from None
    if df.crs is None:
        raise InputError(f"--aoi {aoi!r}: has no CRS; save it with one (e.g. EPSG:4326)")
    geoms = np.asarray(df.geometry.values, dtype=object)
    geoms = geoms[~shapely.is_missing(geoms)]
    poly = shapely.union_all(shapely.make_valid(geoms[np.isin(shapely.get_type_id(geoms), [3, 6, 7])])) \
        if len(geoms) else None
    if poly is None or poly.is_empty or shapely.area(poly) == 0:
        raise InputError(f"--aoi {aoi!r}: holds no polygon")
    return poly, pyproj.CRS.from_user_input(df.crs)


def _transform_geom(geoms, src, dst, densify: float | None = None):
    """Geometries from ``src`` to ``dst`` (pyproj CRSs), edges densified first when ``densify`` is given."""
    import pyproj
    import shapely

    if src == dst:
        return geoms
    if densify:
        geoms = shapely.segmentize(geoms, densify)
    tr = pyproj.Transformer.from_crs(src, dst, always_xy=True)

    def fwd(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geoms, fwd)


# ------------------------------------------------------------------------------------------ export


def _format_of(out: str, fmt: str | None) -> str:
    suffix = PurePosixPath(out).suffix.lower()
    if fmt is None:
        for f, sfx in EXPORT_FORMATS.items():
            if suffix in sfx:
                return f
        known = ", ".join(s for sfx in EXPORT_FORMATS.values() for s in sfx)
        raise ConfigError(f"--out {out!r}: cannot tell the format from {suffix or 'no suffix'!r} (known suffixes: "
                          f"{known}); or pass --format ({', '.join(EXPORT_FORMATS)})")
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: unknown (valid: {', '.join(EXPORT_FORMATS)})")
    if fmt == "shp" and suffix != ".shp":
        raise ConfigError(f"--out {out!r}: a Shapefile output must end in .shp")
    return fmt


def export_run(
    run: str,
    out: str,
    *,
    aoi: str | None = None,
    classes: str | Sequence[str | int] | None = None,
    crs: str | None = None,
    fmt: str | None = None,
    min_area_m2: float = 0.0,
    dissolve: bool = False,
    overwrite: bool = False,
    storage: StorageConfig | None = None,
) -> ExportResult:
    """Export a run (directory or ``s3://`` prefix) to one file ``out`` (local or ``s3://``); see the module doc."""
    import shapely
    from affine import Affine

    from geoseg.areas import area_table, geometry_areas_m2

    t0 = time.perf_counter()
    storage = storage or StorageConfig()
    out = str(out)
    fmt = _format_of(out, fmt)
    if min_area_m2 < 0:
        raise ConfigError(f"--min-area-m2 {min_area_m2!r}: must be >= 0")
    dests = [out] + ([out[:-4] + s for s in _SHP_SIDECARS] if fmt == "shp" else [])
    if not overwrite:
        for d in dests:
            if store.exists(d, storage):
                raise OutputError(f"{d}: exists; pass --overwrite to replace it")
    scenes = find_scenes(run, storage)
    class_names, palette = model_classes(scenes)
    keep_ids = parse_classes(classes, class_names)
    target = parse_crs(crs)
    grids = [scene_grid(s) for s in scenes]
    if target is None:
        first = grids[0][0]
        if not all(g[0].equals(first) for g in grids):
            found = sorted({g[0].to_string() for g in grids})
            raise ConfigError(f"{run}: the scenes are in different CRSs ({', '.join(found)}); pass --crs")
        target = first
    aoi_geom, aoi_crs = load_aoi(aoi, storage) if aoi else (None, None)

    # scene groups on one grid
    groups: list[list[int]] = []
    for i, (c, t, _) in enumerate(grids):
        for g in groups:
            if same_grid(c, t, (grids[g[0]][0], grids[g[0]][1])):
                g.append(i)
                break
        else:
            groups.append([i])

    work = Path(tempfile.mkdtemp(prefix="geoseg-export-"))
    try:
        all_geoms, all_cls, all_members, all_area = [], [], [], []
        merged = 0
        for g in groups:
            gcrs, gt = grids[g[0]][0], grids[g[0]][1]
            aoi_g = None
            if aoi_geom is not None:
                step = max(np.subtract(aoi_geom.bounds[2:], aoi_geom.bounds[:2])) / 256 or None
                aoi_g = _transform_geom(aoi_geom, aoi_crs, gcrs, densify=step)
            geoms, cls, sidx, extents = [], [], [], []
            for k, i in enumerate(g):
                _, t, (rows, cols) = grids[i]
                xs, ys = t @ (np.array([0, cols, 0, cols]), np.array([0, 0, rows, rows]))
                extent = (xs.min(), ys.min(), xs.max(), ys.max())
                extents.append(extent)
                if aoi_g is not None and not shapely.intersects(aoi_g, shapely.box(*extent)):
                    continue
                bbox = None if aoi_g is None else aoi_g.bounds
                gi, ci = read_polygons(scenes[i], storage, bbox, work)
                geoms.append(gi)
                cls.append(ci)
                sidx.append(np.full(len(gi), k, np.int64))
            if not geoms:
                continue
            gg, cc, ss = np.concatenate(geoms), np.concatenate(cls), np.concatenate(sidx)
            if len(g) > 1:  # merge in pixel coordinates of the common grid: exact integer arithmetic
                offs = [tuple(round(v) for v in ~gt @ (grids[i][1].c, grids[i][1].f)) for i in g]
                # the grid's origin at the group's top-left corner: polygons as if the mosaic were polygonized
                c_min, r_min = min(o[0] for o in offs), min(o[1] for o in offs)
                ref = next((grids[i][1] for i, o in zip(g, offs) if o == (c_min, r_min)), None) or \
                    gt * Affine.translation(c_min, r_min)
                px_ext = [(c - c_min, r - r_min, c - c_min + grids[i][2][1], r - r_min + grids[i][2][0])
                          for i, (c, r) in zip(g, offs)]
                px, cc, mem, m = merge_across_scenes(to_pixels(gg, ref), cc, ss, px_ext, tol=0.5)
                gg = to_map(px, ref)
                merged += m
            else:
                mem = [{int(s)} for s in ss]
            mem = [{g[k] for k in m} for m in mem]  # group-local -> run scene indexes
            gg, cc, mem = clip_to_aoi(gg, cc, mem, aoi_g)
            area = geometry_areas_m2(gg, gcrs, densify=max(abs(gt.a), abs(gt.e)) * 64)
            all_geoms.append(_transform_geom(gg, gcrs, target, densify=None if gcrs.equals(target) else
                                             max(abs(gt.a), abs(gt.e)) * 16))
            all_cls.append(cc)
            all_members.extend(mem)
            all_area.append(area)
        if aoi_geom is not None and not all_geoms:
            raise InputError(f"--aoi {aoi!r}: does not overlap any scene of {run}")
        geoms = np.concatenate(all_geoms) if all_geoms else np.array([], dtype=object)
        cls = np.concatenate(all_cls) if all_cls else np.array([], dtype=np.int64)
        area = np.concatenate(all_area) if all_area else np.array([], dtype=np.float64)

        # the class-area table: every class (percent of the valid area in the AOI), then the selection
        valid_m2 = float(area.sum())
        label = {c: class_label(class_names, c) for c in np.unique(cls).tolist()}
        sel = np.ones(len(geoms), bool)
        if keep_ids is not None:
            sel &= np.isin(cls, keep_ids)
        if min_area_m2 > 0:
            sel &= area >= min_area_m2
        sums = {}
        for c in sorted(set(np.unique(cls[sel]).tolist()) | set(keep_ids or [])):
            name = label.get(c) or class_names[c]
            sums[name] = float(area[sel & (cls == c)].sum())
        table = area_table(sums, class_ids={(label.get(c) or class_names[c]): c for c in
                                            set(np.unique(cls[sel]).tolist()) | set(keep_ids or [])},
                           valid_m2=valid_m2, method="polygon areas, Lambert azimuthal equal-area on the ellipsoid",
                           crs=target.to_string())
        geoms, cls, area = geoms[sel], cls[sel], area[sel]
        members = [m for m, s in zip(all_members, sel) if s]
        columns = _feature_columns(geoms, cls, area, members, class_names, scenes, valid_m2, dissolve)
        if dissolve:
            geoms, columns = _dissolve(geoms, cls, area, members, columns, class_names, scenes, valid_m2,
                                       single_grid=len(groups) == 1)
        local = work / ("export" + (PurePosixPath(out).suffix or ".out"))
        written = _write(local, fmt, geoms, columns, target, table, class_names, palette, dissolve)
        paths = []
        for src in written:
            dest = out[:-4] + src.suffix if fmt == "shp" else out
            store.publish_file(str(src), dest, storage)
            paths.append(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(paths=paths, features=len(geoms), areas=table, crs=target.to_string(),
                        seconds=time.perf_counter() - t0, scenes=[s.name for s in scenes], merged=merged)


def _model_of(scenes, members):
    out_m, out_v = [], []
    for m in members:
        rec = scenes[min(m)].record.get("model", {})
        out_m.append(str(rec.get("name", "")))
        out_v.append(str(rec.get("version", "")))
    return np.array(out_m, dtype=object), np.array(out_v, dtype=object)


def _feature_columns(geoms, cls, area, members, class_names, scenes, valid_m2, dissolve) -> dict[str, np.ndarray]:
    names = np.array([class_label(class_names, c) for c in cls], dtype=object)
    model, version = _model_of(scenes, members)
    return {
        "class_id": cls.astype(np.int32),
        "class_name": names,
        "area_m2": np.round(area, 3),
        "area_ha": np.round(area / M2_PER_HA, 6),
        "scenes": np.array([";".join(scenes[i].name for i in sorted(m)) for m in members], dtype=object),
        "model": model,
        "model_ver": version,
    }


def _dissolve(geoms, cls, area, members, columns, class_names, scenes, valid_m2, *, single_grid: bool):
    """One MultiPolygon per class. On one grid the merged polygons of a class are disjoint already (they only
    touch at corners), so their MultiPolygon is valid as it is; otherwise they are unioned."""
    import shapely

    out_geoms, rows = [], {k: [] for k in ("class_id", "class_name", "area_m2", "area_ha", "percent", "scenes",
                                            "model", "model_ver")}
    for c in np.unique(cls).tolist():
        idx = np.flatnonzero(cls == c)
        parts = geoms[idx]
        g = shapely.multipolygons(parts) if single_grid else shapely.union_all(parts)
        if g.geom_type == "Polygon":
            g = shapely.multipolygons([g])
        out_geoms.append(g)
        a = float(area[idx].sum())
        rows["class_id"].append(c)
        rows["class_name"].append(columns["class_name"][idx[0]])
        rows["area_m2"].append(round(a, 3))
        rows["area_ha"].append(round(a / M2_PER_HA, 6))
        rows["percent"].append(round(100 * a / valid_m2, 6) if valid_m2 else 0.0)
        rows["scenes"].append(";".join(scenes[i].name for i in sorted(set().union(*(members[j] for j in idx)))))
        rows["model"].append(columns["model"][idx[0]])
        rows["model_ver"].append(columns["model_ver"][idx[0]])
    cols = {k: np.array(v, dtype=object) for k, v in rows.items()}
    cols["class_id"] = cols["class_id"].astype(np.int32)
    for k in ("area_m2", "area_ha", "percent"):
        cols[k] = cols[k].astype(np.float64)
    return np.array(out_geoms, dtype=object), cols


def table_frame(table: dict[str, Any]):
    """The class-area table as a pandas DataFrame (class_id, class_name, area_m2, area_ha, percent)."""
    import pandas as pd

    rows = [{"class_id": r.get("id"), "class_name": name, "area_m2": r["area_m2"], "area_ha": r["area_ha"],
             "percent": r["percent"]} for name, r in table["classes"].items()]
    return pd.DataFrame(rows, columns=["class_id", "class_name", "area_m2", "area_ha", "percent"])


def _write(local: Path, fmt: str, geoms, columns, crs, table, class_names, palette, dissolve) -> list[Path]:
    """Write the layer (or the table, for csv) to ``local``; returns every file written."""
    import geopandas as gpd
    import pyogrio

    if fmt == "csv":
        table_frame(table).to_csv(local, index=False, float_format="%.6f")
        return [local]
    gtype = "MultiPolygon" if dissolve else "Polygon"
    if fmt == "gpkg":
        from geoseg.write.vectors import FeatureBatch, GPKGWriter

        w = GPKGWriter(local, crs, layer=LAYER, palette=palette, class_names=class_names, geometry_type=gtype)
        with w:
            w.write(FeatureBatch(geoms, columns))
        pyogrio.write_dataframe(table_frame(table), local, layer="class_areas", driver="GPKG")
        return [local]
    if fmt == "parquet":
        import shapely

        from geoseg.write.vectors import FeatureBatch, GeoParquetWriter

        if not len(geoms):  # nothing selected: an empty table with the same columns
            gpd.GeoDataFrame(dict(columns), geometry=gpd.GeoSeries(geoms, crs=crs)).to_parquet(local)
            return [local]
        with GeoParquetWriter(local, crs, extent=tuple(shapely.total_bounds(geoms))) as w:
            w.write(FeatureBatch(geoms, columns))
        return [local]
    gdf = gpd.GeoDataFrame({k: v for k, v in columns.items()}, geometry=gpd.GeoSeries(geoms, crs=crs))
    if fmt == "fgb":
        pyogrio.write_dataframe(gdf, local, driver="FlatGeobuf", layer=LAYER, geometry_type=gtype)
        return [local]
    if fmt == "geojson":
        pyogrio.write_dataframe(gdf, local, driver="GeoJSON", layer=LAYER, geometry_type=gtype)
        return [local]
    if fmt == "shp":
        local = local.with_suffix(".shp")
        pyogrio.write_dataframe(gdf, local, driver="ESRI Shapefile", layer=local.stem, encoding="UTF-8",
                                geometry_type=gtype)
        files = [local.with_suffix(s) for s in _SHP_SIDECARS] + [local]  # the .shp last: it names the layer
        missing = [p.name for p in files if not p.exists()]
        if missing:
            raise OutputError(f"{local}: the Shapefile driver did not write {', '.join(missing)}")
        return files
    raise ConfigError(f"--format {fmt!r}: unknown (valid: {', '.join(EXPORT_FORMATS)})")
