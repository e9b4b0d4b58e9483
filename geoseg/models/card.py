"""The model card: everything the pipeline needs to know about a model, carried in ``card.yaml``.

A card names the architecture and its constructor arguments, the input bands (by name) and their
normalisation, the ground sample distance, the classes (id, name, colour), the nodata class value, and the
tiling facts: ``output_stride`` (tiles start on multiples of it) and ``halo_px`` (context that makes tiled
inference equal to whole-image inference). Tiling reads these from the card, never from constants.

Every validation problem is a ``ModelError`` naming the file (when there is one) and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from geoseg.errors import ModelError
from geoseg.models._exact import simd_inplace

__all__ = ["ClassInfo", "InstanceSpec", "Normalization", "ModelCard", "NORMALIZATIONS"]

_HEX = re.compile(r"^#[0-9A-Fa-f]{6}$")


def _describe(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: field 'a.b': message (got ...)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r:.80})"
        lines.append(f"field '{loc}': {msg}{got}")
    return f"{source}: invalid model card: " + "; ".join(lines)


# How many card models are being validated on this stack: pydantic calls a nested model's custom
# __init__ too, and only the outermost one may turn the ValidationError (which keeps field paths) into
# a ModelError.
_NESTING: ContextVar[int] = ContextVar("geoseg_card_nesting", default=0)


class _Frozen(BaseModel):
    """Frozen, extra="forbid"; a validation failure on construction raises ModelError, not ValidationError."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any):
        token = _NESTING.set(_NESTING.get() + 1)
        try:
            super().__init__(**data)
        except ValidationError as e:
            if _NESTING.get() > 1:
                raise
            raise ModelError(_describe(e, type(self).__name__)) from None
        finally:
            _NESTING.reset(token)


# ---------------------------------------------------------------------------------------------------------
# Normalisations: elementwise / per-band transforms of raw raster values (never per-tile statistics, so a
# pixel's normalised value never depends on which tile it falls in).


def _per_band(value: Any, x: torch.Tensor, what: str) -> torch.Tensor:
    """A scalar or a per-band list as a tensor broadcastable over NCHW ``x``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.numel() != x.shape[1]:
        raise ModelError(f"normalization {what}: {t.numel()} values for {x.shape[1]} bands")
    return t.view(1, -1, 1, 1)


def _dynamic_world(x: torch.Tensor, p: dict) -> torch.Tensor:
    # Dynamic World's log-sigmoid: log(x*0.005+1), standardise per band, then sigmoid(5x-1) written as e/(e+1).
    table = torch.as_tensor(p["percentiles"], dtype=torch.float32, device=x.device)
    if table.shape != (x.shape[1], 2):
        raise ModelError(f"normalization percentiles: table is {tuple(table.shape)}, input has {x.shape[1]} bands")
    # log/exp via simd_inplace: the same bits for a pixel in any tile (see geoseg/models/_exact.py).
    y = simd_inplace(torch.Tensor.log_, (x * 0.005 + 1.0).contiguous())
    y = (y - table[:, 0].view(1, -1, 1, 1)) / table[:, 1].view(1, -1, 1, 1)
    y = simd_inplace(torch.Tensor.exp_, (y * 5.0 - 1.0).contiguous())
    return y / (y + 1.0)


def _scale(x: torch.Tensor, p: dict) -> torch.Tensor:
    return x * _per_band(p.get("factor", 1.0), x, "factor") + _per_band(p.get("offset", 0.0), x, "offset")


def _standardize(x: torch.Tensor, p: dict) -> torch.Tensor:
    return (x - _per_band(p["mean"], x, "mean")) / _per_band(p["std"], x, "std")


def _identity(x: torch.Tensor, p: dict) -> torch.Tensor:
    return x


# name -> (function, required params, optional params)
NORMALIZATIONS: dict[str, tuple[Callable[[torch.Tensor, dict], torch.Tensor], set[str], set[str]]] = {
    "dynamic_world_log_sigmoid": (_dynamic_world, {"percentiles"}, set()),
    "scale": (_scale, set(), {"factor", "offset"}),
    "standardize": (_standardize, {"mean", "std"}, set()),
    "identity": (_identity, set(), set()),
}


class Normalization(_Frozen):
    """A named, serialisable per-band transform of raw raster values (float32 NCHW, bands on dim 1).

    Names: ``dynamic_world_log_sigmoid`` (``percentiles``: a bands x 2 table of log-space centre and
    scale), ``scale`` (``factor``, ``offset``: scalars or per band; ``x * factor + offset``),
    ``standardize`` (``mean``, ``std``: scalars or per band), ``identity``.
    """

    name: str
    params: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Normalization:
        if self.name not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.name!r}; valid names: {', '.join(NORMALIZATIONS)}")
        _, required, optional = NORMALIZATIONS[self.name]
        missing = required - set(self.params)
        extra = set(self.params) - required - optional
        if missing or extra:
            raise ValueError(
                f"normalization {self.name!r} takes params {sorted(required | optional)}; "
                f"missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        for key, value in self.params.items():
            try:
                t = torch.as_tensor(value, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"normalization param {key!r} must be a number or a list of numbers") from None
            if not torch.isfinite(t).all():
                raise ValueError(f"normalization param {key!r} has non-finite values")
            if key == "std" and (t == 0).any():
                raise ValueError("normalization param 'std' has zeros")
            if key == "percentiles" and (t.ndim != 2 or t.shape[1] != 2 or (t[:, 1] == 0).any()):
                raise ValueError("normalization param 'percentiles' must be a bands x 2 table with nonzero scales")
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise raw values ``x`` (float32 NCHW, on any device); returns a new float32 tensor."""
        fn = NORMALIZATIONS[self.name][0]
        return fn(x.to(torch.float32), self.params)


class ClassInfo(_Frozen):
    """One output class: its id (the value written to the mask), name and display colour ``#RRGGBB``."""

    id: int = Field(ge=0)
    name: str = Field(min_length=1)
    color: str

    @field_validator("color")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _HEX.match(v):
            raise ValueError("colour must be '#RRGGBB' hex")
        return v.upper()


class InstanceSpec(_Frozen):
    """How a model's classes make object instances (``geoseg.instances``): the pixels of ``footprint_classes``
    form an object's footprint, the connected components of ``seed_classes`` inside it (building interiors,
    with a boundary class around them) are its objects, grown back to the footprint."""

    footprint_classes: list[int] = Field(min_length=1, description="class ids whose pixels form footprints")
    seed_classes: list[int] = Field(min_length=1, description="class ids whose components are the objects")
    boundary_px: int | None = Field(None, ge=0, description="boundary width the model was trained with")
    min_seed_px: int = Field(1, ge=1, description="seed components smaller than this are not objects of their own")
    min_instance_px: int = Field(1, ge=1, description="objects smaller than this (pixels) are not instances")

    @model_validator(mode="after")
    def _check(self) -> InstanceSpec:
        if not set(self.seed_classes) <= set(self.footprint_classes):
            raise ValueError(f"seed_classes {self.seed_classes} must be footprint classes {self.footprint_classes}")
        return self


class ModelCard(_Frozen):
    """What a model expects, what it outputs and how to tile it. See the module docstring."""

    name: str = Field(min_length=1)
    version: str
    architecture: str
    arch_params: dict = Field(default_factory=dict)
    bands: list[str] = Field(min_length=1, description="input band names in model order, e.g. B2..B12")
    input_dtype: str = Field(description="expected raw values, e.g. 'int16 TOA reflectance x 10000'")
    normalization: Normalization
    gsd_m: float = Field(gt=0, description="ground sample distance the model was trained at, metres")
    classes: list[ClassInfo] = Field(min_length=1)
    output_stride: int = Field(ge=1, description="tiles must start on multiples of this many pixels")
    halo_px: int = Field(ge=0, description="context around a tile that makes tiled inference exact")
    # The input contract, checked for every scene before any compute (geoseg.io.contract).
    fill_value: float = Field(
        0.0, description="raw value the model sees where the input is invalid (nodata, NaN, inf), before "
        "normalisation: invalid pixels never reach the network as NaN or as an arbitrary nodata value"
    )
    value_range: tuple[float, float] | None = Field(
        None, description="typical range of raw input values, e.g. [0, 10000] for reflectance x 10000; a "
        "sample far outside it (reflectance 0-1 given as digital numbers) is refused"
    )
    gsd_range_m: tuple[float, float] | None = Field(
        None, description="pixel sizes the model accepts, metres (default: gsd_m / 1.5 to gsd_m * 1.5)"
    )
    min_input_px: int | None = Field(
        None, ge=1, description="smallest input side the network accepts, pixels (default: output_stride)"
    )
    license: str
    attribution: str
    description: str = ""
    instances: InstanceSpec | None = Field(
        None, description="object instances: footprint and seed classes (absent: connected regions only)"
    )
    tile_px: int | None = Field(
        None, gt=0, description="tile side geoseg uses with this model unless tiling.tile_px is set: large enough "
        "that the halo read around each tile stays a small overhead (default 256)"
    )
    tta: Literal["none", "flips", "d4"] | None = Field(
        None, description="test-time augmentation geoseg predict uses with this model by default (model.tta "
        "overrides): probabilities averaged over the tile's flips, or its flips and 90-degree turns (d4)"
    )
    logit_offsets: list[float] | None = Field(
        None, description="per-class offsets training folded into the head's bias (logit adjustment, calibration); "
        "fine-tuning (train.init_from) takes them out again before it trains"
    )

    @model_serializer(mode="wrap")
    def _drop_absent_fields(self, handler):
        data = handler(self)  # cards without these optional fields serialise as before the fields existed
        if isinstance(data, dict):
            for key in ("instances", "tile_px", "tta", "logit_offsets"):
                if key in data and data[key] is None:
                    data.pop(key)
        return data

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) else v  # YAML reads 1.0 as a float

    @model_validator(mode="after")
    def _check(self) -> ModelCard:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"classes: duplicate class ids {sorted({i for i in ids if ids.count(i) > 1})}")
        if max(ids) >= 255:
            raise ValueError(f"classes: class ids must be < 255 (255 is reserved for nodata); got {max(ids)}")
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"bands: duplicate band names in {self.bands}")
        for key, value in self.normalization.params.items():
            n = torch.as_tensor(value).shape[0] if torch.as_tensor(value).ndim else None
            if n is not None and n != len(self.bands):
                raise ValueError(f"normalization.params.{key}: {n} entries for {len(self.bands)} bands")
        for key in ("value_range", "gsd_range_m"):
            lo_hi = getattr(self, key)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{key}: must be [low, high] with low < high; got {list(lo_hi)}")
        if self.gsd_range_m is not None and not self.gsd_range_m[0] <= self.gsd_m <= self.gsd_range_m[1]:
            raise ValueError(f"gsd_range_m {list(self.gsd_range_m)} does not contain gsd_m {self.gsd_m}")
        if self.tile_px is not None and self.tile_px % self.output_stride:
            raise ValueError(f"tile_px ({self.tile_px}) must be a multiple of output_stride ({self.output_stride})")
        if self.logit_offsets is not None and len(self.logit_offsets) != len(self.classes):
            raise ValueError(f"logit_offsets: {len(self.logit_offsets)} values for {len(self.classes)} classes")
        if self.instances is not None:
            unknown = sorted(set(self.instances.footprint_classes) - set(ids))
            if unknown:
                raise ValueError(f"instances: class ids {unknown} are not in classes {sorted(ids)}")
        return self

    @property
    def accepted_gsd_m(self) -> tuple[float, float]:
        """The pixel sizes (metres) the model accepts."""
        return self.gsd_range_m or (self.gsd_m / 1.5, self.gsd_m * 1.5)

    @property
    def min_side_px(self) -> int:
        """The smallest raster side (rows or cols) the network accepts."""
        return self.min_input_px or self.output_stride

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def palette(self) -> dict[int, tuple[int, int, int, int]]:
        """Class id -> (r, g, b, 255), e.g. for a GeoTIFF colour map."""
        return {c.id: (int(c.color[1:3], 16), int(c.color[3:5], 16), int(c.color[5:7], 16), 255) for c in self.classes}

    @classmethod
    def from_dict(cls, data: Any, source: str = "model card") -> ModelCard:
        """Validate a plain mapping; errors name ``source`` and the field."""
        if not isinstance(data, dict):
            raise ModelError(f"{source}: a model card must be a mapping of fields, got {type(data).__name__}")
        token = _NESTING.set(1)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ModelError(_describe(e, source)) from None
        finally:
            _NESTING.reset(token)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelCard:
        """Read and validate ``card.yaml``."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"{path}: model card not found") from None
        except OSError as e:
            raise ModelError(f"{path}: cannot read model card: {e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ModelError(f"{path}: model card is not valid YAML: {e}") from None
        return cls.from_dict(data, str(path))

    def to_yaml(self, path: str | Path) -> None:
        """Write the card as YAML (fields in declaration order)."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120)
        Path(path).write_text(text, encoding="utf-8")
