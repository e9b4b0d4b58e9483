"""``geoseg`` command line: run, predict, vectorize, models, info. A thin layer over the library.

Every failure ends as one line on stderr and an exit code that tells a scheduler what happened (see
``geoseg.errors``): 3 bad input or config (do not retry), 4 runtime failure (retry), 130 interrupted (a rerun
resumes), 1 an internal error, 2 a usage error (click). ``--debug`` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from geoseg.errors import EXIT_INTERRUPTED, GeosegError, InputError, exit_code

_set = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="override a config value, e.g. --set tiling.block_px=512 (repeatable)",
)
# --overwrite redoes finished scenes too, so it switches off a config's skip_complete
_OVERWRITE_SETS = ("output.overwrite=true", "output.skip_complete=false")
_overwrite = click.option("--overwrite", is_flag=True, help="replace existing outputs / discard partial results")


_DEBUG = {"on": False}


# what an interrupted command leaves behind for its rerun (commands not named publish nothing half-written)
_KEPT = {"run": "finished blocks are kept", "predict": "finished blocks are kept", "map": "finished blocks are kept",
         "train": "the last epoch's checkpoint is kept"}


def _fail(e: BaseException, command: str | None = None):
    """One line on stderr and the exit code of ``e``'s class (the traceback only with ``--debug``)."""
    code = exit_code(e)
    if _DEBUG["on"]:
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    if code == EXIT_INTERRUPTED:
        if command in _KEPT:
            click.secho(f"geoseg: interrupted; {_KEPT[command]}: rerun the same command to resume", fg="yellow",
                        err=True)
        else:
            click.secho("geoseg: interrupted; nothing half-written was published", fg="yellow", err=True)
    elif isinstance(e, GeosegError):
        click.secho(f"geoseg: error: {e}", fg="red", err=True)
    else:
        click.secho(f"geoseg: internal error: {type(e).__name__}: {e} (a bug in geoseg; rerun with --debug "
                    "for the traceback and report it)", fg="red", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Every exception of a command, KeyboardInterrupt included, ends in ``_fail`` (never click's "Aborted!"
    or a bare traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - the CLI's last line of defence
            _fail(e, ctx.invoked_subcommand)


def _report(records) -> None:
    for r in records:
        if not r:
            continue
        outs = r["outputs"]
        click.echo(f"{r['input']['path']}:")
        for kind, path in outs.items():
            click.echo(f"  {kind:9s} {path}")
        click.echo(f"  {'run':9s} {outs['mask'].rsplit('/', 1)[0]}/run.json")
    done = [r for r in records if r]
    if done and done[0]["config"]["output"].get("report", True):  # written by the run over its scenes' pages
        from geoseg.io import store

        click.echo(f"report      {store.join(done[0]['config']['output']['dir'], 'report.html')}")


@click.group(cls=_Group)
@click.version_option(package_name="geoseg")
@click.option("-v", "--verbose", count=True, help="more log output")
@click.option("--debug", is_flag=True, help="show tracebacks of errors")
def main(verbose: int, debug: bool) -> None:
    """Land-use / land-cover maps from large GeoTIFFs: seam-free masks and exact polygons.

    Exit codes: 0 done; 3 bad input or configuration (retrying cannot help); 4 runtime failure (storage,
    disk, failed blocks: a retry may succeed); 130 interrupted (a rerun resumes); 1 internal error;
    2 usage error.
    """
    _DEBUG["on"] = debug
    # The CLI owns its process: Arrow's jemalloc pool, as for the Ray writer (mimalloc, Arrow's default, unmaps
    # and re-faults the Parquet writer's buffers; benchmarks/README.md). Set before pyarrow loads; a user's wins.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set
@_overwrite
def run(config: str, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Run the job described by CONFIG (YAML)."""
    from geoseg.driver import run as run_job
    from geoseg.config import load_config

    try:
        cfg = load_config(config, overrides + (_OVERWRITE_SETS if overwrite else ()))
        _report(run_job(cfg))
    except GeosegError as e:
        _fail(e)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "model", default="dynamic-world", show_default=True, help="model name or bundle path")
@click.option("--out", "out", required=True, help="output directory (local or s3://)")
@_set
@_overwrite
def predict(inputs: tuple[str, ...], model: str, out: str, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Segment INPUTS (rasters, globs or s3:// prefixes) with a model into OUT/<scene>/."""
    from geoseg.driver import predict as predict_job

    try:
        _report(predict_job(list(inputs), out, model=model,
                            overrides=overrides + (_OVERWRITE_SETS if overwrite else ())))
    except GeosegError as e:
        _fail(e)


@main.command("map")
@click.argument("scenes", nargs=-1)
@click.option("--aoi", required=True, help="polygon file (GeoJSON, GPKG, GeoParquet) or bbox minx,miny,maxx,maxy")
@click.option("--aoi-crs", default="EPSG:4326", show_default=True, help="CRS of a bbox --aoi")
@click.option("--stac", default=None, help="a saved STAC ItemCollection (or Item) JSON instead of SCENES")
@click.option("--name", default=None, help="region name (default: the AOI file's stem, or 'region')")
@click.option("--model", "model", default=None, help="model name or bundle path (default: the config's, or "
              "dynamic-world)")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False), help="a YAML job file for the "
              "other settings")
@click.option("--out", "out", required=True, help="output directory (local or s3://)")
@_set
@_overwrite
def map_cmd(scenes, aoi, aoi_crs, stac, name, model, config, out, overrides, overwrite) -> None:
    """Map an area of interest across SCENES (one region grid, one set of outputs in OUT/<name>/)."""
    from geoseg.driver import map_region

    sets = (f"input.aoi_crs={aoi_crs}",) + overrides + (_OVERWRITE_SETS if overwrite else ())
    try:
        _report([map_region(list(scenes), aoi, out, model=model, stac=stac, name=name, overrides=sets,
                            config=config)])
    except GeosegError as e:
        _fail(e)


@main.command()
@click.argument("mask", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, help="output file (.parquet, .gpkg, .geojson, .geojsonl) or directory")
@click.option("--block-px", default=1024, show_default=True, help="block side for parallel polygonize")
@click.option("--workers", default=2, show_default=True, help="processes")
@click.option("--overwrite", is_flag=True, help="replace existing output files")
@_set
def vectorize(mask: str, out: str, block_px: int, workers: int, overwrite: bool, overrides: tuple[str, ...]) -> None:
    """Polygonize a class MASK (e.g. a geoseg mask.tif) into OUT. --set keys are vector.* settings."""
    from geoseg.config import apply_overrides, config_from_dict
    from geoseg.vectorize import vectorize_file

    try:
        cfg = config_from_dict(apply_overrides({}, overrides), source="--set")
        written = vectorize_file(mask, out, cfg.vector, block_px=block_px, workers=workers, overwrite=overwrite,
                                 storage=cfg.storage)
        for p in written if isinstance(written, (list, tuple)) else [written]:
            click.echo(str(p))
    except GeosegError as e:
        _fail(e)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the cards as JSON")
def models(as_json: bool) -> None:
    """List the registered models with their cards."""
    from geoseg.models import list_models, load_model

    try:
        cards = [load_model(n).card for n in list_models()]
    except GeosegError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps([json.loads(c.model_dump_json()) for c in cards], indent=2))
        return
    for c in cards:
        click.echo(f"{c.name}  (version {c.version}, architecture {c.architecture})")
        click.echo(f"  bands        {', '.join(c.bands)}  [{c.input_dtype}]")
        click.echo(f"  gsd          {c.gsd_m} m; output stride {c.output_stride}; halo {c.halo_px} px"
                   + (f"; tiles {c.tile_px} px" if c.tile_px else "") + (f"; tta {c.tta}" if c.tta else ""))
        click.echo(f"  classes      {', '.join(f'{k.id} {k.name}' for k in c.classes)}")
        click.echo(f"  licence      {c.license}")


@main.command()
@click.argument("input")
@click.option("--model", "model", default=None, help="also check the raster against this model")
@_set
def info(input: str, model: str | None, overrides: tuple[str, ...]) -> None:
    """Describe a raster (size, bands, dtype, CRS, resolution, nodata) and whether it fits a model."""
    from geoseg.config import apply_overrides, config_from_dict
    from geoseg.io import raster

    try:
        cfg = config_from_dict(apply_overrides({}, overrides), source="--set")
        with raster.open_raster(input, cfg.storage) as src:
            inf = raster.inspect(src, input)
            results = None
            if model:
                from geoseg.io import contract
                from geoseg.models import load_model

                card = load_model(model).card
                results = contract.checks(src, inf, card, cfg.input, cfg.runtime.max_pixels)
        rows, cols = inf.shape
        click.echo(f"{input}")
        click.echo(f"  size        {cols} x {rows} px (cols x rows), {inf.count} bands, {inf.dtype}")
        click.echo(f"  crs         {inf.crs.to_string()}")
        click.echo(f"  resolution  {inf.resolution[0]:.10g} x {inf.resolution[1]:.10g} (CRS units)")
        click.echo(f"  nodata      {inf.nodata}")
        click.echo(f"  bands       {', '.join(d or f'#{i + 1}' for i, d in enumerate(inf.descriptions))}")
        if results is not None:
            failed = [c for c in results if c.ok is False]
            verdict = "fits" if not failed else f"does NOT fit ({len(failed)} failed checks)"
            click.echo(f"  model       {card.name}: {verdict}")
            for c in results:
                mark = {True: "ok  ", False: "FAIL", None: "--  "}[c.ok]
                click.echo(f"    {mark} {c.name:12s} {c.detail}")
            if failed:
                from geoseg.io import contract

                contract.enforce(input, results)
    except GeosegError as e:
        _fail(e)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set
@click.option("--overwrite", is_flag=True, help="replace an existing bundle directory (train.out)")
@click.option("--from-checkpoint", is_flag=True,
              help="write the bundle from the run's last checkpoint (best weights so far) without training more")
def train(config: str, overrides: tuple[str, ...], overwrite: bool, from_checkpoint: bool) -> None:
    """Train a model on Ray Train from CONFIG (YAML with a train: section); writes a model bundle.

    Rerunning an interrupted run resumes from its last checkpoint (train.checkpoint_dir, default OUT.ckpt)."""
    from geoseg.engines.ray_train import train as train_model
    from geoseg.train.driver import bundle_from_checkpoint, load_train_config

    try:
        cfg = load_train_config(config, overrides)
        if from_checkpoint:
            summary = bundle_from_checkpoint(cfg, overwrite=overwrite)
        else:
            summary = train_model(cfg, overwrite=overwrite)
    except GeosegError as e:
        _fail(e)
    best = summary["best_epoch"]
    click.echo(f"bundle     {summary['bundle']}")
    which = "last epoch" if summary.get("keep") == "last" else "best epoch"
    click.echo(f"{which} {best.get('epoch')}: val mIoU {best.get('val_miou')} {best.get('val_iou')}")
    click.echo(f"halo       {summary['halo']['halo_px']} px (tiled vs whole agreement {summary['halo']['agreement']:.5f})")


@main.command()
@click.argument("run_dir")
@click.option("--out", "out", required=True, help="output file, local or s3:// (its suffix names the format)")
@click.option("--aoi", default=None, help="area of interest: a vector file (local or s3://) or minx,miny,maxx,maxy "
              "in EPSG:4326; polygons are clipped to it")
@click.option("--classes", default=None, help="keep these classes (names or ids), e.g. built,water")
@click.option("--crs", default=None, help="output CRS, e.g. EPSG:3035 (default: the scenes' own)")
@click.option("--format", "fmt", type=click.Choice(["gpkg", "parquet", "fgb", "geojson", "shp", "csv"]),
              default=None, help="output format (default: from the --out suffix); csv is the class-area table")
@click.option("--min-area-m2", default=0.0, show_default=True, type=float, help="drop polygons smaller than this")
@click.option("--dissolve", is_flag=True, help="one multipolygon per class")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@_set
def export(run_dir: str, out: str, aoi: str | None, classes: str | None, crs: str | None, fmt: str | None,
           min_area_m2: float, dissolve: bool, overwrite: bool, overrides: tuple[str, ...]) -> None:
    """Export a finished run (RUN_DIR, local or s3://) as one layer: merged across scenes, clipped to an AOI,
    selected by class, reprojected. --set keys are storage.* settings."""
    from geoseg.config import apply_overrides, config_from_dict
    from geoseg.export import export_run

    try:
        cfg = config_from_dict(apply_overrides({}, overrides), source="--set")
        res = export_run(run_dir, out, aoi=aoi, classes=classes, crs=crs, fmt=fmt, min_area_m2=min_area_m2,
                         dissolve=dissolve, overwrite=overwrite, storage=cfg.storage)
    except GeosegError as e:
        _fail(e)
    for p in res.paths:
        click.echo(p)
    click.echo(f"{res.features} features from {len(res.scenes)} scene(s) in {res.crs}, "
               f"{res.areas['valid_ha']:.2f} ha valid, {res.seconds:.2f} s", err=True)


@main.command()
@click.argument("run_dir")
@_set
def report(run_dir: str, overrides: tuple[str, ...]) -> None:
    """(Re)build report.html for every scene of RUN_DIR (local or s3://) and for the run.
    --set keys are storage.* settings."""
    from geoseg.config import apply_overrides, config_from_dict
    from geoseg.report import build_reports

    try:
        cfg = config_from_dict(apply_overrides({}, overrides), source="--set")
        for p in build_reports(run_dir, cfg.storage):
            click.echo(p)
    except GeosegError as e:
        _fail(e)


@main.command("eval")
@click.argument("paths", nargs=-1)
@click.option("--model", "model", default=None, help="predict --images with this model first, then score")
@click.option("--images", "images", multiple=True, help="with --model: images (paths or globs), repeatable")
@click.option("--labels", "labels", default=None,
              help="with --model: label file or template with {stem} (each image's name without suffix)")
@click.option("--out", "out", default=None, help="write the report (.json or .md); it is printed either way")
@click.option("--object-class", "object_classes", multiple=True,
              help="class (name or id) also scored per instance; default: class 1 of a two-class mask")
@click.option("--label-map", "label_map", default=None, help="raw label value -> class id, e.g. 255:1,0:0")
@click.option("--class-column", default=None, help="polygon labels: attribute with class ids or names")
@click.option("--pred-dir", default=None, help="with --model: where predictions go (default: a temp directory)")
@click.option("--min-object-px", default=1, show_default=True,
              help="instance metrics: ignore objects smaller than this (pixels), in prediction and labels")
@_set
def eval_cmd(paths, model, images, labels, out, object_classes, label_map, class_column, pred_dir, min_object_px,
             overrides):
    """Score a prediction mask PRED against LABELS (raster, GeoJSON, GPKG, GeoParquet), or with --model
    predict --images and score them against --labels together. Labels are put on the prediction's grid."""
    score = dict(out=out, object_classes=object_classes, label_map=label_map, class_column=class_column,
                 min_object_px=min_object_px)
    try:
        if model:
            from geoseg.driver import evaluate_model

            if paths:
                raise InputError("give either PRED LABELS, or --model with --images and --labels (not both)")
            report = evaluate_model(model, images, labels, pred_dir=pred_dir, overrides=overrides, **score)
        else:
            from geoseg.evaluate import run_eval

            report = run_eval(paths, **score)
    except GeosegError as e:
        _fail(e)
    from geoseg.evaluate import format_markdown

    click.echo(format_markdown(report), nl=False)


@main.command("export-coco")
@click.argument("source")
@click.option("--images", "images", multiple=True,
              help="the input rasters (paths or globs, repeatable; default: the scene's input in run.json)")
@click.option("--chip-px", default=512, show_default=True, help="chip side in pixels")
@click.option("--out", "out", required=True, help="output directory (local or s3://)")
@click.option("--classes", default=None, help="object classes (names or ids), e.g. building; default: all but "
              "background / nodata")
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg"]), default="png", show_default=True,
              help="chip image format")
@click.option("--rgb-bands", default=None, help="1-based bands shown as red,green,blue (default: by band name)")
@click.option("--overwrite", is_flag=True, help="replace an existing export in OUT")
@_set
def export_coco_cmd(source, images, chip_px, out, classes, fmt, rgb_bands, overwrite, overrides) -> None:
    """Cut SOURCE (a finished run's scene directory or a mask GeoTIFF, local or s3://) into image chips, each with
    a georeference sidecar, and write a COCO JSON of its objects for annotation tools. --set keys are storage.*."""
    from geoseg.coco import export_coco
    from geoseg.config import apply_overrides, config_from_dict
    from geoseg.errors import InputError as _InputError

    try:
        cfg = config_from_dict(apply_overrides({}, overrides), source="--set")
        try:
            bands = [int(b) for b in rgb_bands.split(",")] if rgb_bands else None
        except ValueError:
            raise _InputError(f"--rgb-bands {rgb_bands!r}: give 1-based band numbers, e.g. 4,3,2") from None
        res = export_coco(source, list(images) or None, out_dir=out, chip_px=chip_px, fmt=fmt, rgb_bands=bands,
                          classes=classes.split(",") if classes else None, overwrite=overwrite, storage=cfg.storage)
    except GeosegError as e:
        _fail(e)
    click.echo(res.coco)
    click.echo(f"{res.images} chips ({res.skipped_chips} without valid pixels skipped), {res.annotations} "
               f"annotations of {', '.join(c['name'] for c in res.categories)}, {res.seconds:.2f} s", err=True)


@main.command("import-labels")
@click.argument("labels")
@click.option("--georef-from", "georef_from", required=True,
              help="the export-coco directory (its georef/ sidecars place each chip)")
@click.option("--out", "out", required=True, help="label polygons: .gpkg, .parquet or .geojson (local or s3://)")
@click.option("--model", "model", default=None, help="check classes against this model (default: the sidecars')")
@click.option("--no-chip-extents", is_flag=True, help="do not add each chip's footprint as background")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@_set
def import_labels_cmd(labels, georef_from, out, model, no_chip_extents, overwrite, overrides) -> None:
    """Turn corrected annotations of exported chips (COCO JSON, or GeoJSON in chip pixels from Label Studio / CVAT)
    into georeferenced label polygons for geoseg train. --set keys are storage.* settings."""
    from geoseg.config import apply_overrides, config_from_dict
    from geoseg.labels_import import import_labels

    try:
        cfg = config_from_dict(apply_overrides({}, overrides), source="--set")
        res = import_labels(labels, georef_from, out, model=model, chip_extents=not no_chip_extents,
                            overwrite=overwrite, storage=cfg.storage)
    except GeosegError as e:
        _fail(e)
    click.echo(res.out)
    click.echo(f"{res.labels} label polygons on {res.chips} chips in {res.crs}; train with kind: polygons, "
               "class_column: class_id", err=True)


def entry() -> None:
    """The ``geoseg`` executable: ``main`` with a hard exit. After a failure: an interrupt can land inside Ray's
    start-up or shutdown, and Ray's exit hooks were seen to crash the interpreter then (SIGSEGV instead of
    exit code 130); the one-line message is already printed and a started Ray is ended by its watchdog. After
    success: the outputs are complete, and the interpreter's own teardown only costs time."""
    import os
    import signal

    def _stop(signum, frame):  # SIGTERM (a scheduler stopping the job) stops it as Ctrl-C does: exit 130
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code != 0:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
        # done: a signal arriving while the interpreter winds down must not turn success into a failure
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Every output is closed and renamed: skip the interpreter's teardown of torch, GDAL and Ray's modules
        # (most of a second at the end of every command), after ending a Ray still running in this process.
        import logging

        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(0)


if __name__ == "__main__":
    entry()
