"""Polygon writers: valid GeoParquet 1.1, RFC 7946 GeoJSON / GeoJSONSeq, styled GeoPackage, atomic publishing."""

from __future__ import annotations

import json
import sqlite3
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyproj
import pytest
import shapely
from affine import Affine

from geoseg.errors import InputError
from geoseg.vectorize import polygon_table, polygonize_array
from geoseg.write.vectors import (
    FeatureBatch,
    GeoParquetWriter,
    hilbert_index,
    open_vector_writer,
)

CRS = pyproj.CRS.from_epsg(32618)  # UTM 18N, like rasterio's RGB.byte.tif
TRANSFORM = Affine(30.0, 0, 101985.0, 0, -30.0, 2826915.0)
NAMES = ["background", "water", "trees", "built"]
PALETTE = {0: (0, 0, 0, 0), 1: (65, 155, 223, 255), 2: (57, 125, 73, 255), 3: (196, 40, 27, 255)}


def sample_batches(n_batches: int = 3) -> list[FeatureBatch]:
    """Real polygon batches: a mask with holes and islands, polygonized and attributed like the pipeline does."""
    rng = np.random.default_rng(3)
    out = []
    for b in range(n_batches):
        mask = np.zeros((60, 80), np.uint8)
        mask[5:50, 5:70] = 2
        mask[10:40, 10:40] = 1  # hole in class 2, with an island of 3 inside
        mask[20:25, 20:25] = 3
        mask[rng.random(mask.shape) < 0.05] = 3
        polys = polygonize_array(mask)
        t = Affine(TRANSFORM.a, 0, TRANSFORM.c, 0, TRANSFORM.e, TRANSFORM.f + TRANSFORM.e * 60 * b)
        geoms = polys.to_shapely(t)
        cols = polygon_table(polys, geoms, transform=t, crs=CRS, class_names=NAMES, scene="s1", model="dw",
                             model_version="1.0", arrow_strings=b % 2 == 1)
        cols["polygon_id"] = cols["polygon_id"] + b * 10_000_000
        out.append(FeatureBatch(geoms, cols))
    return out


def write_batches(path: Path, fmt: str, batches: list[FeatureBatch]) -> None:
    with open_vector_writer(path, fmt, CRS) as w:
        for b in batches:
            w.write(b)


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------ GeoParquet


def test_geoparquet_metadata_and_layout(tmp_path):
    import geopandas as gpd

    path = tmp_path / "polygons.parquet"
    batches = sample_batches()
    with GeoParquetWriter(path, CRS, row_group_rows=300) as w:
        for b in batches:
            w.write(b)
        assert not path.exists()  # published only on close
    n = sum(len(b) for b in batches)
    meta = pq.read_metadata(path)
    assert meta.num_rows == n and meta.num_row_groups == -(-n // 300)
    geo = json.loads(meta.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert pyproj.CRS.from_json_dict(col["crs"]) == CRS
    assert col["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
    schema = pq.read_schema(path)
    assert schema.metadata[b"geo"] == meta.metadata[b"geo"]  # what pyarrow-based readers see
    assert [f.name for f in schema.field("bbox").type] == ["xmin", "ymin", "xmax", "ymax"]
    rg = meta.row_group(0)
    assert all(rg.column(i).compression == "SNAPPY" for i in range(rg.num_columns))
    stats = {rg.column(i).path_in_schema: rg.column(i).statistics for i in range(rg.num_columns)}
    assert stats["bbox.xmin"].has_min_max  # what lets readers skip row groups by bbox

    table = pq.read_table(path)
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    bounds = shapely.bounds(geoms)
    bbox = table.column("bbox").combine_chunks()
    for i, k in enumerate(("xmin", "ymin", "xmax", "ymax")):
        np.testing.assert_array_equal(bbox.field(k).to_numpy(), bounds[:, i])
    want_bbox = [bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max()]
    np.testing.assert_allclose(col["bbox"], want_bbox)
    # each row group is in Hilbert order of bbox centres
    offset = 0
    for g in range(meta.num_row_groups):
        k = meta.row_group(g).num_rows
        c = (bounds[offset : offset + k, :2] + bounds[offset : offset + k, 2:]) / 2
        h = hilbert_index(c[:, 0], c[:, 1], (c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max()))
        assert (np.diff(h.astype(np.int64)) >= 0).all()
        offset += k

    df = gpd.read_parquet(path)
    assert len(df) == n and df.crs == CRS
    assert set(df.class_name) <= set(NAMES) and set(df.scene) == {"s1"}
    assert df.polygon_id.is_unique
    want = np.concatenate([shapely.area(b.geometry) for b in batches]).sum()
    assert df.area.sum() == pytest.approx(want)
    # bbox filter through the covering column
    x0, y0, x1, y1 = bounds[0]
    sub = gpd.read_parquet(path, bbox=(x0, y0, x1, y1))
    assert 0 < len(sub) < n


def test_hilbert_index_order():
    # the 2x2 curve: (0,0) -> (0,1) -> (1,1) -> (1,0)
    h = hilbert_index(np.array([0.0, 0, 1, 1]), np.array([0.0, 1, 1, 0]), (0, 0, 1, 1), order=1)
    assert h.tolist() == [0, 1, 2, 3]
    # neighbours on the curve are neighbours in space
    xs, ys = np.meshgrid(np.arange(16.0), np.arange(16.0))
    h = hilbert_index(xs.ravel(), ys.ravel(), (0, 0, 15, 15), order=4)
    assert sorted(h.tolist()) == list(range(256))
    pts = np.column_stack([xs.ravel(), ys.ravel()])[np.argsort(h)]
    assert (np.abs(np.diff(pts, axis=0)).sum(axis=1) == 1).all()


# ------------------------------------------------------------------------------------------ GeoJSON


def _decimals(s: str) -> int:
    d = Decimal(s).as_tuple().exponent
    return max(0, -d)


def _check_rfc7946_geometry(geom: dict, numbers: list[str]) -> None:
    assert geom["type"] == "Polygon"
    for i, ring in enumerate(geom["coordinates"]):
        xy = np.array([[float(x), float(y)] for x, y in ring])
        assert len(xy) >= 4 and (xy[0] == xy[-1]).all()
        assert (np.abs(xy[:, 0]) <= 180).all() and (np.abs(xy[:, 1]) <= 90).all()
        area2 = np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1])
        assert (area2 > 0) if i == 0 else (area2 < 0), "exterior rings counter-clockwise, holes clockwise"
        numbers.extend(str(v) for pt in ring for v in pt)


def test_geojson_rfc7946(tmp_path):
    path = tmp_path / "polygons.geojson"
    batches = sample_batches(2)
    write_batches(path, "geojson", batches)
    text = path.read_text()
    doc = json.loads(text, parse_float=str)  # keep the literal digits
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    feats = doc["features"]
    assert len(feats) == sum(len(b) for b in batches)
    numbers: list[str] = []
    for f in feats:
        assert f["type"] == "Feature" and isinstance(f["id"], int)
        assert set(f["properties"]) == {"polygon_id", "class_id", "class_name", "area_m2", "perimeter_m", "scene",
                                        "model", "model_version"}
        _check_rfc7946_geometry(f["geometry"], numbers)
    assert max(_decimals(s) for s in numbers) <= 7
    # reprojection: the first polygon's vertices are the source's, transformed to lon/lat
    tr = pyproj.Transformer.from_crs(CRS, 4326, always_xy=True)
    src = shapely.get_coordinates(batches[0].geometry[0])
    lon, lat = tr.transform(src[:, 0], src[:, 1])
    got = np.array([[float(x), float(y)] for x, y in feats[0]["geometry"]["coordinates"][0]])
    assert set(map(tuple, np.round(np.column_stack([lon, lat]), 7).tolist())) == set(map(tuple, got.tolist()))
    # readable by GDAL, in WGS84
    import pyogrio

    info = pyogrio.read_info(path)
    assert info["features"] == len(feats) and "4326" in info["crs"]


def test_geojsonseq(tmp_path):
    path = tmp_path / "polygons.geojsonl"
    batches = sample_batches(2)
    write_batches(path, "geojsonseq", batches)
    lines = path.read_text().splitlines()
    assert len(lines) == sum(len(b) for b in batches)
    numbers: list[str] = []
    for line in lines:
        f = json.loads(line, parse_float=str)
        assert f["type"] == "Feature"
        _check_rfc7946_geometry(f["geometry"], numbers)
    assert max(_decimals(s) for s in numbers) <= 7


# ------------------------------------------------------------------------------------------ GeoPackage


def test_gpkg_layer_index_and_style(tmp_path):
    import pyogrio

    path = tmp_path / "polygons.gpkg"
    batches = sample_batches(3)
    w = open_vector_writer(path, "gpkg", CRS, palette=PALETTE, class_names=NAMES)
    w.batch_rows = 100  # several GDAL appends
    for b in batches:
        w.write(b)
    assert w.close() == path
    layers = dict(pyogrio.list_layers(path).tolist())
    assert layers["polygons"] == "Polygon" and "layer_styles" in layers
    info = pyogrio.read_info(path, layer="polygons")
    assert info["features"] == sum(len(b) for b in batches)
    assert pyproj.CRS.from_user_input(info["crs"]) == CRS
    df = pyogrio.read_dataframe(path, layer="polygons")
    assert set(df.class_name) <= set(NAMES)
    con = sqlite3.connect(path)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        assert "rtree_polygons_geom" in tables  # the spatial index
        ext = con.execute("SELECT extension_name FROM gpkg_extensions WHERE table_name='polygons'").fetchall()
        assert ("gpkg_rtree_index",) in ext
    finally:
        con.close()
    style = pyogrio.read_dataframe(path, layer="layer_styles")
    assert len(style) == 1
    row = style.iloc[0]
    assert row.f_table_name == "polygons" and row.f_geometry_column == "geom" and row.useAsDefault
    qml = ET.fromstring(row.styleQML.split("\n", 1)[1])  # after the DOCTYPE line
    renderer = qml.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_id"
    cats = {c.get("value"): c.get("label") for c in renderer.iter("category")}
    assert cats == {str(k): NAMES[k] for k in PALETTE}
    colors = {o.get("value") for o in renderer.iter("Option") if o.get("name") == "color"}
    assert "196,40,27,255" in colors
    sld = ET.fromstring(row.styleSLD)
    assert sld.tag.endswith("StyledLayerDescriptor")
    assert "#c4281b" in row.styleSLD


# ------------------------------------------------------------------------------------------ atomicity


@pytest.mark.parametrize("fmt,name", [("parquet", "p.parquet"), ("gpkg", "p.gpkg"), ("geojson", "p.geojson"),
                                      ("geojsonseq", "p.geojsonl")])
def test_abort_leaves_nothing(tmp_path, fmt, name):
    path = tmp_path / name
    w = open_vector_writer(path, fmt, CRS, palette=PALETTE, class_names=NAMES)
    for b in sample_batches(2):
        w.write(b)
    if fmt == "gpkg":
        w._flush()  # the temporary GeoPackage exists on disk now
    w.abort()
    assert list(tmp_path.iterdir()) == []
    # the context manager aborts on an error, and leaves an existing output untouched
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with open_vector_writer(path, fmt, CRS) as w:
            w.write(sample_batches(1)[0])
            raise RuntimeError("boom")
    assert path.read_text() == "old" and no_temp_files(tmp_path)
    # closing replaces it
    with open_vector_writer(path, fmt, CRS) as w:
        w.write(sample_batches(1)[0])
    assert path.stat().st_size > 100 and no_temp_files(tmp_path)


@pytest.mark.parametrize("fmt", ["parquet", "gpkg", "geojson"])
def test_empty_outputs_are_valid(tmp_path, fmt):
    import pyogrio

    path = tmp_path / f"empty.{fmt}"
    with open_vector_writer(path, fmt, CRS):
        pass
    if fmt == "parquet":
        assert pq.read_metadata(path).num_rows == 0
        assert json.loads(pq.read_metadata(path).metadata[b"geo"])["version"] == "1.1.0"
    else:
        assert pyogrio.read_info(path, layer="polygons" if fmt == "gpkg" else None)["features"] == 0


def test_accepts_geodataframe_and_rejects_unknown(tmp_path):
    import geopandas as gpd

    b = sample_batches(1)[0]
    gdf = gpd.GeoDataFrame({k: np.asarray(v) for k, v in b.columns.items()}, geometry=b.geometry, crs=CRS)
    with open_vector_writer(tmp_path / "g.parquet", "parquet", CRS) as w:
        w.write(gdf)
    assert pq.read_metadata(tmp_path / "g.parquet").num_rows == len(gdf)
    with pytest.raises(InputError):
        open_vector_writer(tmp_path / "x.shp", "shapefile", CRS)
    with pytest.raises(InputError):
        FeatureBatch.coerce([1, 2, 3])


def test_geojson_from_arrays_equals_geojson_from_shapes(tmp_path, shared_data):
    """The writer's array path (ragged polygons: reprojected, rounded and oriented with numpy) writes the same
    bytes as its shapely path, on real land-cover polygons with holes in a projected CRS (landcover_nc/strata.tif,
    EPSG:3358, reprojected to WGS 84)."""
    import rasterio
    from rasterio.windows import Window

    from geoseg.vectorize import polygonize_block
    from geoseg.vectorize.polygonize import PolygonSet
    from geoseg.write.geojson import GeoJSONWriter

    src = shared_data / "landcover_nc" / "strata.tif"
    with rasterio.open(src) as ds:
        m, t, crs = ds.read(1, window=Window(0, 0, 400, 300)), ds.transform, ds.crs
    m = np.where(m < 0, 255, m).astype(np.uint8)
    bp = polygonize_block(m, Window(0, 0, m.shape[1], m.shape[0]), nodata=255, connectivity=4)
    polys = PolygonSet(bp.coords, bp.ring_offsets, bp.poly_offsets, bp.class_ids, np.arange(len(bp)))
    assert (np.diff(polys.poly_offsets) > 1).any()  # some polygons have holes
    cols = {"polygon_id": polys.polygon_ids, "class_id": polys.class_ids}
    arrays = FeatureBatch.from_ragged(polys.map_coords(t), polys.ring_offsets, polys.poly_offsets, cols)
    shapes = FeatureBatch(arrays.geometry, cols)
    for seq in (False, True):
        for name, batch in (("arrays", arrays), ("shapes", shapes)):
            with GeoJSONWriter(tmp_path / f"{name}{seq}.json", crs, seq=seq) as w:
                w.write(batch)
        assert (tmp_path / f"arrays{seq}.json").read_bytes() == (tmp_path / f"shapes{seq}.json").read_bytes()
