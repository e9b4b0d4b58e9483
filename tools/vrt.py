"""A VRT that repeats a real raster k x k times: a large input that costs no disk (tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import rasterio


def tiled_vrt(src_path, dst_path, k: int) -> Path:
    """Write ``dst_path``: ``src_path`` mosaicked k x k on its own grid extended right and down."""
    src_path = Path(src_path).resolve()
    with rasterio.open(src_path) as src:
        w, h, t = src.width, src.height, src.transform
        gt = ", ".join(repr(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
        dtype = {"uint8": "Byte", "int16": "Int16", "uint16": "UInt16", "float32": "Float32",
                 "int32": "Int32", "float64": "Float64"}[src.dtypes[0]]
        bands = []
        for b in range(1, src.count + 1):
            desc = src.descriptions[b - 1]
            srcs = "".join(
                f"<SimpleSource><SourceFilename relativeToVRT=\"0\">{escape(str(src_path))}</SourceFilename>"
                f"<SourceBand>{b}</SourceBand><SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{w}\" ySize=\"{h}\"/>"
                f"<DstRect xOff=\"{j * w}\" yOff=\"{i * h}\" xSize=\"{w}\" ySize=\"{h}\"/></SimpleSource>"
                for i in range(k) for j in range(k)
            )
            nd = f"<NoDataValue>{src.nodata!r}</NoDataValue>" if src.nodata is not None else ""
            ds = f"<Description>{escape(desc)}</Description>" if desc else ""
            bands.append(f"<VRTRasterBand dataType=\"{dtype}\" band=\"{b}\">{ds}{nd}{srcs}</VRTRasterBand>")
        xml = (f"<VRTDataset rasterXSize=\"{w * k}\" rasterYSize=\"{h * k}\"><SRS>{escape(src.crs.to_wkt())}</SRS>"
               f"<GeoTransform>{gt}</GeoTransform>{''.join(bands)}</VRTDataset>")
    Path(dst_path).write_text(xml)
    return Path(dst_path)
