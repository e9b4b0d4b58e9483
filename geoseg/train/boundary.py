"""Instance training labels (``train.boundary_px``): the edge of each object becomes a boundary class.

The common remote-sensing recipe for one polygon per building: a model trained on background / building interior
/ building boundary separates touching roofs by their boundary pixels; ``geoseg.instances`` then grows the
interior components (seeds) back to the footprint. Pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np

from geoseg.errors import ConfigError

__all__ = ["IGNORE", "boundary_spec", "add_boundary"]

IGNORE = 255


def _class_id(tcfg, ref, what: str) -> int:
    for c in tcfg.classes:
        if ref == c.id or ref == c.name:
            return c.id
    raise ConfigError(f"{what}: {ref!r} is not one of train.classes {[c.name for c in tcfg.classes]}")


def boundary_spec(tcfg) -> tuple:
    """``train.boundary_px`` resolved: (width px, footprint class ids, boundary class id), () when off."""
    if not getattr(tcfg, "boundary_px", 0):
        return ()
    bid = _class_id(tcfg, tcfg.boundary_class, "train.boundary_class")
    fp = tuple(sorted({_class_id(tcfg, c, "train.object_classes") for c in tcfg.object_classes} - {bid}))
    if not fp:
        raise ConfigError("train.boundary_px: train.object_classes needs a class other than train.boundary_class")
    return int(tcfg.boundary_px), fp, bid


def add_boundary(labels: np.ndarray, width_px: int, footprint: tuple[int, ...], boundary: int) -> np.ndarray:
    """Pixels of the ``footprint`` classes within ``width_px`` (Euclidean, pixel centres) of a known pixel of
    another class become ``boundary``. Unlabelled pixels (IGNORE) and the raster's edge make no boundary, so a
    chip cut from the scene has the scene's boundaries."""
    from scipy import ndimage

    inside = np.isin(labels, footprint)
    other = (labels != IGNORE) & ~inside & (labels != boundary)
    if not inside.any() or not other.any():
        return labels
    dist = ndimage.distance_transform_edt(~other)
    out = labels.copy()
    out[inside & (dist <= width_px)] = boundary
    return out
