"""Finished runs as inputs: the scenes of a run directory (local or ``s3://``), their run records, model
classes, grids and polygons. Used by ``geoseg export`` and ``geoseg report``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from geoseg.config import StorageConfig
from geoseg.errors import InputError
from geoseg.io import s3, store

__all__ = ["SceneOutputs", "find_scenes", "read_record", "model_classes", "scene_grid", "read_polygons"]


@dataclass
class SceneOutputs:
    """One finished scene of a run: its directory and its run record."""

    dir: str
    record: dict[str, Any]
    has_report: bool = False  # set by the run report: does the scene have its own page?

    @property
    def name(self) -> str:
        return PurePosixPath(self.dir.rstrip("/")).name if store.is_s3(self.dir) else Path(self.dir).name

    def output(self, kind: str) -> str | None:
        """Path of an output kind (mask, parquet, gpkg, geojson, ...) inside ``dir`` (the run may have moved)."""
        p = self.record.get("outputs", {}).get(kind)
        if not p:
            return None
        return store.join(self.dir, PurePosixPath(str(p)).name)


def find_scenes(run: str, storage: StorageConfig | None = None) -> list[SceneOutputs]:
    """The finished scenes of a run directory (``<run>/*/run.json``), or the run directory itself if it is one
    scene. Raises ``InputError`` naming the path when there is none."""
    storage = storage or StorageConfig()
    run = str(run)
    if not store.is_s3(run) and not os.path.exists(run):
        raise InputError(f"{run}: run directory not found")
    own = store.join(run, "run.json")
    if store.exists(own, storage):
        return [SceneOutputs(run.rstrip("/"), read_record(own, storage))]
    scenes = []
    for entry in store.list_dir(run, storage):
        rec = store.join(entry, "run.json")
        if (store.is_s3(entry) or os.path.isdir(entry)) and store.exists(rec, storage):
            scenes.append(SceneOutputs(entry, read_record(rec, storage)))
    if not scenes:
        raise InputError(f"{run}: holds no finished scene (no <scene>/run.json; is the run complete?)")
    return scenes


def read_record(path: str, storage: StorageConfig) -> dict[str, Any]:
    try:
        rec = json.loads(store.read_bytes(path, storage))
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rec, dict) or "input" not in rec or "model" not in rec:
        raise InputError(f"{path}: not a geoseg run record (keys 'input' and 'model' missing)")
    return rec


def model_classes(scenes: Sequence[SceneOutputs]) -> tuple[list[str], dict[int, tuple[int, int, int, int]]]:
    """Class names by id and the RGBA palette from the scenes' model cards (the first card names them)."""
    names: list[str] = []
    palette: dict[int, tuple[int, int, int, int]] = {}
    for s in scenes:
        for c in s.record.get("model", {}).get("classes", []):
            cid = int(c["id"])
            while len(names) <= cid:
                names.append("")
            if not names[cid]:
                names[cid] = str(c["name"])
                h = str(c.get("color", "#808080")).lstrip("#")
                palette[cid] = (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16), 255)
    return names, palette


def scene_grid(scene: SceneOutputs):
    """(pyproj CRS, Affine, (rows, cols)) of a scene's mask, from its run record."""
    import pyproj
    from affine import Affine

    inp = scene.record["input"]
    return (pyproj.CRS.from_user_input(inp["crs"]), Affine(*inp["transform"][:6]),
            tuple(int(v) for v in inp["shape_rows_cols"]))


def read_polygons(scene: SceneOutputs, storage: StorageConfig, bbox, work: Path):
    """(geometries, class ids) of a scene in its CRS; ``bbox`` (in that CRS) limits what is read."""
    import geopandas as gpd
    import pyogrio

    parquet = scene.output("parquet")
    if parquet and store.exists(parquet, storage):
        kw: dict[str, Any] = {"columns": ["class_id", "geometry"]}
        if bbox is not None:
            kw["bbox"] = tuple(bbox)
        if store.is_s3(parquet):
            gdf = gpd.read_parquet(parquet[len("s3://"):], filesystem=s3.filesystem(storage), **kw)
        else:
            gdf = gpd.read_parquet(parquet, **kw)
        return np.asarray(gdf.geometry.values, dtype=object), gdf["class_id"].to_numpy().astype(np.int64)
    for kind in ("gpkg", "geojson", "geojsonseq"):
        p = scene.output(kind)
        if p and store.exists(p, storage):
            src = store.read_bytes(p, storage) if store.is_s3(p) else p
            df = pyogrio.read_dataframe(src, columns=["class_id"], bbox=tuple(bbox) if bbox is not None else None)
            return np.asarray(df.geometry.values, dtype=object), df["class_id"].to_numpy().astype(np.int64)
    # No polygons were written (vector.enabled=false): polygonize the mask.
    mask = scene.output("mask")
    if not mask or not store.exists(mask, storage):
        raise InputError(f"{scene.dir}: the scene has neither polygons nor mask.tif to export")
    from geoseg.config import VectorConfig
    from geoseg.vectorize import vectorize_file

    local = mask
    if store.is_s3(mask):
        local = str(work / f"{scene.name}-mask.tif")
        Path(local).write_bytes(store.read_bytes(mask, storage))
    out = work / f"{scene.name}-polygons.parquet"
    vectorize_file(local, out, VectorConfig(formats=["parquet"]), workers=1, overwrite=True)
    gdf = gpd.read_parquet(out, columns=["class_id", "geometry"], bbox=tuple(bbox) if bbox is not None else None)
    return np.asarray(gdf.geometry.values, dtype=object), gdf["class_id"].to_numpy().astype(np.int64)
