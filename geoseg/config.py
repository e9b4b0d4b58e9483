"""The job configuration: one pydantic tree, ``extra="forbid"`` everywhere.

A job is a YAML file (``geoseg run job.yaml``) or flags (``geoseg predict ...``); both end here. Overrides
use dotted keys (``--set tiling.block_px=512``) whose values are parsed as YAML scalars. Every validation
problem becomes one ``ConfigError`` that names the key, quotes the bad value and says what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoseg.errors import ConfigError

__all__ = [
    "JobConfig",
    "ModelConfig",
    "InputConfig",
    "TilingConfig",
    "RuntimeConfig",
    "StorageConfig",
    "OutputConfig",
    "VectorConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "relative_to_file",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    name: str = Field("dynamic-world", description="registered model name, or a path to a model bundle directory")
    autocast: Literal["none", "bf16", "fp16"] = Field(
        "none", description="mixed precision on CUDA; ignored on CPU (see benchmarks for its agreement)"
    )
    tta: Literal["none", "flips", "d4"] | None = Field(
        None, description="test-time augmentation: class probabilities averaged over the tile's flips "
        "(4 passes) or its 8 flips and 90-degree rotations (d4); default: what the model's card recommends"
    )


class InputConfig(_Section):
    paths: list[str] = Field(default_factory=list, description="rasters, local or s3://; globs and prefixes expand")
    bands: list[int] | None = Field(
        None, description="1-based band indexes in the model's band order; default: matched by band description"
    )
    scale: float = Field(
        1.0, description="raw values are multiplied by this before the model, e.g. 10000 for reflectance 0-1 "
        "given to a model whose card expects reflectance x 10000"
    )
    offset: float = Field(0.0, description="added to the raw values after input.scale")
    skip_checks: list[Literal["value_range", "gsd"]] = Field(
        default_factory=list, description="input-contract checks to skip when you know the input is right"
    )
    resample: bool = Field(
        False, description="warp an input whose pixel size the model does not accept onto the model's GSD "
        "(the outputs are then on that grid, not the input's)"
    )
    resampling: Literal["bilinear", "cubic", "nearest"] = Field(
        "bilinear", description="how image bands are resampled when warped (region mosaics, input.resample)"
    )
    aoi: str | None = Field(
        None, description="area of interest: a polygon file (GeoJSON, GPKG, GeoParquet; features are united) "
        "or a bbox 'minx,miny,maxx,maxy' in input.aoi_crs; blocks outside it are never read, pixels outside it "
        "are nodata"
    )
    aoi_crs: str = Field("EPSG:4326", description="CRS of a bbox given as input.aoi")
    overlap: Literal["first", "newest", "least_cloudy"] = Field(
        "first", description="region mosaics: which scene wins where scenes overlap (first valid in the given "
        "order, newest acquisition, or lowest cloud score from the STAC item)"
    )

    @field_validator("scale")
    @classmethod
    def _nonzero_scale(cls, v):
        if v == 0 or v != v or v in (float("inf"), float("-inf")):
            raise ValueError("must be a finite, non-zero number")
        return v

    @field_validator("bands")
    @classmethod
    def _positive_bands(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must list at least one band, or be omitted")
            bad = [b for b in v if b < 1]
            if bad:
                raise ValueError(f"band indexes are 1-based; got {bad}")
        return v


#: tile side when neither tiling.tile_px nor the model card's tile_px sets one
DEFAULT_TILE_PX = 256


class TilingConfig(_Section):
    tile_px: int | None = Field(
        None, gt=0, description="model input tile side before the halo, in pixels; default: the model card's "
        "tile_px (a model with a wide halo runs larger tiles), else 256"
    )
    block_px: int = Field(1024, gt=0, description="side of one unit of work (whole tiles), in pixels")
    halo_px: int | None = Field(None, ge=0, description="context around each tile; default: the model card's")


class RuntimeConfig(_Section):
    engine: Literal["auto", "ray", "local"] = Field(
        "auto", description="ray (local or remote cluster), local (one process), or auto: local for a small job "
        "(a few blocks) when no cluster address is given, else ray"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int | None = Field(
        None, gt=0, description="tiles per forward pass; default 8 on a GPU, 1 on CPU (see infer.default_batch_size)"
    )
    workers: int = Field(1, gt=0, description="inference actors (one model each)")
    num_gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs reserved per inference actor; default 1 when the cluster has GPUs, else 0"
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per inference actor")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs reserved per read / postprocess task")
    writers: int = Field(
        1, gt=0, description="scene writer actors (Ray engine): each scene's mask, seam merge and vector outputs "
        "are written in one of them, off the driver; scenes are spread over them"
    )
    cpus_per_writer: float = Field(0.5, gt=0, description="CPUs reserved per scene writer actor")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for the embedded local Ray (default: all)")
    address: str | None = Field(None, description="join this Ray cluster (else RAY_ADDRESS, else start a local one)")
    object_store_mb: int | None = Field(
        512, ge=80, description="object store of the embedded local Ray, MiB (in-flight blocks live there)"
    )
    max_failed_blocks: int = Field(0, ge=0, description="blocks that may fail (recorded) before the run fails")
    max_in_flight_blocks: int | None = Field(
        None, gt=0, description="blocks read but not yet written; bounds memory (default: 2 per worker + 2)"
    )
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    wait_for_resources_s: float = Field(
        0.0, ge=0, description="on a cluster whose autoscaler adds nodes, wait this long for the workers' CPUs "
        "and GPUs to appear before refusing (0: refuse at once when they are not there)"
    )
    max_pixels: int = Field(
        50_000_000_000, gt=0, description="refuse a scene larger than this many pixels (a VRT or header that "
        "declares an absurd size would otherwise plan millions of blocks); raise it for larger mosaics"
    )


class StorageConfig(_Section):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (else AWS_ENDPOINT_URL, else AWS)")
    region: str | None = None
    anonymous: bool = Field(False, description="unsigned requests, for public buckets")
    path_style: bool = Field(False, description="path-style addressing (MinIO, Ceph)")
    max_retries: int = Field(4, ge=0, description="retries with backoff before an endpoint counts as unreachable")


class OutputConfig(_Section):
    dir: str | None = Field(None, description="output directory, local or s3://; one sub-directory per scene")
    overwrite: bool = False
    skip_complete: bool = Field(
        False, description="skip scenes whose run.json already exists (scheduled jobs over a growing prefix)"
    )
    cog_blocksize_px: int = Field(512, gt=0, description="internal tile size of the mask COG")
    compress: Literal["deflate", "lzw", "zstd", "none"] = "deflate"
    overviews: bool = True
    report: bool = Field(True, description="write report.html + preview.png per scene (geoseg report rebuilds them)")
    confidence: bool | None = Field(
        None, description="write confidence.tif per scene: the predicted class's probability, uint8 round(p * 254), "
        "255 nodata (default: when instances.parquet is written, whose score it gives)"
    )
    crs: str | None = Field(
        None, description="region maps: the output CRS when scenes must be warped (default: the AOI's UTM zone)"
    )
    resolution_m: float | None = Field(
        None, gt=0, description="region maps: output pixel size when warping, metres (default: the model's GSD)"
    )
    shared_filesystem: bool = Field(
        False, description="a local output.dir is the same shared volume on every node of a multi-node cluster"
    )

    @field_validator("cog_blocksize_px")
    @classmethod
    def _multiple_of_16(cls, v):
        if v % 16:
            raise ValueError(f"GeoTIFF tiles must be a multiple of 16 pixels; got {v}")
        return v

    @model_validator(mode="after")
    def _one_policy(self):
        if self.overwrite and self.skip_complete:
            raise ValueError("overwrite and skip_complete contradict each other for finished scenes; choose one")
        return self


class VectorConfig(_Section):
    enabled: bool = True
    formats: list[Literal["parquet", "gpkg", "geojson", "geojsonseq"]] = Field(
        default_factory=lambda: ["parquet", "gpkg", "geojson"]
    )
    connectivity: Literal[4, 8] = Field(4, description="pixel connectivity; 4 is GDAL's default")
    sieve_px: int = Field(0, ge=0, description="merge regions smaller than this many pixels into a neighbour")
    min_area_m2: float = Field(0.0, ge=0, description="like sieve_px, in square metres (the larger applies)")
    simplify_tolerance_m: float = Field(0.0, ge=0, description="coverage-preserving simplification tolerance")
    include_classes: list[int | str] | None = Field(None, description="keep only these classes (ids or names)")
    exclude_classes: list[int | str] = Field(default_factory=list, description="drop these classes (ids or names)")
    single_file: bool | None = Field(
        None, description="true: one file per format, written by the scene's writer (canonical row order, "
        "byte-identical for any split); false: each block's worker writes its polygons that touch no block edge "
        "and the writer only the seams' (polygons.parquet/ is then a directory of parts with _metadata; GPKG only "
        "when listed in formats explicitly); unset: one file up to 64 megapixels or with sieve / simplification"
    )
    instances: bool | None = Field(
        None, description="also write instances.parquet, one polygon per object (geoseg/instances.py); default: "
        "when the model card declares instances"
    )


class TrainSourceConfig(_Section):
    """One set of training images and their labels (see geoseg/train/data.py for the three kinds)."""

    kind: Literal["rasters", "polygons", "chips"] = Field(
        "rasters", description="rasters: label rasters (reprojected onto each image's grid when they differ); "
        "polygons: vector labels rasterized onto each image's grid; chips: images without georeferencing whose "
        "grid comes from the same-named label mask"
    )
    images: list[str] = Field(description="image paths or globs; with stack_bands, single-band files of one scene")
    labels: str = Field(description="label path; '{stem}' is replaced by each image's file name without suffix")
    stack_bands: bool = Field(False, description="the images are the bands of ONE scene, stacked in order")
    class_column: str | None = Field(None, description="polygons: attribute holding the class id or name")
    class_value: int | None = Field(None, description="polygons: one class id for every feature")
    label_map: dict[int, int] = Field(default_factory=dict, description="raw label value -> class id")
    ignore_values: list[float] = Field(default_factory=list, description="label values that are not scored")
    split: Literal["auto", "train", "val"] = Field("auto", description="auto: the validation split decides")


class TrainClassConfig(_Section):
    id: int = Field(ge=0, lt=255)
    name: str = Field(min_length=1)
    color: str = "#808080"


class AugmentConfig(_Section):
    flips: bool = True
    rot90: bool = True
    brightness: float = Field(0.25, ge=0, lt=1, description="random gain 1 +- this, per chip")
    contrast: float = Field(0.25, ge=0, lt=1, description="random contrast 1 +- this around the chip mean")
    channel_gain: float = Field(0.1, ge=0, lt=1, description="random per-band gain 1 +- this (colour balance)")
    saturation: float = Field(0.0, ge=0, le=1, description="random saturation 1 +- this: bands pulled towards (or "
                              "pushed away from) their per-pixel mean, per chip (0 = grey at the extreme)")
    noise: float = Field(0.0, ge=0, description="Gaussian noise, in units of each band's training std")


class ValSplitConfig(_Section):
    by: Literal["file", "block"] = Field("file", description="hold out whole files, or spatial blocks")
    fraction: float = Field(0.2, gt=0, lt=1)
    block_px: int = Field(512, gt=0, description="block side for by=block (chips never cross a block)")
    seed: int = 0


class TrainConfig(_Section):
    """``geoseg train``: data, model, optimisation and the bundle it writes."""

    sources: list[TrainSourceConfig] = Field(default_factory=list)
    classes: list[TrainClassConfig] = Field(default_factory=list)
    object_classes: list[int | str] = Field(default_factory=list, description="classes scored per instance too")
    band_names: list[str] | None = Field(None, description="default: the images' band descriptions, else b1..bn")
    input_bands: list[int] | None = Field(None, description="1-based bands to use (default: all)")
    name: str = "my-model"
    version: str = "1.0"
    description: str = ""
    license: str = "unspecified"
    attribution: str = "unspecified"
    input_dtype: str | None = None
    gsd_range_m: list[float] | None = Field(
        None, min_length=2, max_length=2, description="pixel sizes the model accepts, metres (default: the "
        "training images' range widened 1.5x each way)"
    )
    architecture: Literal["unet", "deeplabv3plus"] = "unet"
    arch_params: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = Field(
        None, description="fine-tuning: a model bundle (registered name or path) whose weights training starts "
        "from; its architecture, arch_params, bands and classes must match these, its normalisation is kept, and "
        "the logit offsets its card declares are taken out of the head first"
    )
    keep: Literal["best", "last"] = Field(
        "best", description="the weights the bundle gets: the epoch with the best val mIoU, or the last epoch's "
        "(with ema_decay: the average at the end of the schedule; validation then chooses nothing)"
    )
    tta: Literal["none", "flips", "d4"] | None = Field(
        None, description="the card's test-time augmentation: what geoseg predict does with this model by default "
        "(model.tta overrides); epochs are validated without it"
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights (and BatchNorm "
        "statistics), updated every step with this decay (e.g. 0.998); validation, the best epoch and the bundle "
        "use the average instead of the last step's weights"
    )
    chip_px: int = Field(256, gt=0)
    sampling: Literal["grid", "random", "balanced"] = "grid"
    chips_per_epoch: int | None = Field(None, gt=0, description="random/balanced: chips drawn per epoch")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    val: ValSplitConfig = Field(default_factory=ValSplitConfig)
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(8, gt=0, description="chips per step per worker")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0.5, ge=0)
    loss: Literal["ce", "ce_dice", "ce_dice_balanced", "ce_lovasz"] = Field(
        "ce_dice", description="ce_dice_balanced: cross-entropy weighted per class by each batch's class frequencies "
        "(thin classes such as a building boundary), plus Dice; ce_lovasz: cross-entropy plus the Lovasz-softmax "
        "surrogate of IoU (Berman et al. 2018), over the classes present in each batch"
    )
    early_stopping_patience: int = Field(5, ge=1, description="epochs without a better val mIoU")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel)")
    use_gpu: bool | None = Field(None, description="default: when the cluster has GPUs")
    amp: bool = Field(True, description="mixed precision (on GPU only)")
    torch_threads: int | None = Field(None, gt=0, description="threads per CPU worker (default: CPUs / workers)")
    seed: int = 0
    out: str | None = Field(None, description="bundle directory to write")
    checkpoint_dir: str | None = Field(None, description="Ray Train storage (default: OUT.ckpt beside the bundle)")
    resume: bool = Field(True, description="continue an interrupted run from its last checkpoint")
    halo_max_px: int = Field(256, ge=0, description="largest halo tried when measuring it")
    halo_images: int = Field(4, ge=1, description="validation images used to measure the halo")
    max_steps_per_epoch: int | None = Field(None, gt=0, description="cap (smoke tests, benchmarks)")
    max_val_chips: int | None = Field(None, gt=0)
    source_weights: list[float] | None = Field(
        None, description="random sampling: share of each epoch's chips drawn from each source, in sources order "
        "(the weight of a source without training regions is ignored; default: by area)"
    )
    scale_range: list[float] | None = Field(
        None, min_length=2, max_length=2, description="random sampling: scale augmentation, each chip is cut "
        "at chip_px / s and resampled to chip_px, s log-uniform in [lo, hi] (> 1 zooms in)"
    )
    logit_adjustment: float = Field(
        0.0, ge=0, description="tau of post-hoc logit adjustment: every class's logit gets -tau * log(its share of "
        "the label pixels trained on), at validation and in the bundle's head bias; 1 decides as if all classes "
        "were equally likely (a class rare in training but dense where the model runs), 0 keeps the training prior"
    )
    weights_dtype: Literal["float32", "float16"] = Field(
        "float32", description="how the bundle stores its weights (float16: half the file; the weights are rounded "
        "before the halo is measured, so the bundle is what was measured; they load as float32)"
    )
    calibrate_bias: bool = Field(
        False, description="choose a logit offset for every class but class 0 on the validation split: epochs are "
        "compared by val mIoU at their best offset, and the bundle's head bias gets the best epoch's offset"
    )
    boundary_px: int = Field(
        0, ge=0, description="instance training: labelled pixels of the object_classes within this many pixels "
        "of a pixel of another known class become boundary_class (0: off); the card then declares instances"
    )
    boundary_class: int | str | None = Field(None, description="with boundary_px: the class of boundary pixels")

    @model_validator(mode="after")
    def _sampling_options(self):
        if self.source_weights is not None:
            if len(self.source_weights) != len(self.sources) or any(w < 0 for w in self.source_weights):
                raise ValueError(
                    f"train.source_weights needs one weight >= 0 per source ({len(self.sources)} sources)"
                )
        if self.source_weights is not None or self.scale_range is not None:
            if self.sampling != "random":
                raise ValueError("train.source_weights and train.scale_range need train.sampling: random")
        if self.scale_range is not None and not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"train.scale_range must be [lo, hi] with 0 < lo <= hi; got {self.scale_range}")
        if self.boundary_px and (self.boundary_class is None or not self.object_classes):
            raise ValueError("train.boundary_px needs train.boundary_class and train.object_classes")
        return self


class JobConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    vector: VectorConfig = Field(default_factory=VectorConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _block_holds_whole_tiles(self):
        t = self.tiling
        tile = t.tile_px or DEFAULT_TILE_PX  # a card's tile_px is checked when planning (plan.tile_size)
        if t.block_px % tile:
            raise ValueError(
                f"tiling.block_px ({t.block_px}) must be a multiple of tiling.tile_px ({tile})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            section = _section_of(e["loc"])
            valid = ", ".join(sorted(section.model_fields)) if section else ""
            lines.append(f"unknown key {key!r}" + (f" (valid keys here: {valid})" if valid else ""))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            # A check across keys gets the whole section as its input: name the keys, never dump the dict.
            shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r:.120})"
            lines.append(f"{key}: {msg}{shown}" if e["loc"] else f"{msg}{shown}")
    return f"{source}: invalid configuration: " + "; ".join(lines)


def _section_of(loc) -> type[BaseModel] | None:
    """The pydantic class that holds the key at ``loc`` (for listing valid keys)."""
    cls: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        cls = field.annotation
    return cls


def config_from_dict(data: dict[str, Any], source: str = "config") -> JobConfig:
    """Validate a plain dict into a ``JobConfig``; raises ``ConfigError`` naming ``source``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a job configuration must be a mapping, got {type(data).__name__}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    out = copy.deepcopy(data) if data else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. tiling.block_px=512")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key component in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({_yaml_reason(e)})") from None
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def _yaml_reason(e: yaml.YAMLError) -> str:
    """PyYAML's problem and position on one line (its own text spans several, with a caret drawing)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a YAML job file, apply ``--set`` overrides, validate."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({_yaml_reason(e)})") from None
    data = relative_to_file(data, p.parent)
    return config_from_dict(apply_overrides(data or {}, overrides), source=str(p))


def relative_to_file(data: Any, base: Path) -> Any:
    """Relative local input and training paths in a job file are relative to the file's folder, not to where
    the job is started (``geoseg run configs/job.yaml`` and ``cd configs; geoseg run job.yaml`` read the same scenes).
    ``--set`` values stay relative to the working directory, like any command-line path."""
    if not isinstance(data, dict):
        return data
    data = _train_relative_to(data, base)
    if not isinstance(data.get("input"), dict):
        return data
    paths = data["input"].get("paths")
    if not isinstance(paths, list):
        return data
    fixed = [
        str(base / q) if isinstance(q, str) and q and "://" not in q and not Path(q).is_absolute() else q
        for q in paths
    ]
    return {**data, "input": {**data["input"], "paths": fixed}}


def _train_relative_to(data: dict, base: Path) -> dict:
    """Relative local paths of ``train:`` (sources, out, checkpoint_dir, an init_from bundle path), normalised,
    ``~`` left to expand."""
    import os

    if not isinstance(data.get("train"), dict):
        return data

    def fix(q):
        local = isinstance(q, str) and q and "://" not in q and not q.startswith("~") and not Path(q).is_absolute()
        return os.path.normpath(str(base / q)) if local else q

    tr = dict(data["train"])
    for key in ("out", "checkpoint_dir"):
        if key in tr:
            tr[key] = fix(tr[key])
    init = tr.get("init_from")
    if isinstance(init, str) and ("/" in init or init.startswith(".")):  # a bundle path, not a registered name
        tr["init_from"] = fix(init)
    if isinstance(tr.get("sources"), list):
        srcs = []
        for s in tr["sources"]:
            if isinstance(s, dict):
                s = dict(s)
                if isinstance(s.get("images"), list):
                    s["images"] = [fix(q) for q in s["images"]]
                elif isinstance(s.get("images"), str):
                    s["images"] = [fix(s["images"])]
                if "labels" in s:
                    s["labels"] = fix(s["labels"])
            srcs.append(s)
        tr["sources"] = srcs
    return {**data, "train": tr}
