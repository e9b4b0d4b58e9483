"""The bad-input corpus: small real files made at test time, each with the exit code and message it must get.

Every case is something a hostile but fair user does: a wrong file, a wrong unit, a wrong band order, a
wrong setting. ``tests/test_bad_inputs.py`` runs each through the real CLI (in-process) and checks: the exit
code's class, one line on stderr, no traceback, the message names the file or key and matches the problem,
and no output is left under a final name. ``python -m tests.bad_inputs`` rewrites ``docs/errors.md`` (the
table of kinds -> messages) from a run of the corpus; a test keeps it current.

Inputs derive from the real Sentinel-2 L1C chip in ``../shared/data/sentinel2`` (13 bands, B1..B12 incl. B8A,
int16 reflectance x 10000, EPSG:4326, nodata 0).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import rasterio
from affine import Affine
from rasterio.control import GroundControlPoint

from geoseg.errors import EXIT_INPUT, EXIT_RUNTIME
from tests.rasters import chip_copy, corrupt_tile_copy

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"


@dataclass(frozen=True)
class Case:
    """``build(tmp, chip)`` makes the inputs and returns the CLI arguments (after ``geoseg``)."""

    name: str
    kind: str  # what the user did, in words (the docs table's first column)
    build: Callable[[Path, Path], list[str]]
    exit_code: int
    pattern: str  # a regex the one-line message must match
    names: str  # the file name or config key the message must contain


def _predict(inp: Path | str, tmp: Path, *sets: str, model: str = "dynamic-world") -> list[str]:
    args = ["predict", str(inp), "--model", model, "--out", str(tmp / "out"), "--set", "runtime.engine=local"]
    for s in sets:
        args += ["--set", s]
    return args


def _copy(tmp: Path, chip: Path, name: str, **kw) -> Path:
    return chip_copy(chip, tmp / name, **kw)


def _nine_bands_named_b1_to_b8a(tmp: Path, chip: Path) -> list[str]:
    """The first nine bands of the chip (B1..B8A), named so: fed by position they would be read as B2..B12."""
    p = _copy(tmp, chip, "s2_b1_b8a.tif", transform_data=lambda d: d[:9])
    return _predict(p, tmp)


def _reflectance_0_1(tmp: Path, chip: Path) -> list[str]:
    p = _copy(tmp, chip, "reflectance_0_1.tif", profile={"dtype": "float32", "nodata": 0.0},
              transform_data=lambda d: d.astype(np.float32) / 10000)
    return _predict(p, tmp)


def _gsd_6x(tmp: Path, chip: Path) -> list[str]:
    with rasterio.open(chip) as src:
        t = src.transform
    p = _copy(tmp, chip, "gsd_60m.tif", profile={"transform": Affine(t.a * 6, 0, t.c, 0, t.e * 6, t.f)})
    return _predict(p, tmp)


def _south_up(tmp: Path, chip: Path) -> list[str]:
    with rasterio.open(chip) as src:
        t, h = src.transform, src.height
    p = _copy(tmp, chip, "south_up.tif", profile={"transform": Affine(t.a, 0, t.c, 0, -t.e, t.f + t.e * h)},
              transform_data=lambda d: d[:, ::-1, :])
    return _predict(p, tmp)


def _huge_vrt(tmp: Path, chip: Path) -> list[str]:
    """A VRT declaring 10^6 x 10^6 pixels over the 512 px chip."""
    with rasterio.open(chip) as src:
        crs = src.crs.to_wkt()
        t = src.transform
        names = src.descriptions
    bands = "".join(
        f'<VRTRasterBand dataType="Int16" band="{b}"><Description>{names[b - 1]}</Description>'
        f'<SimpleSource><SourceFilename relativeToVRT="0">{chip}</SourceFilename><SourceBand>{b}</SourceBand>'
        '<SrcRect xOff="0" yOff="0" xSize="512" ySize="512"/><DstRect xOff="0" yOff="0" xSize="512" ySize="512"/>'
        "</SimpleSource></VRTRasterBand>"
        for b in range(1, 14)
    )
    gt = ", ".join(repr(v) for v in (t.c, t.a, 0.0, t.f, 0.0, t.e))
    p = tmp / "huge.vrt"
    p.write_text(f'<VRTDataset rasterXSize="1000000" rasterYSize="1000000"><SRS>{crs}</SRS>'
                 f"<GeoTransform>{gt}</GeoTransform>{bands}</VRTDataset>")
    return _predict(p, tmp)


def _window(tmp: Path, chip: Path, name: str, rows: int, cols: int) -> Path:
    with rasterio.open(chip) as src:
        w = rasterio.windows.Window(0, 0, cols, rows)
        prof = src.profile
        prof.update(width=cols, height=rows, transform=src.window_transform(w), tiled=False)
        prof.pop("blockxsize", None)
        prof.pop("blockysize", None)
        data = src.read(window=w)
        names = src.descriptions
    with rasterio.open(tmp / name, "w", **prof) as dst:
        dst.write(data)
        dst.descriptions = names
    return tmp / name


def _one_pixel(tmp: Path, chip: Path) -> list[str]:
    return _predict(_window(tmp, chip, "one_pixel.tif", 1, 1), tmp)


def _one_row(tmp: Path, chip: Path) -> list[str]:
    return _predict(_window(tmp, chip, "one_row.tif", 1, 512), tmp)


def _gcps_only(tmp: Path, chip: Path) -> list[str]:
    gcps = [GroundControlPoint(0, 0, -0.78, 38.13), GroundControlPoint(0, 512, -0.734, 38.13),
            GroundControlPoint(512, 0, -0.78, 38.084)]
    p = _copy(tmp, chip, "gcps.tif", profile={"crs": None, "transform": Affine.identity()})
    with rasterio.open(p, "r+") as ds:
        ds.gcps = (gcps, rasterio.crs.CRS.from_epsg(4326))
    return _predict(p, tmp)


def _config_file(tmp: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


# name, what the user did, build, exit code, message pattern, what the message must name
CASES: list[Case] = [
    # files that are not usable rasters
    Case("missing_file", "input file does not exist", lambda t, c: _predict(t / "nope.tif", t),
         EXIT_INPUT, r"nope\.tif: input not found", "nope.tif"),
    Case("not_a_raster", "input is a text file named .tif",
         lambda t, c: (t.joinpath("notes.tif").write_text("not pixels\n"), _predict(t / "notes.tif", t))[1],
         EXIT_INPUT, r"notes\.tif: not a readable raster", "notes.tif"),
    Case("directory", "input is an empty directory",
         lambda t, c: (t.joinpath("empty_dir").mkdir(), _predict(t / "empty_dir", t))[1],
         EXIT_INPUT, r"empty_dir: .*(no rasters|directory)", "empty_dir"),
    Case("truncated", "GeoTIFF cut off after 3000 bytes",
         lambda t, c: (t.joinpath("truncated.tif").write_bytes(c.read_bytes()[:3000]),
                       _predict(t / "truncated.tif", t))[1],
         EXIT_INPUT, r"truncated\.tif: .*(truncated|corrupt|not a readable)", "truncated.tif"),
    Case("corrupt_tile", "one compressed tile is garbage (header fine)",
         lambda t, c: _predict(corrupt_tile_copy(c, t / "badtile.tif", (1, 1), band=2), t,
                               "tiling.block_px=128", "tiling.tile_px=128", "vector.enabled=false"),
         EXIT_RUNTIME, r"badtile\.tif: block r\d+c\d+: .*ZIPDecode", "badtile.tif"),
    Case("unsupported_dtype", "complex-valued pixels",
         lambda t, c: _predict(_copy(t, c, "complex.tif", profile={"dtype": "complex64", "nodata": None}), t),
         EXIT_INPUT, r"complex\.tif: unsupported data type complex64 \(supported: ", "complex.tif"),
    # georeferencing
    Case("no_crs", "no CRS", lambda t, c: _predict(_copy(t, c, "nocrs.tif", profile={"crs": None}), t),
         EXIT_INPUT, r"nocrs\.tif: has no CRS", "nocrs.tif"),
    Case("gcps_only", "georeferenced by ground control points only", _gcps_only,
         EXIT_INPUT, r"gcps\.tif: georeferenced only by ground control points", "gcps.tif"),
    Case("rotated", "rotated geotransform",
         lambda t, c: _predict(_copy(t, c, "rotated.tif", profile={
             "transform": Affine(10, 2, 500000, 1, -10, 4000000), "crs": "EPSG:32630"}), t),
         EXIT_INPUT, r"rotated\.tif: rotated or sheared", "rotated.tif"),
    Case("south_up", "south-up raster (positive pixel height)", _south_up,
         EXIT_INPUT, r"south_up\.tif: south-up .*mirrored image.*warp it north-up", "south_up.tif"),
    # the input contract
    Case("too_few_bands", "3-band RGB given to a 9-band model",
         lambda t, c: _predict(_copy(t, c, "rgb.tif", transform_data=lambda d: d[[3, 2, 1]]), t),
         EXIT_INPUT, r"rgb\.tif: has 3 bands but the model needs 9", "rgb.tif"),
    Case("bands_named_wrong", "9 bands named B1..B8A (fed by position they would be B2..B12)",
         _nine_bands_named_b1_to_b8a, EXIT_INPUT,
         r"s2_b1_b8a\.tif: its bands are named .*B8A.* but the model needs .*missing: B11, B12.*input\.bands",
         "s2_b1_b8a.tif"),
    Case("band_index_out_of_range", "input.bands names band 20 of a 13-band file",
         lambda t, c: _predict(c, t, "input.bands=[2,3,4,5,6,7,8,12,20]"),
         EXIT_INPUT, r"input\.bands \[20\] out of range; the raster has 13 bands", "input.bands"),
    Case("reflectance_0_1", "float reflectance 0-1 given to a model of reflectance x 10000",
         _reflectance_0_1, EXIT_INPUT,
         r"reflectance_0_1\.tif: values are in other units.*set input\.scale=10000", "reflectance_0_1.tif"),
    Case("gsd_6x", "pixel size 6x the model's (60 m for a 10 m model)", _gsd_6x, EXIT_INPUT,
         r"gsd_60m\.tif: pixel size 5\d\.\d+ m .* is [56]\.\d+x the model's 10 m \(accepted: 6\.5 to 15 m\)",
         "gsd_60m.tif"),
    Case("one_pixel", "a 1 x 1 px raster", _one_pixel, EXIT_INPUT,
         r"one_pixel\.tif: is 1 x 1 px \(cols x rows\) but the model needs at least 2 x 2", "one_pixel.tif"),
    Case("one_row", "a 512 x 1 px strip", _one_row, EXIT_INPUT,
         r"one_row\.tif: is 512 x 1 px \(cols x rows\) but the model needs at least 2 x 2", "one_row.tif"),
    Case("huge_vrt", "a VRT declaring 10^6 x 10^6 px over a 512 px file", _huge_vrt, EXIT_INPUT,
         r"huge\.vrt: declares 1,000,000 x 1,000,000 px = 1,000,000,000,000 pixels, over runtime\.max_pixels",
         "huge.vrt"),
    # settings
    Case("too_many_workers", "runtime.workers=64 on a machine with fewer CPUs",
         lambda t, c: _predict(c, t, "runtime.engine=ray", "runtime.workers=64", "runtime.num_cpus=2"),
         EXIT_INPUT, r"runtime\.workers=64 x runtime\.cpus_per_worker=1 need 64 CPUs but this machine has 2",
         "runtime.workers"),
    Case("cuda_without_gpu", "runtime.device=cuda on a machine without a GPU",
         lambda t, c: _predict(c, t, "runtime.device=cuda"),
         EXIT_INPUT, r"runtime\.device is 'cuda' but this machine has no usable CUDA device", "runtime.device"),
    Case("unknown_key", "a typo in a config key", lambda t, c: _predict(c, t, "tiling.tile_size=256"),
         EXIT_INPUT, r"unknown key 'tiling\.tile_size' \(valid keys here: block_px, halo_px, tile_px\)",
         "tiling.tile_size"),
    Case("bad_value", "a negative block size", lambda t, c: _predict(c, t, "tiling.block_px=-512"),
         EXIT_INPUT, r"tiling\.block_px: Input should be greater than 0 \(got -512\)", "tiling.block_px"),
    Case("cross_key_value", "block size not a multiple of the tile size (no config dump)",
         lambda t, c: _predict(c, t, "tiling.block_px=300"),
         EXIT_INPUT, r"tiling\.block_px \(300\) must be a multiple of tiling\.tile_px \(256\)$", "tiling.block_px"),
    Case("stride", "tile size not a multiple of the model's output stride",
         lambda t, c: _predict(c, t, "tiling.tile_px=255", "tiling.block_px=510"),
         EXIT_INPUT, r"tile_px \(255\) must be a multiple of the model's output stride \(2\)", "tile_px"),
    Case("unknown_class", "vector.include_classes names a class the model lacks",
         lambda t, c: _predict(c, t, "vector.include_classes=[buildings]"),
         EXIT_INPUT, r"vector\.include_classes: unknown class 'buildings' \(valid names: water, trees",
         "vector.include_classes"),
    Case("set_without_equals", "--set without KEY=VALUE", lambda t, c: _predict(c, t, "tiling.block_px"),
         EXIT_INPUT, r"--set 'tiling\.block_px': expected KEY=VALUE", "tiling.block_px"),
    Case("unknown_model", "a model name that is not registered",
         lambda t, c: _predict(c, t, model="dynamic-wrld"),
         EXIT_INPUT, r"unknown model 'dynamic-wrld': known models: .*dynamic-world", "dynamic-wrld"),
    Case("scale_zero", "input.scale=0", lambda t, c: _predict(c, t, "input.scale=0"),
         EXIT_INPUT, r"input\.scale: must be a finite, non-zero number \(got 0\)", "input.scale"),
    Case("config_missing", "geoseg run of a config file that does not exist",
         lambda t, c: ["run", str(t / "nojob.yaml")], EXIT_INPUT, r"nojob\.yaml: config file not found",
         "nojob.yaml"),
    Case("config_not_yaml", "a job file that is not YAML",
         lambda t, c: ["run", str(_config_file(t, "input: [unclosed\n", "broken.yaml"))],
         EXIT_INPUT, r"broken\.yaml: not valid YAML", "broken.yaml"),
    Case("config_no_inputs", "a job file without input paths",
         lambda t, c: ["run", str(_config_file(t, f"output:\n  dir: {t / 'out'}\n", "noinput.yaml"))],
         EXIT_INPUT, r"input\.paths is empty", "input.paths"),
    Case("duplicate_stems", "two inputs that would write the same output folder",
         lambda t, c: (t.joinpath("a").mkdir(), t.joinpath("b").mkdir(),
                       _copy(t, c, "a/scene.tif"), _copy(t, c, "b/scene.tif"),
                       ["predict", str(t / "a/scene.tif"), str(t / "b/scene.tif"), "--out", str(t / "out"),
                        "--set", "runtime.engine=local"])[-1],
         EXIT_INPUT, r"share the output name 'scene'; rename one", "scene.tif"),
    # outputs
    Case("output_is_file", "--out is an existing file",
         lambda t, c: (t.joinpath("afile").write_text("x"),
                       ["predict", str(c), "--out", str(t / "afile" / "sub"), "--set", "runtime.engine=local"])[1],
         EXIT_INPUT, r"afile/sub: cannot create the output directory", "afile/sub"),
]


def run_case(case: Case, tmp: Path, chip: Path):
    """Run one case through the CLI in-process; returns (exit code, stderr, stdout)."""
    from click.testing import CliRunner

    from geoseg.cli import main

    args = case.build(tmp, chip)
    res = CliRunner().invoke(main, args, catch_exceptions=True)
    return res.exit_code, res.stderr, res.stdout


def table(results: list[tuple[Case, int, str]], tmp_dirs: list[Path], chip: Path) -> str:
    """The docs table: kind -> exit code -> message (temporary folders shown as ``<dir>``)."""
    lines = [
        "# What geoseg says when the input is wrong",
        "",
        "Generated by `python -m tests.bad_inputs` from the bad-input corpus in `tests/bad_inputs.py`, whose",
        "every case the test suite runs (`tests/test_bad_inputs.py`). Exit codes: 3 = bad input or",
        "configuration (do not retry), 4 = runtime failure (a retry may succeed), 130 = interrupted (a rerun",
        "resumes), 1 = internal error, 2 = usage error. `--debug` adds the traceback.",
        "",
        "| what the user did | exit | message |",
        "|---|---|---|",
    ]
    for case, code, msg in results:
        for d in tmp_dirs:
            msg = msg.replace(str(d), "<dir>")
        msg = msg.replace(str(chip.parent), "<data>")
        msg = msg.strip().removeprefix("geoseg: error: ").replace("|", "\\|")
        lines.append(f"| {case.kind} | {code} | `{msg}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    import tempfile

    chip = ROOT.parent / "shared" / "data" / "sentinel2" / "Spain_7370579_S2Hand.tif"
    results = []
    dirs = []
    for case in CASES:
        tmp = Path(tempfile.mkdtemp(prefix=f"geoseg-{case.name}-"))
        dirs.append(tmp)
        code, err, _ = run_case(case, tmp, chip)
        results.append((case, code, err))
        ok = code == case.exit_code and re.search(case.pattern, err.strip())
        print(f"{'ok ' if ok else 'BAD'} {case.name}: {code} {err.strip()[:100]}")
    out = Path(argv[0]) if argv else DOC
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table(results, dirs, chip))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
