"""STAC in and out.

In: ``load_scenes`` reads a saved ItemCollection (or one Item, or a JSON list of Item files) with pystac and
picks each item's assets by the model's band names: one multi-band asset whose ``eo:bands`` name them, or
one asset per band (keyed ``B02``... or named in ``eo:bands``, ``common_name`` too), stacked into a VRT. No
search service is queried: any STAC API's saved results work. Hrefs may be local or ``s3://``.

Out: ``scene_item`` describes one output (a scene or a region) as a STAC 1.0.0 Item with the projection,
raster and classification extensions (class values, names and colours), ``collection`` a run's outputs.
STAC 1.0.0 and these extension versions are what the schemas in ``../shared/stac-schemas`` hold, so
``validate`` checks them offline (jsonschema with a registry of the local files: nothing is fetched).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from geoseg.errors import InputError

__all__ = ["load_scenes", "scene_item", "collection", "validate", "SCHEMA_ROOT"]

STAC_VERSION = "1.0.0"
EXTENSIONS = {
    "proj": "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "classification": "https://stac-extensions.github.io/classification/v1.1.0/schema.json",
}
SCHEMA_ROOT = Path(os.environ.get("GEOSEG_STAC_SCHEMAS", Path(__file__).resolve().parents[2] / "shared" / "stac-schemas"))


def _norm(name: str | None) -> str | None:
    from geoseg.io.raster import band_name  # one notion of band-name equality

    return band_name(name)


def load_scenes(path: str, card) -> list:
    """The scenes of the STAC items in ``path`` (see the module docstring), with their datetimes and
    ``eo:cloud_cover`` for ``input.overlap``."""
    import pystac

    from geoseg.region import Scene

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: STAC file not found") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a STAC JSON file ({e})") from None
    if isinstance(data, list):  # a list of Item files
        items = [pystac.Item.from_file(str(Path(path).parent / p) if not os.path.isabs(p) else p) for p in data]
    elif data.get("type") == "FeatureCollection":
        items = list(pystac.ItemCollection.from_dict(data))
    elif data.get("type") == "Feature":
        items = [pystac.Item.from_dict(data)]
    else:
        raise InputError(f"{path}: expected a STAC ItemCollection, an Item, or a list of Item files")
    if not items:
        raise InputError(f"{path}: the ItemCollection has no items")
    base = Path(path).resolve().parent
    scenes = []
    vrt_dir = None
    for item in items:
        href_of = {}
        for key, asset in item.assets.items():
            href = asset.href
            if "://" not in href and not os.path.isabs(href):
                href = str(base / href)
            href_of[key] = (href, asset.extra_fields.get("eo:bands") or [])
        scene = _multi_band(item, href_of, card)
        if scene is None:
            vrt_dir = vrt_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"geoseg-stac-{os.getpid()}"
            scene = _stacked(item, href_of, card, vrt_dir)
        scene.datetime = item.datetime.isoformat() if item.datetime else item.properties.get("start_datetime")
        scene.cloud = item.properties.get("eo:cloud_cover")
        scenes.append(scene)
    return scenes


def _names(bands: list[dict]) -> list[str | None]:
    return [_norm(b.get("name")) or _norm(b.get("common_name")) for b in bands]


def _multi_band(item, href_of: dict, card):
    """One asset holding every model band, found by its ``eo:bands`` names."""
    from geoseg.region import Scene

    want = [_norm(b) for b in card.bands]
    for href, bands in href_of.values():
        names = _names(bands)
        alt = [_norm(b.get("common_name")) for b in bands]
        idx = []
        for w in want:
            if w in names:
                idx.append(names.index(w) + 1)
            elif w in alt:
                idx.append(alt.index(w) + 1)
        if len(idx) == len(want):
            return Scene(href, bands=idx)
    return None


def _stacked(item, href_of: dict, card, vrt_dir: Path):
    """One asset per band (by key or ``eo:bands`` name): a VRT stacking them on the first band's grid."""
    import rasterio

    from geoseg.region import Scene

    chosen = []
    for band in card.bands:
        w = _norm(band)
        hit = next((h for k, (h, bs) in href_of.items() if _norm(k) == w or w in _names(bs)), None)
        if hit is None:
            raise InputError(f"STAC item {item.id!r}: no asset for band {band} (assets: {', '.join(href_of)}); "
                             "name them by key (e.g. B02) or in eo:bands")
        chosen.append(hit)
    with rasterio.open(chosen[0]) as ref:
        crs, t, width, height, dtype, nodata = ref.crs, ref.transform, ref.width, ref.height, ref.dtypes[0], ref.nodata
    from xml.sax.saxutils import escape

    from geoseg.region import GDAL_TYPES, vrt_number

    gt = ", ".join(repr(float(v)) for v in (t.c, t.a, 0.0, t.f, 0.0, t.e))
    parts = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{escape(crs.to_wkt())}</SRS>'
             f"<GeoTransform>{gt}</GeoTransform>"]
    for i, (band, href) in enumerate(zip(card.bands, chosen)):
        with rasterio.open(href) as src:
            if src.crs != crs:
                raise InputError(f"STAC item {item.id!r}: band assets in different CRSs ({src.crs} vs {crs})")
            win = rasterio.windows.from_bounds(*rasterio.transform.array_bounds(height, width, t), src.transform)
            nd = src.nodata
        gdal_path = href if "://" not in href else "/vsis3/" + href.split("://", 1)[1]
        parts.append(f'<VRTRasterBand dataType="{GDAL_TYPES[dtype]}" band="{i + 1}"><Description>{escape(band)}'
                     "</Description>" + (f"<NoDataValue>{vrt_number(nodata)}</NoDataValue>" if nodata is not None else "")
                     + f'<ComplexSource resampling="bilinear"><SourceFilename relativeToVRT="0">{escape(gdal_path)}'
                     f'</SourceFilename><SourceBand>1</SourceBand><SrcRect xOff="{win.col_off!r}" '
                     f'yOff="{win.row_off!r}" xSize="{win.width!r}" ySize="{win.height!r}"/><DstRect xOff="0" '
                     f'yOff="0" xSize="{width}" ySize="{height}"/>'
                     + (f"<NODATA>{vrt_number(nd)}</NODATA>" if nd is not None else "") + "</ComplexSource></VRTRasterBand>")
    parts.append("</VRTDataset>")
    vrt_dir.mkdir(parents=True, exist_ok=True)
    dest = vrt_dir / f"{item.id}.vrt"
    dest.write_text("".join(parts))
    return Scene(str(dest))


def _bbox_4326(crs_wkt: str, transform, shape) -> tuple[list[float], dict]:
    import shapely
    from pyproj import CRS, Transformer

    rows, cols = shape
    ring = [transform @ (c, r) for c, r in ((0, 0), (cols, 0), (cols, rows), (0, rows))]
    tr = Transformer.from_crs(CRS.from_wkt(crs_wkt), CRS.from_epsg(4326), always_xy=True)
    geom = shapely.segmentize(shapely.Polygon(ring), max(abs(transform.a) * cols, abs(transform.e) * rows) / 32)
    import numpy as np

    g = shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    return [round(v, 9) for v in g.bounds], shapely.geometry.mapping(g)


def scene_item(record: dict[str, Any], item_id: str, card) -> dict[str, Any]:
    """A STAC Item for one scene's (or region's) outputs; asset hrefs are relative to the scene folder."""
    from pyproj import CRS

    inp = record["input"]
    shape = tuple(inp["shape_rows_cols"])
    from affine import Affine

    t = Affine(*inp["transform"])
    crs = CRS.from_user_input(inp["crs"])
    bbox, geometry = _bbox_4326(crs.to_wkt(), t, shape)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    epsg = crs.to_epsg()
    classes = [{"value": c.id, "name": c.name, "description": c.name.replace("_", " "),
                "color_hint": c.color.lstrip("#").upper()} for c in card.classes]
    assets = {
        "mask": {
            "href": "mask.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "title": f"{card.name} classes", "roles": ["data"],
            "raster:bands": [{"nodata": 255, "data_type": "uint8", "sampling": "area"}],
            "classification:classes": classes,
        },
        "run": {"href": "run.json", "type": "application/json", "roles": ["metadata"]},
    }
    media = {"parquet": "application/vnd.apache.parquet", "gpkg": "application/geopackage+sqlite3",
             "geojson": "application/geo+json", "report": "text/html", "manifest": "application/json"}
    for kind, path in record["outputs"].items():
        if kind in media:
            assets[kind] = {"href": Path(path).name, "type": media[kind], "roles": ["data" if kind != "report" else
                                                                                      "overview"]}
    props = {
        "datetime": now, "created": now,
        "proj:epsg": epsg, "proj:shape": list(shape), "proj:transform": list(inp["transform"]),
        "classification:classes": classes,
        "geoseg:model": card.name, "geoseg:model_version": card.version,
        "geoseg:class_pixel_counts": record.get("class_pixel_counts", {}),
    }
    if epsg is None:
        props["proj:wkt2"] = crs.to_wkt()
    return {
        "type": "Feature", "stac_version": STAC_VERSION, "stac_extensions": list(EXTENSIONS.values()),
        "id": item_id, "bbox": bbox, "geometry": geometry, "properties": props,
        "links": [], "assets": assets,
    }


def collection(items: list[dict[str, Any]], collection_id: str, hrefs: list[str], card) -> dict[str, Any]:
    """A STAC Collection over a run's items (``hrefs``: each item's path relative to the collection)."""
    boxes = [i["bbox"] for i in items]
    bbox = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    times = sorted(i["properties"]["datetime"] for i in items)
    return {
        "type": "Collection", "stac_version": STAC_VERSION, "stac_extensions": [EXTENSIONS["classification"]],
        "id": collection_id, "description": f"Land-cover maps by geoseg with {card.name} {card.version}",
        "license": "proprietary" if not card.license else card.license.replace(" ", "-"),
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [[times[0], times[-1]]]}},
        "summaries": {"classification:classes": items[0]["properties"]["classification:classes"]},
        "links": [{"rel": "item", "href": h, "type": "application/json"} for h in hrefs],
    }


def validate(obj: dict[str, Any], root: Path | None = None) -> None:
    """Validate a STAC Item or Collection against the core and extension schemas in ``root`` (default: the
    shared folder), offline. Raises ``jsonschema.ValidationError``."""
    import jsonschema
    from referencing import Registry, Resource

    root = Path(root or SCHEMA_ROOT)
    if not root.exists():
        raise FileNotFoundError(f"{root}: STAC schemas not found (set GEOSEG_STAC_SCHEMAS)")

    import pystac

    geojson = Path(pystac.__file__).parent / "validation" / "jsonschemas" / "geojson"

    def retrieve(uri: str):
        rel = uri.split("://", 1)[1].split("#", 1)[0]
        if rel.startswith("geojson.org/schema/"):  # the GeoJSON schemas the STAC core refers to ship with pystac
            return Resource.from_contents(json.loads((geojson / rel.rsplit("/", 1)[1]).read_text()))
        return Resource.from_contents(json.loads((root / rel).read_text()))

    registry = Registry(retrieve=retrieve)
    kind = {"Feature": "item-spec/json-schema/item.json",
            "Collection": "collection-spec/json-schema/collection.json"}[obj["type"]]
    urls = [f"https://schemas.stacspec.org/v{obj['stac_version']}/{kind}", *obj.get("stac_extensions", [])]
    for url in urls:
        schema = retrieve(url).contents
        cls = jsonschema.validators.validator_for(schema)
        cls(schema, registry=registry).validate(obj)
