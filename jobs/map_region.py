"""Ray job entrypoint: on-demand mapping of one region (one or a few rasters) into a given output prefix.

    python jobs/map_region.py s3://imagery/region/*.tif --out s3://results/region-42/ [--model PATH] [--set k=v]
"""

from __future__ import annotations

import argparse
import logging
import sys

from geoseg.api import predict
from geoseg.errors import GeosegError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="dynamic-world")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        for r in predict(args.inputs, args.out, model=args.model, overrides=args.overrides + ["runtime.progress=log"]):
            logging.info("done: %s -> %s", r["input"]["path"], r["outputs"])
    except GeosegError as e:
        logging.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
