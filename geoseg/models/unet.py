"""U-Net (Ronneberger et al. 2015) in plain PyTorch, for training on any band and class count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "STEMS", "avg_stem_to_space_to_depth"]


class _DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


STEMS = ("avg", "space_to_depth")


class UNet(nn.Module):
    """U-Net: ``depth`` max-pool stages with skip connections; logits at the input's H x W.

    Widths double per stage from ``base_channels``, up to ``max_channels`` (a deeper network, more context,
    without the deepest stages' widths growing the weights fourfold per stage). ``input_stride`` > 1 runs the
    network on the input averaged over ``input_stride`` x ``input_stride`` pixels and upsamples the logits back (bilinear): for imagery finer
    than the objects need (0.1 m for buildings), a quarter of the compute per pixel and twice the context.
    ``stem="space_to_depth"`` moves each ``input_stride`` x ``input_stride`` block of pixels into channels instead
    of averaging it (the first convolution sees the fine texture, e.g. corrugated roofs, at the same cost);
    ``avg_stem_to_space_to_depth`` turns an averaging model's weights into one that computes the same function.
    Inputs whose sides are not multiples of ``input_stride * 2**depth`` (the output stride a card should
    declare) are zero-padded on the bottom/right and the output cropped back, so any size works.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base_channels: int = 32, depth: int = 4,
                 input_stride: int = 1, max_channels: int | None = None, stem: str = "avg"):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or base_channels < 1 or depth < 1:
            raise ValueError("in_channels, num_classes, base_channels and depth must be >= 1")
        if input_stride < 1 or input_stride & (input_stride - 1):
            raise ValueError(f"input_stride must be a power of 2 (1, 2, 4, ...); got {input_stride}")
        if max_channels is not None and max_channels < base_channels:
            raise ValueError(f"max_channels ({max_channels}) must be >= base_channels ({base_channels})")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}; got {stem!r}")
        widths = [min(base_channels * 2**i, max_channels or base_channels * 2**i) for i in range(depth + 1)]
        self.depth = depth
        self.input_stride = input_stride
        self.stem = stem if input_stride > 1 else "avg"
        stem_in = in_channels * input_stride**2 if self.stem == "space_to_depth" else in_channels
        self.inc = _DoubleConv(stem_in, widths[0])
        self.down = nn.ModuleList(_DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(_DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @property
    def output_stride(self) -> int:
        return self.input_stride * 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = self.output_stride
        x = F.pad(x, (0, -w % s, 0, -h % s))
        if self.input_stride > 1:  # avg: texture finer than the stride is gone; space_to_depth keeps every pixel
            x = F.avg_pool2d(x, self.input_stride) if self.stem == "avg" else F.pixel_unshuffle(x, self.input_stride)
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
        y = self.head(y)
        if self.input_stride > 1:
            y = F.interpolate(y, scale_factor=self.input_stride, mode="bilinear", align_corners=False)
        return y[..., :h, :w]


def avg_stem_to_space_to_depth(state_dict: dict[str, torch.Tensor], input_stride: int) -> dict[str, torch.Tensor]:
    """A ``stem="avg"`` U-Net's weights as a ``stem="space_to_depth"`` one's that computes the same function: the
    first convolution's weights for each band spread equally over the band's ``input_stride**2`` sub-pixel
    channels (``pixel_unshuffle`` puts band c's sub-pixels at channels c * s**2 .. (c + 1) * s**2 - 1)."""
    key = "inc.0.weight"
    out = dict(state_dict)
    w = state_dict[key]
    n = input_stride**2
    out[key] = (w / n).repeat_interleave(n, dim=1)
    return out
