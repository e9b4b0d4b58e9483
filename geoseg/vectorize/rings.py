"""Merging a group's rings across seams (``merge_groups``): the exact-ring half of ``geoseg.vectorize.seams``.

Each ring is cut at its vertices on seam lines and at vertices several rings of its group share (pinches), the
seam unit edges present in both directions are cancelled, and the pieces are re-chained with GDAL's right-turn
rule at pinches. The merged rings then drop the collinear vertices the cuts left and start at their lowest
(row, col) vertex, exterior first, as one polygonize of the whole mask would give them.

Cost. The seam polygons are few but large (in a 268 MP benchmark, 2.4% of polygons held 40% of all vertices), so
everything per vertex is kept to a few passes: the cut flags, one minimum per piece and one final gather. The
rest works per piece: pieces are index ranges into the input, whose inner vertices are never touched. A vertex is
handled as one int64 key (its (x, y) int32 pair read as one integer), which orders vertices by (row, col).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from geoseg._ragged import offsets as _offsets
from geoseg._ragged import ranges as _ranges
from geoseg._ragged import repeated
from geoseg.vectorize.polygonize import COORD_BITS, repeated_vertices

__all__ = ["merge_groups"]


def merge_groups(
    ring_coords: np.ndarray, ring_lens: np.ndarray, ring_group: np.ndarray, n_groups: int,
    vseams: np.ndarray, hseams: np.ndarray, shared: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rings (closed, GDAL orientation) of connected groups of block polygons -> each group's merged polygon.
    ``shared``: the blocks' ``BlockPolygons.shared`` flags of the coordinates, if every block sent them.

    Returns (closed ring coords (int32), ring lengths, rings per group); per group the exterior first, then the
    holes by start vertex.
    """
    coords = np.ascontiguousarray(ring_coords, dtype=np.int32)
    ring_lens = np.asarray(ring_lens, dtype=np.int64)
    ring_group = np.asarray(ring_group, dtype=np.int64)
    off = _offsets(ring_lens)
    closing = off[1:] - 1
    keys = _vertex_keys(coords)
    cut = _on_lines(coords[:, 0], vseams)
    cut |= _on_lines(coords[:, 1], hseams)
    # Vertices several rings of a group pass through are pinches whose pairing the blocks may have decided
    # differently (with 4-connectivity, diagonal pixels that only the merge connects): cut and re-pair them.
    # Off the seams such a vertex is one its block flagged (``shared``); else they are found by sorting.
    cut |= repeated_vertices(coords, off, ring_group) if shared is None else shared
    cut[closing] = False
    ci = np.flatnonzero(cut)
    cr = np.searchsorted(off, ci, side="right") - 1
    whole = np.flatnonzero(np.bincount(cr, minlength=len(ring_lens)) == 0)
    pieces, run_keys = _cut(coords, off, ring_lens - 1, ring_group, ci, cr, vseams, hseams)
    # the keys of every vertex a piece can start at, then a sentinel (``_segment_min`` reads one past the end)
    keys = np.concatenate([keys, run_keys, [np.iinfo(np.int64).max]])
    # Output rings as key segments: (segment starts, counts, ring of each; per ring its lowest key and group).
    parts = []
    if len(pieces.group):
        walk, cycle_len = _chain(pieces)
        parts.append((*_rotated_segments(keys, *_subpieces(pieces, walk, cycle_len)),
                      pieces.group[walk[_offsets(cycle_len)[:-1]]]))
    if len(whole):  # rings with no cut vertex are kept as they are (GDAL started them at their lowest vertex)
        n_before = len(parts[0][3]) if parts else 0
        parts.append((off[whole], ring_lens[whole], n_before + np.arange(len(whole)), keys[off[whole]],
                      ring_group[whole]))
    starts, counts, seg_r, rkey, rgroup = (np.concatenate(a) for a in zip(*parts))
    # Per group, the exterior first: its lowest vertex is the group's lowest (holes lie strictly below its top
    # row); then the holes by their start vertex.
    ring_order = np.lexsort((rkey, rgroup))
    rank = np.empty_like(ring_order)
    rank[ring_order] = np.arange(len(ring_order))
    seg_order = np.argsort(rank[seg_r], kind="stable")  # segments stay in ring order within a ring
    ring_len = np.bincount(rank[seg_r], weights=counts, minlength=len(ring_order)).astype(np.int64)
    out = keys[_ranges(starts[seg_order], counts[seg_order])]
    return _coords_from_keys(out), ring_len, np.bincount(rgroup, minlength=n_groups)


def _vertex_keys(coords: np.ndarray) -> np.ndarray:
    """One int64 per (x, y) int32 vertex, ordered by (y, x): the pair itself on little-endian machines."""
    if sys.byteorder == "little":
        return coords.view(np.int64).reshape(-1)
    return coords[:, 0].astype(np.int64) | (coords[:, 1].astype(np.int64) << 32)


def _keys_of(xy: np.ndarray) -> np.ndarray:
    """``_vertex_keys`` of (n, 2) int64 points."""
    return xy[:, 0] | (xy[:, 1] << 32)


def _coords_from_keys(keys: np.ndarray) -> np.ndarray:
    """(n, 2) int32 vertices back from ``_vertex_keys``."""
    if sys.byteorder == "little":
        return keys.view(np.int32).reshape(-1, 2)
    return np.column_stack([keys & 0xFFFFFFFF, keys >> 32]).astype(np.int32)


@dataclass
class _Pieces:
    """Ring pieces: arcs of input rings, then surviving seam runs. A piece's own vertices are the keys at
    ``base`` + positions ``start`` .. ``start + count - 1`` taken modulo ``modulo`` (its ring's open length; a
    run has one own vertex, its start, after the input's keys); its end vertex is the next piece's start. Per
    piece also its group, end points and first / last unit step."""

    group: np.ndarray
    start_pt: np.ndarray
    end_pt: np.ndarray
    first_dir: np.ndarray
    last_dir: np.ndarray
    base: np.ndarray
    start: np.ndarray
    count: np.ndarray
    modulo: np.ndarray


def _cut(coords: np.ndarray, off: np.ndarray, open_lens: np.ndarray, ring_group: np.ndarray, ci: np.ndarray,
         cr: np.ndarray, vseams: np.ndarray, hseams: np.ndarray) -> tuple[_Pieces, np.ndarray]:
    """Pieces from the cut vertices ``ci`` (ascending, of rings ``cr``); seam unit edges present in both
    directions dropped, the rest rejoined into runs. Returns (pieces, the runs' start keys)."""
    cs = ci - off[cr]
    first = np.r_[True, cr[1:] != cr[:-1]]
    ring_first = np.flatnonzero(first)[np.cumsum(first) - 1]
    last = np.r_[first[1:], True]
    nxt_cut = np.empty_like(cs)
    nxt_cut[~last] = cs[1:][~last[:-1]]
    nxt_cut[last] = cs[ring_first[last]] + open_lens[cr[last]]
    n_seg = nxt_cut - cs
    # a closed ring's next coordinate after its last open vertex is its first: ci + 1 needs no wrap
    P, Q = coords[ci].astype(np.int64), coords[ci + 1].astype(np.int64)
    seam = (n_seg == 1) & (((P[:, 0] == Q[:, 0]) & _on_lines(P[:, 0], vseams))
                           | ((P[:, 1] == Q[:, 1]) & _on_lines(P[:, 1], hseams)))
    arc = ~seam
    a_ring, a_start, a_len = cr[arc], cs[arc], n_seg[arc]
    lens = open_lens[a_ring]
    end_pos = a_start + a_len
    end_pos -= np.where(end_pos >= lens, lens, 0)
    last_pos = end_pos - 1
    last_pos += np.where(last_pos < 0, lens, 0)
    end_pt = coords[off[a_ring] + end_pos].astype(np.int64)
    last_pt = coords[off[a_ring] + last_pos].astype(np.int64)
    run_s, run_e, run_g = _surviving_seam_runs(P[seam], Q[seam], ring_group[cr[seam]])
    n_run, n = len(run_s), len(coords)
    run_dir = np.sign(run_e - run_s)
    return _Pieces(
        group=np.concatenate([ring_group[a_ring], run_g]),
        start_pt=np.concatenate([P[arc], run_s]),
        end_pt=np.concatenate([end_pt, run_e]),
        first_dir=np.concatenate([np.sign(Q[arc] - P[arc]), run_dir]),
        last_dir=np.concatenate([np.sign(end_pt - last_pt), run_dir]),
        base=np.concatenate([off[a_ring], n + np.arange(n_run)]),  # where the ring's (or run's) keys start
        start=np.concatenate([a_start, np.zeros(n_run, np.int64)]),
        count=np.concatenate([a_len, np.ones(n_run, np.int64)]),
        modulo=np.concatenate([lens, np.ones(n_run, np.int64)]),
    ), _keys_of(run_s)


def _chain(pc: _Pieces) -> tuple[np.ndarray, np.ndarray]:
    """Chain pieces into closed rings: each piece's successor starts where it ends; at a pinch (two such), the
    right turn. Returns (the pieces in ring order, ring after ring; pieces per ring)."""
    n_p = len(pc.group)
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
    return np.asarray(walk, dtype=np.int64), np.asarray(cycle_len, dtype=np.int64)


def _subpieces(pc: _Pieces, walk: np.ndarray, cycle_len: np.ndarray):
    """The chained pieces as contiguous key segments, in ring order: (starts, counts, ring of each). A piece
    that wraps past its ring's end is two segments. A joint (a piece's first vertex) where the ring goes
    straight on is dropped (only joints can be collinear: GDAL's rings have none, and a piece keeps its inner
    vertices' neighbours)."""
    cyc_off = _offsets(cycle_len)
    prev = np.arange(len(walk)) - 1
    prev[cyc_off[:-1]] = cyc_off[1:] - 1  # a ring's first piece follows its last
    straight = (pc.last_dir[walk[prev]] == pc.first_dir[walk]).all(axis=1)
    skip = straight.astype(np.int64)
    start, count, modulo = pc.start[walk] + skip, pc.count[walk] - skip, pc.modulo[walk]
    start -= np.where(start >= modulo, modulo, 0)  # a dropped joint at a ring's last position
    head = np.minimum(count, modulo - start)  # the part before the ring's end, then the wrapped rest
    ring = np.repeat(np.arange(len(cycle_len)), cycle_len)
    base = pc.base[walk]
    wraps = np.flatnonzero(count > head)
    starts = np.insert(base + start, wraps + 1, base[wraps])
    counts = np.insert(head, wraps + 1, count[wraps] - head[wraps])
    return starts, counts, np.insert(ring, wraps + 1, ring[wraps])


def _rotated_segments(keys: np.ndarray, starts: np.ndarray, counts: np.ndarray, ring: np.ndarray):
    """Each ring's segments rotated to start at its lowest vertex and closed: (segment starts, counts, ring of
    each, ring order within a ring kept; each ring's lowest key)."""
    n_rings = int(ring[-1]) + 1
    nonempty = np.flatnonzero(counts > 0)
    smin = np.full(len(starts), np.iinfo(np.int64).max)
    smin[nonempty] = _segment_min(keys, starts[nonempty], counts[nonempty])
    seg_off = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    rmin = np.minimum.reduceat(smin, seg_off)
    chosen = np.flatnonzero(smin == rmin[ring])  # the lowest vertex is no pinch: in one segment of its ring
    if len(chosen) != n_rings:
        raise RuntimeError("seam merge found no single lowest vertex of a ring; this is a bug")
    at = _find_in_segments(keys, starts[chosen], counts[chosen], rmin)
    # ranks in the ring: the chosen segment's tail first, the others in order after it, its head, the closing
    seg_n = np.diff(np.r_[seg_off, len(starts)])
    rank = np.arange(len(starts)) - np.repeat(chosen, seg_n)
    rank += np.where(rank < 0, np.repeat(seg_n, seg_n), 0)
    s, c = starts.copy(), counts.copy()
    s[chosen] += at
    c[chosen] -= at
    all_s = np.concatenate([s, starts[chosen], starts[chosen] + at])
    all_c = np.concatenate([c, at, np.ones(n_rings, np.int64)])
    all_ring = np.concatenate([ring, np.arange(n_rings), np.arange(n_rings)])
    all_rank = np.concatenate([rank, seg_n, seg_n + 1])
    order = np.lexsort((all_rank, all_ring))
    return all_s[order], all_c[order], all_ring[order], rmin


def _segment_min(keys: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Minimum of ``keys[s : s + c]`` per (disjoint, non-empty) segment; ``keys`` ends with a sentinel past
    every segment. One ``reduceat`` over the segments in address order (the gaps between them cost one pass)."""
    order = np.argsort(starts, kind="stable")
    idx = np.empty(2 * len(order), dtype=np.int64)
    idx[0::2] = starts[order]
    idx[1::2] = starts[order] + counts[order]
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.minimum.reduceat(keys, idx)[0::2]
    return out


def _find_in_segments(keys: np.ndarray, starts: np.ndarray, counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Position in each segment of its target key (which occurs there exactly once)."""
    idx = _ranges(starts, counts)
    hit = np.flatnonzero(keys[idx] == np.repeat(targets, counts))
    seg_off = _offsets(counts)
    seg = np.searchsorted(seg_off, hit, side="right") - 1
    out = np.zeros(len(starts), dtype=np.int64)
    out[seg] = hit - seg_off[seg]
    return out


def _on_lines(v: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """``np.isin(v, lines)`` for non-negative coordinates: one lookup instead of a pass per seam line."""
    table = np.zeros(max(int(v.max(initial=0)), int(lines.max(initial=0))) + 2, dtype=bool)
    table[lines] = True
    return table[v]


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
