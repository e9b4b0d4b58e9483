"""Ray job entrypoint: on-demand mapping of one region.

With ``--aoi`` (a polygon file or a bbox), the scenes (or the items of ``--stac``) become one region grid and
one set of outputs in ``OUT/<name>/`` (``geoseg map``); without it, each scene is mapped on its own grid
(``geoseg predict``).

    ray job submit -- python jobs/map_region.py s3://imagery/region/*.tif --aoi district.gpkg \\
        --out s3://results/region-42/ [--model PATH] [--set k=v]

Exit codes as the CLI's: 3 bad input or configuration, 4 runtime failure (retry), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from geoseg.errors import GeosegError, exit_code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="default: the config's model, or dynamic-world")
    ap.add_argument("--config", default=None, help="a YAML job file for the other settings (e.g. a ConfigMap)")
    ap.add_argument("--aoi", default=None, help="polygon file or bbox minx,miny,maxx,maxy (then: one region)")
    ap.add_argument("--aoi-crs", default="EPSG:4326")
    ap.add_argument("--stac", default=None, help="a saved STAC ItemCollection instead of inputs")
    ap.add_argument("--name", default=None, help="region name (default: the AOI file's stem)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sets = args.overrides + ["runtime.progress=log"]
    try:
        if args.aoi:
            from geoseg.driver import map_region

            records = [map_region(args.inputs, args.aoi, args.out, model=args.model, stac=args.stac,
                                  name=args.name, overrides=[f"input.aoi_crs={args.aoi_crs}", *sets],
                                  config=args.config)]
        else:
            from geoseg.driver import predict

            if not args.inputs:
                ap.error("give input rasters (or --aoi with --stac)")
            records = predict(args.inputs, args.out, model=args.model or "dynamic-world", overrides=sets)
        for r in records:
            logging.info("done: %s -> %s", r["input"]["path"], r["outputs"])
    except (GeosegError, KeyboardInterrupt) as e:
        logging.error("%s", e if isinstance(e, GeosegError) else "interrupted; a rerun resumes")
        return exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
