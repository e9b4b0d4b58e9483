"""Google's Dynamic World land-cover network, re-implemented in plain PyTorch.

The layer graph, activations and padding were read from the published TensorFlow SavedModel (Apache-2.0,
github.com/google/dynamicworld; ``tools/convert_dynamic_world.py`` converts its weights):

    stem      3x3 conv (9 -> 64) + BN + Mish                          full resolution
    down      bilinear antialiased resize to int(H/2)                 (tf ScaleAndTranslate, antialias)
    side      1x1 conv (64 -> 48), depthwise 3x3                      half resolution
    block1-3  [1x1 conv, depthwise 3x3] x 3 + 1x1 shortcut, summed    widths 96, 144, 144
              block3 reads concat(block2, side)
    up        bilinear resize back to H x W (half-pixel centres)
    head      L2 normalisation across channels, 1x1 conv -> 9 logits

Every conv is followed by batch norm (eps 1e-3) and Mish, both on the main path and on the shortcut.
Two resamplers are written here as fixed-kernel ops so that a window at an even pixel offset gives, away
from its edges, exactly the whole image's result (tiled inference is exact):

- ``down``: TF's antialiased bilinear at scale 1/2 is the separable kernel [1, 3, 3, 1] / 8 with stride 2,
  renormalised where it overhangs the image edge (TF drops the outside taps and rescales the rest).
- ``up``: bilinear at a fixed scale of 2 (half-pixel centres, edge clamped).

For even H and W both equal TF's ops. For an odd size TF derives the scale from the size (e.g. 255/511),
which shifts every pixel slightly; here the scale stays 1/2 (and the last row/column is edge-clamped), so
odd-sized inputs differ from the SavedModel by a sub-pixel resampling; the model card's output stride (2)
tells the tiler to keep tile offsets even.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.models import _native
from geoseg.models._exact import simd_inplace

__all__ = ["DynamicWorldNet", "ConvBNMish", "SeparableResBlock", "antialias_downsample2", "bilinear_upsample2"]

BN_EPS = 1e-3  # Keras BatchNormalization default, as stored in the SavedModel

# TF's triangle kernel stretched by 2 and sampled at the four taps a stride-2 output sees.
_TAPS = (0.125, 0.375, 0.375, 0.125)


def _edge_gain(n_in: int, device: torch.device) -> torch.Tensor:
    """1 / (sum of in-image tap weights) for each of the ``n_in // 2`` outputs (1.0 exactly in the interior)."""
    ones = torch.ones(1, 1, n_in, device=device, dtype=torch.float32)
    k = torch.tensor(_TAPS, device=device, dtype=torch.float32).view(1, 1, 4)
    return 1.0 / F.conv1d(ones, k, stride=2, padding=1).view(-1)


def antialias_downsample2(x: torch.Tensor) -> torch.Tensor:
    """Halve H and W (to ``int(H/2)``) like ``tf.image.resize(x, [H//2, W//2], 'bilinear', antialias=True)``.

    A depthwise 4x4 conv with stride 2 and zero padding 1, then the outputs whose kernel overhangs the
    image edge are rescaled so their in-image weights sum to one, as TF does.
    """
    n, c, h, w = x.shape
    k1 = torch.tensor(_TAPS, device=x.device, dtype=x.dtype)
    weight = (k1[:, None] * k1[None, :]).expand(c, 1, 4, 4).contiguous()
    y = F.conv2d(x, weight, stride=2, padding=1, groups=c)
    gain = _edge_gain(h, x.device)[:, None] * _edge_gain(w, x.device)[None, :]
    return y * gain.to(x.dtype)


def bilinear_upsample2(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample by exactly 2 (half-pixel centres) to ``size``, which is ``2h`` or ``2h + 1`` per axis.

    ``tf.image.resize(..., 'bilinear')`` with half_pixel_centers; at an odd size the extra last row/column
    clamps to the edge, keeping the scale fixed at 2 (see the module docstring).
    """
    h, w = x.shape[-2:]
    y = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    pad_h, pad_w = size[0] - 2 * h, size[1] - 2 * w
    if pad_h or pad_w:
        y = F.pad(y, (0, pad_w, 0, pad_h), mode="replicate")
    return y


def _mish_(x: torch.Tensor) -> None:
    F.mish(x, inplace=True)


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _use_native(x: torch.Tensor) -> bool:
    """The fused C kernels (``_native``) serve CPU float32 inference when they compiled; else PyTorch ops."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not _cpu_autocast() and _native.available())


class ConvBNMish(nn.Module):
    """Conv (bias, zero 'same' padding) -> BatchNorm (eps 1e-3) -> Mish; ``depthwise`` makes it 3x3 per channel.

    In eval mode the batch norm is folded into the conv's weight and bias on the fly (a few thousand
    multiplies per call): one pass over the activations instead of two, and the state_dict keeps the
    original conv and BN tensors, so checkpoints and training are unaffected.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, depthwise: bool = False):
        super().__init__()
        groups = in_channels if depthwise else 1
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv's weight and bias with the eval-mode batch norm folded in."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        bias = (self.conv.bias - bn.running_mean) * scale + bn.bias
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.mish(self.bn(self.conv(x)))
        weight, bias = self.folded()
        y = F.conv2d(x, weight, bias, padding=self.conv.padding, groups=self.conv.groups)
        return simd_inplace(_mish_, y)

    def native(self, x: torch.Tensor, **kw) -> torch.Tensor:
        """Inference through the fused C kernels. 1x1 (or the stem): the raw conv, its Mish left to the consumer
        (the kernel reading it). Depthwise 3x3: ``_native.dw3x3_mish`` with ``kw``."""
        weight, bias = self.folded()
        if self.conv.groups > 1:
            return _native.dw3x3_mish(x, weight, bias, **kw)
        return F.conv2d(x, weight, bias, padding=self.conv.padding)


class SeparableResBlock(nn.Module):
    """Three (1x1 conv, depthwise 3x3) pairs plus a 1x1 shortcut, each with BN + Mish; the two are summed."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for _ in range(3):
            layers += [ConvBNMish(c_in, channels, 1), ConvBNMish(channels, channels, 3, depthwise=True)]
            c_in = channels
        self.main = nn.Sequential(*layers)
        self.shortcut = ConvBNMish(in_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)

    def entry_convs(self) -> list[ConvBNMish]:
        """The 1x1 convs that read the block's input: the first of the main path and the shortcut."""
        return [self.main[0], self.shortcut]

    def native(self, t: torch.Tensor, shortcut: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The fused-kernel path from the raw outputs of ``entry_convs`` (``t``, ``shortcut``; channel slices of
        one tensor): each 1x1 conv's Mish is applied by the depthwise kernel reading it, and the shortcut (with
        its Mish) is added by the last depthwise kernel; ``out`` as in ``dw3x3_mish``."""
        layers = list(self.main)
        y = None
        for i in range(1, len(layers), 2):
            if i > 1:
                t = layers[i - 1].native(y)
            last = i + 1 == len(layers)
            y = layers[i].native(t, in_mish=True, add=shortcut if last else None, add_mish=True,
                                 out=out if last else None)
        return y


class DynamicWorldNet(nn.Module):
    """The Dynamic World network: normalised bands (N, 9, H, W) -> logits (N, 9, H, W).

    Input is the log-sigmoid-normalised reflectance (the model card's ``normalization``), not raw values.
    The output matches the SavedModel's for even H and W; tiles must start on even pixel offsets.
    """

    output_stride = 2

    def __init__(
        self,
        in_channels: int = 9,
        num_classes: int = 9,
        stem_channels: int = 64,
        side_channels: int = 48,
        block_channels: tuple[int, int, int] | list[int] = (96, 144, 144),
    ):
        super().__init__()
        c1, c2, c3 = block_channels
        self.stem = ConvBNMish(in_channels, stem_channels, 3)
        self.side = nn.Sequential(
            ConvBNMish(stem_channels, side_channels, 1), ConvBNMish(side_channels, side_channels, 3, depthwise=True)
        )
        self.block1 = SeparableResBlock(stem_channels, c1)
        self.block2 = SeparableResBlock(c1, c2)
        self.block3 = SeparableResBlock(c2 + side_channels, c3)
        self.head = nn.Conv2d(c3, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2], x.shape[-1])
        # oneDNN's convs run faster on NHWC than on NCHW (benchmarks/README.md); results stay bit-stable per pixel.
        x = x.contiguous(memory_format=torch.channels_last)
        if _use_native(x):
            return self._forward_native(x, size)
        x = antialias_downsample2(self.stem(x))
        side = self.side(x)
        x = self.block2(self.block1(x))
        x = self.block3(torch.cat([x, side], dim=1))
        x = bilinear_upsample2(x, size)
        # tf.math.l2_normalize: x * rsqrt(max(sum(x^2), 1e-12))
        x = x * torch.rsqrt(torch.clamp_min((x * x).sum(dim=1, keepdim=True), 1e-12))
        return self.head(x).contiguous()

    def _forward_native(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """CPU inference through ``_native``'s fused kernels: the same network, one pass over memory per layer."""
        _native.keep_heap()  # large activations reuse freed memory instead of faulting in fresh pages each pass
        stem = self.stem.native(x)  # raw conv; Mish is applied by the downsampling kernel
        n, c, big_h, big_w = stem.shape
        h, w = big_h // 2, big_w // 2
        x = _native.down2_mish(stem, _edge_gain(big_h, stem.device), _edge_gain(big_w, stem.device),
                               torch.empty(n, c, h, w, memory_format=torch.channels_last))
        del stem
        c2 = self.block2.shortcut.conv.out_channels
        both = torch.empty(n, c2 + self.side[1].conv.out_channels, h, w, memory_format=torch.channels_last)
        # 1x1 convs that read the same input run as one conv (one pass over the input, a wider GEMM).
        side_t, b1_t, b1_sc = _merged_conv([self.side[0], *self.block1.entry_convs()], x)
        # block3 reads concat(block2, side): both write their channel slice of one tensor (no copy).
        self.side[1].native(side_t, in_mish=True, out=both[:, c2:])
        y1 = self.block1.native(b1_t, b1_sc)
        del side_t, b1_t, b1_sc
        b2_t, b2_sc = _merged_conv(self.block2.entry_convs(), y1)
        self.block2.native(b2_t, b2_sc, out=both[:, :c2])
        del y1, b2_t, b2_sc
        b3_t, b3_sc = _merged_conv(self.block3.entry_convs(), both)
        y3 = self.block3.native(b3_t, b3_sc)
        del both, b3_t, b3_sc
        z = F.conv2d(y3, self.head.weight)  # the 1x1 head commutes with the upsample (both linear)
        return _native.up2_l2_head(y3, z, self.head.bias, size)


def _merged_conv(convs: list[ConvBNMish], x: torch.Tensor) -> list[torch.Tensor]:
    """The raw outputs of several 1x1 ``convs`` of ``x``, computed as one conv: channel slices of one tensor."""
    folded = [c.folded() for c in convs]
    out = F.conv2d(x, torch.cat([w for w, _ in folded]), torch.cat([b for _, b in folded]))
    slices, start = [], 0
    for wt, _ in folded:
        slices.append(out[:, start : start + wt.shape[0]])
        start += wt.shape[0]
    return slices
