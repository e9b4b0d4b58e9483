"""Shared test fixtures.


Real data lives in ``../shared/data`` beside the project root. On a user's machine without it those tests
skip; in CI (``GEOSEG_REQUIRE_SHARED_DATA=1``, set by ``.ci/run``) its absence is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3server"]

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


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory):
    """A small untrained U-Net bundle with Dynamic World's bands and classes: fast, for pipeline mechanics."""
    import torch

    from geoseg.models import get_model, load_model, save_bundle

    dw = load_model("dynamic-world").card
    card = dw.model_copy(update={
        "name": "tiny-unet", "version": "0", "architecture": "unet",
        "arch_params": {"in_channels": 9, "num_classes": 9, "base_channels": 4, "depth": 2},
        "output_stride": 4, "halo_px": 16,
    })
    torch.manual_seed(0)
    module = get_model("unet", **card.arch_params)
    return load_model(save_bundle(module, card, tmp_path_factory.mktemp("bundles") / "tiny-unet"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test run: 3 logical CPUs (on 2 cores: inference actors, a scene writer and a
    task fit at once), one logical GPU (so GPU actors get scheduled), no dashboard."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    # left running for later tests; Ray shuts down at interpreter exit


@pytest.fixture(scope="session")
def dw_model():
    """The Dynamic World model, loaded once per test run."""
    from geoseg.models import load_model

    return load_model("dynamic-world")
