"""Run every benchmark in turn (``make bench``); each prints its own numbers and ratios measured in one run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_model.py", "bench_autocast.py", "bench_vectorize.py", "bench_pipeline.py", "bench_s3_read.py"]


def main() -> int:
    failed = []
    for name in BENCHES:
        print(f"\n######## {name}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / name)], cwd=HERE.parent)
        if rc:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
