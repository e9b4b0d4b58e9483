"""Property-based tests (hypothesis): the tile grid covers every pixel exactly once with in-bounds,
stride-aligned windows; vectorized polygons rasterize back to the mask, identically for any block size."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from geoseg.grid import TileGrid

TRANSFORM = Affine(10.0, 0, 500000.0, 0, -10.0, 4000000.0)


@st.composite
def grids(draw):
    stride = draw(st.sampled_from([1, 2, 4, 8]))
    tile = stride * draw(st.integers(1, 12))
    halo = stride * draw(st.integers(0, 6))
    block = tile * draw(st.integers(1, 4))
    shape = (draw(st.integers(1, 200)), draw(st.integers(1, 200)))
    return TileGrid(shape=shape, transform=TRANSFORM, crs="EPSG:32630", tile_px=tile, halo_px=halo,
                    block_px=block, stride_px=stride)


def _inside(inner, outer) -> bool:
    return (inner.col_off >= outer.col_off and inner.row_off >= outer.row_off
            and inner.col_off + inner.width <= outer.col_off + outer.width
            and inner.row_off + inner.height <= outer.row_off + outer.height)


@settings(max_examples=150, deadline=None)
@given(grids())
def test_grid_covers_every_pixel_once(grid):
    rows, cols = grid.shape
    tile_cover = np.zeros(grid.shape, np.int32)
    block_cover = np.zeros(grid.shape, np.int32)
    for block in grid.blocks():
        w = block.window
        block_cover[int(w.row_off):int(w.row_off + w.height), int(w.col_off):int(w.col_off + w.width)] += 1
        assert _inside(w, block.read)
        for t in block.tiles:
            c, r = t.core, t.read
            tile_cover[int(c.row_off):int(c.row_off + c.height), int(c.col_off):int(c.col_off + c.width)] += 1
            assert c.width > 0 and c.height > 0
            assert _inside(c, r) and _inside(c, w) and _inside(r, block.read)
            # reads stay in the raster and start on the model's stride (what makes tiling bit-exact)
            assert r.col_off >= 0 and r.row_off >= 0 and r.col_off + r.width <= cols and r.row_off + r.height <= rows
            assert r.col_off % grid.stride_px == 0 and r.row_off % grid.stride_px == 0
            # the halo is all the context there is: clipped only at the raster's edges
            assert r.col_off == max(0, c.col_off - grid.halo_px)
            assert r.row_off + r.height == min(rows, c.row_off + c.height + grid.halo_px)
    assert (tile_cover == 1).all() and (block_cover == 1).all()
    assert grid.num_blocks == len(list(grid.blocks()))


@st.composite
def masks(draw):
    rows, cols = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    values = st.sampled_from([0, 1, 2, 3, 255])
    m = draw(arrays(np.uint8, (rows, cols), elements=values))
    # blobs as well as noise: repeat a coarse mask so regions span block borders
    if draw(st.booleans()):
        k = draw(st.integers(2, 6))
        coarse = draw(arrays(np.uint8, (-(-rows // k), -(-cols // k)), elements=values))
        m = np.kron(coarse, np.ones((k, k), np.uint8))[:rows, :cols]
    return m


def _write_mask(path, m):
    prof = dict(driver="GTiff", width=m.shape[1], height=m.shape[0], count=1, dtype="uint8", crs="EPSG:32630",
                transform=TRANSFORM, nodata=255)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(m, 1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=masks(), block_px=st.sampled_from([8, 16, 24, 1024]), connectivity=st.sampled_from([4, 8]))
def test_polygons_rasterize_back_to_the_mask(workdir, m, block_px, connectivity):
    import geopandas as gpd
    from rasterio import features

    from geoseg.config import VectorConfig
    from geoseg.vectorize import vectorize_file

    src = workdir / "mask.tif"
    _write_mask(src, m)
    cfg = VectorConfig(formats=["parquet"], connectivity=connectivity)
    out = workdir / f"p{block_px}.parquet"
    vectorize_file(src, out, cfg, block_px=block_px, workers=1, overwrite=True)
    df = gpd.read_parquet(out)
    back = features.rasterize(zip(df.geometry, df["class_id"]), out_shape=m.shape, transform=TRANSFORM,
                              fill=255, dtype="uint8")
    np.testing.assert_array_equal(back, m)
    # partition invariance: the same polygons, ids and all, as one block over the whole mask
    whole = workdir / "whole.parquet"
    vectorize_file(src, whole, cfg, block_px=1024, workers=1, overwrite=True)
    ref = gpd.read_parquet(whole)
    assert list(df["polygon_id"]) == list(ref["polygon_id"])
    assert all(a.equals_exact(b, 0) for a, b in zip(df.geometry, ref.geometry))
    # regions never split: as many polygons as connected regions per class
    from scipy import ndimage

    struct = np.ones((3, 3)) if connectivity == 8 else None
    regions = sum(ndimage.label(m == c, structure=struct)[1] for c in np.unique(m) if c != 255)
    assert len(df) == regions
