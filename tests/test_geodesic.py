"""Geodesic edge lengths from per-row tables (geoseg.vectorize.geodesic) against one pyproj inverse per edge."""

import numpy as np
import pyproj
import pytest
from affine import Affine

from geoseg.vectorize.geodesic import SERIES_MAX_RAD, edge_measures

WGS84 = pyproj.Geod(ellps="WGS84")


@pytest.mark.parametrize("res_deg, lat0", [(8.98e-5, 42.5), (1e-6, -33.9), (0.0027, 71.0), (0.25, 60.0)])
def test_edges_match_one_inverse_each(res_deg, lat0):
    """Every edge alone (one polygon per edge): 1e-11 relative to ``Geod.inv`` for short and long parallel edges
    (series below SERIES_MAX_RAD, exact above); meridian edges to 10 nm; the 0.25 degree grid has no series span."""
    t = Affine(res_deg, 0, 10.0, 0, -res_deg, lat0)
    rng = np.random.default_rng(0)
    n = 4000
    rows_max = int(min(3000, 60 / res_deg))
    y0 = rng.integers(0, rows_max, n)
    x0 = rng.integers(0, 5000, n)
    span = max(2, int(3 * SERIES_MAX_RAD / np.radians(res_deg)))
    d = np.where(rng.random(n) < 0.5, rng.integers(1, 40, n), rng.integers(1, span, n))
    vert = rng.random(n) < 0.4
    x1 = np.where(vert, x0, x0 + d)
    y1 = np.where(vert, np.minimum(y0 + d, rows_max), y0)
    got = edge_measures(x0, y0, x1, y1, t, WGS84)[0]
    lon0, lat_0 = t @ (x0, y0)
    lon1, lat_1 = t @ (x1, y1)
    _, _, ref = WGS84.inv(lon0, lat_0, lon1, lat_1)
    # a parallel edge measured from longitude 0 (map longitudes round (x1 - x0) * res by ~1e-11 of a short edge)
    _, _, ref_h = WGS84.inv(np.zeros(n), lat_0, np.abs(x1 - x0) * res_deg, lat_0)
    ref = np.where(vert, ref, ref_h)
    # parallels: 1e-11 relative (a nanometre in 100 m); meridians are differences of arcs from the equator (as before these tables):
    # exact to a few nanometres
    np.testing.assert_allclose(got[~vert], ref[~vert], rtol=1e-11)
    np.testing.assert_allclose(got[vert], ref[vert], rtol=1e-12, atol=1e-8)


def test_split_does_not_change_a_polygon():
    """The same edges summed in two calls with different row ranges (as two blocks would) give identical bits."""
    t = Affine(1e-4, 0, 5.0, 0, -1e-4, 50.0)
    x0 = np.array([0, 7, 7, 0]); y0 = np.array([3000, 3000, 3010, 3010])
    x1 = np.array([7, 7, 0, 0]); y1 = np.array([3000, 3010, 3010, 3000])
    a = edge_measures(x0, y0, x1, y1, t, WGS84)[0].sum()
    xs = np.r_[x0, 0, 1]; ys = np.r_[y0, 10, 10]; xe = np.r_[x1, 1, 1]; ye = np.r_[y1, 10, 5000]
    b = edge_measures(xs, ys, xe, ye, t, WGS84)[0][:4].sum()
    assert a == b
