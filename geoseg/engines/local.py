"""The local engine: every block's stages in this process, in order, into writers in this process (the
reference the Ray engine must equal)."""

from __future__ import annotations

from typing import Callable, Iterator

from geoseg.blocks import BlockOutcome, WorkItem, process_item
from geoseg.config import JobConfig
from geoseg.plan import ScenePlan
from geoseg.stitch import SceneWriter

__all__ = ["LocalEngine"]


class LocalEngine:
    """Runs blocks with one model in this process; the scene writers are plain ``SceneWriter``s."""

    name = "local"

    def __init__(self, cfg: JobConfig, model):
        self.cfg = cfg
        self.model = model

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def map(self, fn: Callable, args: list[tuple]) -> list:
        """``fn`` over argument tuples, in order."""
        return [fn(*a) for a in args]

    def call(self, fn: Callable, *args):
        return fn(*args)

    def open_writer(self, plan: ScenePlan, card) -> SceneWriter:
        return SceneWriter(plan, self.cfg, card)

    def result(self, record: dict) -> dict:
        """A finished scene's run record (``SceneWriter.finish`` returned it already)."""
        return record

    def results(self, plans: list[ScenePlan], items: list[WorkItem]) -> Iterator[BlockOutcome]:
        """Each item's outcome in order; the model loads on the first block that needs it."""
        from geoseg.infer import Predictor

        cfg = self.cfg
        predictor = None
        for item in items:
            if predictor is None and not item.resume:
                predictor = Predictor(self.model, cfg.runtime.device, cfg.runtime.batch_size, cfg.model.autocast,
                                      cfg.model.tta)
            result = process_item(plans, item, predictor, cfg)
            yield BlockOutcome(item.scene, result.block_id, item.row, item.col, result.error, result)
