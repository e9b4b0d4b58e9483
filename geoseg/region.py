"""Region maps: an area of interest across many scenes, as one grid, mapped like one scene.

``geoseg.driver.map_region`` takes scenes (files, or STAC items through ``geoseg.stac``) and an AOI, chooses a
region grid, builds one virtual mosaic (a GDAL VRT) of the scenes on that grid with the functions here, and
runs the ordinary job on it with the AOI set, so blocks, seams, resume, outputs and run records are exactly
those of one scene:

- Region grid (``region_grid``): when every scene shares one pixel grid (same CRS, same pixel size, origins
  on whole pixels) whose GSD the model accepts, the region is a window of that grid: no resampling at all.
  The window is the AOI's bounds grown by the model's halo and snapped to the model's stride from the
  mosaic's origin, so every pixel inside the AOI is predicted exactly as in a map of the whole mosaic.
  Otherwise the region is the AOI's UTM zone (``output.crs`` overrides) at the card's GSD
  (``output.resolution_m``), aligned to whole pixels and to the stride, and each scene is warped onto it
  (``rasterio.vrt.WarpedVRT``; ``input.resampling`` for image bands).
- Overlaps (``input.overlap``): the first valid pixel in the given order, the newest acquisition, or the
  lowest cloud score (from STAC). GDAL draws a VRT's later sources over earlier ones except where they are
  nodata, so sources are listed in reverse priority.
- AOI (``read_aoi``): a polygon file (GeoJSON, GPKG, GeoParquet; features united) or a bbox in any CRS. The
  job applies it (``geoseg.plan``): blocks that do not touch it are never read, pixels outside are
  nodata, so polygons end at the AOI's pixels.

Everything here runs in the driver; workers read the mosaic VRT like any raster.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from affine import Affine

from geoseg.errors import ConfigError, InputError

__all__ = ["Aoi", "Scene", "RegionGrid", "read_aoi", "region_grid", "build_mosaic", "warp_to_gsd"]


@dataclass(frozen=True)
class Aoi:
    """An area of interest: a shapely geometry in ``crs_wkt`` and a name for the region's outputs."""

    geometry: Any
    crs_wkt: str
    name: str

    def in_crs(self, crs_wkt: str):
        """The geometry transformed to ``crs_wkt`` (exactly, densified along edges)."""
        import numpy as np
        import shapely
        from pyproj import CRS, Transformer
        from shapely import segmentize

        src, dst = CRS.from_wkt(self.crs_wkt), CRS.from_wkt(crs_wkt)
        if src == dst:
            return self.geometry
        tr = Transformer.from_crs(src, dst, always_xy=True)
        span = max(self.geometry.bounds[2] - self.geometry.bounds[0], self.geometry.bounds[3] - self.geometry.bounds[1])
        geom = segmentize(self.geometry, max(span / 64, 1e-9))
        return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


def read_aoi(spec: str, aoi_crs: str = "EPSG:4326") -> Aoi:
    """``spec``: a polygon file (features united) or ``minx,miny,maxx,maxy`` in ``aoi_crs``."""
    import shapely
    from pyproj import CRS

    parts = [p.strip() for p in spec.split(",")]
    if len(parts) == 4 and not os.path.exists(spec):
        try:
            minx, miny, maxx, maxy = (float(p) for p in parts)
        except ValueError:
            raise ConfigError(f"input.aoi {spec!r}: neither a file nor a bbox 'minx,miny,maxx,maxy'") from None
        if not (minx < maxx and miny < maxy):
            raise ConfigError(f"input.aoi {spec!r}: a bbox needs minx < maxx and miny < maxy")
        try:
            crs = CRS.from_user_input(aoi_crs)
        except Exception:
            raise ConfigError(f"input.aoi_crs {aoi_crs!r}: not a CRS pyproj knows (e.g. EPSG:4326)") from None
        return Aoi(shapely.box(minx, miny, maxx, maxy), crs.to_wkt(), "region")
    if not os.path.exists(spec):
        raise InputError(f"{spec}: AOI file not found (input.aoi takes a polygon file or 'minx,miny,maxx,maxy')")
    import geopandas as gpd

    try:
        df = gpd.read_parquet(spec) if spec.lower().endswith((".parquet", ".geoparquet")) else gpd.read_file(spec)
    except Exception as e:
        raise InputError(f"{spec}: cannot read the AOI ({str(e).splitlines()[0]})") from None
    if df.empty:
        raise InputError(f"{spec}: the AOI file has no features")
    if df.crs is None:
        raise InputError(f"{spec}: the AOI file has no CRS")
    geom = shapely.make_valid(df.geometry.union_all())
    polys = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type in ("Polygon", "MultiPolygon")]
    if not polys or shapely.union_all(polys).is_empty:
        raise InputError(f"{spec}: the AOI has no polygon area (got {geom.geom_type})")
    return Aoi(shapely.union_all(polys), df.crs.to_wkt(), Path(spec).stem)


@dataclass
class Scene:
    """One input scene of a region: a raster (or a VRT of STAC assets) and what ordering needs."""

    path: str
    bands: list[int] | None = None  # 1-based, in the model's band order; None: matched by names
    datetime: str | None = None
    cloud: float | None = None
    info: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class RegionGrid:
    """The region's pixel grid: CRS, transform, (rows, cols); ``shared`` when no scene is resampled."""

    crs_wkt: str
    transform: Affine
    shape: tuple[int, int]
    shared: bool


def _same_grid(infos) -> bool:
    from pyproj import CRS

    a = infos[0]
    for b in infos[1:]:
        if CRS.from_wkt(a.crs_wkt) != CRS.from_wkt(b.crs_wkt):
            return False
        ta, tb = a.transform, b.transform
        if not (math.isclose(ta.a, tb.a, rel_tol=1e-9) and math.isclose(ta.e, tb.e, rel_tol=1e-9)):
            return False
        for off, px in ((tb.c - ta.c, ta.a), (tb.f - ta.f, ta.e)):
            k = off / px
            if abs(k - round(k)) > 1e-6:
                return False
    return True


def utm_crs_wkt(lon: float, lat: float) -> str:
    from pyproj import CRS

    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32700 if lat < 0 else 32600) + zone).to_wkt()


def region_grid(scenes: list[Scene], aoi: Aoi, card, halo_px: int, cfg) -> RegionGrid:
    """The region's grid (see the module docstring)."""
    infos = [s.info for s in scenes]
    stride = card.output_stride
    from geoseg.io.contract import gsd_ok

    if not cfg.input.resample and _same_grid(infos) and all(gsd_ok(i, card) for i in infos) \
            and cfg.output.crs is None and cfg.output.resolution_m is None:
        base = infos[0]
        t = base.transform
        # the mosaic: the union of the scenes on the shared grid, in whole pixels from the first scene
        cols0 = [round((i.transform.c - t.c) / t.a) for i in infos]
        rows0 = [round((i.transform.f - t.f) / t.e) for i in infos]
        c_min, r_min = min(cols0), min(rows0)
        c_max = max(c + i.shape[1] for c, i in zip(cols0, infos))
        r_max = max(r + i.shape[0] for r, i in zip(rows0, infos))
        geom = aoi.in_crs(base.crs_wkt)
        minx, miny, maxx, maxy = geom.bounds
        inv = ~t
        cx = sorted([(inv @ (minx, miny))[0], (inv @ (maxx, maxy))[0]])
        ry = sorted([(inv @ (minx, miny))[1], (inv @ (maxx, maxy))[1]])
        # grown by the halo, snapped to the stride from the mosaic's origin: inside the AOI every pixel is
        # predicted as in a map of the whole mosaic
        c0 = max(c_min, c_min + (math.floor(cx[0]) - halo_px - c_min) // stride * stride)
        r0 = max(r_min, r_min + (math.floor(ry[0]) - halo_px - r_min) // stride * stride)
        c1 = min(c_max, math.ceil(cx[1]) + halo_px)
        r1 = min(r_max, math.ceil(ry[1]) + halo_px)
        if c1 <= c0 or r1 <= r0:
            raise InputError(f"input.aoi ({aoi.name}): does not overlap the scenes {[s.path for s in scenes]}")
        return RegionGrid(base.crs_wkt, t @ Affine.translation(c0, r0), (r1 - r0, c1 - c0), shared=True)
    # warped: the AOI's UTM zone (or output.crs) at the model's GSD, on whole pixels and the stride
    from pyproj import CRS

    ll = aoi.in_crs(CRS.from_epsg(4326).to_wkt()).centroid
    crs_wkt = CRS.from_user_input(cfg.output.crs).to_wkt() if cfg.output.crs else utm_crs_wkt(ll.x, ll.y)
    res = cfg.output.resolution_m or card.gsd_m
    crs = CRS.from_wkt(crs_wkt)
    if crs.is_geographic:
        raise ConfigError(f"output.crs {cfg.output.crs!r}: a region grid needs a projected CRS (metres)")
    res_units = res / crs.axis_info[0].unit_conversion_factor
    minx, miny, maxx, maxy = aoi.in_crs(crs_wkt).bounds
    step = res_units * stride
    pad = halo_px * res_units
    # anchored on a scene already in this CRS at this pixel size, if any: that scene then needs no resampling
    ox, oy = 0.0, 0.0
    for i in infos:
        if CRS.from_wkt(i.crs_wkt) == crs and math.isclose(i.transform.a, res_units, rel_tol=1e-9) \
                and math.isclose(-i.transform.e, res_units, rel_tol=1e-9):
            ox, oy = i.transform.c, i.transform.f
            break
    x0 = ox + math.floor((minx - pad - ox) / step) * step
    y1 = oy + math.ceil((maxy + pad - oy) / step) * step
    x1 = ox + math.ceil((maxx + pad - ox) / res_units) * res_units
    y0 = oy + math.floor((miny - pad - oy) / res_units) * res_units
    cols, rows = round((x1 - x0) / res_units), round((y1 - y0) / res_units)
    return RegionGrid(crs_wkt, Affine(res_units, 0, x0, 0, -res_units, y1), (rows, cols), shared=False)


GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}


def vrt_number(v) -> str:
    """A value as VRT XML writes it (nan, or an int / float literal)."""
    return "nan" if isinstance(v, float) and math.isnan(v) else repr(float(v) if isinstance(v, float) else int(v))


def _order(scenes: list[Scene], rule: str) -> list[Scene]:
    """Scenes in priority order (first wins)."""
    if rule == "first":
        return list(scenes)
    if rule == "newest":
        missing = [s.path for s in scenes if not s.datetime]
        if missing:
            raise InputError(f"input.overlap=newest needs acquisition dates (from STAC items); none for {missing}")
        return sorted(scenes, key=lambda s: s.datetime, reverse=True)
    missing = [s.path for s in scenes if s.cloud is None]
    if missing:
        raise InputError(f"input.overlap=least_cloudy needs a cloud score (eo:cloud_cover in the STAC item); "
                         f"none for {missing}")
    return sorted(scenes, key=lambda s: s.cloud)


def _warped_vrt(scene: Scene, grid: RegionGrid, resampling: str, dest: Path) -> str:
    """The scene warped onto the region grid, as a VRT file (GDAL's warper, read lazily by each block)."""
    import rasterio
    import rasterio.warp
    import rasterio.shutil
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    from geoseg.io import raster

    rows, cols = grid.shape
    with raster.open_raster(scene.path) as src:
        with WarpedVRT(src, crs=rasterio.crs.CRS.from_wkt(grid.crs_wkt), transform=grid.transform, width=cols,
                       height=rows, resampling=Resampling[resampling], src_nodata=src.nodata,
                       nodata=src.nodata) as vrt:
            rasterio.shutil.copy(vrt, dest, driver="VRT")
    return str(dest)


def build_mosaic(scenes: list[Scene], grid: RegionGrid, card, dest: Path, rule: str = "first",
                 resampling: str = "bilinear") -> Path:
    """Write the region's virtual mosaic ``dest`` (a VRT): the model's bands, named as the card names them, of
    every scene placed on ``grid`` (warped first when the grid is not the scenes' own)."""
    from geoseg.io import raster

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ordered = _order(scenes, rule)
    rows, cols = grid.shape
    dtype = np.result_type(*[s.info.dtype for s in scenes]).name
    nodatas = {s.info.nodata for s in scenes}
    nodata = nodatas.pop() if len(nodatas) == 1 else None
    if nodata is None:
        # where no scene has a pixel the mosaic must read as nodata, never as a valid 0
        kind = np.dtype(dtype)
        nodata = float("nan") if kind.kind == "f" else (np.iinfo(kind).max if kind.kind == "u" else np.iinfo(kind).min)
    sources: list[tuple[str, list[int], tuple[int, int, int, int], Any]] = []
    for k, s in enumerate(reversed(ordered)):  # GDAL draws later sources on top: the first scene goes last
        bands = s.bands or raster.resolve_bands(s.info, card.bands, None)
        if grid.shared:
            t = s.info.transform
            c = round((t.c - grid.transform.c) / t.a)
            r = round((t.f - grid.transform.f) / t.e)
            sources.append((s.path, bands, (c, r, s.info.shape[1], s.info.shape[0]), s.info.nodata))
        else:
            path = _warped_vrt(s, grid, resampling, dest.with_name(f"{dest.stem}.scene{k:03d}.vrt"))
            sources.append((path, bands, (0, 0, cols, rows), s.info.nodata))
    gt = ", ".join(repr(float(v)) for v in (grid.transform.c, grid.transform.a, 0.0, grid.transform.f, 0.0,
                                            grid.transform.e))
    out = [f'<VRTDataset rasterXSize="{cols}" rasterYSize="{rows}">',
           f"<SRS>{escape(grid.crs_wkt)}</SRS>", f"<GeoTransform>{gt}</GeoTransform>"]
    for i, name in enumerate(card.bands):
        out.append(f'<VRTRasterBand dataType="{GDAL_TYPES[dtype]}" band="{i + 1}">')
        out.append(f"<Description>{escape(name)}</Description>")
        if nodata is not None:
            out.append(f"<NoDataValue>{vrt_number(nodata)}</NoDataValue>")
        for path, bands, (c, r, w, h), nd in sources:
            out.append("<ComplexSource>")
            out.append(f'<SourceFilename relativeToVRT="0">{escape(os.path.abspath(path))}</SourceFilename>')
            out.append(f"<SourceBand>{bands[i]}</SourceBand>")
            out.append(f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>')
            out.append(f'<DstRect xOff="{c}" yOff="{r}" xSize="{w}" ySize="{h}"/>')
            if nd is not None:
                out.append(f"<NODATA>{vrt_number(nd)}</NODATA>")
            out.append("</ComplexSource>")
        out.append("</VRTRasterBand>")
    out.append("</VRTDataset>")
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text("\n".join(out))
    os.replace(tmp, dest)
    return dest


def warp_to_gsd(path: str, card, resampling: str, dest: Path) -> str:
    """``input.resample``: ``path`` warped to the card's GSD (its own CRS when projected, else its UTM zone),
    as a VRT at ``dest``. Returns the VRT's path."""
    import rasterio
    import rasterio.warp

    from geoseg.io import raster

    with raster.open_raster(path) as src:
        info = raster.inspect(src, path)
        src_bounds = src.bounds
    scene = Scene(path, info=info)
    crs = info.crs
    if crs.is_projected:
        crs_wkt = info.crs_wkt
    else:
        rows, cols = info.shape
        lon, lat = info.transform @ (cols / 2, rows / 2)
        crs_wkt = utm_crs_wkt(lon, lat)
    from pyproj import CRS

    unit = CRS.from_wkt(crs_wkt).axis_info[0].unit_conversion_factor
    res = card.gsd_m / unit
    bounds = rasterio.warp.transform_bounds(info.crs, rasterio.crs.CRS.from_wkt(crs_wkt), *src_bounds)
    step = res * card.output_stride
    x0, y1 = math.floor(bounds[0] / step) * step, math.ceil(bounds[3] / step) * step
    cols, rows = math.ceil((bounds[2] - x0) / res), math.ceil((y1 - bounds[1]) / res)
    grid = RegionGrid(crs_wkt, Affine(res, 0, x0, 0, -res, y1), (rows, cols), shared=False)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    return _warped_vrt(scene, grid, resampling, Path(dest))
