"""The Dynamic World port: agreement with Google's SavedModel, exact tiled inference, the fixed-kernel ops.

``tests/data/dw_reference.npz`` was computed once with the SavedModel (``tools/make_dw_reference.py``,
TensorFlow) on the real chip, so these tests need no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F

from geoseg.models import GeoModel
from geoseg.models._exact import simd_inplace
from geoseg.models.dynamic_world import antialias_downsample2, bilinear_upsample2

REFERENCE = Path(__file__).parent / "data" / "dw_reference.npz"


@pytest.fixture(scope="module")
def dw(dw_model) -> GeoModel:
    return dw_model  # the session's one loaded Dynamic World (conftest)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def chip_bands(s2_chip, reference) -> torch.Tensor:
    """The chip's Dynamic World bands (B2..B8, B11, B12), raw values as float32 1x9xHxW."""
    with rasterio.open(s2_chip) as src:
        return torch.from_numpy(src.read(reference["bands"].tolist()).astype(np.float32))[None]


def _predict(dw: GeoModel, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return dw.module(dw.card.normalization.apply(x))


@pytest.fixture(scope="module")
def chip_logits(dw, chip_bands) -> torch.Tensor:
    return _predict(dw, chip_bands)


def _tiled(dw: GeoModel, x: torch.Tensor, tile: int, halo: int) -> torch.Tensor:
    """Tiles at multiples of ``tile`` read with ``halo`` context (clipped at the raster edge), centre-cropped."""
    assert tile % dw.card.output_stride == 0 and halo % dw.card.output_stride == 0
    h, w = x.shape[-2:]
    out = torch.full((1, dw.card.num_classes, h, w), float("nan"))
    for r in range(0, h, tile):
        for c in range(0, w, tile):
            r0, c0 = max(r - halo, 0), max(c - halo, 0)
            r1, c1 = min(r + tile + halo, h), min(c + tile + halo, w)
            y = _predict(dw, x[..., r0:r1, c0:c1])
            th, tw = min(tile, h - r), min(tile, w - c)
            out[..., r : r + th, c : c + tw] = y[..., r - r0 : r - r0 + th, c - c0 : c - c0 + tw]
    return out


def test_logits_match_saved_model(chip_logits, reference):
    """Max |logit difference| <= 1e-3 on the reference crop and the same class on 100% of the chip."""
    logits = chip_logits[0].permute(1, 2, 0).numpy()  # HWC like the SavedModel
    r, c, n = reference["crop"].tolist()
    diff = np.abs(logits[r : r + n, c : c + n] - reference["logits"]).max()
    assert diff <= 1e-3, f"max |diff| {diff}"
    labels = logits.argmax(-1)
    assert labels.shape == reference["labels"].shape == (512, 512)
    mismatched = int((labels != reference["labels"]).sum())
    assert mismatched == 0, f"{mismatched} pixels disagree with the SavedModel's class"


def test_tiled_inference_is_bit_identical(dw, chip_bands, chip_logits):
    """Even-aligned tiles with the card's halo, clipped at the edges, give exactly the whole-chip logits."""
    assert dw.card.output_stride == 2 and dw.card.halo_px == 32
    tiled = _tiled(dw, chip_bands, tile=192, halo=dw.card.halo_px)  # 512 = 192 + 192 + 128: ragged last tile
    assert torch.equal(tiled, chip_logits)


def test_tiled_inference_exact_on_odd_sized_raster(dw, chip_bands):
    """Also on an odd-sized raster (odd edge windows) with per-tile normalisation."""
    x = chip_bands[..., 101:351, 50:293]  # 250 x 243
    assert torch.equal(_tiled(dw, x, tile=128, halo=dw.card.halo_px), _predict(dw, x))


def test_receptive_field_within_halo(dw):
    """Changing one input pixel changes logits only within 22 px: the card's 32 px halo covers it."""
    torch.manual_seed(0)
    x = torch.rand(1, 9, 96, 96)
    x2 = x.clone()
    x2[..., 48, 48] += 0.5
    with torch.inference_mode():
        changed = (dw.module(x) != dw.module(x2)).any(dim=1)[0].nonzero()
    radius = int((changed - 48).abs().max())
    assert 20 <= radius <= 22 < dw.card.halo_px


def _tf_antialias_matrix(n_in: int) -> np.ndarray:
    """TF ScaleAndTranslate (triangle kernel, antialias, scale 1/2) as an (n_in // 2) x n_in matrix."""
    n_out = n_in // 2
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * 2.0  # sample position in continuous coordinates
        for s in range(n_in):
            m[i, s] = max(0.0, 1.0 - abs(s + 0.5 - centre) / 2.0)
        m[i] /= m[i].sum()
    return m


@pytest.mark.parametrize("shape", [(2, 3), (4, 5), (8, 8), (17, 10)])
def test_downsample_matches_tf_kernel(shape):
    """The fixed-kernel downsample equals TF's antialiased bilinear resize, edges included."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, *shape, dtype=torch.float64)
    mh, mw = _tf_antialias_matrix(shape[0]), _tf_antialias_matrix(shape[1])
    expected = np.einsum("ih,nchw,jw->ncij", mh, x.numpy(), mw)
    got = antialias_downsample2(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_upsample_is_half_pixel_bilinear():
    """Even sizes: torch's bilinear with half-pixel centres (TF's ResizeBilinear); odd: last row clamps."""
    x = torch.rand(1, 2, 5, 6)
    np.testing.assert_array_equal(
        bilinear_upsample2(x, (10, 12)).numpy(),
        F.interpolate(x, size=(10, 12), mode="bilinear", align_corners=False).numpy(),
    )
    odd = bilinear_upsample2(x, (11, 13))
    assert odd.shape[-2:] == (11, 13)
    assert torch.equal(odd[..., :10, :12], bilinear_upsample2(x, (10, 12)))
    assert torch.equal(odd[..., 10, :12], odd[..., 9, :12])


@pytest.mark.parametrize("threads", [1, 3])
def test_simd_inplace_is_position_independent(threads):
    """An element's result does not depend on where it sits in the tensor, for any size and thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        base = torch.randn(200_003) * 4
        ref = simd_inplace(lambda t: F.mish(t, inplace=True), base.clone())
        for start, stop in [(1, 200_003), (37, 70_001), (5, 40_000), (1001, 1050)]:
            part = simd_inplace(lambda t: F.mish(t, inplace=True), base[start:stop].clone())
            assert torch.equal(part, ref[start:stop]), (start, stop)
    finally:
        torch.set_num_threads(old)


def test_output_shape_and_odd_sizes(dw):
    for h, w in [(64, 64), (33, 47)]:
        with torch.inference_mode():
            y = dw.module(torch.rand(2, 9, h, w))
        assert y.shape == (2, 9, h, w) and y.dtype == torch.float32 and y.is_contiguous()


# --- The fused C kernels (geoseg/models/_native.py) and the PyTorch-ops fallback --------------------------------

from geoseg.models import _native  # noqa: E402
from geoseg.models import dynamic_world as dw_module  # noqa: E402

needs_native = pytest.mark.skipif(not _native.available(), reason="no C compiler: the fused kernels are not built")


@pytest.fixture()
def torch_path(monkeypatch):
    """Force the PyTorch-ops forward (what runs where no C compiler exists)."""
    monkeypatch.setattr(dw_module, "_use_native", lambda x: False)


@needs_native
def test_native_and_torch_paths_agree(dw, chip_bands, chip_logits, torch_path):
    """The fused kernels compute the same network as the PyTorch ops, to float rounding."""
    fallback = _predict(dw, chip_bands)
    assert (chip_logits - fallback).abs().max() <= 1e-4
    assert torch.equal(chip_logits.argmax(1), fallback.argmax(1))


def test_torch_path_matches_saved_model_and_tiles_exactly(dw, chip_bands, reference, torch_path):
    """The fallback path keeps both guarantees on its own (the fused path is covered by the tests above)."""
    whole = _predict(dw, chip_bands)
    r, c, n = reference["crop"].tolist()
    assert np.abs(whole[0].permute(1, 2, 0).numpy()[r : r + n, c : c + n] - reference["logits"]).max() <= 1e-3
    assert torch.equal(_tiled(dw, chip_bands, tile=192, halo=dw.card.halo_px), whole)


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
def test_native_mish_is_position_independent_and_accurate(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        base = torch.randn(200_003) * 8
        base[:4] = torch.tensor([0.0, 30.0, -30.0, -100.0])
        ref = _native.mish_(base.clone())
        exact = F.mish(base.double())
        assert ((ref.double() - exact).abs() <= 1e-6 * exact.abs().clamp_min(1.0)).all()
        for start, stop in [(1, 200_003), (37, 70_001), (5, 40_000), (1001, 1050)]:
            assert torch.equal(_native.mish_(base[start:stop].clone()), ref[start:stop]), (start, stop)
    finally:
        torch.set_num_threads(old)


@needs_native
def test_native_depthwise_kernel():
    """dw3x3_mish = Mish(depthwise conv + bias) [+ Mish(add)], from Mish(input); a window gives the same bits."""
    torch.manual_seed(0)
    for c in (48, 20):  # a whole number of 16-float vectors, and a remainder
        x = torch.randn(2, c, 23, 19).contiguous(memory_format=torch.channels_last)
        w, b, add = torch.randn(c, 1, 3, 3), torch.randn(c), torch.randn(2, c, 23, 19)
        expected = F.mish(F.conv2d(F.mish(x), w, b, padding=1, groups=c)) + F.mish(add)
        got = _native.dw3x3_mish(x, w, b, in_mish=True, add=add, add_mish=True)
        assert (got - expected).abs().max() <= 1e-5
        part = _native.dw3x3_mish(x[..., 4:15, 3:12], w, b, in_mish=True, add=add[..., 4:15, 3:12], add_mish=True)
        assert torch.equal(part[..., 1:-1, 1:-1], got[..., 5:14, 4:11])


@needs_native
@pytest.mark.parametrize("shape", [(8, 8), (9, 7)])
def test_native_down_and_up_kernels(shape):
    torch.manual_seed(0)
    h, w = shape
    x = torch.randn(1, 16, 2 * h + 1, 2 * w).contiguous(memory_format=torch.channels_last)
    big_h, big_w = x.shape[-2:]
    out = torch.empty(1, 16, big_h // 2, big_w // 2).contiguous(memory_format=torch.channels_last)
    got = _native.down2_mish(x, dw_module._edge_gain(big_h, x.device), dw_module._edge_gain(big_w, x.device), out)
    assert (got - antialias_downsample2(F.mish(x))).abs().max() <= 1e-5
    head_w, head_b = torch.randn(9, 16, 1, 1), torch.randn(9)
    y = got.contiguous()
    for size in [(2 * y.shape[-2], 2 * y.shape[-1]), (2 * y.shape[-2] + 1, 2 * y.shape[-1] + 1)]:
        up = bilinear_upsample2(y, size)
        expected = F.conv2d(up * torch.rsqrt(torch.clamp_min((up * up).sum(1, keepdim=True), 1e-12)), head_w, head_b)
        z = F.conv2d(got, head_w)
        assert (_native.up2_l2_head(got, z, head_b, size) - expected).abs().max() <= 1e-5


def test_cpu_autocast_takes_the_torch_path(dw):
    """bf16 autocast on CPU (bench_autocast) runs PyTorch ops: the fused kernels are float32 only."""
    x = torch.rand(1, 9, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = dw.module(x)
    assert y.shape == (1, 9, 64, 64)
