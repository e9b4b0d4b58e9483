"""Merging a group's rings across seams (``merge_groups``): the exact-ring half of ``geoseg.vectorize.seams``.

Cut each ring at vertices on seam lines or shared by several rings of its group, cancel the seam unit edges
present in both directions, re-chain the pieces with GDAL's right-turn rule at pinches, drop the collinear
vertices the cuts left, start each ring at its lowest (row, col) vertex, exterior first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geoseg._ragged import offsets as _offsets
from geoseg._ragged import ranges as _ranges
from geoseg._ragged import repeated
from geoseg.vectorize.polygonize import COORD_BITS

__all__ = ["merge_groups"]


def merge_groups(
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
