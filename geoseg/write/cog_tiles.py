"""The mask COG assembled from compressed tiles: the workers compress, the scene's writer copies bytes.

GDAL's COG driver only copies a finished dataset, decompressing and recompressing every tile and computing
every overview in the one process that writes the scene (about 0.06 CPU-second per megapixel: one writer could
not keep up with a GPU). Here the finish task of each block compresses the block's own tiles of the full
resolution and of the overview levels that still cover whole tiles within the block (``block_tiles``), and
hands the writer those bytes plus its block at the first level that does not (``coarse``: 1/16 of the pixels
for 1024-px blocks and 512-px tiles). The writer keeps only that coarse level, builds the remaining small
levels from it at the end, and writes the file (``COGAssembler.finish``): GDAL's COG layout, byte for byte in
structure -- the structural-metadata "ghost" header, every IFD before the data, tile data from the smallest
overview to the full resolution, each tile with its size before it and its last 4 bytes repeated after it --
and the GeoTIFF tags GDAL itself writes for the same grid, CRS, nodata, colour table and metadata (taken from a
template dataset GDAL writes in memory, so every CRS it can encode is encoded as GDAL does).

Overviews: the mode of each 2 x 2 window of the level above (``mode2x2``; nodata ignored, ties to the smaller
class id), level by level. Tiles: DEFLATE (zlib) of the tile padded to full size with nodata. Every byte
depends only on the mask: the same file for every block size, worker count and arrival order, whether the
workers compressed the tiles or the writer did (blocks not aligned to the tile grid, a sieve pass).
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

__all__ = ["mode2x2", "overview_count", "level_shape", "worker_levels", "block_tiles", "BlockTiles", "encode_tile",
           "COGAssembler"]

GHOST = (b"GDAL_STRUCTURAL_METADATA_SIZE=000140 bytes\n"
         b"LAYOUT=IFDS_BEFORE_DATA\nBLOCK_ORDER=ROW_MAJOR\nBLOCK_LEADER=SIZE_AS_UINT4\n"
         b"BLOCK_TRAILER=LAST_4_BYTES_REPEATED\nKNOWN_INCOMPATIBLE_EDITION=NO\n ")
DEFLATE_LEVEL = 6  # GDAL's default for DEFLATE

# TIFF tags used here by number
NEW_SUBFILE_TYPE, IMAGE_WIDTH, IMAGE_LENGTH = 254, 256, 257
TILE_OFFSETS, TILE_BYTE_COUNTS = 324, 325
# Tags an overview IFD repeats from the full-resolution one (GDAL's COG: no georeferencing, no metadata)
_OVERVIEW_TAGS = {258, 259, 262, 277, 284, 317, 320, 322, 323, 338, 339, 42113}
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}


def level_shape(shape: tuple[int, int], level: int) -> tuple[int, int]:
    """(rows, cols) of overview ``level`` (0: full resolution): halved, rounded up, per level."""
    rows, cols = int(shape[0]), int(shape[1])
    for _ in range(level):
        rows, cols = -(-rows // 2), -(-cols // 2)
    return rows, cols


def overview_count(shape: tuple[int, int], blocksize: int) -> int:
    """Overview levels, as GDAL's ``OVERVIEWS=AUTO``: halve until the image fits in one tile."""
    n = 0
    rows, cols = int(shape[0]), int(shape[1])
    while max(rows, cols) > blocksize:
        rows, cols = -(-rows // 2), -(-cols // 2)
        n += 1
    return n


def worker_levels(block_px: int, blocksize: int, n_overviews: int) -> int:
    """How many levels (from the full resolution) a block encodes itself: those at which every block covers
    whole tiles. 0 when blocks are not a multiple of the tile size (the writer then encodes everything)."""
    if block_px % blocksize:
        return 0
    k, side = 0, block_px
    while side >= blocksize and side % blocksize == 0 and k <= n_overviews:
        k += 1
        side //= 2
    return k


def mode2x2(a: np.ndarray, nodata: int) -> np.ndarray:
    """The next overview level: the most frequent valid value of each 2 x 2 window (ties: the smaller value;
    nodata only where all four are nodata). Odd edges are padded with nodata."""
    rows, cols = a.shape
    if rows % 2 or cols % 2:
        p = np.full((rows + rows % 2, cols + cols % 2), nodata, dtype=a.dtype)
        p[:rows, :cols] = a
        a = p
    v = np.stack([a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2]])
    counts = sum((v == v[j]).astype(np.int16) for j in range(4))
    # rank: count first, then the smaller value; nodata never wins over a valid value
    key = counts * 512 + (255 - v.astype(np.int16))
    key[v == nodata] = -1
    return np.take_along_axis(v, key.argmax(axis=0)[None], axis=0)[0]


def encode_tile(tile: np.ndarray, blocksize: int, nodata: int) -> bytes:
    """One tile's DEFLATE stream (partial edge tiles padded with nodata, as full tiles)."""
    if tile.shape != (blocksize, blocksize):
        full = np.full((blocksize, blocksize), nodata, dtype=np.uint8)
        full[: tile.shape[0], : tile.shape[1]] = tile
        tile = full
    return zlib.compress(np.ascontiguousarray(tile, dtype=np.uint8).tobytes(), DEFLATE_LEVEL)


@dataclass
class BlockTiles:
    """What a block hands the COG writer: compressed tiles ``(level, tile_row, tile_col, bytes)`` and its raster
    at the first level it could not tile (``coarse`` at ``coarse_offset`` (row, col) in that level's pixels;
    None when the block's tiles reach the last level)."""

    tiles: list[tuple[int, int, int, bytes]]
    coarse: np.ndarray | None
    coarse_offset: tuple[int, int]


def block_tiles(mask: np.ndarray, row_off: int, col_off: int, shape: tuple[int, int], blocksize: int,
                levels: int, nodata: int) -> BlockTiles:
    """Compress a block's tiles at levels ``0 .. levels-1`` (``worker_levels``); the block must start on the tile
    grid of each of those levels."""
    n_ovr = overview_count(shape, blocksize)
    arr, r0, c0 = mask, int(row_off), int(col_off)
    tiles = []
    for level in range(levels):
        if r0 % blocksize or c0 % blocksize:
            raise ValueError(f"block at ({row_off}, {col_off}) is not on level {level}'s tile grid")
        for i in range(0, arr.shape[0], blocksize):
            for j in range(0, arr.shape[1], blocksize):
                tiles.append((level, (r0 + i) // blocksize, (c0 + j) // blocksize,
                              encode_tile(arr[i:i + blocksize, j:j + blocksize], blocksize, nodata)))
        if level == n_ovr:
            return BlockTiles(tiles, None, (0, 0))
        arr, r0, c0 = mode2x2(arr, nodata), r0 // 2, c0 // 2
    return BlockTiles(tiles, arr, (r0, c0))


# ----------------------------------------------------------------------------------------------- the writer


def _template_tags(shape, transform, crs, blocksize: int, nodata: int, palette, tags: dict, band_tags: dict,
                   description: str) -> list[tuple[int, int, int, bytes]]:
    """The full-resolution IFD's tags as GDAL writes them for this dataset: ``(tag, type, count, value bytes)``."""
    from rasterio.io import MemoryFile

    rows, cols = shape
    with MemoryFile() as mf:
        with mf.open(driver="GTiff", width=cols, height=rows, count=1, dtype="uint8", crs=crs, transform=transform,
                     nodata=nodata, tiled=True, blockxsize=blocksize, blockysize=blocksize, compress="deflate",
                     sparse_ok=True) as ds:
            ds.write_colormap(1, {i: palette.get(i, (0, 0, 0, 0)) for i in range(256)})
            ds.update_tags(**tags)
            ds.update_tags(1, **band_tags)
            ds.set_band_description(1, description)
        data = mf.read()
    return _read_ifd0(data)


def _read_ifd0(data: bytes) -> list[tuple[int, int, int, bytes]]:
    if data[:4] == b"II*\x00":
        (off,) = struct.unpack_from("<I", data, 4)
        (n,) = struct.unpack_from("<H", data, off)
        entries, size, fmt, inline = off + 2, 12, "<HHI4s", 4
    elif data[:4] == b"II+\x00":
        (off,) = struct.unpack_from("<Q", data, 8)
        (n,) = struct.unpack_from("<Q", data, off)
        entries, size, fmt, inline = off + 8, 20, "<HHQ8s", 8
    else:
        raise ValueError("not a little-endian TIFF")
    out = []
    for i in range(n):
        tag, typ, count, raw = struct.unpack_from(fmt, data, entries + size * i)
        nbytes = _TYPE_SIZE[typ] * count
        if nbytes <= inline:
            value = raw[:nbytes]
        else:
            (voff,) = struct.unpack("<I" if inline == 4 else "<Q", raw)
            value = data[voff:voff + nbytes]
        out.append((tag, typ, count, value))
    return out


class COGAssembler:
    """One scene's mask COG from compressed tiles (``add_tiles``) and coarse or full-resolution blocks
    (``write_block``), in any order; ``finish`` writes the file. Memory: the tile index; disk: the tiles' bytes
    and a compressed scratch raster of the coarse level."""

    def __init__(self, work: Path, shape: tuple[int, int], transform, crs, *, blocksize: int, levels: int,
                 nodata: int, palette: dict, tags: dict, band_tags: dict, description: str = "class"):
        import rasterio

        self.work = Path(work)
        self.shape = (int(shape[0]), int(shape[1]))
        self.bs = int(blocksize)
        self.nodata = int(nodata)
        self.n_ovr = overview_count(self.shape, self.bs)
        self.levels = min(int(levels), self.n_ovr + 1)  # the first level the writer builds itself
        self.meta = (transform, crs, palette, tags, band_tags, description)
        self.index: dict[tuple[int, int, int], tuple[int, int]] = {}  # (level, row, col) -> (offset, size)
        self.work.mkdir(parents=True, exist_ok=True)
        self.data_path = self.work / "cog.tiles"
        self._data = open(self.data_path, "wb")
        self._size = 0
        self.scratch_path = None
        self._scratch = None
        if self.levels <= self.n_ovr:
            rows, cols = level_shape(self.shape, self.levels)
            self.scratch_path = self.work / f"cog.level{self.levels}.tif"
            # georeferenced like the level it holds (the full resolution when the writer encodes everything)
            scale = 2 ** self.levels
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._scratch = rasterio.open(
                    self.scratch_path, "w", driver="GTiff", width=cols, height=rows, count=1, dtype="uint8",
                    nodata=nodata, tiled=True, blockxsize=256, blockysize=256, compress="zstd", zstd_level=1,
                    bigtiff="IF_SAFER", sparse_ok=True, crs=crs, transform=transform @ Affine.scale(scale))

    # -- taking blocks
    def add_tiles(self, tiles) -> None:
        for level, r, c, data in tiles:
            self._append(level, r, c, data)

    def _append(self, level: int, r: int, c: int, data: bytes) -> None:
        self._data.write(data)
        self.index[(level, r, c)] = (self._size, len(data))
        self._size += len(data)

    def close_scratch(self) -> Path:
        """Close the scratch raster for reading (the full resolution when ``levels`` is 0: a sieve pass)."""
        if not self._scratch.closed:
            self._scratch.close()
        return self.scratch_path

    def write_coarse(self, arr: np.ndarray, row_off: int, col_off: int) -> None:
        """A block's raster at level ``self.levels`` (its offset in that level's pixels)."""
        from rasterio.windows import Window

        self._scratch.write(arr, 1, window=Window(col_off, row_off, arr.shape[1], arr.shape[0]))

    # -- the file
    def finish(self, dst: Path) -> Path:
        """Encode the levels the workers did not, then write ``dst`` (to a temporary name, renamed into place)."""
        self._encode_remaining()
        self._data.close()
        tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")
        try:
            self._write_file(tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        self.cleanup()
        return Path(dst)

    def _encode_remaining(self) -> None:
        """Levels ``self.levels`` .. last, from the coarse scratch raster, a strip of tile rows at a time (memory:
        two tile rows of that level)."""
        if self._scratch is None:
            return
        from rasterio.windows import Window

        import rasterio

        self.close_scratch()
        with rasterio.open(self.scratch_path) as src:
            level = self.levels
            rows, cols = level_shape(self.shape, level)
            step = 2 * self.bs  # two tile rows of this level -> one of the next
            nxt: list[np.ndarray] = []
            for r0 in range(0, rows, step):
                strip = src.read(1, window=Window(0, r0, cols, min(step, rows - r0)))
                self._strip(level, r0, strip)
                if level < self.n_ovr:
                    nxt.append(mode2x2(strip, self.nodata))
        arr = np.concatenate(nxt) if nxt else None
        for level in range(self.levels + 1, self.n_ovr + 1):  # small from here on: 1/4 of the coarse level
            self._strip(level, 0, arr)
            arr = mode2x2(arr, self.nodata) if level < self.n_ovr else None

    def _strip(self, level: int, r0: int, strip: np.ndarray) -> None:
        for i in range(0, strip.shape[0], self.bs):
            for j in range(0, strip.shape[1], self.bs):
                self._append(level, (r0 + i) // self.bs, j // self.bs,
                             encode_tile(strip[i:i + self.bs, j:j + self.bs], self.bs, self.nodata))

    def _write_file(self, path: Path) -> None:
        transform, crs, palette, tags, band_tags, description = self.meta
        base = _template_tags(self.shape, transform, crs, self.bs, self.nodata, palette, tags, band_tags,
                              description)
        grids = []  # per level: (rows, cols, tile rows, tile cols)
        for level in range(self.n_ovr + 1):
            rows, cols = level_shape(self.shape, level)
            grids.append((rows, cols, -(-rows // self.bs), -(-cols // self.bs)))
        missing = [(lv, r, c) for lv, (_, _, tr, tc) in enumerate(grids) for r in range(tr) for c in range(tc)
                   if (lv, r, c) not in self.index]
        if missing:
            raise OSError(f"{len(missing)} tiles of the mask were never written, e.g. {missing[:3]}")
        data_bytes = sum(size + 8 for _, size in self.index.values())  # each tile with its leader and trailer
        big = data_bytes + 1_000_000 + 64 * len(self.index) > 2**32 - 1
        ifds = []
        for level, (rows, cols, _, _) in enumerate(grids):
            if level == 0:
                entries = [(t, ty, n, v) for t, ty, n, v in base if t not in (TILE_OFFSETS, TILE_BYTE_COUNTS)]
            else:
                entries = [(NEW_SUBFILE_TYPE, 4, 1, struct.pack("<I", 1))]
                entries += [(t, ty, n, v) for t, ty, n, v in base if t in _OVERVIEW_TAGS]
                entries += [(IMAGE_WIDTH, 3, 1, struct.pack("<H", cols)) if cols < 65536
                            else (IMAGE_WIDTH, 4, 1, struct.pack("<I", cols)),
                            (IMAGE_LENGTH, 3, 1, struct.pack("<H", rows)) if rows < 65536
                            else (IMAGE_LENGTH, 4, 1, struct.pack("<I", rows))]
            ifds.append(entries)
        _write_tiff(path, ifds, grids, self.index, self.data_path, big)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._data.close()
        if self._scratch is not None:
            with contextlib.suppress(Exception):
                self._scratch.close()
        self.cleanup()

    def cleanup(self) -> None:
        self.data_path.unlink(missing_ok=True)
        if self.scratch_path is not None:
            self.scratch_path.unlink(missing_ok=True)


def _write_tiff(path: Path, ifds: list, grids: list, index: dict, data_path: Path, big: bool) -> None:
    """Header, ghost, IFDs (full resolution first), then tile data from the last level to the first, each tile
    with a 4-byte size leader and its last 4 bytes repeated after it (GDAL's COG layout)."""
    entry, count_fmt, off_fmt, inline = (20, "<Q", "<Q", 8) if big else (12, "<H", "<I", 4)
    header = 16 if big else 8
    offset_type = 16 if big else 4
    # IFD sizes: entries sorted by tag, the tile offsets and byte counts added; out-of-line values after each IFD
    layouts = []
    pos = header + len(GHOST)
    pos += pos % 2
    for level, entries in enumerate(ifds):
        _, _, tr, tc = grids[level]
        n_tiles = tr * tc
        full = sorted(entries + [(TILE_OFFSETS, offset_type, n_tiles, None), (TILE_BYTE_COUNTS, 4, n_tiles, None)])
        size = struct.calcsize(count_fmt) + entry * len(full) + struct.calcsize(off_fmt)
        extra = sum(_padded(_TYPE_SIZE[ty] * n) for _, ty, n, _ in full if _TYPE_SIZE[ty] * n > inline)
        layouts.append((pos, full))
        pos += size + extra
    # tile data positions: smallest overview first, each level row-major
    order = [(lv, r, c) for lv in range(len(grids) - 1, -1, -1)
             for r in range(grids[lv][2]) for c in range(grids[lv][3])]
    where: dict[tuple[int, int, int], int] = {}
    for key in order:
        where[key] = pos + 4  # after the size leader
        pos += index[key][1] + 8
    with open(path, "wb") as f:
        if big:
            f.write(b"II+\x00" + struct.pack("<HHQ", 8, 0, layouts[0][0]))
        else:
            f.write(b"II*\x00" + struct.pack("<I", layouts[0][0]))
        f.write(GHOST)
        if f.tell() % 2:
            f.write(b"\0")
        for level, (ifd_pos, full) in enumerate(layouts):
            _, _, tr, tc = grids[level]
            keys = [(level, r, c) for r in range(tr) for c in range(tc)]
            offsets = np.array([where[k] for k in keys], dtype="<u8" if big else "<u4").tobytes()
            counts = np.array([index[k][1] for k in keys], dtype="<u4").tobytes()
            assert f.tell() == ifd_pos, (f.tell(), ifd_pos)
            values = []
            value_pos = ifd_pos + struct.calcsize(count_fmt) + entry * len(full) + struct.calcsize(off_fmt)
            body = struct.pack(count_fmt, len(full))
            for tag, typ, n, value in full:
                value = offsets if tag == TILE_OFFSETS else counts if tag == TILE_BYTE_COUNTS else value
                if len(value) <= inline:
                    field = value.ljust(inline, b"\0")
                else:
                    field = struct.pack(off_fmt, value_pos)
                    values.append(value.ljust(_padded(len(value)), b"\0"))
                    value_pos += _padded(len(value))
                body += struct.pack("<HH", tag, typ) + struct.pack("<Q" if big else "<I", n) + field
            nxt = layouts[level + 1][0] if level + 1 < len(layouts) else 0
            body += struct.pack(off_fmt, nxt)
            f.write(body + b"".join(values))
        with open(data_path, "rb") as data:
            for key in order:
                off, size = index[key]
                data.seek(off)
                tile = data.read(size)
                f.write(struct.pack("<I", size) + tile + tile[-4:])
        f.flush()
        os.fsync(f.fileno())


def _padded(n: int) -> int:
    return n + (n % 2)
