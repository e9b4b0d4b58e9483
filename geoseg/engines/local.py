"""The local engine: every block's stages in this process, in order (the reference the Ray engine must equal)."""

from __future__ import annotations

from typing import Iterator

from geoseg.blocks import BlockResult, WorkItem, process_item
from geoseg.config import JobConfig
from geoseg.plan import ScenePlan

__all__ = ["local_engine"]


def local_engine(plans: list[ScenePlan], items: list[WorkItem], cfg: JobConfig, model) -> Iterator[BlockResult]:
    """Yield each item's ``BlockResult`` in order; the model loads on the first block that needs it."""
    from geoseg.infer import Predictor

    predictor = None
    for item in items:
        if predictor is None and not item.resume:
            predictor = Predictor(model, cfg.runtime.device, cfg.runtime.batch_size, cfg.model.autocast)
        yield process_item(plans, item, predictor, cfg)
