"""Ray job entrypoint: export analyst formats from an existing mask (e.g. a different class subset or sieve).

    python jobs/export_vectors.py OUT/scene/mask.tif --out OUT/scene/built.gpkg --set vector.include_classes=[built]
"""

from __future__ import annotations

import argparse
import logging
import sys

from geoseg.config import apply_overrides, config_from_dict
from geoseg.errors import GeosegError, exit_code
from geoseg.vectorize import vectorize_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mask")
    ap.add_argument("--out", required=True)
    ap.add_argument("--block-px", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = config_from_dict(apply_overrides({}, args.overrides), source="--set")
        vectorize_file(args.mask, args.out, cfg.vector, block_px=args.block_px, workers=args.workers,
                       overwrite=args.overwrite)
    except (GeosegError, KeyboardInterrupt) as e:  # the CLI's exit codes: 3 bad input, 4 retry may help, 130
        logging.error("%s", e if isinstance(e, GeosegError) else "interrupted; a rerun resumes")
        return exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
