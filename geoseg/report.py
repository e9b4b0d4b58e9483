"""``report.html``: one self-contained page per scene and one per run, for a person rather than a program.

A scene's page shows a preview (the class mask over an RGB rendering of the input: a 2-98 percentile stretch,
the model's colours with transparency, a scale bar drawn into the picture), a legend, the class-area table from
``run.json`` and a bar chart of it (inline SVG), the run's facts (input, model card, timings, megapixels
per second, blocks, skipped nodata tiles, warnings) and links to every output. A run's page adds up the scenes'
tables and shows a mosaic of their previews when they share a CRS.

Self-contained: CSS inline, pictures embedded as ``data:`` URIs (``preview.png`` is also written beside the
page, for slides), no script, nothing fetched from a network. The preview never reads full resolution of a large
raster: the mask (a COG) is read at the preview's size, which GDAL serves from the overviews, and the input
backdrop likewise when it has overviews; an input without overviews larger than ``MAX_BACKDROP_PX`` pixels is
left out (the mask is drawn alone, and the page says so).

``write_scene_report`` is called by the pipeline with the scene's local mask before publishing; ``build_reports``
(``geoseg report RUN_DIR``) rebuilds every page of a finished run, local or ``s3://``.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from geoseg.config import StorageConfig
from geoseg.conventions import NODATA
from geoseg.io import raster, store

log = logging.getLogger("geoseg")

__all__ = ["write_scene_report", "write_run_report", "build_reports", "render_preview", "MAX_PREVIEW_PX"]

MAX_PREVIEW_PX = 1024  # longest side of a preview picture
MAX_BACKDROP_PX = 16_000_000  # an input without overviews larger than this is not read for the backdrop
MASK_ALPHA = 0.55

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222;
padding:0 16px;background:#fafafa}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
figure{margin:0}figure img{max-width:100%;border:1px solid #ccc;background:#fff}
figcaption{color:#666;font-size:.85em}
table{border-collapse:collapse;font-size:.92em;background:#fff}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f0f0f0}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #555;vertical-align:middle;margin-right:6px}
ul.legend{list-style:none;padding:0;margin:0}ul.legend li{margin:3px 0}
.warn{color:#8a4b00}.ok{color:#2d6a2d}
dl{display:grid;grid-template-columns:max-content auto;gap:3px 14px;margin:0}dt{color:#666}dd{margin:0}
"""


# ------------------------------------------------------------------------------------------ small helpers


def _hex_rgb(color: str) -> tuple[int, int, int]:
    h = str(color).lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _classes(record: dict[str, Any]) -> list[dict[str, Any]]:
    return list(record.get("model", {}).get("classes", []))


def _palette(record: dict[str, Any]) -> dict[int, tuple[int, int, int]]:
    return {int(c["id"]): _hex_rgb(c.get("color", "#808080")) for c in _classes(record)}


def _fmt(v: float, decimals: int = 0) -> str:
    return f"{v:,.{decimals}f}"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _rel(path: str) -> str:
    """A link to an output beside the page: its file name."""
    return PurePosixPath(str(path)).name


# ------------------------------------------------------------------------------------------ preview


def _read_at(ds, bands: Sequence[int], out_shape: tuple[int, int]) -> np.ndarray:
    """Bands at ``out_shape`` (nearest); GDAL answers from the overview that fits when the file has them."""
    from rasterio.enums import Resampling

    return ds.read(list(bands), out_shape=(len(bands), *out_shape), resampling=Resampling.nearest)


def _rgb_bands(record: dict[str, Any], count: int) -> list[int]:
    """Input band indexes (1-based) for red, green, blue: by the model's band names, else the first three."""
    names = [str(b).lower() for b in record.get("model", {}).get("bands", [])]
    idx = record.get("input", {}).get("bands") or []
    want = (("b4", "red", "r"), ("b3", "green", "g"), ("b2", "blue", "b"))
    found = []
    for aliases in want:
        hit = next((idx[i] for i, n in enumerate(names) if n in aliases and i < len(idx)), None)
        found.append(hit)
    if all(found):
        return [int(b) for b in found]
    if len(idx) >= 3:
        return [int(b) for b in idx[:3]]
    if idx:
        return [int(idx[0])] * 3
    return [1, 2, 3] if count >= 3 else [1, 1, 1]


def _stretch(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per band 2-98 percentile stretch of the valid pixels to 0..1."""
    out = np.zeros(data.shape, np.float32)
    for i, band in enumerate(data.astype(np.float64)):
        v = band[valid]
        if not v.size:
            continue
        lo, hi = np.percentile(v, [2, 98])
        out[i] = np.clip((band - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return out


def _metres_per_px(transform, crs, shape: tuple[int, int], out_w: int) -> float | None:
    """Ground distance of one preview pixel along the scene's centre row (geodesic, on the CRS's ellipsoid)."""
    import pyproj

    try:
        pcrs = pyproj.CRS.from_user_input(crs if isinstance(crs, str) else crs.to_wkt())
        rows, cols = shape
        x0, y0 = transform @ (0, rows / 2)
        x1, y1 = transform @ (cols, rows / 2)
        to_ll = pyproj.Transformer.from_crs(pcrs, pcrs.geodetic_crs, always_xy=True)
        (lon0, lon1), (lat0, lat1) = to_ll.transform([x0, x1], [y0, y1])
        _, _, dist = pcrs.get_geod().inv(lon0, lat0, lon1, lat1)
        return float(dist) / out_w if dist > 0 else None
    except Exception:  # no CRS / not transformable: no scale bar
        return None


def _nice_length(max_m: float) -> float:
    """The largest 1, 2 or 5 x 10^n metres not above ``max_m``."""
    exp = 10 ** math.floor(math.log10(max_m))
    for f in (5, 2, 1):
        if f * exp <= max_m:
            return f * exp
    return exp


def _draw_scale_bar(img, m_per_px: float | None) -> None:
    from PIL import ImageDraw, ImageFont

    if not m_per_px:
        return
    w, h = img.size
    length_m = _nice_length(m_per_px * w / 4)
    bar = max(1, int(round(length_m / m_per_px)))
    label = f"{length_m / 1000:g} km" if length_m >= 1000 else f"{length_m:g} m"
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=max(11, h // 45))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pad = max(6, h // 80)
    tw = draw.textlength(label, font=font)
    th = max(11, h // 45)
    x0, y1 = pad, h - pad
    box = (x0 - 4, y1 - th - 14, x0 + max(bar, tw) + 6, y1 + 2)
    draw.rectangle(box, fill=(255, 255, 255))
    draw.rectangle((x0, y1 - 6, x0 + bar, y1 - 2), fill=(0, 0, 0))
    draw.text((x0, y1 - th - 11), label, fill=(0, 0, 0), font=font)


def render_preview(
    mask_ds,
    record: dict[str, Any],
    *,
    storage: StorageConfig | None = None,
    max_px: int = MAX_PREVIEW_PX,
    alpha: float = MASK_ALPHA,
    scale_bar: bool = True,
    min_px: int = 640,
) -> tuple[bytes, list[str]]:
    """PNG bytes of the mask over the input, and notes (what the preview had to leave out).

    A scene smaller than ``min_px`` is enlarged by a whole factor (nearest), so its pixels stay visible."""
    from PIL import Image

    notes: list[str] = []
    rows, cols = mask_ds.height, mask_ds.width
    scale = max(rows, cols) / max_px
    out_shape = (rows, cols) if scale <= 1 else (max(1, round(rows / scale)), max(1, round(cols / scale)))
    mask = _read_at(mask_ds, [1], out_shape)[0]
    nodata = NODATA if mask_ds.nodata is None else int(mask_ds.nodata)
    rgb = _backdrop(record, (rows, cols), out_shape, storage, notes)
    pal = np.zeros((256, 3), np.float32)
    for cid, c in _palette(record).items():
        pal[cid] = np.array(c, np.float32) / 255
    colour = pal[mask]
    has_class = mask != nodata
    if rgb is None:
        out = np.full((*out_shape, 3), 0.93, np.float32)
        out[has_class] = colour[has_class]
    else:
        out = rgb.copy()
        out[has_class] = (1 - alpha) * rgb[has_class] + alpha * colour[has_class]
    img = Image.fromarray(np.round(out * 255).astype(np.uint8), "RGB")
    k = max(1, min_px // max(out_shape))
    if k > 1:
        img = img.resize((out_shape[1] * k, out_shape[0] * k), Image.NEAREST)
    if scale_bar:
        _draw_scale_bar(img, _metres_per_px(mask_ds.transform, mask_ds.crs, (rows, cols), img.size[0]))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), notes


def _backdrop(record, shape, out_shape, storage, notes) -> np.ndarray | None:
    """The input as RGB 0..1 (H, W, 3) at ``out_shape``, or None (with a note) when it cannot be had cheaply."""
    path = record.get("input", {}).get("path")
    if not path:
        return None
    try:
        with raster.open_raster(path, storage) as src:
            if (src.height, src.width) != tuple(shape):
                notes.append(f"input {path} no longer matches the mask's size; preview without backdrop")
                return None
            if src.height * src.width > MAX_BACKDROP_PX and not src.overviews(1) and out_shape != tuple(shape):
                notes.append(f"input {path} has no overviews and {src.width}x{src.height} pixels: the preview shows "
                             "the mask alone rather than reading it at full resolution")
                return None
            bands = _rgb_bands(record, src.count)
            data = _read_at(src, bands, out_shape)
            nod = src.nodata
    except Exception as e:  # the input may have moved since the run: the report still has everything else
        notes.append(f"input {path} could not be read for the backdrop ({type(e).__name__}: {e})")
        return None
    valid = np.all(data != nod, axis=0) if nod is not None else np.ones(out_shape, bool)
    valid &= np.all(np.isfinite(data), axis=0) if data.dtype.kind == "f" else True
    rgb = _stretch(data, valid)
    rgb[:, ~valid] = 0
    return np.moveaxis(rgb, 0, -1)


# ------------------------------------------------------------------------------------------ chart, tables


def _bar_chart(table: dict[str, Any], palette_by_name: dict[str, tuple[int, int, int]]) -> str:
    """Class areas as horizontal bars (ha, with the percent of the valid area), as inline SVG: no plotting
    library to import, text that stays sharp and searchable."""
    names = list(table.get("classes", {}))
    ha = [float(table["classes"][n]["area_ha"]) for n in names]
    pct = [float(table["classes"][n]["percent"]) for n in names]
    label_w, bar_w, row_h, top = 150, 380, 24, 8
    width, base = label_w + bar_w + 70, top + row_h * max(len(names), 1)
    height, top_ha = base + 34, (max(ha) if ha else 0.0) or 1.0
    p10 = 10 ** math.floor(math.log10(top_ha / 4))  # axis ticks: 1, 2 or 5 times a power of ten
    step = next(m * p10 for m in (1, 2, 5, 10) if m * p10 >= top_ha / 4)
    dec = max(0, -math.floor(math.log10(step)))
    x = lambda v: label_w + bar_w * v / (step * math.ceil(top_ha / step))  # noqa: E731
    out = [f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="class areas (ha)" '
           'font-family="sans-serif" font-size="12">']
    for k in range(int(math.ceil(top_ha / step)) + 1):
        gx = x(k * step)
        out.append(f'<line x1="{gx:.1f}" y1="{top}" x2="{gx:.1f}" y2="{base}" stroke="#ddd"/>'
                   f'<text x="{gx:.1f}" y="{base + 14}" text-anchor="middle" fill="#444">{_fmt(k * step, dec)}</text>')
    for i, (n, h, p) in enumerate(zip(names, ha, pct)):
        y = top + i * row_h
        c = palette_by_name.get(n, (128, 128, 128))
        out.append(f'<text x="{label_w - 6}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end">{_e(n)}</text>'
                   f'<rect data-class="{_e(n)}" x="{label_w}" y="{y + 4}" width="{x(h) - label_w:.2f}" '
                   f'height="{row_h - 8}" fill="rgb{tuple(c)}" stroke="#333" stroke-width="0.5"/>'
                   f'<text x="{x(h) + 4:.1f}" y="{y + row_h / 2 + 4:.1f}" fill="#222">{p:.1f} %</text>')
    out.append(f'<line x1="{label_w}" y1="{base}" x2="{label_w + bar_w}" y2="{base}" stroke="#333"/>'
               f'<text x="{label_w + bar_w / 2}" y="{height - 4}" text-anchor="middle">area (ha)</text></svg>')
    return "".join(out)


def _area_table_html(table: dict[str, Any], palette_by_name: dict[str, tuple[int, int, int]]) -> str:
    rows = []
    for name, r in table.get("classes", {}).items():
        c = palette_by_name.get(name, (128, 128, 128))
        px = _fmt(r["pixels"]) if "pixels" in r else ""
        rows.append(
            f'<tr data-class="{_e(name)}"><td><span class="sw" style="background:rgb{c}"></span>{_e(name)}</td>'
            f'<td class="n">{px}</td><td class="n">{_fmt(r["area_m2"])}</td><td class="n">{_fmt(r["area_ha"], 2)}</td>'
            f'<td class="n">{_fmt(r["percent"], 2)}</td></tr>'
        )
    total = (f'<tr class="total"><th>valid area</th><th></th><th class="n">{_fmt(table.get("valid_m2", 0))}</th>'
             f'<th class="n">{_fmt(table.get("valid_ha", 0), 2)}</th><th class="n">100.00</th></tr>')
    method = f'<p class="sub">Areas: {_e(table["method"])}.</p>' if table.get("method") else ""
    return (
        '<table id="class-areas"><thead><tr><th>class</th><th>pixels</th><th>area (m²)</th><th>area (ha)</th>'
        "<th>% of valid area</th></tr></thead><tbody>" + "".join(rows) + "</tbody><tfoot>" + total +
        "</tfoot></table>" + method
    )


def _legend_html(record: dict[str, Any]) -> str:
    items = [f'<li><span class="sw" style="background:{_e(c.get("color", "#808080"))}"></span>{_e(c["name"])}</li>'
             for c in _classes(record)]
    return '<ul class="legend" id="legend">' + "".join(items) + "</ul>"


def _dl(pairs: Sequence[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _warnings(record: dict[str, Any], notes: Sequence[str]) -> list[str]:
    out = []
    stats = record.get("stats", {})
    if stats.get("blocks_failed"):
        out.append(f"{stats['blocks_failed']} block(s) failed and are nodata in the outputs: "
                   + "; ".join(f"{k}: {v}" for k, v in list(record.get("failed_blocks", {}).items())[:5]))
    vec = record.get("config", {}).get("vector", {})
    if vec.get("include_classes") is not None or vec.get("exclude_classes"):
        out.append("the polygons hold only some classes (vector.include_classes / exclude_classes); the mask and "
                   "the class areas hold all")
    areas = record.get("class_areas") or {}
    if areas.get("valid_m2", 1) == 0:
        out.append("the scene has no valid pixel: every pixel is nodata")
    out.extend(record.get("warnings", []) or [])
    out.extend(notes)
    return out


def _megapixels_per_s(px: float, seconds: float | None) -> str:
    return f"{px / 1e6 / seconds:.2f}" if seconds else "n/a"


def _page(title: str, subtitle: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class=\"sub\">{subtitle}</p>{body}</body></html>\n"
    )


# ------------------------------------------------------------------------------------------ scene page


def scene_report_html(record: dict[str, Any], preview_png: bytes | None, notes: Sequence[str] = (),
                      *, scene: str | None = None) -> str:
    """The scene page as text; ``record`` is the scene's run record (``run.json``)."""
    from geoseg.areas import area_table

    inp, model, tiling = record.get("input", {}), record.get("model", {}), record.get("tiling", {})
    stats, timings = record.get("stats", {}), record.get("timings_s", {})
    rows, cols = (inp.get("shape_rows_cols") or [0, 0])[:2]
    scene = scene or PurePosixPath(str(inp.get("path", "scene"))).stem
    palette_by_name = {c["name"]: _hex_rgb(c.get("color", "#808080")) for c in _classes(record)}
    table = record.get("class_areas") or area_table({})
    seconds = timings.get("total") or timings.get("wall")
    tr = inp.get("transform") or [0, 0, 0, 0, 0, 0]
    parts = []
    parts.append('<div class="row">')
    if preview_png is not None:
        parts.append(f'<figure><img id="preview" alt="class mask over the input" src="{_data_uri(preview_png)}">'
                     f"<figcaption>Classes over the input (RGB, 2-98 % stretch); {int(MASK_ALPHA * 100)} % opaque. "
                     '<a href="preview.png">preview.png</a></figcaption></figure>')
    parts.append(f"<div><h2 style=\"margin-top:0\">Legend</h2>{_legend_html(record)}</div></div>")
    parts.append("<h2>Class areas</h2><div class=\"row\">")
    parts.append(_area_table_html(table, palette_by_name))
    if table.get("classes"):
        parts.append(f"<figure>{_bar_chart(table, palette_by_name)}</figure>")
    parts.append("</div>")
    parts.append("<h2>Run</h2>")
    parts.append(_dl([
        ("input", _e(inp.get("path", ""))),
        ("size", f"{_fmt(cols)} x {_fmt(rows)} px ({rows * cols / 1e6:.2f} Mpx), bands {_e(inp.get('bands'))}, "
                 f"{_e(inp.get('dtype', ''))}, nodata {_e(inp.get('nodata'))}"),
        ("CRS / pixel", f"{_e(inp.get('crs', ''))}; {abs(tr[0]):.6g} x {abs(tr[4]):.6g} CRS units"),
        ("model", f"{_e(model.get('name'))} {_e(model.get('version'))} ({_e(model.get('architecture'))}), "
                  f"bands {_e(', '.join(model.get('bands', [])))}, {_e(model.get('gsd_m'))} m"),
        ("licence", f"{_e(model.get('license', ''))}. {_e(model.get('attribution', ''))}"),
        ("timings", ", ".join(f"{_e(k)} {v:.2f} s" for k, v in timings.items() if isinstance(v, (int, float)))),
        ("throughput", f"{_megapixels_per_s(rows * cols, seconds)} Mpx/s"),
        ("blocks", f"{_e(tiling.get('blocks'))} of {_e(tiling.get('block_px'))} px: {stats.get('blocks_computed', 0)}"
                   f" computed, {stats.get('blocks_resumed', 0)} resumed, {stats.get('blocks_failed', 0)} failed"),
        ("tiles", f"{stats.get('tiles_inferred', 0)} inferred in {stats.get('model_calls', 0)} model calls; "
                  f"{stats.get('tiles_skipped_nodata', 0)} skipped (all nodata)"),
        ("geoseg", _e(record.get("geoseg_version", ""))),
    ]))
    warns = _warnings(record, notes)
    parts.append("<h2>Warnings</h2>" + ("<ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in warns) + "</ul>"
                                         if warns else '<p class="ok">none</p>'))
    outs = dict(record.get("outputs", {}))
    outs.setdefault("run", "run.json")
    links = "".join(f'<li>{_e(k)}: <a href="{_e(_rel(v))}">{_e(_rel(v))}</a></li>' for k, v in outs.items()
                    if k != "report")
    parts.append(f'<h2>Outputs</h2><ul id="outputs">{links}</ul>')
    sub = f"geoseg scene report · {_e(model.get('name', ''))} · {_fmt(table.get('valid_ha', 0), 2)} ha valid"
    return _page(f"{scene}", sub, "".join(parts))


def write_scene_report(
    out_dir: str | os.PathLike,
    record: dict[str, Any],
    *,
    mask: str | os.PathLike | None = None,
    storage: StorageConfig | None = None,
) -> dict[str, Path]:
    """Write ``report.html`` and ``preview.png`` into the local directory ``out_dir`` from the scene's run record
    and its mask (default: ``record['outputs']['mask']``); returns ``{"report": path, "preview": path}``."""
    out_dir = Path(out_dir)
    mask = mask or record.get("outputs", {}).get("mask")
    preview, notes = None, []
    if mask:
        with raster.open_raster(str(mask), storage) as ds:
            preview, notes = render_preview(ds, record, storage=storage)
    written = {}
    if preview is not None:
        written["preview"] = out_dir / "preview.png"
        written["preview"].write_bytes(preview)
    outs = dict(record.get("outputs", {}))
    if preview is not None:
        outs["preview"] = "preview.png"
    page = scene_report_html(dict(record, outputs=outs), preview, notes)
    written["report"] = out_dir / "report.html"
    written["report"].write_text(page, encoding="utf-8")
    return written


# ------------------------------------------------------------------------------------------ run page


def _mosaic_preview(scenes, storage, max_px: int = MAX_PREVIEW_PX) -> tuple[bytes | None, list[str]]:
    """One picture of every scene's mask over its input, when the scenes share a CRS and are north-up."""
    import pyproj
    from affine import Affine
    from PIL import Image

    crss = [pyproj.CRS.from_user_input(s.record["input"]["crs"]) for s in scenes]
    ts = [Affine(*s.record["input"]["transform"][:6]) for s in scenes]
    if not all(c.equals(crss[0]) for c in crss) or any(t.b or t.d for t in ts):
        return None, ["the scenes differ in CRS (or are rotated): no mosaic; see each scene's page"]
    boxes = []
    for s, t in zip(scenes, ts):
        r, c = s.record["input"]["shape_rows_cols"][:2]
        xs, ys = t @ (np.array([0, c]), np.array([0, r]))
        boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))
    b = np.array(boxes)
    xmin, ymin, xmax, ymax = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    res = max(xmax - xmin, ymax - ymin) / max_px
    res = max(res, min(min(abs(t.a), abs(t.e)) for t in ts))  # never finer than the scenes
    W, H = max(1, int(round((xmax - xmin) / res))), max(1, int(round((ymax - ymin) / res)))
    canvas = np.full((H, W, 3), 238, np.uint8)
    notes = []
    for s, box in zip(scenes, boxes):
        c0, c1 = int(round((box[0] - xmin) / res)), int(round((box[2] - xmin) / res))
        r0, r1 = int(round((ymax - box[3]) / res)), int(round((ymax - box[1]) / res))
        if c1 <= c0 or r1 <= r0:
            continue
        mask = s.output("mask")
        if not mask or not store.exists(mask, storage):
            notes.append(f"{s.name}: mask.tif missing, left out of the mosaic")
            continue
        with raster.open_raster(mask, storage) as ds:
            png, n = render_preview(ds, s.record, storage=storage, max_px=max(r1 - r0, c1 - c0), scale_bar=False,
                                    min_px=1)
        notes.extend(f"{s.name}: {x}" for x in n)
        tile = Image.open(io.BytesIO(png)).convert("RGB").resize((c1 - c0, r1 - r0), Image.NEAREST)
        canvas[r0:r1, c0:c1] = np.asarray(tile)
    img = Image.fromarray(canvas, "RGB")
    first = scenes[0].record["input"]
    _draw_scale_bar(img, _metres_per_px(Affine(res, 0, xmin, 0, -res, ymax), first["crs"], (H, W), W))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), notes


def run_report_html(scenes, preview_png: bytes | None, notes: Sequence[str] = (), *, title: str = "run") -> str:
    """The run page: scenes, summed class areas, facts, links to each scene's page."""
    from geoseg.areas import area_table, sum_tables

    recs = [s.record for s in scenes]
    table = sum_tables([r.get("class_areas") or area_table({}) for r in recs])
    palette_by_name: dict[str, tuple[int, int, int]] = {}
    legend_rec = recs[0]
    for r in recs:
        for c in _classes(r):
            palette_by_name.setdefault(c["name"], _hex_rgb(c.get("color", "#808080")))
    px = sum(r["input"]["shape_rows_cols"][0] * r["input"]["shape_rows_cols"][1] for r in recs)
    job_s = max((r.get("timings_s", {}).get("total") or r.get("timings_s", {}).get("wall") or 0) for r in recs)
    st = lambda k: sum(int(r.get("stats", {}).get(k, 0)) for r in recs)  # noqa: E731
    parts = ['<div class="row">']
    if preview_png is not None:
        parts.append(f'<figure><img id="preview" alt="mosaic of the scenes" src="{_data_uri(preview_png)}">'
                     "<figcaption>Every scene's classes over its input.</figcaption></figure>")
    parts.append(f"<div><h2 style=\"margin-top:0\">Legend</h2>{_legend_html(legend_rec)}</div></div>")
    parts.append("<h2>Class areas (all scenes)</h2><div class=\"row\">")
    parts.append(_area_table_html(table, palette_by_name))
    if table.get("classes"):
        parts.append(f"<figure>{_bar_chart(table, palette_by_name)}</figure>")
    parts.append("</div><h2>Scenes</h2><table id=\"scenes\"><thead><tr><th>scene</th><th>input</th><th>size</th>"
                 "<th>CRS</th><th>valid (ha)</th><th>time (s)</th><th>Mpx/s</th><th>warnings</th></tr></thead><tbody>")
    for s in scenes:
        r = s.record
        rows, cols = r["input"]["shape_rows_cols"][:2]
        t = r.get("timings_s", {}).get("wall")
        link = f'<a href="{_e(s.name)}/report.html">{_e(s.name)}</a>' if "report" in r.get("outputs", {}) or \
            s.has_report else _e(s.name)
        parts.append(
            f"<tr><td>{link}</td><td>{_e(r['input'].get('path', ''))}</td><td class=\"n\">{cols} x {rows}</td>"
            f"<td>{_e(r['input'].get('crs', ''))}</td>"
            f"<td class=\"n\">{_fmt((r.get('class_areas') or {}).get('valid_ha', 0), 2)}</td>"
            f"<td class=\"n\">{t if t is not None else ''}</td><td class=\"n\">{_megapixels_per_s(rows * cols, t)}</td>"
            f"<td class=\"n\">{len(_warnings(r, ()))}</td></tr>")
    parts.append("</tbody></table>")
    models = sorted({f"{r['model'].get('name')} {r['model'].get('version')}" for r in recs})
    parts.append("<h2>Run</h2>" + _dl([
        ("scenes", str(len(scenes))),
        ("pixels", f"{px / 1e6:.2f} Mpx"),
        ("model", _e(", ".join(models))),
        ("job time", f"{job_s:.2f} s (the longest scene's time since the job started)"),
        ("throughput", f"{_megapixels_per_s(px, job_s)} Mpx/s"),
        ("blocks", f"{sum(int(r.get('tiling', {}).get('blocks', 0)) for r in recs)}: {st('blocks_computed')} "
                   f"computed, {st('blocks_resumed')} resumed, {st('blocks_failed')} failed"),
        ("tiles", f"{st('tiles_inferred')} inferred; {st('tiles_skipped_nodata')} skipped (all nodata)"),
    ]))
    warns = [f"{s.name}: {w}" for s in scenes for w in _warnings(s.record, ())] + list(notes)
    parts.append("<h2>Warnings</h2>" + ("<ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in warns) + "</ul>"
                                         if warns else '<p class="ok">none</p>'))
    links = []
    for s in scenes:
        outs = dict(s.record.get("outputs", {}))
        outs.setdefault("run", "run.json")
        links.append(f"<li>{_e(s.name)}: " + ", ".join(
            f'<a href="{_e(s.name)}/{_e(_rel(v))}">{_e(_rel(v))}</a>' for v in outs.values()) + "</li>")
    parts.append(f'<h2>Outputs</h2><ul id="outputs">{"".join(links)}</ul>')
    sub = f"geoseg run report · {len(scenes)} scene(s) · {_fmt(table.get('valid_ha', 0), 2)} ha valid"
    return _page(title, sub, "".join(parts))


def write_run_report(run: str, storage: StorageConfig | None = None, *, scenes=None) -> str:
    """(Re)write ``<run>/report.html`` from the finished scenes of ``run`` (local or ``s3://``); returns its path."""
    from geoseg.runs import find_scenes

    storage = storage or StorageConfig()
    scenes = scenes if scenes is not None else find_scenes(run, storage)
    for s in scenes:
        s.has_report = store.exists(store.join(s.dir, "report.html"), storage)
    preview, notes = _mosaic_preview(scenes, storage)
    title = PurePosixPath(str(run).rstrip("/")).name or "run"
    page = run_report_html(scenes, preview, notes, title=title)
    dest = store.join(run, "report.html")
    store.write_bytes(dest, page.encode("utf-8"), storage)
    return dest


def build_reports(run: str, storage: StorageConfig | None = None) -> list[str]:
    """``geoseg report RUN_DIR``: every scene's report.html + preview.png, then the run's report.html (a run of
    one scene given as the scene directory gets its scene page only). Returns the pages written."""
    from geoseg.runs import find_scenes

    storage = storage or StorageConfig()
    scenes = find_scenes(run, storage)
    written = []
    work = Path(tempfile.mkdtemp(prefix="geoseg-report-"))
    try:
        for s in scenes:
            rec = s.record
            if "class_areas" not in rec:  # a run from before class areas: measure them from the mask
                from geoseg.areas import mask_class_areas

                names = [c["name"] for c in sorted(_classes(rec), key=lambda c: c["id"])]
                with raster.open_raster(s.output("mask"), storage) as ds:
                    rec = dict(rec, class_areas=mask_class_areas(ds, names, nodata=NODATA))
            rec = dict(rec, outputs={k: store.join(s.dir, _rel(v)) for k, v in rec.get("outputs", {}).items()})
            d = work / s.name
            d.mkdir()
            files = write_scene_report(d, rec, mask=rec["outputs"].get("mask"), storage=storage)
            for kind in ("preview", "report"):  # the page last: it links to the picture
                if kind in files:
                    store.publish_file(str(files[kind]), store.join(s.dir, files[kind].name), storage)
            written.append(store.join(s.dir, "report.html"))
            s.record = rec
        if not store.exists(store.join(run, "run.json"), storage):
            written.append(write_run_report(run, storage, scenes=scenes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return written
