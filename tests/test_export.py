"""``geoseg export`` on a real two-scene run: the Sentinel-2 chip split into a west and an east window on the same
grid, mapped by Dynamic World. Merged polygons equal polygonizing the mosaic of the two masks; AOI + classes + CRS
outputs open in geopandas, pyogrio and DuckDB; areas add up to the run report's table; the GPKG style names every
class; exports, vectorize and reports go to s3:// on the local S3 server; outputs respect the umask."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio
import shapely
from rasterio.windows import Window

from geoseg.errors import ConfigError, InputError, OutputError
from geoseg.export import export_run

ROOT = Path(__file__).resolve().parent.parent
AOI_BBOX = "-0.77,38.10,-0.755,38.12"  # lon/lat, straddles the seam between the two scenes (x = -0.75890)


def split_chip(chip: Path, out: Path) -> list[Path]:
    """The chip's west and east halves as two GeoTIFFs on the chip's grid."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(chip) as src:
        prof = src.profile
        for name, win in (("west", Window(0, 0, 256, 512)), ("east", Window(256, 0, 256, 512))):
            p = out / f"{name}.tif"
            with rasterio.open(p, "w", **dict(prof, width=win.width, height=win.height,
                                              transform=src.window_transform(win))) as dst:
                dst.write(src.read(window=win))
                dst.descriptions = src.descriptions
            paths.append(p)
    return paths


@pytest.fixture(scope="module")
def two_scene_run(tmp_path_factory, s2_chip, dw_model):
    from geoseg.api import predict
    from geoseg.report import write_run_report

    base = tmp_path_factory.mktemp("two")
    inputs = split_chip(s2_chip, base / "in")
    out = base / "run"
    recs = predict([str(p) for p in inputs], str(out), overrides=["runtime.engine=local", "tiling.block_px=256"],
                   loaded_model=dw_model)
    write_run_report(str(out))
    return out, recs


@pytest.fixture(scope="module")
def mosaic_polygons(two_scene_run, tmp_path_factory):
    """Polygonize one mask made of the two scenes' masks side by side (the reference for merging)."""
    from geoseg.config import VectorConfig
    from geoseg.vectorize import vectorize_file

    run, _ = two_scene_run
    d = tmp_path_factory.mktemp("mosaic")
    with rasterio.open(run / "west" / "mask.tif") as w, rasterio.open(run / "east" / "mask.tif") as e:
        assert w.transform.c + 256 * w.transform.a == pytest.approx(e.transform.c, abs=1e-12)
        prof, tags = w.profile, w.tags()
        data = np.hstack([w.read(1), e.read(1)])
    prof.update(driver="GTiff", width=data.shape[1])
    with rasterio.open(d / "mosaic.tif", "w", **prof) as dst:
        dst.write(data, 1)
        dst.update_tags(**tags)
    res = vectorize_file(d / "mosaic.tif", d / "mosaic.parquet", VectorConfig(formats=["parquet"]), workers=1)
    return gpd.read_parquet(res.paths["parquet"])


def _norm(df) -> list[tuple[int, bytes]]:
    return sorted(zip(df["class_id"].astype(int), shapely.to_wkb(shapely.normalize(df.geometry.values))))


class _TableParser(HTMLParser):
    """Rows of ``<table id="class-areas">``: {class: [cell texts]}."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self._in, self._row, self._cell = False, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "class-areas":
            self._in = True
        elif self._in and tag == "tr" and "data-class" in a:
            self._row = a["data-class"]
            self.rows[self._row] = []
        elif self._in and self._row and tag == "td":
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        elif tag == "tr":
            self._row = None
        elif tag == "td" and self._cell is not None:
            self.rows[self._row].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def report_table(html_text: str) -> dict[str, dict[str, float]]:
    """The class-area table as shown: {class: {pixels, area_m2, area_ha, percent}} (numbers as displayed)."""
    p = _TableParser()
    p.feed(html_text)
    num = lambda s: float(s.replace(",", "")) if s else None  # noqa: E731
    return {k: dict(zip(("pixels", "area_m2", "area_ha", "percent"), map(num, v[1:]))) for k, v in p.rows.items()}


# ------------------------------------------------------------------------------------------ merging


def test_merge_equals_polygonizing_the_mosaic(two_scene_run, mosaic_polygons, tmp_path):
    run, recs = two_scene_run
    res = export_run(str(run), str(tmp_path / "all.parquet"))
    assert res.merged > 0, "the seam cuts polygons: some must be joined"
    merged = gpd.read_parquet(tmp_path / "all.parquet")
    per_scene = sum(len(gpd.read_parquet(run / s / "polygons.parquet")) for s in ("west", "east"))
    assert len(merged) == len(mosaic_polygons) == per_scene - res.merged
    assert _norm(merged) == _norm(mosaic_polygons)  # the same polygons, vertex for vertex
    assert shapely.is_valid(merged.geometry.values).all()
    seam_x = recs[0]["input"]["transform"][2] if "east" in recs[0]["input"]["path"] else \
        recs[1]["input"]["transform"][2]
    crossing = merged[(merged.bounds.minx < seam_x) & (merged.bounds.maxx > seam_x)]
    assert len(crossing) and set(crossing["scenes"]) == {"east;west"}


def test_areas_add_up_to_the_run_report(two_scene_run, tmp_path):
    """Without AOI or selection, the export's areas (polygons, equal-area) equal the run report's table (mask
    pixel counts x ellipsoidal pixel areas) per class."""
    run, recs = two_scene_run
    res = export_run(str(run), str(tmp_path / "areas.csv"))
    shown = report_table((run / "report.html").read_text())
    csv = {r["class_name"]: r for r in _csv_rows(tmp_path / "areas.csv")}
    assert set(shown) == set(csv) == set(recs[0]["class_areas"]["classes"]) | set(recs[1]["class_areas"]["classes"])
    for name, row in shown.items():
        assert float(csv[name]["area_m2"]) == pytest.approx(row["area_m2"], abs=1.0, rel=1e-6), name
        assert float(csv[name]["percent"]) == pytest.approx(row["percent"], abs=0.006), name
        want = sum(r["class_areas"]["classes"].get(name, {}).get("area_m2", 0) for r in recs)
        assert row["area_m2"] == pytest.approx(want, abs=0.5)
    assert res.areas["valid_m2"] == pytest.approx(sum(r["class_areas"]["valid_m2"] for r in recs), rel=1e-7)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ AOI + classes + CRS


@pytest.fixture(scope="module")
def aoi_file(tmp_path_factory):
    """The AOI as a GeoPackage in another CRS (ETRS89 / UTM 30N) than both the run and the output."""
    lon0, lat0, lon1, lat1 = (float(v) for v in AOI_BBOX.split(","))
    poly = shapely.segmentize(shapely.box(lon0, lat0, lon1, lat1), 1e-4)
    gdf = gpd.GeoDataFrame({"name": ["district"]}, geometry=[poly], crs="EPSG:4326").to_crs("EPSG:25830")
    p = tmp_path_factory.mktemp("aoi") / "district.gpkg"
    gdf.to_file(p, driver="GPKG")
    return p


FORMATS = ["gpkg", "parquet", "fgb", "geojson", "shp"]


@pytest.fixture(scope="module")
def aoi_exports(two_scene_run, aoi_file, tmp_path_factory):
    run, _ = two_scene_run
    d = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt in FORMATS + ["csv"]:
        res = export_run(str(run), str(d / f"district.{fmt}"), aoi=str(aoi_file), classes="built,water",
                         crs="EPSG:3035")
        out[fmt] = res
    return d, out


def _aoi_in(crs: str, aoi_file: Path):
    return gpd.read_file(aoi_file).to_crs(crs).geometry.union_all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_aoi_classes_crs_opens_in_geopandas_and_pyogrio(aoi_exports, aoi_file, fmt):
    d, results = aoi_exports
    path = d / f"district.{fmt}"
    res = results[fmt]
    assert res.features > 0
    df = gpd.read_parquet(path) if fmt == "parquet" else gpd.read_file(path, layer=None if fmt != "gpkg"
                                                                         else "landcover")
    assert pyproj.CRS.from_user_input(df.crs).equals(pyproj.CRS.from_epsg(3035))
    assert set(df["class_name"]) == {"built", "water"} and len(df) == res.features
    assert shapely.is_valid(df.geometry.values).all()
    aoi = _aoi_in("EPSG:3035", aoi_file)
    assert shapely.within(df.geometry.values, aoi.buffer(0.05)).all()  # clipped (5 cm: reprojection rounding)
    # every clipped polygon's area, measured again on the ellipsoid, matches its area_m2 column
    from geoseg.areas import geometry_areas_m2

    again = geometry_areas_m2(np.asarray(df.geometry.values), df.crs)
    np.testing.assert_allclose(df["area_m2"].to_numpy(), again, rtol=1e-5, atol=0.05)
    if fmt == "parquet" and "Parquet" not in pyogrio.list_drivers():
        # pyogrio's wheel GDAL has no Parquet driver: check the GeoParquet metadata with pyarrow instead
        import pyarrow.parquet as pq

        meta = pq.read_metadata(path)
        geo = json.loads(meta.metadata[b"geo"])
        assert meta.num_rows == res.features and geo["columns"]["geometry"]["encoding"] == "WKB"
        fields = [f for f in meta.schema.names if f not in ("geometry", "bbox")]
    else:
        info = pyogrio.read_info(path, layer="landcover" if fmt == "gpkg" else None)
        assert info["features"] == res.features
        fields = list(info["fields"])
    assert fields and all(len(f) <= 10 for f in fields)
    # the per-class sums of the layer equal the csv class-area table of the same selection
    csv = {r["class_name"]: float(r["area_m2"]) for r in _csv_rows(d / "district.csv")}
    sums = df.groupby("class_name")["area_m2"].sum()
    for name in ("built", "water"):
        assert sums[name] == pytest.approx(csv[name], abs=0.01 * res.features)


def test_aoi_export_percent_is_of_the_valid_area_in_the_aoi(aoi_exports, two_scene_run, aoi_file):
    """The csv's valid area is the whole mapped area inside the AOI (all classes), not just the selection."""
    d, results = aoi_exports
    table = results["csv"].areas
    aoi_area = abs(pyproj.Geod(ellps="WGS84").geometry_area_perimeter(_aoi_in("EPSG:4326", aoi_file))[0])
    assert table["valid_m2"] == pytest.approx(aoi_area, rel=1e-4)  # the chip has no nodata inside the AOI
    for name in ("built", "water"):
        assert table["classes"][name]["percent"] == pytest.approx(
            100 * table["classes"][name]["area_m2"] / table["valid_m2"], abs=1e-5)


def test_duckdb_spatial_reads_the_exports(aoi_exports):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    try:
        try:
            con.execute("LOAD spatial")
        except Exception:
            import duckdb_extension_spatial  # the signed extension binary as a wheel (no download at run time)

            ext = next(Path(duckdb_extension_spatial.__file__).parent.rglob("spatial.duckdb_extension"))
            con.execute(f"LOAD '{ext}'")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"DuckDB's spatial extension cannot be loaded offline here ({type(e).__name__})")
    d, results = aoi_exports
    for fmt in ("gpkg", "fgb", "geojson", "shp"):
        n, area = con.execute(
            f"SELECT count(*), sum(area_m2) FROM ST_Read('{d / f'district.{fmt}'}')").fetchone()
        assert n == results[fmt].features, fmt
        assert area == pytest.approx(results[fmt].areas["classes"]["built"]["area_m2"]
                                     + results[fmt].areas["classes"]["water"]["area_m2"], abs=0.01 * n)
    parquet = d / "district.parquet"
    try:  # DuckDB >= 1.4 reads GeoParquet geometry as GEOMETRY; before, as WKB blobs
        n, valid = con.execute(f"SELECT count(*), bool_and(ST_IsValid(geometry)) FROM '{parquet}'").fetchone()
    except duckdb.BinderException:
        n, valid = con.execute(
            f"SELECT count(*), bool_and(ST_IsValid(ST_GeomFromWKB(geometry))) FROM '{parquet}'").fetchone()
    assert n == results["parquet"].features and valid


def test_gpkg_style_names_every_class(aoi_exports, two_scene_run):
    d, _ = aoi_exports
    _, recs = two_scene_run
    classes = {c["name"]: c["color"].lower() for c in recs[0]["model"]["classes"]}
    con = sqlite3.connect(d / "district.gpkg")
    try:
        (qml, sld, table), = con.execute("SELECT styleQML, styleSLD, f_table_name FROM layer_styles").fetchall()
        kinds = dict(con.execute("SELECT table_name, data_type FROM gpkg_contents").fetchall())
    finally:
        con.close()
    assert table == "landcover" and kinds["class_areas"] == "attributes"
    root = ET.fromstring(qml.split("\n", 1)[1])  # after the DOCTYPE line
    cats = {c.get("label"): c for c in root.iter("category")}
    assert set(cats) == set(classes)
    symbols = {s.get("name"): s for s in root.iter("symbol")}
    for label, cat in cats.items():
        colour = next(o.get("value") for o in symbols[cat.get("symbol")].iter("Option") if o.get("name") == "color")
        r, g, b = (int(v) for v in colour.split(",")[:3])
        assert f"#{r:02x}{g:02x}{b:02x}" == classes[label]
    ET.fromstring(sld)  # the SLD parses too
    areas = pyogrio.read_dataframe(d / "district.gpkg", layer="class_areas")
    assert set(areas["class_name"]) == {"built", "water"}


def test_shapefile_sidecars(aoi_exports):
    d, results = aoi_exports
    assert sorted(Path(p).suffix for p in results["shp"].paths) == [".cpg", ".dbf", ".prj", ".shp", ".shx"]
    assert (d / "district.cpg").read_text().strip().upper() in ("UTF-8", "UTF8")
    assert pyproj.CRS.from_wkt((d / "district.prj").read_text()).to_epsg() == 3035  # ESRI WKT, same CRS
    df = gpd.read_file(d / "district.shp")
    assert list(df.columns) == ["class_id", "class_name", "area_m2", "area_ha", "scenes", "model", "model_ver",
                                "geometry"]


def test_dissolve_and_min_area(two_scene_run, tmp_path):
    run, _ = two_scene_run
    export_run(str(run), str(tmp_path / "all.parquet"))
    every = gpd.read_parquet(tmp_path / "all.parquet")
    res = export_run(str(run), str(tmp_path / "dis.gpkg"), dissolve=True, crs="EPSG:25830")
    dis = gpd.read_file(tmp_path / "dis.gpkg", layer="landcover")
    assert sorted(dis["class_name"]) == sorted(every["class_name"].unique())
    assert set(dis.geom_type) == {"MultiPolygon"} and shapely.is_valid(dis.geometry.values).all()
    sums = every.groupby("class_name")["area_m2"].sum()
    for _, row in dis.iterrows():
        assert row["area_m2"] == pytest.approx(sums[row["class_name"]], abs=1.0)
        assert row["percent"] == pytest.approx(res.areas["classes"][row["class_name"]]["percent"], abs=1e-5)
    big = export_run(str(run), str(tmp_path / "big.fgb"), min_area_m2=5000)
    df = gpd.read_file(tmp_path / "big.fgb")
    assert len(df) == big.features == int((every["area_m2"] >= 5000).sum()) > 0
    assert df["area_m2"].min() >= 5000


def test_clear_errors(two_scene_run, tmp_path):
    run, _ = two_scene_run
    with pytest.raises(ConfigError, match=r"unknown class 'buildings' \(valid names: water, trees, grass"):
        export_run(str(run), str(tmp_path / "a.gpkg"), classes="buildings")
    with pytest.raises(ConfigError, match=r"--crs 'EPSG:999999'"):
        export_run(str(run), str(tmp_path / "a.gpkg"), crs="EPSG:999999")
    with pytest.raises(ConfigError, match=r"cannot tell the format from '.txt'.*\.gpkg"):
        export_run(str(run), str(tmp_path / "a.txt"))
    with pytest.raises(InputError, match=r"does not overlap any scene"):
        export_run(str(run), str(tmp_path / "a.gpkg"), aoi="10,50,10.1,50.1")
    with pytest.raises(InputError, match=r"holds no finished scene"):
        export_run(str(tmp_path), str(tmp_path / "a.gpkg"))
    (tmp_path / "b.gpkg").write_bytes(b"x")
    with pytest.raises(OutputError, match=r"b.gpkg: exists; pass --overwrite"):
        export_run(str(run), str(tmp_path / "b.gpkg"))
    assert (tmp_path / "b.gpkg").read_bytes() == b"x"


def test_cli_export(two_scene_run, tmp_path):
    run, _ = two_scene_run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "geoseg.cli", "export", str(run), "--out", str(tmp_path / "b.fgb"),
                         "--classes", "built", "--aoi", AOI_BBOX, "--crs", "EPSG:3857"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "b.fgb")
    assert set(gpd.read_file(tmp_path / "b.fgb")["class_name"]) == {"built"}
    bad = subprocess.run([sys.executable, "-m", "geoseg.cli", "export", str(run), "--out", str(tmp_path / "c.fgb"),
                          "--classes", "biult"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown class 'biult' (valid names: water," in bad.stderr
    assert "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------ S3 + permissions


@pytest.fixture(scope="module")
def s3_run(s3_server, two_scene_run):
    """The two-scene run copied under s3://<bucket>/runs/two/."""
    run, _ = two_scene_run
    bucket = s3_server.make_bucket("geoseg-export")
    client = s3_server.client()
    for p in run.rglob("*"):
        if p.is_file():
            client.put_object(Bucket=bucket, Key=f"runs/two/{p.relative_to(run).as_posix()}", Body=p.read_bytes())
    return bucket


def _get(s3_server, bucket, key) -> bytes:
    return s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def test_export_s3_to_s3_equals_local(s3_server, s3_run, two_scene_run, aoi_file, tmp_path):
    run, _ = two_scene_run
    storage = s3_server.storage_config()
    kw = dict(aoi=str(aoi_file), classes="built,water", crs="EPSG:3035")
    local = export_run(str(run), str(tmp_path / "d.parquet"), **kw)
    remote = export_run(f"s3://{s3_run}/runs/two", f"s3://{s3_run}/exports/d.parquet", storage=storage, **kw)
    assert remote.paths == [f"s3://{s3_run}/exports/d.parquet"]
    assert _get(s3_server, s3_run, "exports/d.parquet") == (tmp_path / "d.parquet").read_bytes()
    assert remote.areas == local.areas
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        export_run(f"s3://{s3_run}/runs/two", f"s3://{s3_run}/exports/d.parquet", storage=storage, **kw)
    # an AOI stored on S3 too
    s3_server.client().put_object(Bucket=s3_run, Key="aoi/district.gpkg", Body=aoi_file.read_bytes())
    again = export_run(str(run), f"s3://{s3_run}/exports/e.csv", storage=storage,
                       **dict(kw, aoi=f"s3://{s3_run}/aoi/district.gpkg"))
    assert again.areas == local.areas


def test_vectorize_to_s3_equals_local(s3_server, s3_run, two_scene_run, tmp_path):
    """``geoseg vectorize s3://.../mask.tif --out s3://.../x.gpkg`` writes the same bytes as a local run (it used to
    make a local folder named 's3:' and die in pyogrio)."""
    run, _ = two_scene_run
    env = {**os.environ, **s3_server.env(), "PYTHONPATH": str(ROOT)}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [sys.executable, "-m", "geoseg.cli", "vectorize"]
    local = subprocess.run(args + [str(run / "west" / "mask.tif"), "--out", str(tmp_path / "w.gpkg"), "--workers", "1"],
                           env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert local.returncode == 0, local.stderr
    remote = subprocess.run(args + [f"s3://{s3_run}/runs/two/west/mask.tif", "--out", f"s3://{s3_run}/vec/w.gpkg",
                                    "--workers", "1"], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.strip() == f"s3://{s3_run}/vec/w.gpkg"
    assert _get(s3_server, s3_run, "vec/w.gpkg") == (tmp_path / "w.gpkg").read_bytes()
    assert not (cwd / "s3:").exists() and not list(cwd.iterdir())
    # a directory prefix receives every format; a second run refuses to overwrite
    remote = subprocess.run(args + [f"s3://{s3_run}/runs/two/west/mask.tif", "--out", f"s3://{s3_run}/vec/dir",
                                    "--workers", "1"], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert remote.returncode == 0, remote.stderr
    keys = s3_server.client().list_objects_v2(Bucket=s3_run, Prefix="vec/dir/")["Contents"]
    assert sorted(k["Key"] for k in keys) == [f"vec/dir/polygons.{s}" for s in ("geojson", "gpkg", "parquet")]
    again = subprocess.run(args + [f"s3://{s3_run}/runs/two/west/mask.tif", "--out", f"s3://{s3_run}/vec/w.gpkg"],
                           env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert again.returncode != 0 and "vec/w.gpkg: exists" in again.stderr


def test_report_rebuilt_on_s3(s3_server, s3_run):
    from geoseg.report import build_reports

    storage = s3_server.storage_config()
    client = s3_server.client()
    for key in ("runs/two/report.html", "runs/two/west/report.html", "runs/two/west/preview.png"):
        client.delete_object(Bucket=s3_run, Key=key)
    written = build_reports(f"s3://{s3_run}/runs/two", storage)
    assert written[-1] == f"s3://{s3_run}/runs/two/report.html"
    page = _get(s3_server, s3_run, "runs/two/west/report.html").decode()
    assert report_table(page) and "data:image/png;base64," in page
    assert _get(s3_server, s3_run, "runs/two/west/preview.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'href="west/report.html"' in _get(s3_server, s3_run, "runs/two/report.html").decode()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_respect_the_umask(s2_chip, tiny_unet, tmp_path, umask):
    """run.json, manifest.json, the mask, polygons, report and exports get 0666/0777 less the umask (run.json
    used to be 0600 from mkstemp, unreadable by a colleague in the same group)."""
    from geoseg.api import predict
    from geoseg.io import store
    from geoseg.report import write_run_report

    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        predict([str(s2_chip)], str(out), model="tiny", overrides=["runtime.engine=local"], loaded_model=tiny_unet)
        write_run_report(str(out))
        export_run(str(out), str(tmp_path / "x.gpkg"))
        export_run(str(out), str(tmp_path / "x.shp"))
        store.write_bytes(str(tmp_path / "direct.json"), b"{}")
    finally:
        os.umask(old)
    files = [p for p in [*out.rglob("*"), *tmp_path.glob("x.*"), tmp_path / "direct.json"]]
    assert any(p.name == "run.json" for p in files) and any(p.name == "report.html" for p in files)
    for p in files:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, f"{p}: {oct(p.stat().st_mode & 0o777)} != {oct(want)}"


def test_export_without_polygons_polygonizes_the_mask(s2_chip, tiny_unet, tmp_path):
    """A run with vector.enabled=false still exports: its mask is polygonized (the same polygons as the pipeline
    would have written)."""
    from geoseg.api import predict

    (rec,) = predict([str(s2_chip)], str(tmp_path / "novec"), model="tiny", loaded_model=tiny_unet,
                     overrides=["runtime.engine=local", "vector.enabled=false", "output.report=false"])
    assert "parquet" not in rec["outputs"]
    res = export_run(str(tmp_path / "novec"), str(tmp_path / "p.parquet"))
    (ref,) = predict([str(s2_chip)], str(tmp_path / "vec"), model="tiny", loaded_model=tiny_unet,
                     overrides=["runtime.engine=local", "vector.formats=[parquet]", "output.report=false"])
    assert _norm(gpd.read_parquet(tmp_path / "p.parquet")) == _norm(gpd.read_parquet(ref["outputs"]["parquet"]))
    assert res.areas["valid_m2"] == pytest.approx(rec["class_areas"]["valid_m2"], rel=1e-6)
