"""The tile grid: stride-aligned clipped read windows, blocks of whole tiles, each pixel in one tile core."""

import numpy as np
import pytest
from affine import Affine

from geoseg.errors import ConfigError
from geoseg.grid import TileGrid


def grid(rows=700, cols=530, tile=128, halo=32, block=256, stride=2):
    return TileGrid((rows, cols), Affine(10, 0, 500000, 0, -10, 4000000), "EPSG:32630", tile, halo, block, stride)


@pytest.mark.parametrize("block", [128, 256, 512, 1024])
def test_every_pixel_in_exactly_one_tile_core(block):
    g = grid(block=block)
    cover = np.zeros(g.shape, dtype=np.int32)
    for b in g.blocks():
        for t in b.tiles:
            c = t.core
            cover[c.row_off:c.row_off + c.height, c.col_off:c.col_off + c.width] += 1
            # the block's read window holds each of its tiles' read windows
            assert b.read.row_off <= t.read.row_off and b.read.col_off <= t.read.col_off
            assert t.read.row_off + t.read.height <= b.read.row_off + b.read.height
            assert t.read.col_off + t.read.width <= b.read.col_off + b.read.width
    assert (cover == 1).all()


def test_read_windows_clipped_and_stride_aligned():
    g = grid()
    rows, cols = g.shape
    for b in g.blocks():
        for t in b.tiles:
            r = t.read
            assert r.col_off >= 0 and r.row_off >= 0
            assert r.col_off + r.width <= cols and r.row_off + r.height <= rows
            assert r.col_off % 2 == 0 and r.row_off % 2 == 0
            # full halo wherever the raster has room for it
            assert t.core.col_off - r.col_off == min(32, t.core.col_off)
            assert (r.col_off + r.width) - (t.core.col_off + t.core.width) == min(
                32, cols - (t.core.col_off + t.core.width))


def test_block_ids_and_transform():
    g = grid()
    assert g.shape_blocks == (3, 3)
    b = g.block(1, 2)
    assert b.id == "r00001c00002"
    assert g.window_transform(b.window) == Affine(10, 0, 500000 + 512 * 10, 0, -10, 4000000 - 256 * 10)
    with pytest.raises(IndexError):
        g.block(3, 0)


def test_invalid_tilings():
    with pytest.raises(ConfigError, match="output stride"):
        grid(tile=127, block=127)
    with pytest.raises(ConfigError, match="halo_px"):
        grid(halo=31)
    with pytest.raises(ConfigError, match="multiple of tiling.tile_px"):
        grid(block=300)
    with pytest.raises(ConfigError, match="positive"):
        grid(tile=0)
