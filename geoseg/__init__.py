"""geoseg: distributed land-use / land-cover segmentation of large GeoTIFFs.

Public API: the job config, ``run`` / ``predict``, ``load_model``, and the error classes.
"""

from __future__ import annotations

from geoseg.conventions import VERSION as __version__

from geoseg.config import JobConfig, load_config  # noqa: E402
from geoseg.errors import (  # noqa: E402
    BlockError,
    ConfigError,
    GeosegError,
    InputError,
    ModelError,
    OutputError,
    StorageError,
)

__all__ = [
    "__version__",
    "JobConfig",
    "load_config",
    "run",
    "predict",
    "load_model",
    "GeosegError",
    "InputError",
    "ConfigError",
    "ModelError",
    "OutputError",
    "StorageError",
    "BlockError",
]


def load_model(name_or_path: str):
    """Load a registered model by name, or a model bundle directory by path."""
    from geoseg.models import load_model as _load

    return _load(name_or_path)


def run(cfg: JobConfig, **kwargs):
    """Run a configured job; returns one run record (dict) per scene."""
    from geoseg.driver import run as _run

    return _run(cfg, **kwargs)


def predict(inputs, out_dir: str, model: str = "dynamic-world", overrides=(), **kwargs):
    """Build a job from arguments (like ``geoseg predict``) and run it."""
    from geoseg.driver import predict as _predict

    return _predict(inputs, out_dir, model=model, overrides=overrides, **kwargs)
