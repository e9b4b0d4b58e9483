"""The tile grid: which windows of a raster each tile and block reads and writes. No I/O.

A ``TileGrid`` is an immutable value anchored to the raster origin. Tiles are ``tile_px`` squares indexed by
``(row, col)``; each is predicted from a read window grown by ``halo_px`` on every side and *clipped* to the
raster, so at the edges the model meets the raster edge exactly as in whole-image inference (its own zero
padding) rather than an invented fill value. Because ``tile_px`` and ``halo_px`` are multiples of the model's
output stride, every read window starts on a stride-aligned offset, which is what makes tiled inference
bit-identical to whole-image inference (an odd offset changes a stride-2 model's logits everywhere).

Blocks are the unit of work: squares of ``block_px`` (whole tiles) that read one window (block + halo) and
predict their tiles in batches. Every output pixel belongs to exactly one tile core, so the result does not
depend on how tiles are grouped into blocks.

Windows are rasterio ``Window(col_off, row_off, width, height)`` throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

from affine import Affine
from rasterio.windows import Window

from geoseg.errors import ConfigError

__all__ = ["TileGrid", "Block", "Tile"]


def _clip_span(start: int, stop: int, size: int) -> tuple[int, int]:
    return max(0, start), min(size, stop)


@dataclass(frozen=True)
class Tile:
    """One model input: ``core`` is what it writes, ``read`` what it sees (core + halo, clipped)."""

    row: int
    col: int
    core: Window
    read: Window


@dataclass(frozen=True)
class Block:
    """One unit of work: ``window`` is written, ``read`` (window + halo, clipped) is read once."""

    row: int
    col: int
    window: Window
    read: Window
    tiles: tuple[Tile, ...]

    @property
    def id(self) -> str:
        """Stable name used in manifests, logs and errors."""
        return f"r{self.row:05d}c{self.col:05d}"


@dataclass(frozen=True)
class TileGrid:
    """Tiling of a ``(rows, cols)`` raster into stride-aligned, haloed tiles grouped into blocks."""

    shape: tuple[int, int]
    transform: Affine
    crs: object
    tile_px: int
    halo_px: int
    block_px: int
    stride_px: int = 1

    def __post_init__(self):
        rows, cols = self.shape
        if rows <= 0 or cols <= 0:
            raise ConfigError(f"raster shape must be positive, got (rows, cols) = {self.shape}")
        for name in ("tile_px", "block_px", "stride_px"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"tiling: {name} must be positive, got {getattr(self, name)}")
        if self.halo_px < 0:
            raise ConfigError(f"tiling.halo_px must be >= 0, got {self.halo_px}")
        s = self.stride_px
        if self.tile_px % s:
            raise ConfigError(
                f"tiling.tile_px ({self.tile_px}) must be a multiple of the model's output stride ({s})"
            )
        if self.halo_px % s:
            raise ConfigError(
                f"tiling.halo_px ({self.halo_px}) must be a multiple of the model's output stride ({s})"
            )
        if self.block_px % self.tile_px:
            raise ConfigError(
                f"tiling.block_px ({self.block_px}) must be a multiple of tiling.tile_px ({self.tile_px})"
            )

    @property
    def shape_blocks(self) -> tuple[int, int]:
        """Number of blocks as (rows, cols)."""
        rows, cols = self.shape
        return -(-rows // self.block_px), -(-cols // self.block_px)

    @property
    def shape_tiles(self) -> tuple[int, int]:
        rows, cols = self.shape
        return -(-rows // self.tile_px), -(-cols // self.tile_px)

    def _grow(self, w: Window) -> Window:
        rows, cols = self.shape
        r0, r1 = _clip_span(w.row_off - self.halo_px, w.row_off + w.height + self.halo_px, rows)
        c0, c1 = _clip_span(w.col_off - self.halo_px, w.col_off + w.width + self.halo_px, cols)
        return Window(c0, r0, c1 - c0, r1 - r0)

    def _square(self, row: int, col: int, size: int) -> Window:
        rows, cols = self.shape
        r0, c0 = row * size, col * size
        return Window(c0, r0, min(size, cols - c0), min(size, rows - r0))

    def tile(self, row: int, col: int) -> Tile:
        core = self._square(row, col, self.tile_px)
        return Tile(row, col, core, self._grow(core))

    def block(self, row: int, col: int) -> Block:
        nbr, nbc = self.shape_blocks
        if not (0 <= row < nbr and 0 <= col < nbc):
            raise IndexError(f"block ({row}, {col}) outside the {nbr}x{nbc} block grid")
        window = self._square(row, col, self.block_px)
        per = self.block_px // self.tile_px
        ntr, ntc = self.shape_tiles
        tiles = tuple(
            self.tile(tr, tc)
            for tr in range(row * per, min((row + 1) * per, ntr))
            for tc in range(col * per, min((col + 1) * per, ntc))
        )
        return Block(row, col, window, self._grow(window), tiles)

    def blocks(self) -> Iterator[Block]:
        """All blocks in row-major order."""
        nbr, nbc = self.shape_blocks
        for r in range(nbr):
            for c in range(nbc):
                yield self.block(r, c)

    @cached_property
    def num_blocks(self) -> int:
        nbr, nbc = self.shape_blocks
        return nbr * nbc

    def window_transform(self, w: Window) -> Affine:
        """The affine transform of a window on this grid (same pixel size, shifted origin)."""
        return self.transform @ Affine.translation(w.col_off, w.row_off)
