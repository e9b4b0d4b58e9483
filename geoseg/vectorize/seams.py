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
(4-connected diagonal pixels that only the merge connects). Merging a group (``merge_groups``) cuts its rings at
such vertices, cancels the seam unit edges that appear in both directions (same-class pixels on both sides),
re-chains the pieces with the right-turn rule, drops the collinear vertices the cuts left, and starts each ring
at its lowest (row, col) vertex as GDAL does. The output equals a single ``rasterio.features.shapes`` of the
whole mask: same polygons, same vertices, same ring starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from rasterio.windows import Window

from geoseg._ragged import offsets as _offsets
from geoseg._ragged import ranges as _ranges
from geoseg._ragged import take as take_ragged
from geoseg._ragged import repeated
from geoseg.errors import InputError
from geoseg.vectorize.polygonize import BlockPolygons, COORD_BITS, CORNERS, E, OPPOSITE, PolygonSet, SIDE_STEP, W, polygon_keys, window_tuple


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
        for p in touching.tolist():
            g = base | p
            r0, r1 = po[p], po[p + 1]
            c0, c1 = ro[r0], ro[r1]
            flags = None if shared is None else shared[c0:c1]
            self._polys[g] = (cls[p], coords[c0:c1].copy(), ring_lens[r0:r1], flags)
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
            merged, ring_lens, rings_per = _merge_groups(
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


def _merge_groups(
    ring_coords: np.ndarray, ring_lens: np.ndarray, ring_group: np.ndarray, n_groups: int,
    vseams: np.ndarray, hseams: np.ndarray, shared: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rings (closed, GDAL orientation) of connected groups of block polygons -> each group's merged polygon.
    ``shared``: the blocks' ``BlockPolygons.shared`` flags of the coordinates, if every block sent them.

    Per group: cut the rings at every vertex on a seam line or shared by several rings, cancel the seam unit
    edges present in both directions (``_cut_rings``), re-chain the pieces with GDAL's pinch rule (turn right)
    and drop collinear vertices (``_rechain``), start each ring at its lowest (row, col) vertex and order
    them (``_order_rings``). Vectorized over all groups at once (keys carry the group); only the walk around
    the re-chained rings is a Python loop.

    Returns (closed ring coords, ring lengths, rings per group); per group the exterior first, then the holes
    by start vertex.
    """
    ring_lens = np.asarray(ring_lens, dtype=np.int64)
    ring_group = np.asarray(ring_group, dtype=np.int64)
    pieces, whole = _cut_rings(ring_coords, ring_lens, ring_group, vseams, hseams, shared)
    out_coords: list[np.ndarray] = []
    out_lens: list[np.ndarray] = []
    out_group: list[np.ndarray] = []
    if pieces.count:
        coords, lens_c, group_c = _rechain(pieces)
        out_coords.append(coords)
        out_lens.append(lens_c)
        out_group.append(group_c)
    if len(whole):  # rings with no cut vertex are kept as they are
        closed_off = _offsets(ring_lens)
        out_coords.append(ring_coords[_ranges(closed_off[whole], ring_lens[whole])].astype(np.int64))
        out_lens.append(ring_lens[whole])
        out_group.append(ring_group[whole])
    return _order_rings(np.concatenate(out_coords), np.concatenate(out_lens), np.concatenate(out_group), n_groups)


@dataclass
class _Pieces:
    """Ring pieces after cutting: arcs (index ranges into ``vertices``) then surviving seam runs (two points
    each, appended to ``vertices``); for each, its group, end points and first / last step directions."""

    vertices: np.ndarray
    group: np.ndarray
    start_pt: np.ndarray
    end_pt: np.ndarray
    first_dir: np.ndarray
    last_dir: np.ndarray
    base: np.ndarray
    start: np.ndarray
    length: np.ndarray
    modulo: np.ndarray

    @property
    def count(self) -> int:
        return len(self.group)


def _cut_rings(ring_coords: np.ndarray, ring_lens: np.ndarray, ring_group: np.ndarray, vseams: np.ndarray,
               hseams: np.ndarray, shared: np.ndarray | None = None) -> tuple[_Pieces, np.ndarray]:
    """Cut every ring at seam vertices and at vertices several rings of its group share; drop the seam unit
    edges present in both directions. Returns the pieces and the indices of rings with no cut."""
    n_in = len(ring_lens)
    closed_off = _offsets(ring_lens)
    is_closing = np.zeros(len(ring_coords), dtype=bool)
    is_closing[closed_off[1:] - 1] = True
    V = ring_coords[~is_closing].astype(np.int64)  # open rings
    lens = ring_lens - 1
    roff = _offsets(lens)
    onv = _on_lines(V[:, 0], vseams)
    onh = _on_lines(V[:, 1], hseams)
    # Vertices several rings of a group pass through are pinches whose pairing the blocks may have decided
    # differently (with 4-connectivity, diagonal pixels that only the merge connects): cut and re-pair them.
    # Off the seams such a vertex is one its block flagged (``shared``); else find them by sorting.
    if shared is None:
        shared = repeated((np.repeat(ring_group, lens) << (2 * COORD_BITS)) | (V[:, 1] << COORD_BITS) | V[:, 0])
    else:
        shared = shared[~is_closing]
    # Pieces: from each cut vertex to the next one of its ring (cyclically), ``n_seg`` segments long. Per-vertex
    # arrays are only the flags: ring, position and successor are computed at the cut vertices alone.
    ci = np.flatnonzero(onv | onh | shared)
    cr = np.searchsorted(roff, ci, side="right") - 1
    cs = ci - roff[cr]
    whole = np.flatnonzero(np.bincount(cr, minlength=n_in) == 0)
    first = np.concatenate([[True], cr[1:] != cr[:-1]])
    ring_first = np.flatnonzero(first)[np.cumsum(first) - 1]
    last = np.concatenate([first[1:], [True]])
    nxt_cut = np.empty_like(cs)
    nxt_cut[~last] = cs[1:][~last[:-1]]
    nxt_cut[last] = cs[ring_first[last]] + lens[cr[last]]
    n_seg = nxt_cut - cs
    q_idx = np.where(cs + 1 == lens[cr], roff[cr], ci + 1)  # a ring's last vertex is followed by its first
    P, Q = V[ci], V[q_idx]
    seam = (n_seg == 1) & (((P[:, 0] == Q[:, 0]) & onv[ci]) | ((P[:, 1] == Q[:, 1]) & onh[ci]))
    arc = ~seam
    a_ring, a_start, a_len = cr[arc], cs[arc], n_seg[arc]
    a_end_idx = roff[a_ring] + (a_start + a_len) % lens[a_ring]
    a_last_idx = roff[a_ring] + (a_start + a_len - 1) % lens[a_ring]
    run_s, run_e, run_g = _surviving_seam_runs(P[seam], Q[seam], ring_group[cr[seam]])
    n_run = len(run_s)
    pieces = _Pieces(
        vertices=np.concatenate([V, run_s]),
        group=np.concatenate([ring_group[a_ring], run_g]),
        start_pt=np.concatenate([V[ci[arc]], run_s]),
        end_pt=np.concatenate([V[a_end_idx], run_e]),
        first_dir=np.concatenate([np.sign(V[q_idx[arc]] - V[ci[arc]]), np.sign(run_e - run_s)]),
        last_dir=np.concatenate([np.sign(V[a_end_idx] - V[a_last_idx]), np.sign(run_e - run_s)]),
        base=np.concatenate([roff[a_ring], len(V) + np.arange(n_run)]),
        start=np.concatenate([a_start, np.zeros(n_run, np.int64)]),
        length=np.concatenate([a_len, np.ones(n_run, np.int64)]),
        modulo=np.concatenate([lens[a_ring], np.ones(n_run, np.int64)]),
    )
    return pieces, whole


def _on_lines(v: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """``np.isin(v, lines)`` for non-negative coordinates: one lookup instead of a pass per seam line."""
    table = np.zeros(max(int(v.max(initial=0)), int(lines.max(initial=0))) + 2, dtype=bool)
    table[lines] = True
    return table[v]


def _rechain(pc: _Pieces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chain pieces into closed rings: each piece's successor starts where it ends; at a pinch (two such), the
    right turn. Returns (closed ring coords without collinear vertices, ring lengths, ring groups)."""
    n_p = pc.count
    gshift = 2 * COORD_BITS
    skey = (pc.group << gshift) | (pc.start_pt[:, 1] << COORD_BITS) | pc.start_pt[:, 0]
    ekey = (pc.group << gshift) | (pc.end_pt[:, 1] << COORD_BITS) | pc.end_pt[:, 0]
    order = np.argsort(skey, kind="stable")
    sorted_keys = skey[order]
    lo = np.searchsorted(sorted_keys, ekey, side="left")
    hi = np.searchsorted(sorted_keys, ekey, side="right")
    if ((hi - lo) < 1).any() or ((hi - lo) > 2).any():
        raise RuntimeError("seam merge found an unmatched ring piece; this is a bug")
    c1 = order[lo]
    c2 = order[np.minimum(lo + 1, n_p - 1)]
    cross = pc.last_dir[:, 0] * pc.first_dir[c1, 1] - pc.last_dir[:, 1] * pc.first_dir[c1, 0]
    succ = np.where((hi - lo == 1) | (cross > 0), c1, c2).tolist()
    seen = bytearray(n_p)
    walk: list[int] = []
    cycle_len: list[int] = []
    for i in range(n_p):
        if seen[i]:
            continue
        j = i
        n0 = len(walk)
        while not seen[j]:
            seen[j] = 1
            walk.append(j)
            j = succ[j]
        if j != i:
            raise RuntimeError("seam merge could not close a ring; this is a bug")
        cycle_len.append(len(walk) - n0)
    c = np.asarray(walk)
    ln = pc.length[c]
    pos = _ranges(pc.start[c], ln)  # each piece's vertices (its end is the next piece's start), wrapping once
    mod = np.repeat(pc.modulo[c], ln)
    pos -= np.where(pos >= mod, mod, 0)
    idx = np.repeat(pc.base[c], ln) + pos
    coords, lens_c = _clean_rings(pc.vertices, idx, _offsets(ln)[:-1], np.repeat(np.arange(len(cycle_len)), cycle_len))
    return coords, lens_c, pc.group[c[_offsets(cycle_len)[:-1]]]


def _order_rings(coords: np.ndarray, lens_out: np.ndarray, group_out: np.ndarray,
                 n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group the exterior first, then the holes by start vertex; checks one exterior per group."""
    off = _offsets(lens_out)
    # Signed area per closed ring, exact in int64 (its last vertex repeats the first and starts no segment).
    x, y = coords[:, 0].astype(np.int64), coords[:, 1].astype(np.int64)
    cross_v = x[:-1] * y[1:] - x[1:] * y[:-1]
    cross_v[off[1:-1] - 1] = 0
    signs = np.add.reduceat(cross_v, off[:-1])
    n_ext = np.bincount(group_out[signs < 0], minlength=n_groups)
    if (n_ext != 1).any() or (signs == 0).any():
        raise RuntimeError(f"seam merge produced {n_ext.max()} exterior rings for a polygon (expected 1): a bug")
    first_key = (y[off[:-1]] << COORD_BITS) | x[off[:-1]]
    ring_order = np.lexsort((first_key, signs > 0, group_out))  # by group: exterior, then holes by start
    if not (ring_order == np.arange(len(ring_order))).all():
        coords = coords[_ranges(off[ring_order], lens_out[ring_order])]
    return coords.astype(np.int32, copy=False), lens_out[ring_order], np.bincount(group_out, minlength=n_groups)


def _surviving_seam_runs(
    p: np.ndarray, q: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seam segments p -> q (of ``group``) as unit edges; drop those present in both directions within a group;
    rejoin the rest into runs. Returns (run starts, run ends, run groups)."""
    if len(p) == 0:
        z = np.zeros((0, 2), dtype=np.int64)
        return z, z, np.zeros(0, dtype=np.int64)
    step = np.sign(q - p)
    length = np.abs(q - p).sum(axis=1)
    seg_id = np.repeat(np.arange(len(p)), length)
    t = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    st = step[seg_id]
    a = p[seg_id] + st * t[:, None]
    b = a + st
    lo = np.minimum(a, b)
    vertical = (st[:, 0] == 0).astype(np.int64)
    undirected = (((group[seg_id] << (2 * COORD_BITS)) | (lo[:, 1] << COORD_BITS) | lo[:, 0]) << 1) | vertical
    alive = ~repeated(undirected)
    first = t == 0
    last = t == length[seg_id] - 1
    prev_alive = np.concatenate([[False], alive[:-1]])
    next_alive = np.concatenate([alive[1:], [False]])
    run_start = alive & (first | ~prev_alive)
    run_end = alive & (last | ~next_alive)
    return a[run_start], b[run_end], group[seg_id[run_start]]


def _clean_rings(vertices: np.ndarray, idx: np.ndarray, joints: np.ndarray,
                 joint_ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Open rings given as indices ``idx`` into ``vertices``, ring after ring; ``joints`` are the positions in
    ``idx`` where a piece starts (ascending), ``joint_ring`` their ring. Drops collinear vertices, starts each
    ring at its lowest (row, col) vertex and closes it. Only joints can be collinear (GDAL's rings have no
    collinear vertex, and a piece keeps its inner vertices' neighbours), so only they are tested. Returns (closed
    coords, ring lengths)."""
    ring_first = np.flatnonzero(np.r_[True, joint_ring[1:] != joint_ring[:-1]])  # a ring's first joint
    ring_start = joints[ring_first]
    ring_end = np.r_[ring_start[1:], len(idx)]
    prev = joints - 1
    prev[ring_first] = ring_end - 1
    nxt = joints + 1
    at_end = nxt == ring_end[joint_ring]
    nxt[at_end] = ring_start[joint_ring[at_end]]
    v, p, n = vertices[idx[joints]], vertices[idx[prev]], vertices[idx[nxt]]
    keep = np.ones(len(idx), dtype=bool)
    keep[joints] = (np.sign(v - p) != np.sign(n - v)).any(axis=1)
    counts = np.add.reduceat(keep, ring_start).astype(np.int64) if len(idx) else np.zeros(0, np.int64)
    idx = idx[keep]
    off = _offsets(counts)
    # Rotate each ring to its lowest (row, col) vertex; it is never a pinch, so it occurs once per ring.
    key = (vertices[idx, 1] << COORD_BITS) | vertices[idx, 0]
    low = np.minimum.reduceat(key, off[:-1])
    start = np.flatnonzero(key == np.repeat(low, counts)) - off[:-1]
    # closed ring r: positions 0..n_r, source off[r] + (start[r] + j) mod n_r
    n_closed = counts + 1
    src = _ranges(off[:-1] + start, n_closed)
    ends = np.repeat(off[1:], n_closed)
    src -= np.where(src >= ends, np.repeat(counts, n_closed), 0)
    return vertices[idx[src]], n_closed
