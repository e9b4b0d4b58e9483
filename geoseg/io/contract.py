"""The input contract: does a raster fit a model? Checked for every scene before any compute.

A land-cover map made from input the model was not built for is the worst outcome: it looks like a map.
So each scene is checked against its model card before Ray starts or a byte is written:

- ``size``: the scene is at least ``card.min_side_px`` on each side and at most ``runtime.max_pixels``.
- ``bands``: the band mapping (``io.raster.resolve_bands``: named bands must match the card's names).
- ``gsd``: the pixel size in metres (measured on the ellipsoid at the scene's centre for a geographic CRS)
  lies in ``card.accepted_gsd_m``.
- ``value_range``: a cheap sample (the overviews, else a few windows) of the valid values, after
  ``input.scale`` / ``input.offset``, lies in the card's ``value_range`` (reflectance 0-1 given to a model of
  digital numbers 0-10000 is refused with the scale that fixes it).

Orientation (north-up, no rotation) is checked when the raster is opened (``io.raster.inspect``).
``checks`` returns every result (``geoseg info`` prints them all); ``enforce`` raises the failures as one
``InputError`` naming the file.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
from rasterio.errors import RasterioError
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.io.raster import RasterInfo, resolve_bands

__all__ = ["Check", "checks", "enforce", "pixel_size_m", "gsd_m", "gsd_ok", "sample_values"]


@dataclass(frozen=True)
class Check:
    """One contract check: ``ok`` is None when it could not be judged (e.g. no valid pixel sampled)."""

    name: str
    ok: bool | None
    detail: str


def pixel_size_m(info: RasterInfo) -> tuple[float, float]:
    """Pixel width and height in metres at the scene's centre (ellipsoidal distances for a geographic CRS)."""
    crs = info.crs
    t = info.transform
    if crs.is_geographic:
        from pyproj import CRS, Geod

        geod = CRS.from_wkt(info.crs_wkt).get_geod() or Geod(ellps="WGS84")
        rows, cols = info.shape
        x, y = t @ (cols / 2, rows / 2)
        _, _, dx = geod.inv(x, y, x + abs(t.a), y)
        _, _, dy = geod.inv(x, y, x, y + abs(t.e) if y + abs(t.e) <= 90 else y - abs(t.e))
        return float(dx), float(dy)
    factor = crs.linear_units_factor[1] if crs.is_projected else 1.0
    return abs(t.a) * factor, abs(t.e) * factor


def gsd_m(info: RasterInfo) -> float:
    """The pixel size in metres: the side of a square of the same area (right for non-square degree pixels)."""
    dx, dy = pixel_size_m(info)
    return math.sqrt(dx * dy)


def gsd_ok(info: RasterInfo, card) -> bool:
    """Whether the model accepts this raster's pixel size."""
    lo, hi = card.accepted_gsd_m
    return lo <= gsd_m(info) <= hi


def sample_values(src, bands: list[int], scale: float = 1.0, offset: float = 0.0, max_px: int = 512) -> np.ndarray:
    """Valid values of ``bands`` (scaled) from a cheap sample: the overviews when the file has them, else five
    windows (the centre and the centres of the four quadrants). Never reads the whole image."""
    rows, cols = src.height, src.width
    parts = []
    # A window that fails to decode is left out: a corrupt tile is reported by the block that reads it,
    # with the block's name, not by this sample.
    if src.overviews(bands[0]):
        f = max(1, math.ceil(max(rows, cols) / max_px))
        shape = (len(bands), max(1, rows // f), max(1, cols // f))
        with contextlib.suppress(RasterioError):
            parts.append((src.read(bands, out_shape=shape), src.read_masks(bands, out_shape=shape)))
    else:
        side = min(256, rows, cols)
        for fr, fc in ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):
            r0 = min(max(0, int(rows * fr) - side // 2), rows - side)
            c0 = min(max(0, int(cols * fc) - side // 2), cols - side)
            w = Window(c0, r0, side, side)
            with contextlib.suppress(RasterioError):
                parts.append((src.read(bands, window=w), src.read_masks(bands, window=w)))
    values = []
    for data, masks in parts:
        ok = masks > 0
        if data.dtype.kind == "f":
            ok &= np.isfinite(data)
        values.append(data[ok].astype(np.float64))
    v = np.concatenate(values) if values else np.empty(0)
    return v * scale + offset


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _value_check(info: RasterInfo, card, values: np.ndarray, scale: float) -> Check:
    if card.value_range is None:
        return Check("value_range", True, "the model card declares no value range")
    lo, hi = card.value_range
    if values.size == 0:
        return Check("value_range", None, "not checked: no valid pixel in the sample")
    p1, p99 = (float(x) for x in np.percentile(values, [1, 99]))
    span = hi - lo
    want = f"the model expects {card.input_dtype} (typical range {_fmt(lo)} to {_fmt(hi)})"
    seen = f"1st-99th percentile {_fmt(p1)} to {_fmt(p99)}" + (f" after input.scale={scale:g}" if scale != 1 else "")
    if p99 < lo + 0.01 * span or p99 > hi + span:
        # a power of ten that brings the sample's top into the range, e.g. 10000 for reflectance 0-1
        fix = 10 ** round(math.log10(max(hi * 0.3, 1e-12) / max(abs(p99), 1e-12))) * scale
        hint = f"set input.scale={fix:g} to convert" if p99 > 0 else "check the input's units"
        return Check("value_range", False,
                     f"values are in other units than the model's: {seen}, but {want}; {hint}, or "
                     "input.skip_checks=[value_range] if the values are right")
    if p1 < lo - span:
        return Check("value_range", False,
                     f"values far below the model's range: {seen}, but {want}; check input.offset and the "
                     "nodata value, or set input.skip_checks=[value_range] if the values are right")
    return Check("value_range", True, f"{seen}, within {_fmt(lo)} to {_fmt(hi)}")


def _gsd_check(info: RasterInfo, card) -> Check:
    dx, dy = pixel_size_m(info)
    gsd = gsd_m(info)
    lo, hi = card.accepted_gsd_m
    seen = f"pixel size {_fmt(gsd)} m ({_fmt(dx)} x {_fmt(dy)} m)"
    if not gsd_ok(info, card):
        ratio = gsd / card.gsd_m
        return Check("gsd", False,
                     f"{seen} is {_fmt(ratio)}x the model's {_fmt(card.gsd_m)} m (accepted: {_fmt(lo)} to "
                     f"{_fmt(hi)} m); set input.resample=true to warp it to {_fmt(card.gsd_m)} m, or "
                     "input.skip_checks=[gsd] if you know the model works at this scale")
    return Check("gsd", True, f"{seen}, accepted {_fmt(lo)} to {_fmt(hi)} m")


def _size_check(info: RasterInfo, card, max_pixels: int) -> Check:
    rows, cols = info.shape
    need = card.min_side_px
    if rows < need or cols < need:
        return Check("size", False,
                     f"is {cols} x {rows} px (cols x rows) but the model needs at least {need} x {need}")
    if rows * cols > max_pixels:
        return Check("size", False,
                     f"declares {cols:,} x {rows:,} px = {rows * cols:,} pixels, over runtime.max_pixels="
                     f"{max_pixels:,}; if the size is real, raise runtime.max_pixels")
    return Check("size", True, f"{cols} x {rows} px")


def checks(src, info: RasterInfo, card, input_cfg, max_pixels: int) -> list[Check]:
    """Every contract check of one opened raster against ``card`` (see the module docstring)."""
    out = [_size_check(info, card, max_pixels)]
    try:
        bands = resolve_bands(info, card.bands, input_cfg.bands)
        out.append(Check("bands", True, f"bands {bands} -> {', '.join(card.bands)}"))
    except InputError as e:
        out.append(Check("bands", False, str(e).removeprefix(f"{info.path}: ")))
        bands = None
    if "gsd" in input_cfg.skip_checks:
        out.append(Check("gsd", None, "skipped (input.skip_checks)"))
    else:
        out.append(_gsd_check(info, card))
    if "value_range" in input_cfg.skip_checks:
        out.append(Check("value_range", None, "skipped (input.skip_checks)"))
    elif bands is not None and out[0].ok:
        values = sample_values(src, bands, input_cfg.scale, input_cfg.offset)
        out.append(_value_check(info, card, values, input_cfg.scale))
    return out


def enforce(path: str, results: list[Check]) -> None:
    """Raise one ``InputError`` naming ``path`` and every failed check."""
    failed = [c for c in results if c.ok is False]
    if failed:
        raise InputError(f"{path}: " + "; ".join(c.detail for c in failed))
