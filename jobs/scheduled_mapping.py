"""Ray job entrypoint: scheduled mapping of new imagery (e.g. every night over an S3 prefix).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/scheduled_mapping.py configs/cluster_scheduled.yaml --set output.dir=s3://bucket/run-2026-11-25/

Inside a Ray job RAY_ADDRESS is set, so geoseg joins the cluster instead of starting a local Ray. Scenes whose
outputs are complete (their run.json exists) are skipped (``output.skip_complete``, set here), interrupted ones
resume from their block records.
"""

from __future__ import annotations

import argparse
import logging
import sys

from geoseg.driver import run
from geoseg.config import load_config
from geoseg.errors import GeosegError, exit_code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides + ["runtime.progress=log"])
        if not cfg.output.overwrite:  # nightly reruns over a growing prefix compute only the new scenes
            cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"skip_complete": True})})
        records = run(cfg)
    except (GeosegError, KeyboardInterrupt) as e:  # the CLI's exit codes: 3 bad input, 4 retry may help, 130
        logging.error("%s", e if isinstance(e, GeosegError) else "interrupted; a rerun resumes")
        return exit_code(e)
    for r in records:
        logging.info("done: %s -> %s", r["input"]["path"], r["outputs"]["mask"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
