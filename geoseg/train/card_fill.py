"""Fill a model card from the training data, and measure the halo that makes tiled inference exact."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from rasterio.windows import Window

from geoseg.config import DEFAULT_TILE_PX
from geoseg.models.card import ClassInfo, InstanceSpec, ModelCard, Normalization
from geoseg.train.boundary import boundary_spec

__all__ = ["recommended_tile_px", "make_card", "measure_halo", "tiled_vs_whole_agreement"]

log = logging.getLogger("geoseg")

# Tiled and whole-image argmax must agree on all but this fraction of pixels (float rounding differs between
# convolution calls on different input sizes, which can flip an exact tie between two classes).
AGREEMENT_TOLERANCE = 1e-4


def make_card(tcfg, *, band_names: list[str], mean: list[float], std: list[float], gsd_m: float, dtype: str,
              output_stride: int, halo_px: int, arch_params: dict, extra_description: str = "",
              gsd_range_m: list[float] | None = None, value_range: list[float] | None = None) -> ModelCard:
    classes = [ClassInfo(id=c.id, name=c.name, color=c.color) for c in tcfg.classes]
    desc = (tcfg.description + (" " if tcfg.description else "") + extra_description).strip()
    extra = {}
    # input-contract fields, where this version of the card has them
    if gsd_range_m is not None and "gsd_range_m" in ModelCard.model_fields:
        extra["gsd_range_m"] = [round(float(gsd_range_m[0]), 4), round(float(gsd_range_m[1]), 4)]
    if value_range is not None and "value_range" in ModelCard.model_fields:
        extra["value_range"] = [float(value_range[0]), float(value_range[1])]
    if tcfg.tta not in (None, "none"):  # the default test-time augmentation of predict with this model
        extra["tta"] = tcfg.tta
    spec = boundary_spec(tcfg)
    if spec:  # train.boundary_px: the footprint is the object classes plus the boundary class
        width, seeds, boundary = spec
        extra["instances"] = InstanceSpec(footprint_classes=sorted((*seeds, boundary)), seed_classes=list(seeds),
                                          boundary_px=width)
    return ModelCard(
        **extra,
        name=tcfg.name, version=tcfg.version, architecture=tcfg.architecture, arch_params=arch_params,
        bands=band_names, input_dtype=tcfg.input_dtype or f"{dtype} raw values as in the training images",
        normalization=Normalization(name="standardize", params={"mean": mean, "std": std}),
        gsd_m=round(float(gsd_m), 4), classes=classes, output_stride=output_stride, halo_px=halo_px,
        license=tcfg.license, attribution=tcfg.attribution, description=desc,
    )


def recommended_tile_px(halo_px: int, output_stride: int, default_px: int = DEFAULT_TILE_PX,
                        max_px: int = 1024) -> int | None:
    """The card's tile side for a measured halo: the smallest power of two from ``default_px`` up (and a multiple
    of the stride) that is at least 4 halos, so the halo read around a tile costs at most 2.25x its pixels; at most
    ``max_px``. None when ``default_px`` already does (the card then leaves the tile side to the config)."""
    tile = default_px
    while tile < 4 * halo_px and tile < max_px:
        tile *= 2
    tile = -(-tile // output_stride) * output_stride
    return None if tile == default_px else tile


def _whole(module, norm: Normalization, data: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        x = norm.apply(torch.from_numpy(data[None].astype(np.float32)))
        return module(x).argmax(1)[0].to(torch.uint8).numpy()


def tiled_vs_whole_agreement(module, card: ModelCard, images: list[tuple[np.ndarray, np.ndarray]], tile_px: int,
                             halo_px: int) -> float:
    """Fraction of valid pixels where geoseg's tiled inference (tile_px, halo_px) equals whole-image inference."""
    from affine import Affine

    from geoseg.grid import TileGrid
    from geoseg.infer import Predictor
    from geoseg.models.registry import GeoModel

    pred = Predictor(GeoModel(card=card, module=module), device="cpu", batch_size=4, tta="none")  # as _whole
    same = total = 0
    for data, valid in images:
        rows, cols = data.shape[1:]
        block = max(tile_px, -(-max(rows, cols) // tile_px) * tile_px)
        grid = TileGrid((rows, cols), Affine.identity(), None, tile_px, halo_px, block, card.output_stride)
        b = grid.block(0, 0)
        tiled = pred.predict_block(b, data, valid).mask
        whole = _whole(module, card.normalization, data)
        same += int((tiled[valid] == whole[valid]).sum())
        total += int(valid.sum())
    return same / max(total, 1)


def measure_halo(module, card: ModelCard, images: list[tuple[np.ndarray, np.ndarray]], max_halo_px: int = 256,
                 tile_px: int | None = None) -> tuple[int, float, int]:
    """The smallest halo (a multiple of the output stride) at which tiled == whole-image inference.

    Tiles are small (``tile_px``, default 64 rounded up to the stride) so the validation images have interior
    seams. Returns (halo_px, agreement at that halo, tile_px used). When no halo up to ``max_halo_px`` reaches
    the tolerance, returns the best one seen (its agreement says how close it came).
    """
    s = card.output_stride
    tile_px = tile_px or s * math.ceil(64 / s)
    module = module.eval()
    best = (max_halo_px, -1.0)
    for halo in range(0, max_halo_px + 1, s):
        agree = tiled_vs_whole_agreement(module, card, images, tile_px, halo)
        log.info("halo %d px: tiled vs whole-image agreement %.6f", halo, agree)
        if agree > best[1]:
            best = (halo, agree)
        if agree >= 1 - AGREEMENT_TOLERANCE:
            return halo, agree, tile_px
    return best[0], best[1], tile_px


def window_of(shape) -> Window:
    rows, cols = shape
    return Window(0, 0, cols, rows)
