"""Shared test fixtures.

Real data lives in ``../shared/data`` beside the project root. On a user's machine without it those tests
skip; in CI (``GEOSEG_REQUIRE_SHARED_DATA=1``, set by ``.ci/run``) its absence is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("GEOSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("GEOSEG_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{path} is missing: CI requires ../shared/data")
        pytest.skip(f"{path} not present (real data lives in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder ``../shared/data``."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def s2_chip(shared_data) -> Path:
    """The real Sentinel-2 L1C chip (13 bands, 512x512, EPSG:4326, nodata 0)."""
    return _require(shared_data / "sentinel2" / "Spain_7370579_S2Hand.tif")
