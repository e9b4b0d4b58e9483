"""Real GeoTIFFs derived from the Sentinel-2 chip for error tests: altered copies and a corrupted tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio


def chip_copy(src_path: Path, path: Path, *, profile: dict | None = None, transform_data=None) -> Path:
    """Copy ``src_path`` to ``path`` with ``profile`` changes and ``transform_data(data)`` applied to the pixels."""
    with rasterio.open(src_path) as src:
        prof = src.profile
        data = src.read()
        names = src.descriptions
    prof.update(profile or {})
    if transform_data is not None:
        data = transform_data(data)
    prof["count"] = data.shape[0]
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data.astype(prof["dtype"]))
        dst.descriptions = names[: data.shape[0]]
    return path


def corrupt_tile_copy(src_path: Path, path: Path, tile_rc: tuple[int, int], *, band: int = 2,
                      tile_px: int = 128, seed: int = 0) -> Path:
    """A tiled copy whose header is intact but whose compressed tile ``tile_rc`` of ``band`` is random bytes,
    so the file opens and only reading that tile fails (GDAL's ZIPDecode error)."""
    chip_copy(src_path, path, profile={"tiled": True, "blockxsize": tile_px, "blockysize": tile_px})
    raw = bytearray(path.read_bytes())
    r, c = tile_rc
    with rasterio.open(path) as src:
        off = int(src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=band))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=band))
    raw[off: off + size] = np.random.default_rng(seed).integers(0, 255, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    return path
