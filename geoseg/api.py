"""The job API for programs and notebooks: ``run``, ``predict`` and ``map_region`` (``geoseg.driver``)."""

from geoseg.driver import map_region, predict, run

__all__ = ["run", "predict", "map_region"]
