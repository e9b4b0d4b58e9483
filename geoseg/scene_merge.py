"""Joining scenes of one pixel grid for ``geoseg export``: exact pixel-corner coordinates, polygons of one class
unioned across scene borders (shared edges only, as 4-connected polygonize), and clipping to an AOI."""

from __future__ import annotations

import numpy as np

__all__ = ["same_grid", "to_pixels", "to_map", "merge_across_scenes", "clip_to_aoi"]


def same_grid(crs, transform, ref) -> bool:
    """Does a grid line up with ``ref`` (crs, transform): same CRS, pixel size, rotation, whole-pixel offset?"""
    rcrs, rt = ref
    if not crs.equals(rcrs) or not np.allclose([transform.a, transform.b, transform.d, transform.e],
                                                [rt.a, rt.b, rt.d, rt.e], rtol=1e-9, atol=0):
        return False
    col, row = ~rt @ (transform.c, transform.f)
    return abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6


def to_pixels(geoms, transform):
    """Geometries in whole pixel-corner coordinates of ``transform``'s grid (exact small integers)."""
    import shapely

    inv = ~transform

    def px(xy: np.ndarray) -> np.ndarray:
        return np.column_stack([np.round(inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c),
                                np.round(inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f)])

    return shapely.transform(geoms, px)


def to_map(geoms, transform):
    """Pixel-corner coordinates to map coordinates by the formula of ``vectorize.PolygonSet.map_coords``, so a
    vertex gets the very bits it has in the scenes' own polygons."""
    import shapely

    t = transform

    def fwd(xy: np.ndarray) -> np.ndarray:
        c, r = xy[:, 0], xy[:, 1]
        return np.column_stack([t.a * c + t.b * r + t.c, t.d * c + t.e * r + t.f])

    return shapely.transform(geoms, fwd)


def merge_across_scenes(geoms, class_ids, scene_idx, extents, *, tol: float):
    """Union polygons of one class from different scenes that share an edge across a scene border.

    ``extents[i]`` is scene i's (xmin, ymin, xmax, ymax); only polygons reaching their scene's border (within
    ``tol``) are candidates. Returns (geoms, class ids, list of scene-index sets, polygons removed by merging).
    """
    import shapely

    n = len(geoms)
    members = [{int(s)} for s in scene_idx]
    if n == 0 or len(extents) < 2:
        return geoms, class_ids, members, 0
    b = shapely.bounds(geoms)
    ext = np.asarray(extents)[scene_idx]
    border = ((np.abs(b[:, 0] - ext[:, 0]) < tol) | (np.abs(b[:, 1] - ext[:, 1]) < tol)
              | (np.abs(b[:, 2] - ext[:, 2]) < tol) | (np.abs(b[:, 3] - ext[:, 3]) < tol))
    cand = np.flatnonzero(border)
    if len(cand) < 2:
        return geoms, class_ids, members, 0
    tree = shapely.STRtree(geoms[cand])
    left, right = tree.query(geoms[cand], predicate="intersects")
    keep = (left < right) & (class_ids[cand[left]] == class_ids[cand[right]]) \
        & (scene_idx[cand[left]] != scene_idx[cand[right]])
    left, right = cand[left[keep]], cand[right[keep]]
    # shared edges only: a shared corner point does not join (4-connectivity)
    if len(left):
        shared = shapely.length(shapely.intersection(geoms[left], geoms[right])) > 0
        left, right = left[shared], right[shared]
    if not len(left):
        return geoms, class_ids, members, 0
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(left.tolist(), right.tolist()):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n)])
    groups: dict[int, list[int]] = {}
    for i in np.unique(np.r_[left, right]).tolist():
        groups.setdefault(int(roots[i]), []).append(i)
    drop = np.zeros(n, bool)
    new_geoms, new_cls, new_members = [], [], []
    for root, idx in groups.items():
        if len(idx) < 2:
            continue
        u = shapely.union_all(geoms[idx])
        for part in shapely.get_parts(shapely.simplify(u, 0)):  # drop the seam's collinear vertices
            new_geoms.append(part)
            new_cls.append(class_ids[root])
            new_members.append(set().union(*(members[i] for i in idx)))
        drop[idx] = True
    keep_idx = np.flatnonzero(~drop)
    out_geoms = np.concatenate([geoms[keep_idx], np.array(new_geoms, dtype=object)])
    out_cls = np.concatenate([class_ids[keep_idx], np.array(new_cls, dtype=np.int64)])
    out_members = [members[i] for i in keep_idx] + new_members
    return out_geoms, out_cls, out_members, int(drop.sum()) - len(new_geoms)


def clip_to_aoi(geoms, class_ids, members, aoi):
    """Clip to ``aoi``: polygon pieces only, each its own feature."""
    import shapely

    if aoi is None or not len(geoms):
        return geoms, class_ids, members
    shapely.prepare(aoi)
    hit = shapely.intersects(aoi, geoms)
    geoms, class_ids = geoms[hit], class_ids[hit]
    members = [m for m, h in zip(members, hit) if h]
    inside = shapely.contains_properly(aoi, geoms)
    cut = np.flatnonzero(~inside)
    if not len(cut):
        return geoms, class_ids, members
    pieces = shapely.intersection(geoms[cut], aoi)
    parts, src = shapely.get_parts(pieces, return_index=True)
    poly = (shapely.get_type_id(parts) == 3) & (shapely.area(parts) > 0)
    parts, src = parts[poly], cut[src[poly]]
    keep = np.flatnonzero(inside)
    out_geoms = np.concatenate([geoms[keep], parts])
    out_cls = np.concatenate([class_ids[keep], class_ids[src]])
    out_members = [members[i] for i in keep] + [members[i] for i in src]
    return out_geoms, out_cls, out_members
