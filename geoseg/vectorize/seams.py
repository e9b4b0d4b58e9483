"""Seam merge: blocks' polygons in any order -> the polygons of one whole-mask polygonize.

``SeamMerger`` takes blocks in any order. A polygon that touches no internal block edge is final at once.
Polygons that do are joined across seams (union-find on the side intervals: overlapping same-class intervals
for 4-connectivity, also touching ones -- diagonal neighbours -- for 8, plus block corners) and a group is
emitted as soon as no block it touches is unseen. Memory holds only the open seams and the polygons still
touching them.

Exact rings. GDAL traces every ring with the region on its left (exteriors counter-clockwise on screen, holes
clockwise) and, at a pinch vertex (two diagonal pixels of the region), always turns right, for either
connectivity (the tests check ring-for-ring equality on random masks). A block's rings are therefore those of
the whole mask except at vertices on its edges, and at vertices where rings of two of its polygons meet
(4-connected diagonal pixels that only the merge connects). Merging a group (``rings.merge_groups``) cuts its rings at
such vertices, cancels the seam unit edges that appear in both directions (same-class pixels on both sides),
re-chains the pieces with the right-turn rule, drops the collinear vertices the cuts left, and starts each ring
at its lowest (row, col) vertex as GDAL does. The output equals a single ``rasterio.features.shapes`` of the
whole mask: same polygons, same vertices, same ring starts.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from rasterio.windows import Window

from geoseg._ragged import offsets as _offsets
from geoseg._ragged import ranges as _ranges
from geoseg._ragged import take as take_ragged
from geoseg.errors import InputError
from geoseg.vectorize.polygonize import (BlockPolygons, COORD_BITS, CORNERS, E, OPPOSITE, PolygonSet, SIDE_STEP, W,
                                         polygon_keys, window_tuple)
from geoseg.vectorize.rings import merge_groups


# ------------------------------------------------------------------------------------------ seam merge


def block_windows(shape: tuple[int, int], block_px: int) -> list[Window]:
    """Row-major grid of ``block_px`` windows covering a ``(rows, cols)`` raster (edge blocks clipped)."""
    rows, cols = shape
    if block_px <= 0:
        raise InputError(f"block_px must be positive, got {block_px}")
    return [
        Window(c, r, min(block_px, cols - c), min(block_px, rows - r))
        for r in range(0, rows, block_px)
        for c in range(0, cols, block_px)
    ]


def corner_polygon(block: BlockPolygons, di: int, dj: int) -> int | None:
    """Local index of the polygon owning the block's corner pixel towards (di, dj), if any."""
    col_off, row_off, width, height = block.window
    polys, start, end = block.seams[W if dj < 0 else E]
    if len(start) == 0:
        return None
    if di < 0:
        return int(polys[0]) if start[0] == row_off else None
    return int(polys[-1]) if end[-1] == row_off + height else None


class _Group:
    __slots__ = ("pending", "members", "key")

    def __init__(self, member: int, key: int):
        self.pending = 0
        self.members = [member]
        self.key = key


class SeamMerger:
    """Streaming cross-block merge: blocks in any order in, finished polygons out.

    ``shape`` is the raster's ``(rows, cols)``; the block layout is a regular grid given by ``block_px`` or by
    the list of block ``windows`` (any grid of column and row edges). ``add`` returns the polygons that can no
    longer touch an unseen block; ``finish`` returns the rest (normally nothing; if blocks never arrived, the
    groups as far as they got). Together they equal ``polygonize_array`` of the whole mask.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        block_px: int | None = None,
        windows: Sequence[Window] | None = None,
        connectivity: int = 4,
    ):
        rows, cols = int(shape[0]), int(shape[1])
        if connectivity not in (4, 8):
            raise InputError(f"connectivity must be 4 or 8, got {connectivity!r}")
        if (block_px is None) == (windows is None):
            raise InputError("SeamMerger needs exactly one of block_px or windows")
        if rows >= 1 << COORD_BITS or cols >= 1 << COORD_BITS:
            raise InputError(f"raster of {rows} x {cols} pixels is too large to vectorize (max {1 << COORD_BITS})")
        if windows is None:
            wins = block_windows((rows, cols), int(block_px))
        else:
            wins = [Window(*window_tuple(w)) for w in windows]
        col_edges = sorted({int(w.col_off) for w in wins} | {cols})
        row_edges = sorted({int(w.row_off) for w in wins} | {rows})
        if col_edges[0] != 0 or row_edges[0] != 0:
            raise InputError("block windows must cover the raster from (0, 0)")
        self.shape = (rows, cols)
        self.connectivity = connectivity
        self._col_edges = np.asarray(col_edges)
        self._row_edges = np.asarray(row_edges)
        self._ncb = len(col_edges) - 1
        self._nrb = len(row_edges) - 1
        self._col_index = {c: i for i, c in enumerate(col_edges[:-1])}
        self._row_index = {r: i for i, r in enumerate(row_edges[:-1])}
        self._vseams = np.asarray(col_edges[1:-1], dtype=np.int64)
        self._hseams = np.asarray(row_edges[1:-1], dtype=np.int64)
        self._seen: set[int] = set()
        self._seen_per_row = np.zeros(self._nrb, dtype=np.int64)
        # Open seams: (block, side) -> (gids, start, end, class) of the side's intervals; (block, corner) -> gid.
        self._open_sides: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._open_corners: dict[tuple[int, tuple[int, int]], tuple[int, int] | None] = {}
        self._parent: dict[int, int] = {}
        self._groups: dict[int, _Group] = {}
        self._polys: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # gid -> (class, coords, ring lengths)

    # -- union-find
    def _find(self, g: int) -> int:
        parent = self._parent
        root = g
        while parent[root] != root:
            root = parent[root]
        while parent[g] != root:  # path compression
            parent[g], g = root, parent[g]
        return root

    def _union(self, a: int, b: int) -> int:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return ra
        ga, gb = self._groups[ra], self._groups[rb]
        if len(ga.members) < len(gb.members):
            ra, rb, ga, gb = rb, ra, gb, ga
        self._parent[rb] = ra
        ga.members.extend(gb.members)
        ga.pending += gb.pending
        ga.key = min(ga.key, gb.key)
        del self._groups[rb]
        return ra

    # -- state for callers that batch finished polygons by position (row bands)
    def rows_complete_until(self) -> int:
        """All blocks of raster rows ``< this`` have been added."""
        full = self._seen_per_row == self._ncb
        k = int(np.argmin(full)) if not full.all() else self._nrb
        return int(self._row_edges[k])

    @property
    def open_polygons(self) -> int:
        """Polygons held because they touch a seam of an unseen block."""
        return len(self._polys)

    def _block_index(self, window: tuple[int, int, int, int]) -> tuple[int, int]:
        col_off, row_off, width, height = window
        try:
            bi, bj = self._row_index[row_off], self._col_index[col_off]
        except KeyError:
            raise InputError(f"block window {window} is not on the merger's block grid") from None
        if (self._col_edges[bj + 1] - col_off, self._row_edges[bi + 1] - row_off) != (width, height):
            raise InputError(f"block window {window} is not on the merger's block grid")
        return bi, bj

    def add(self, block: BlockPolygons) -> PolygonSet:
        """Merge one block; return the polygons (of any blocks) that are now final."""
        b, bi, bj = self._register(block)
        touch, corner_poly = self._touching(block, bi, bj)
        keys = polygon_keys(block.coords, block.ring_offsets, block.poly_offsets, self.shape[1])
        finals = []
        idle = np.flatnonzero(~touch)
        if len(idle):  # polygons on no internal edge are final at once
            coords, ring_off, poly_off = take_ragged(block.coords, block.ring_offsets, block.poly_offsets, idle)
            finals.append(PolygonSet(coords, ring_off, poly_off, block.class_ids[idle], keys[idle]))
        candidates = self._hold(block, b, np.flatnonzero(touch), keys)
        candidates |= self._join_sides(block, b, bi, bj)
        candidates |= self._join_corners(block, b, bi, bj, corner_poly)
        done = {r for r in (self._find(g) for g in candidates) if self._groups[r].pending == 0}
        finals.extend(self._emit(sorted(done)))
        return PolygonSet.concat(finals)

    def _register(self, block: BlockPolygons) -> tuple[int, int, int]:
        """Check and record a new block: (block number, block row, block column)."""
        if block.connectivity != self.connectivity:
            raise InputError(
                f"block polygonized with connectivity {block.connectivity}, merger uses {self.connectivity}"
            )
        bi, bj = self._block_index(block.window)
        b = bi * self._ncb + bj
        if b in self._seen:
            raise InputError(f"block {block.window} was added twice")
        self._seen.add(b)
        self._seen_per_row[bi] += 1
        return b, bi, bj

    def _neighbour(self, bi: int, bj: int, di: int, dj: int) -> int | None:
        """The block number across (di, dj), or None outside the raster."""
        i, j = bi + di, bj + dj
        return i * self._ncb + j if 0 <= i < self._nrb and 0 <= j < self._ncb else None

    def _touching(self, block: BlockPolygons, bi: int, bj: int) -> tuple[np.ndarray, dict]:
        """Which polygons touch an internal edge (or, for 8-connectivity, an internal corner), and the polygon at
        each internal corner."""
        touch = np.zeros(len(block), dtype=bool)
        for side, (di, dj) in SIDE_STEP.items():
            if self._neighbour(bi, bj, di, dj) is not None:
                touch |= (block.sides & side) != 0
        corner_poly: dict[tuple[int, int], int | None] = {}
        if self.connectivity == 8:
            for di, dj in CORNERS:
                if self._neighbour(bi, bj, di, dj) is None:
                    continue
                p = self._corner_polygon(block, di, dj)
                corner_poly[(di, dj)] = p
                if p is not None:
                    touch[p] = True
        return touch, corner_poly

    def _hold(self, block: BlockPolygons, b: int, touching: np.ndarray, keys: np.ndarray) -> set[int]:
        """Keep the polygons that touch a seam until their group is complete; their global ids."""
        base = b << 32
        po, ro, cls = block.poly_offsets.tolist(), block.ring_offsets.tolist(), block.class_ids.tolist()
        ring_lens, coords, shared = np.diff(block.ring_offsets), block.coords, block.shared
        whole = len(touching) == len(block)  # views then keep nothing else of the block alive
        for p in touching.tolist():
            g = base | p
            r0, r1 = po[p], po[p + 1]
            c0, c1 = ro[r0], ro[r1]
            flags = None if shared is None else shared[c0:c1]
            self._polys[g] = (cls[p], coords[c0:c1] if whole else coords[c0:c1].copy(), ring_lens[r0:r1], flags)
            self._parent[g] = g
            self._groups[g] = _Group(g, int(keys[p]))
        return {base | p for p in touching.tolist()}

    def _join_sides(self, block: BlockPolygons, b: int, bi: int, bj: int) -> set[int]:
        """Seams with each side's neighbour: join with a seen one, or leave open for an unseen one. Returns the
        groups that may have become complete."""
        base = b << 32
        candidates: set[int] = set()
        for side, (di, dj) in SIDE_STEP.items():
            nb = self._neighbour(bi, bj, di, dj)
            if nb is None:
                continue
            polys, start, end = block.seams[side]
            gids = base | polys.astype(np.int64)
            if nb in self._seen:
                o_gids, o_start, o_end, o_cls = self._open_sides.pop((nb, OPPOSITE[side]))
                ia, ib = _match_intervals(start, end, o_start, o_end, self.connectivity)
                same = block.class_ids[polys[ia]] == o_cls[ib]
                for ga, gb in zip(gids[ia[same]].tolist(), o_gids[ib[same]].tolist()):
                    self._union(ga, gb)
                for g in np.unique(o_gids).tolist():
                    self._groups[self._find(g)].pending -= 1
                    candidates.add(g)
            else:
                self._open_sides[(b, side)] = (gids, start, end, block.class_ids[polys])
                for g in np.unique(gids).tolist():
                    self._groups[self._find(g)].pending += 1
        return candidates

    def _join_corners(self, block: BlockPolygons, b: int, bi: int, bj: int, corner_poly: dict) -> set[int]:
        """8-connectivity: diagonal neighbours meet at block corners; same as ``_join_sides`` for corners."""
        base = b << 32
        candidates: set[int] = set()
        for (di, dj), p in corner_poly.items():
            nb = self._neighbour(bi, bj, di, dj)
            mine = None if p is None else (base | p, int(block.class_ids[p]))
            if nb in self._seen:
                other = self._open_corners.pop((nb, (-di, -dj)))
                if other is not None:
                    if mine is not None and mine[1] == other[1]:
                        self._union(mine[0], other[0])
                    self._groups[self._find(other[0])].pending -= 1
                    candidates.add(other[0])
            else:
                self._open_corners[(b, (di, dj))] = mine
                if mine is not None:
                    self._groups[self._find(mine[0])].pending += 1
        return candidates

    def _corner_polygon(self, block: BlockPolygons, di: int, dj: int) -> int | None:
        return corner_polygon(block, di, dj)

    def finish(self) -> PolygonSet:
        """Emit every group still open (all of them final once every block was added)."""
        self._open_sides.clear()
        self._open_corners.clear()
        out = self._emit(sorted(self._groups))
        return PolygonSet.concat(out)

    def _emit(self, roots: Iterable[int]) -> list[PolygonSet]:
        """Pop finished groups: single polygons pass through; multi-block groups are merged in one pass."""
        single: list[tuple[int, int, int]] = []  # (gid, class, key)
        multi: list[tuple[list[int], int, int]] = []
        for r in roots:
            group = self._groups.pop(r)
            cls = self._polys[group.members[0]][0]
            if len(group.members) == 1:
                single.append((group.members[0], cls, group.key))
            else:
                multi.append((group.members, cls, group.key))
        out = []
        if single:
            polys = [self._polys.pop(g) for g, _, _ in single]
            lens = [p[2] for p in polys]
            out.append(PolygonSet(
                np.concatenate([p[1] for p in polys]),
                _offsets(np.concatenate(lens)),
                _offsets([len(x) for x in lens]),
                np.asarray([c for _, c, _ in single], dtype=np.uint8),
                np.asarray([k for _, _, k in single], dtype=np.int64),
            ))
            for g, _, _ in single:
                del self._parent[g]
        # Keys pack the group index above 44 bits of coordinates: merge at most 2**18 groups per pass.
        for k in range(0, len(multi), 1 << 18):
            chunk = multi[k : k + (1 << 18)]
            coords, lens, ring_group, flags = [], [], [], []
            for gi, (members, _, _) in enumerate(chunk):
                for m in members:
                    _, c, rl, sh = self._polys.pop(m)
                    del self._parent[m]
                    coords.append(c)
                    lens.append(rl)
                    ring_group.append(np.full(len(rl), gi, dtype=np.int64))
                    flags.append(sh)
            merged, ring_lens, rings_per = merge_groups(
                np.concatenate(coords), np.concatenate(lens), np.concatenate(ring_group), len(chunk),
                self._vseams, self._hseams, None if any(f is None for f in flags) else np.concatenate(flags),
            )
            out.append(PolygonSet(
                merged,
                _offsets(ring_lens),
                _offsets(rings_per),
                np.asarray([c for _, c, _ in chunk], dtype=np.uint8),
                np.asarray([k for _, _, k in chunk], dtype=np.int64),
            ))
        return out


def _match_intervals(a0, a1, b0, b1, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs of intervals (sorted, disjoint per side) that touch across a seam.

    4-connectivity: they share at least one pixel row (overlap). 8: also diagonal neighbours (end == start).
    """
    if len(a0) == 0 or len(b0) == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    if connectivity == 4:
        lo = np.searchsorted(b1, a0, side="right")
        hi = np.searchsorted(b0, a1, side="left")
    else:
        lo = np.searchsorted(b1, a0, side="left")
        hi = np.searchsorted(b0, a1, side="right")
    cnt = np.maximum(hi - lo, 0)
    return np.repeat(np.arange(len(a0), dtype=np.int64), cnt), _ranges(lo, cnt)
