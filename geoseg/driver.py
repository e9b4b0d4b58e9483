"""The job driver: validate everything first, then stream blocks through an engine into one writer per scene.

An engine maps the per-block stages (``geoseg.blocks``) over work items and yields results in any order.
``local`` (``geoseg.engines.local``) runs them in this process, the reference used by tests; ``ray``
(``geoseg.engines.ray``) runs them on a local or remote Ray cluster. Both call the same stage functions, so
their outputs are identical. Only the CLI, the jobs and ``geoseg.api`` import this module.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from geoseg.blocks import BlockOutcome, WorkItem
from geoseg.config import JobConfig, apply_overrides, config_from_dict
from geoseg.errors import BlockError, ConfigError, GeosegError, InputError, OutputError
from geoseg.io import store
from geoseg.plan import ScenePlan, plan_scene
from geoseg.progress import Progress
from geoseg.stitch import load_run_record, prepare_scene, stored_blocks

log = logging.getLogger("geoseg")

__all__ = ["run", "predict", "map_region", "evaluate_model", "prepare", "auto_engine", "AUTO_LOCAL_MAX_BLOCKS"]


# runtime.engine=auto computes a job of at most this many blocks in this process: starting Ray and a worker that
# loads the model costs seconds (~10 s on 2 cores), more than a few blocks of model time.
AUTO_LOCAL_MAX_BLOCKS = 4


def auto_engine(cfg: JobConfig, items: list[WorkItem]) -> str:
    """``runtime.engine: auto``: ``ray`` when a cluster address is given or more than a few blocks need the
    model, else ``local``. Both engines give identical outputs."""
    if cfg.runtime.address or os.environ.get("RAY_ADDRESS"):
        return "ray"
    return "local" if sum(not i.resume for i in items) <= AUTO_LOCAL_MAX_BLOCKS else "ray"


def input_paths(cfg: JobConfig, card) -> list[str]:
    """Expand and check the job's inputs and settings before anything starts: the scene paths (warped first
    with ``input.resample``), each with its own output name, and a writable output directory."""
    from geoseg.plan import scene_stem

    if not cfg.input.paths:
        raise ConfigError("input.paths is empty: give at least one raster (local path or s3://...)")
    if not cfg.output.dir:
        raise ConfigError("output.dir is not set: where should the outputs go?")
    _check_settings(cfg, card)
    paths = store.expand_inputs(cfg.input.paths, cfg.storage)
    if cfg.input.resample:
        paths = [_resampled(p, cfg, card) for p in paths]
    seen: dict[str, str] = {}
    for p in paths:
        stem = scene_stem(p)
        if stem in seen:
            raise ConfigError(f"inputs {seen[stem]!r} and {p!r} share the output name {stem!r}; rename one")
        seen[stem] = p
    _check_output_dir(cfg.output.dir)
    return paths


def prepare(cfg: JobConfig, card, mapper=None, paths: list[str] | None = None) -> list[ScenePlan]:
    """Every scene planned and validated against the model (the input contract) before anything is written:
    one clear error, nothing half-done. ``mapper(fn, args)`` plans the scenes (the Ray engine's runs them on
    the cluster, in parallel); default: here, one after another."""
    paths = input_paths(cfg, card) if paths is None else paths
    args = [(i, p, cfg, card) for i, p in enumerate(paths)]
    return mapper(plan_scene, args) if mapper else [plan_scene(*a) for a in args]


def _resampled(path: str, cfg: JobConfig, card) -> str:
    """``input.resample``: a scene whose pixel size the model does not accept, as a VRT warped to the card's GSD
    (named like the scene, so its outputs keep the scene's name); other scenes as they are."""
    from geoseg.io import raster
    from geoseg.io.contract import gsd_ok
    from geoseg.plan import scene_stem
    from geoseg.region import warp_to_gsd

    with raster.open_raster(path, cfg.storage) as src:
        info = raster.inspect(src, path)
    if gsd_ok(info, card):
        return path
    if store.is_s3(cfg.output.dir):
        import tempfile

        where = tempfile.mkdtemp(prefix="geoseg-warped-")
    else:
        where = os.path.join(cfg.output.dir, ".geoseg-warped")
    dest = os.path.join(where, f"{scene_stem(path)}.vrt")
    log.info("input.resample: %s warped to %g m in %s", path, card.gsd_m, dest)
    return warp_to_gsd(path, card, cfg.input.resampling, dest)


def _check_settings(cfg: JobConfig, card) -> None:
    """Settings that can be judged before any input is opened or any process started."""
    if cfg.vector.enabled and (cfg.vector.include_classes is not None or cfg.vector.exclude_classes):
        from geoseg.vectorize import resolve_classes

        try:
            resolve_classes(cfg.vector.include_classes, cfg.vector.exclude_classes, card.class_names)
        except GeosegError as e:
            raise ConfigError(str(e)) from None
    rt = cfg.runtime
    local = not (rt.address or os.environ.get("RAY_ADDRESS"))
    if rt.device == "cuda" and local:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "runtime.device is 'cuda' but this machine has no usable CUDA device (torch "
                f"{torch.__version__}, cuda build: {torch.version.cuda or 'no'}); use runtime.device=auto or cpu"
            )
    engine = cfg.runtime.engine
    if local and engine != "local":
        # An embedded Ray gets this machine's CPUs: more actors than CPUs would each hold a model in memory
        # while waiting for a CPU (64 actors on 2 cores filled 13 GB), so refuse instead of oversubscribing.
        have = rt.num_cpus or os.cpu_count() or 1
        need = rt.workers * rt.cpus_per_worker
        if need > have + 1e-9:
            raise ConfigError(
                f"runtime.workers={rt.workers} x runtime.cpus_per_worker={rt.cpus_per_worker:g} need {need:g} "
                f"CPUs but this machine has {have}; lower them (fractions are allowed, e.g. "
                f"runtime.cpus_per_worker={have / rt.workers:.2g}) or join a cluster with runtime.address"
            )


def _check_output_dir(out: str) -> None:
    """Fail before any compute when a local output directory cannot be created or written."""
    if store.is_s3(out):
        return  # S3 permissions show on the first write of job.json, still before any compute
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror})") from None
    if not os.path.isdir(out):
        raise OutputError(f"{out}: output path exists and is not a directory")
    probe = os.path.join(out, f".geoseg-write-test-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{out}: output directory is not writable ({e.strerror})") from None


def run(
    cfg: JobConfig,
    *,
    loaded_model=None,
    engine: str | None = None,
    on_result: Callable[[BlockOutcome], None] | None = None,
) -> list[dict[str, Any]]:
    """Run a job: returns one run record per scene.

    ``loaded_model`` skips loading ``cfg.model.name`` (tests, notebooks); ``engine`` overrides
    ``runtime.engine``; ``on_result`` sees every block's outcome after its writer took it.
    """
    from geoseg.models import load_model

    t0 = time.monotonic()
    model = loaded_model or load_model(cfg.model.name)
    name = engine or cfg.runtime.engine
    plans = None
    paths = input_paths(cfg, model.card)  # settings and inputs checked before any engine starts
    if name == "auto":
        if cfg.runtime.address or os.environ.get("RAY_ADDRESS") or len(paths) > AUTO_LOCAL_MAX_BLOCKS:
            name = "ray"  # every scene is at least one block
        else:  # a few scenes: plan them here, then decide by the blocks that need the model
            plans = prepare(cfg, model.card, paths=paths)
            name = auto_engine(cfg, _work(plans, cfg, model.card, dry=True)[0])
        log.info("engine: %s (runtime.engine=auto)", name)
    with _engine(name, cfg, model) as eng:
        if plans is None:
            plans = prepare(cfg, model.card, eng.map, paths)
        items, remaining, records = _work(plans, cfg, model.card)
        if remaining:  # else every scene was complete: nothing to compute
            _stream(eng, plans, items, remaining, records, cfg, model.card, t0, on_result)
            eng.call(finish_run, cfg, records, model.card)
    return records


def _work(plans: list[ScenePlan], cfg: JobConfig, card, dry: bool = False):
    """(work items, blocks remaining per scene, run records of scenes skipped as complete). Prepares each scene's
    output location (``stitch.prepare_scene``) unless ``dry``."""
    remaining: dict[int, int] = {}
    items: list[WorkItem] = []
    records: list[dict[str, Any]] = [None] * len(plans)  # type: ignore[list-item]
    for plan in plans:
        if cfg.output.skip_complete:
            done = load_run_record(plan)
            if done is not None:
                if not dry:
                    log.info("skipped %s: its outputs are complete (%s)", plan.path, plan.out_dir)
                records[plan.index] = done
                continue
        if dry:
            stored = set() if cfg.output.overwrite else stored_blocks(plan, cfg, card)
        else:
            stored = prepare_scene(plan, cfg, card, overwrite=cfg.output.overwrite)
        remaining[plan.index] = plan.grid.num_blocks
        items.extend(WorkItem(plan.index, b.row, b.col, resume=b.id in stored) for b in plan.grid.blocks())
    return items, remaining, records


def finish_run(cfg: JobConfig, records: list[dict[str, Any]], card) -> None:
    """After the scenes: the run's STAC collection and its report page (run by the engine, off the driver)."""
    _write_collection(cfg, records, card)
    if cfg.output.report and any(records):  # the run's page over its scenes' pages
        from geoseg.report import write_run_report

        write_run_report(cfg.output.dir, cfg.storage)


def _engine(name: str, cfg: JobConfig, model):
    """The engine object for ``runtime.engine`` (``auto`` is decided by ``run``)."""
    if name == "local":
        from geoseg.engines.local import LocalEngine

        return LocalEngine(cfg, model)
    if name == "ray":
        from geoseg.engines.ray import RayEngine

        return RayEngine(cfg, model)
    raise ConfigError(f"runtime.engine {name!r} is not one of auto, ray, local")


def _stream(eng, plans: list[ScenePlan], items: list[WorkItem], remaining: dict[int, int],
            records: list, cfg: JobConfig, card, t0: float, on_result) -> None:
    """Hand every block's outcome to its scene's writer (opened at the scene's first block; the first one
    before any compute, so a refused setting costs nothing), count failures, finish scenes as they complete."""
    writers: dict = {}

    def writer(scene: int):
        if scene not in writers:
            writers[scene] = eng.open_writer(plans[scene], card)
        return writers[scene]

    total_px = sum(plans[i].info.shape[0] * plans[i].info.shape[1] for i in remaining)
    progress = Progress(len(items), total_px, cfg.runtime.progress)
    finishing: dict[int, Any] = {}  # scene -> its writer's run record, or the engine's promise of it
    failed = 0
    t_setup = time.monotonic() - t0
    try:
        writer(items[0].scene)
        for outcome in eng.results(plans, items):
            plan = plans[outcome.scene]
            block = plan.grid.block(outcome.row, outcome.col)
            if outcome.error is not None:
                failed += 1
                log.error("block failed: %s", outcome.error)
                if failed > cfg.runtime.max_failed_blocks:
                    raise BlockError(
                        outcome.error
                        + (f" ({failed} blocks failed; runtime.max_failed_blocks={cfg.runtime.max_failed_blocks})"
                           if cfg.runtime.max_failed_blocks else "")
                    )
            writer(outcome.scene).add(block, outcome.result)
            if on_result is not None:
                on_result(outcome)
            progress.update(int(block.window.width * block.window.height))
            remaining[outcome.scene] -= 1
            if remaining[outcome.scene] == 0:  # the writer completes the scene while others go on
                finishing[outcome.scene] = writers.pop(outcome.scene).finish(
                    {"setup": round(t_setup, 3), "total": round(time.monotonic() - t0, 3)}
                )
        for scene, pending in finishing.items():
            records[scene] = eng.result(pending)
            log.info("wrote %s", plans[scene].out_dir)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        progress.close()


def _write_collection(cfg: JobConfig, records: list[dict[str, Any]], card) -> None:
    """``OUT/collection.json``: a STAC Collection over the scenes' Items (written after every scene)."""
    import json

    from geoseg import stac

    items, hrefs = [], []
    for r in records:
        path = (r or {}).get("outputs", {}).get("item")
        if path:
            items.append(json.loads(store.read_bytes(path, cfg.storage)))
            hrefs.append(f"./{items[-1]['id']}/item.json")
    if items:
        coll = stac.collection(items, "geoseg-run", hrefs, card)
        store.write_bytes(store.join(cfg.output.dir, "collection.json"), json.dumps(coll, indent=1).encode(),
                          cfg.storage)


def predict(inputs: Iterable[str], out_dir: str, *, model: str = "dynamic-world", overrides=(), **kwargs):
    """``geoseg predict`` as a function: a job built from arguments, then ``run``."""
    data = apply_overrides({"model": {"name": model}, "input": {"paths": list(inputs)}, "output": {"dir": out_dir}},
                           overrides)
    return run(config_from_dict(data, source="predict arguments"), **kwargs)


def map_region(scene_paths: list[str], aoi_spec: str, out_dir: str, *, model: str | None = None,
               stac: str | None = None, name: str | None = None, overrides=(), loaded_model=None, engine=None,
               config: str | None = None):
    """``geoseg map``: map the AOI across ``scene_paths`` (or the STAC items in ``stac``) into
    ``out_dir/<name>/``, with the settings of the job file ``config`` if given. Returns the region's run
    record."""
    import copy

    import yaml

    from geoseg.config import relative_to_file
    from geoseg.io import raster
    from geoseg.models import load_model
    from geoseg.region import Scene, build_mosaic, read_aoi, region_grid

    data: dict = {}
    if config:
        try:
            data = relative_to_file(yaml.safe_load(Path(config).read_text()) or {}, Path(config).parent)
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{config}: cannot read the job file ({str(e).splitlines()[0]})") from None
    data = copy.deepcopy(data)
    if model:
        data.setdefault("model", {})["name"] = model
    data.setdefault("output", {})["dir"] = out_dir
    data.setdefault("input", {})["aoi"] = aoi_spec
    base = apply_overrides(data, overrides)
    cfg = config_from_dict(base, source="map arguments")
    gm = loaded_model or load_model(cfg.model.name)
    card = gm.card
    aoi = read_aoi(aoi_spec, cfg.input.aoi_crs)
    if stac:
        from geoseg import stac as stac_mod

        scenes = stac_mod.load_scenes(stac, card)
    else:
        if not scene_paths:
            raise ConfigError("geoseg map: give scenes (paths, globs, s3:// prefixes) or --stac ITEMS.json")
        scenes = [Scene(p) for p in store.expand_inputs(scene_paths, cfg.storage)]
    remote = [s.path for s in scenes if store.is_s3(s.path) or s.path.startswith("/vsi")]
    if remote:
        # The mosaic is a local VRT that workers open without the S3 settings; refuse rather than fail late.
        raise ConfigError(f"geoseg map: scenes on S3 are not supported in a region mosaic yet ({remote[0]}); "
                          "copy them to a local or shared file system, or map them one by one with geoseg predict")
    for s in scenes:
        with raster.open_raster(s.path, cfg.storage) as src:
            s.info = raster.inspect(src, s.path)
        if s.bands is None:
            s.bands = raster.resolve_bands(s.info, card.bands, cfg.input.bands)
    halo = card.halo_px if cfg.tiling.halo_px is None else cfg.tiling.halo_px
    grid = region_grid(scenes, aoi, card, halo, cfg)
    region = name or aoi.name
    if store.is_s3(out_dir):
        import tempfile

        mosaic_dir = Path(tempfile.mkdtemp(prefix="geoseg-mosaic-"))
    else:
        mosaic_dir = Path(out_dir) / ".geoseg-mosaics"
    mosaic = build_mosaic(scenes, grid, card, mosaic_dir / f"{region}.vrt", cfg.input.overlap,
                          cfg.input.resampling)
    job = apply_overrides(base, [])
    job["input"] = {**job.get("input", {}), "paths": [str(mosaic)], "bands": None}
    job["input"].pop("resample", None)
    rcfg = config_from_dict(job, source="map arguments")
    (record,) = run(rcfg, loaded_model=gm, engine=engine)
    return record


def evaluate_model(model: str, images, labels: str, *, pred_dir: str | None = None, overrides=(),
                   out: str | None = None, **score) -> dict:
    """``geoseg eval --model``: predict ``images`` with ``model`` (into ``pred_dir`` or a temporary directory),
    then score the masks against ``labels`` (a file or a ``{stem}`` template). ``score``: object_classes,
    label_map, class_column, min_object_px (``geoseg.evaluate.score_predictions``)."""
    import tempfile

    from geoseg import evaluate
    from geoseg.models import load_model

    if not images or not labels:
        raise InputError("--model needs --images (paths or globs) and --labels (file or {stem} template)")
    card = load_model(model).card
    files = evaluate.expand_images(images)
    with tempfile.TemporaryDirectory(prefix="geoseg-eval-") as tmp:
        where = pred_dir or tmp
        predict(files, where, model=model,
                overrides=("vector.enabled=false", "output.overwrite=true") + tuple(overrides))
        report = evaluate.score_predictions(files, where, labels, card, **score)
    report["model"]["source"] = str(model)
    if out:
        evaluate.write_report(report, out)
    return report
