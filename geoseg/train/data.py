"""Training data: index the sources, build label rasters on each image's grid, split, sample chips.

Pure functions over files and arrays (no Ray, no torch). Three kinds of source (``train.sources[].kind``):

- ``rasters``: image rasters + label rasters. A label raster on another grid (CRS, transform or size) is
  reprojected onto the image's grid (nearest neighbour).
- ``polygons``: image rasters + label polygons (GeoJSON / GPKG / GeoParquet), a class column or one class,
  reprojected to the image's CRS and rasterized onto its grid with ``rasterio.features.rasterize``.
- ``chips``: images without georeferencing (PNG/JPEG chips) whose grid is the same-named label mask's.

Labels are uint8 class ids with ``IGNORE`` (255) where nothing is known (label nodata, ``ignore_values``,
pixels outside the polygons' coverage are background only for ``polygons``). Every problem is one
``InputError`` naming the file.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from geoseg.errors import ConfigError, InputError
from geoseg.train.boundary import IGNORE, add_boundary, boundary_spec

__all__ = [
    "IGNORE",
    "Scene",
    "Chip",
    "Split",
    "index_sources",
    "load_labels",
    "read_image",
    "split_scenes",
    "grid_chips",
    "random_chips",
    "balanced_weights",
    "band_stats",
    "band_summary",
    "scene_gsd_m",
    "class_histogram",
]

_VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".parquet", ".geoparquet", ".shp", ".fgb")


@dataclass(frozen=True)
class Scene:
    """One training image (possibly several stacked single-band files) and how to build its labels."""

    index: int
    source: int
    images: tuple[str, ...]
    labels: str
    kind: str
    shape: tuple[int, int]
    count: int
    dtype: str
    crs_wkt: str
    transform: Affine
    nodata: float | None
    bands: tuple[int, ...]
    split: str
    class_column: str | None = None
    class_value: int | None = None
    label_map: tuple[tuple[int, int], ...] = ()
    ignore_values: tuple[float, ...] = ()
    descriptions: tuple[str | None, ...] = ()
    # train.boundary_px: (width px, footprint class ids, boundary class id), or () when off
    boundary: tuple = ()

    @property
    def name(self) -> str:
        return self.images[0] if len(self.images) == 1 else f"{self.images[0]} (+{len(self.images) - 1} bands)"

    @property
    def crs(self):
        return rasterio.crs.CRS.from_wkt(self.crs_wkt) if self.crs_wkt else None


@dataclass(frozen=True)
class Chip:
    """A chip: ``window`` of scene ``scene`` (may extend past the scene; padded with IGNORE labels)."""

    scene: int
    row: int
    col: int
    size: int


@dataclass
class Split:
    """Train and validation regions: (scene index, Window) pairs. Chips never cross a region."""

    train: list[tuple[int, Window]] = field(default_factory=list)
    val: list[tuple[int, Window]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# indexing


def _expand(patterns: list[str], what: str) -> list[str]:
    out: list[str] = []
    for p in patterns:
        p = os.path.expanduser(p)
        hits = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
        if not hits:
            raise InputError(f"{p}: no {what} found (file missing or glob matches nothing)")
        out.extend(os.path.abspath(h) for h in hits)  # Ray workers run in another working directory
    return out


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suf in (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".vrt", ".img"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _open(path: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as e:
        if not os.path.exists(path):
            raise InputError(f"{path}: file not found") from None
        raise InputError(f"{path}: not a readable raster ({e})") from None


def _georef(src) -> bool:
    return src.crs is not None and not src.transform.is_identity


def index_sources(tcfg) -> list[Scene]:
    """Every training scene of ``tcfg.sources``, validated (files exist, bands agree, labels fit)."""
    if not tcfg.sources:
        raise ConfigError("train.sources is empty: list at least one set of images and labels")
    scenes: list[Scene] = []
    for si, s in enumerate(tcfg.sources):
        images = _expand(s.images, "images")
        groups = [tuple(images)] if s.stack_bands else [(p,) for p in images]
        if s.kind == "polygons" and s.class_column is None and s.class_value is None:
            raise ConfigError(
                f"train.sources[{si}]: polygons need class_column (an attribute with class ids or names) "
                "or class_value (one class for every feature)"
            )
        for group in groups:
            scenes.append(_index_scene(len(scenes), si, group, s, tcfg))
    boundary = boundary_spec(tcfg)
    if boundary:
        scenes = [replace(sc, boundary=boundary) for sc in scenes]
    counts = {}
    for sc in scenes:
        counts.setdefault(len(sc.bands), sc)
    if len(counts) > 1:
        (n0, a), (n1, b) = list(counts.items())[:2]
        raise InputError(
            f"{b.name}: has {n1} bands but {a.name} has {n0}; every training image must have the same bands "
            "(choose them with train.input_bands)"
        )
    return scenes


def _label_path(template: str, stem: str) -> str:
    return os.path.abspath(os.path.expanduser(template.replace("{stem}", stem)))


def _index_scene(index: int, si: int, group: tuple[str, ...], s, tcfg) -> Scene:
    first = group[0]
    label = _label_path(s.labels, _stem(first))
    if not os.path.exists(label):
        raise InputError(f"{first}: its label file {label} does not exist (train.sources[{si}].labels={s.labels!r})")
    with _open(first) as src:
        shape, count, dtype = (src.height, src.width), src.count, src.dtypes[0]
        crs_wkt = src.crs.to_wkt() if src.crs else ""
        transform, nodata, desc = src.transform, src.nodata, tuple(src.descriptions)
        georef = _georef(src)
    if len(group) > 1:
        for p in group[1:]:
            with _open(p) as src:
                if (src.height, src.width) != shape or src.transform != transform:
                    raise InputError(
                        f"{p}: stacked band file is {src.width}x{src.height} on transform {tuple(src.transform)[:6]}; "
                        f"{first} is {shape[1]}x{shape[0]} on {tuple(transform)[:6]} (stack_bands needs one grid)"
                    )
                count += src.count
        desc = tuple(_stem(p) for p in group)
    if s.kind == "chips":
        with _open(label) as lab:
            if not _georef(lab):
                raise InputError(f"{label}: chip mask has no georeferencing; the chip {first} takes its grid from it")
            if (lab.height, lab.width) != shape:
                raise InputError(
                    f"{label}: mask is {lab.width}x{lab.height} px but its chip {first} is {shape[1]}x{shape[0]} px; "
                    "a chip's mask must have the chip's size"
                )
            crs_wkt, transform = lab.crs.to_wkt(), lab.transform
    elif not georef:
        raise InputError(
            f"{first}: has no georeferencing; use kind: chips (grid from a same-named mask) or georeference it"
        )
    bands = tuple(tcfg.input_bands) if tcfg.input_bands else tuple(range(1, count + 1))
    over = [b for b in bands if b > count]
    if over:
        raise InputError(f"{first}: train.input_bands {over} out of range; the image has {count} bands")
    if s.kind == "polygons":
        if not label.lower().endswith(_VECTOR_SUFFIXES):
            raise InputError(f"{label}: kind polygons needs a vector file ({', '.join(_VECTOR_SUFFIXES)})")
    elif label.lower().endswith(_VECTOR_SUFFIXES):
        raise InputError(f"{label}: is a vector file; set kind: polygons for polygon labels")
    return Scene(
        index=index, source=si, images=group, labels=label, kind=s.kind, shape=shape, count=count, dtype=dtype,
        crs_wkt=crs_wkt, transform=transform, nodata=nodata, bands=bands, split=s.split,
        class_column=s.class_column, class_value=s.class_value,
        label_map=tuple(sorted(s.label_map.items())), ignore_values=tuple(s.ignore_values), descriptions=desc,
    )


# ---------------------------------------------------------------------------------------------------------
# labels


def _bounds(shape, transform) -> tuple[float, float, float, float]:
    rows, cols = shape
    return rasterio.transform.array_bounds(rows, cols, transform)  # (west, south, east, north)


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _map_classes(raw: np.ndarray, known: np.ndarray, scene: Scene, class_ids: list[int]) -> np.ndarray:
    """Raw label values -> uint8 class ids (IGNORE where unknown); unexpected values are an error."""
    out = np.full(raw.shape, IGNORE, dtype=np.uint8)
    lut = dict(scene.label_map)
    ids = set(class_ids)
    vals = np.unique(raw[known])
    bad = []
    for v in vals.tolist():
        if v in scene.ignore_values:
            continue
        cid = lut.get(int(v), int(v)) if float(v).is_integer() else None
        if cid is None or cid not in ids:
            bad.append(v)
            continue
        out[known & (raw == v)] = cid
    if bad:
        shown = ", ".join(f"{b:g}" for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise InputError(
            f"{scene.labels}: label values [{shown}] are not in the class list (class ids: "
            f"{sorted(ids)}{'; label_map: ' + str(lut) if lut else ''}); map them with label_map or "
            "list them in ignore_values"
        )
    return out


def load_labels(scene: Scene, class_ids: list[int], class_names: dict[str, int] | None = None) -> np.ndarray:
    """The scene's labels on its own grid: uint8 class ids, IGNORE where unlabelled; with ``scene.boundary``
    (``train.boundary_px``) the footprint classes' edges become the boundary class (``add_boundary``)."""
    labels = _load_labels(scene, class_ids, class_names)
    if scene.boundary:
        labels = add_boundary(labels, *scene.boundary)
    return labels


def _load_labels(scene: Scene, class_ids: list[int], class_names: dict[str, int] | None = None) -> np.ndarray:
    if scene.kind == "polygons":
        return _rasterize(scene, class_ids, class_names or {})
    with _open(scene.labels) as lab:
        if lab.count < 1:
            raise InputError(f"{scene.labels}: label raster has no bands")
        same_grid = (
            scene.kind == "chips"
            or ((lab.height, lab.width) == scene.shape and lab.transform.almost_equals(scene.transform)
                and lab.crs is not None and lab.crs == scene.crs)
        )
        if same_grid:
            raw = lab.read(1)
            known = lab.read_masks(1) > 0
        else:
            raw, known = _reproject_labels(lab, scene)
    if raw.dtype.kind == "f":
        known &= np.isfinite(raw)
    if not known.any():
        raise InputError(f"{scene.labels}: label raster has no labelled pixels (all nodata) over {scene.name}")
    return _map_classes(raw, known, scene, class_ids)


def _reproject_labels(lab, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.warp import Resampling, reproject, transform_bounds

    if lab.crs is None:
        raise InputError(f"{scene.labels}: label raster has no CRS and is not on the grid of {scene.name}")
    lb = transform_bounds(lab.crs, scene.crs, *lab.bounds, densify_pts=21)
    if not _overlaps(lb, _bounds(scene.shape, scene.transform)):
        raise InputError(
            f"{scene.labels}: labels do not overlap the image {scene.name} (label bounds {_fmt_b(lb)} vs image "
            f"bounds {_fmt_b(_bounds(scene.shape, scene.transform))} in the image's CRS)"
        )
    fill = lab.nodata if lab.nodata is not None else (-1 if np.dtype(lab.dtypes[0]).kind in "if" else 0)
    dtype = np.float64 if np.dtype(lab.dtypes[0]).kind == "f" else np.int64
    raw = np.full(scene.shape, fill, dtype=dtype)
    reproject(
        source=rasterio.band(lab, 1), destination=raw, dst_transform=scene.transform, dst_crs=scene.crs,
        resampling=Resampling.nearest, src_nodata=lab.nodata, dst_nodata=fill,
    )
    known = raw != fill
    # pixels outside the label raster's footprint are unknown too
    cover = np.zeros(scene.shape, dtype=np.uint8)
    reproject(
        source=np.ones((lab.height, lab.width), dtype=np.uint8), destination=cover, src_transform=lab.transform,
        src_crs=lab.crs, dst_transform=scene.transform, dst_crs=scene.crs, resampling=Resampling.nearest,
        dst_nodata=0,
    )
    return raw, known & (cover > 0)


def _fmt_b(b) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"


def _read_vector(path: str):
    import geopandas as gpd

    try:
        if path.lower().endswith((".parquet", ".geoparquet")):
            return gpd.read_parquet(path)
        return gpd.read_file(path)
    except Exception as e:  # pyogrio / arrow raise many types; all mean an unreadable file here
        raise InputError(f"{path}: cannot read label polygons ({e})") from None


_VECTOR_CACHE: dict[str, object] = {}


def _rasterize(scene: Scene, class_ids: list[int], class_names: dict[str, int]) -> np.ndarray:
    from rasterio.features import rasterize

    gdf = _VECTOR_CACHE.get(scene.labels)
    if gdf is None:
        gdf = _read_vector(scene.labels)
        _VECTOR_CACHE.clear()
        _VECTOR_CACHE[scene.labels] = gdf
    if len(gdf) == 0:
        raise InputError(f"{scene.labels}: label file has no features (empty); nothing to train on")
    if gdf.crs is None:
        raise InputError(f"{scene.labels}: label polygons have no CRS; cannot place them on {scene.name}")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if len(gdf) == 0:
        raise InputError(f"{scene.labels}: every feature has an empty geometry; nothing to train on")
    if scene.class_column is not None:
        if scene.class_column not in gdf.columns:
            cols = [c for c in gdf.columns if c != gdf.geometry.name]
            raise InputError(f"{scene.labels}: no column {scene.class_column!r} (columns: {', '.join(cols)})")
        raw = gdf[scene.class_column].tolist()
        lut = dict(scene.label_map)
        values = []
        bad = set()
        for v in raw:
            if isinstance(v, str):
                cid = class_names.get(v)
            else:
                try:
                    cid = lut.get(int(v), int(v))
                except (TypeError, ValueError):
                    cid = None
            if cid is None or cid not in class_ids:
                bad.add(v)
            values.append(cid)
        if bad:
            raise InputError(
                f"{scene.labels}: column {scene.class_column!r} has values {sorted(map(str, bad))[:10]} that are not "
                f"in the class list (ids {sorted(class_ids)}, names {sorted(class_names)})"
            )
    else:
        if scene.class_value not in class_ids:
            raise InputError(f"{scene.labels}: class_value {scene.class_value} is not a class id {sorted(class_ids)}")
        values = [scene.class_value] * len(gdf)
    if gdf.crs != scene.crs:
        gdf = gdf.to_crs(scene.crs)
    if not _overlaps(tuple(gdf.total_bounds), _bounds(scene.shape, scene.transform)):
        raise InputError(
            f"{scene.labels}: label polygons do not overlap the image {scene.name} (polygon bounds "
            f"{_fmt_b(gdf.total_bounds)} vs image bounds {_fmt_b(_bounds(scene.shape, scene.transform))} "
            "in the image's CRS)"
        )
    background = 0 if 0 in class_ids and scene.class_value is not None else IGNORE
    out = rasterize(
        zip(gdf.geometry.values, values), out_shape=scene.shape, transform=scene.transform, fill=background,
        dtype="uint8",
    )
    return out


# ---------------------------------------------------------------------------------------------------------
# images


def read_image(scene: Scene, window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 data (bands, rows, cols), valid bool (rows, cols)) of ``window`` (boundless; outside is invalid)."""
    rows, cols = scene.shape
    window = window or Window(0, 0, cols, rows)
    parts, masks = [], []
    for p in scene.images:
        with _open(p) as src:
            if len(scene.images) == 1:
                idx = list(scene.bands)
            else:
                idx = [1]
            try:
                d = src.read(idx, window=window, boundless=True, fill_value=0)
                m = src.read_masks(idx, window=window, boundless=True)
            except RasterioError as e:
                raise InputError(f"{p}: read failed ({e})") from None
        parts.append(d)
        masks.append(m)
    data = np.concatenate(parts, axis=0)
    if len(scene.images) > 1:
        data = data[[b - 1 for b in scene.bands]]
    valid = np.all(np.concatenate(masks, axis=0) > 0, axis=0)
    data = data.astype(np.float32, copy=False)
    valid &= np.all(np.isfinite(data), axis=0)
    data[:, ~valid] = 0
    return data, valid


def scene_gsd_m(scene: Scene) -> float:
    """Pixel size in metres (geographic CRSs: at the scene's centre latitude)."""
    crs = scene.crs
    rx, ry = abs(scene.transform.a), abs(scene.transform.e)
    if crs is not None and crs.is_geographic:
        w, s, e, n = _bounds(scene.shape, scene.transform)
        lat = math.radians((s + n) / 2)
        return float(math.sqrt(rx * 111_320 * math.cos(lat) * ry * 110_574))
    factor = crs.linear_units_factor[1] if crs is not None else 1.0
    return float(math.sqrt(rx * ry) * factor)


# ---------------------------------------------------------------------------------------------------------
# split and sampling


def _hash_fraction(key: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_scenes(scenes: list[Scene], vcfg, chip_px: int) -> Split:
    """Regions for training and validation.

    Sources with ``split: val`` / ``train`` are used as given (when any source says ``val``, the rest train).
    Otherwise ``val.by: file`` holds out whole files and ``val.by: block`` cuts every scene into blocks of
    ``val.block_px`` (a scene no larger than a block is one block, keyed by its place on the ground so
    neighbouring chips share a block) and holds out blocks. Chips never cross a region, so no chip of one side
    overlaps the other. Either side empty is an error naming the files.
    """
    split = Split()
    explicit = any(s.split == "val" for s in scenes)
    for s in scenes:
        rows, cols = s.shape
        whole = Window(0, 0, cols, rows)
        if explicit or s.split != "auto":
            side = "val" if s.split == "val" else "train"
            getattr(split, side).append((s.index, whole))
            continue
        if vcfg.by == "file":
            side = "val" if _hash_fraction(s.name, vcfg.seed) < vcfg.fraction else "train"
            getattr(split, side).append((s.index, whole))
            continue
        b = vcfg.block_px
        if rows <= b and cols <= b:
            cx, cy = s.transform * (cols / 2, rows / 2)
            bx, by = b * abs(s.transform.a), b * abs(s.transform.e)
            key = f"{s.crs_wkt[:64]}|{math.floor(cx / bx)}|{math.floor(cy / by)}"
            side = "val" if _hash_fraction(key, vcfg.seed) < vcfg.fraction else "train"
            getattr(split, side).append((s.index, whole))
            continue
        for r0 in range(0, rows, b):
            for c0 in range(0, cols, b):
                w = Window(c0, r0, min(b, cols - c0), min(b, rows - r0))
                side = "val" if _hash_fraction(f"{s.name}|{r0}|{c0}", vcfg.seed) < vcfg.fraction else "train"
                getattr(split, side).append((s.index, w))
    names = ", ".join(s.name for s in scenes[:3]) + (f" (+{len(scenes) - 3} more)" if len(scenes) > 3 else "")
    for side in ("train", "val"):
        if not getattr(split, side):
            other = "val" if side == "train" else "train"
            how = (
                "sources marked split: val/train" if explicit or any(s.split != "auto" for s in scenes)
                else f"val.by={vcfg.by}, val.fraction={vcfg.fraction}"
                + (f", val.block_px={vcfg.block_px}" if vcfg.by == "block" else "")
            )
            raise InputError(
                f"{names}: the validation split leaves the {side} side empty ({how}; every region went to "
                f"{other}); add data, change val.fraction, or split by block"
            )
    return split


def grid_chips(regions: list[tuple[int, Window]], chip_px: int, stride_px: int | None = None) -> list[Chip]:
    """Chips on a regular grid inside each region (the last row/column flush with the region's edge)."""
    stride = stride_px or chip_px
    out = []
    for si, w in regions:
        r0, c0, h, wd = int(w.row_off), int(w.col_off), int(w.height), int(w.width)

        def starts(n):
            if n <= chip_px:
                return [0]
            s = list(range(0, n - chip_px + 1, stride))
            if s[-1] != n - chip_px:
                s.append(n - chip_px)
            return s

        for dr in starts(h):
            for dc in starts(wd):
                out.append(Chip(si, r0 + dr, c0 + dc, chip_px))
    return out


def random_chips(regions: list[tuple[int, Window]], chip_px: int, n: int, rng: np.random.Generator,
                 weights: np.ndarray | None = None, sizes: np.ndarray | None = None) -> list[Chip]:
    """``n`` chips at random places inside the regions (a region is chosen by area, or by ``weights``).

    ``sizes`` (one side per chip) cuts chips of other sides than ``chip_px`` (scale augmentation); a chip larger
    than its region starts at the region's corner and extends past it (padded like any chip past its scene).
    """
    areas = np.array([float(w.width * w.height) for _, w in regions])
    p = areas / areas.sum() if weights is None else weights / weights.sum()
    picks = rng.choice(len(regions), size=n, p=p)
    out = []
    for j, k in enumerate(picks):
        si, w = regions[k]
        size = chip_px if sizes is None else int(sizes[j])
        dr = int(rng.integers(0, max(1, int(w.height) - size + 1)))
        dc = int(rng.integers(0, max(1, int(w.width) - size + 1)))
        out.append(Chip(si, int(w.row_off) + dr, int(w.col_off) + dc, size))
    return out


def class_histogram(labels: np.ndarray, num: int = 256) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=num)[:num]


def balanced_weights(chip_hists: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """Sampling weight per chip that evens out classes: each labelled pixel weighs 1 / its class's frequency."""
    h = chip_hists[:, class_ids].astype(np.float64)
    freq = h.sum(axis=0)
    inv = np.where(freq > 0, 1.0 / np.maximum(freq, 1), 0.0)
    w = (h * inv).sum(axis=1)
    return np.where(w > 0, w, 0.0) + 1e-12


def band_stats(scenes: list[Scene], regions: list[tuple[int, Window]], step: int = 4
               ) -> tuple[list[float], list[float]]:
    """Per-band mean and std over the valid pixels of the training regions (every ``step``-th pixel)."""
    mean, std, _, _ = band_summary(scenes, regions, step)
    return mean, std


def band_summary(scenes: list[Scene], regions: list[tuple[int, Window]], step: int = 4
                 ) -> tuple[list[float], list[float], float, float]:
    """Per-band mean and std, and the smallest and largest value, over the valid training pixels."""
    total = None
    lo, hi = math.inf, -math.inf
    for si, w in regions:
        data, valid = read_image(scenes[si], w)
        d = data[:, ::step, ::step].astype(np.float64)
        v = valid[::step, ::step]
        if not v.any():
            continue
        x = d[:, v]
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        acc = np.stack([np.full(x.shape[0], x.shape[1], dtype=np.float64), x.sum(1), (x * x).sum(1)])
        total = acc if total is None else total + acc
    if total is None:
        raise InputError(f"{scenes[regions[0][0]].name}: the training images have no valid pixel")
    n, s1, s2 = total
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0))
    std = np.where(std > 1e-6, std, 1.0)
    return [float(v) for v in mean], [float(v) for v in std], lo, hi


def scene_path_list(scenes: list[Scene]) -> list[str]:
    return [str(Path(p)) for s in scenes for p in s.images]
