"""Conventions every stage shares: the mask's nodata value, the class-name tag, labels of unnamed classes,
the package version stamped into outputs. One home, so a writer and a reader cannot disagree."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["VERSION", "NODATA", "CLASS_NAMES_TAG", "class_label", "to_pyproj", "M2_PER_HA"]

VERSION = "0.1.0"  # geoseg.__version__; stamped into masks (GEOSEG_VERSION tag) and run records

NODATA = 255  # the class mask's nodata value: no model has 256 classes
CLASS_NAMES_TAG = "GEOSEG_CLASS_NAMES"  # mask tag: JSON list of class names by class id
M2_PER_HA = 10_000.0


def class_label(class_names: Sequence[str | None], class_id: int) -> str:
    """A class's name, or ``class_<id>`` for an id the names do not cover (or cover with an empty name)."""
    cid = int(class_id)
    if 0 <= cid < len(class_names) and class_names[cid]:
        return str(class_names[cid])
    return f"class_{cid}"


def to_pyproj(crs: Any):
    """Any CRS (rasterio CRS, WKT, EPSG string, pyproj CRS) as a ``pyproj.CRS``; None stays None."""
    import pyproj

    if crs is None:
        return None
    if isinstance(crs, pyproj.CRS):
        return crs
    return pyproj.CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
