"""DeepLabv3+ (Chen et al. 2018) with a ResNet-style encoder written here (no torchvision / timm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DeepLabV3Plus", "ResNetEncoder"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1):
    pad = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, out_channels, 3, stride, dilation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet-18-style encoder: stem /4, then four stages (/4, /8, /16, /16 dilated).

    Returns (low-level features at /4, high-level features at /16).
    """

    def __init__(self, in_channels: int, base_channels: int = 32, blocks: tuple[int, ...] | list[int] = (2, 2, 2, 2)):
        super().__init__()
        w = [base_channels * 2**i for i in range(4)]
        self.stem = nn.Sequential(
            _conv_bn_relu(in_channels, w[0], 3, stride=2), _conv_bn_relu(w[0], w[0], 3), nn.MaxPool2d(3, 2, 1)
        )
        strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)  # the last stage dilates instead of striding (OS 16)
        stages, c_in = [], w[0]
        for c, n, s, d in zip(w, blocks, strides, dilations, strict=True):
            blocks_ = [_BasicBlock(c_in if i == 0 else c, c, s if i == 0 else 1, d) for i in range(n)]
            stages.append(nn.Sequential(*blocks_))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.low_channels, self.out_channels = w[0], w[3]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        low = x = self.stages[0](x)
        for stage in self.stages[1:]:
            x = stage(x)
        return low, x


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch and dilated 3x3 branches, optionally image pooling."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, ...], image_pooling: bool):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, channels, 1)]
            + [_conv_bn_relu(in_channels, channels, 3, dilation=r) for r in rates]
        )
        self.pool = _conv_bn_relu(in_channels, channels, 1) if image_pooling else None
        n = len(self.branches) + (1 if image_pooling else 0)
        self.project = _conv_bn_relu(n * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        if self.pool is not None:
            outs.append(self.pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+: ResNet encoder, ASPP at /16, decoder fusing /4 features; logits at the input's H x W.

    ``image_pooling`` (global average pooling in ASPP) is off by default: it makes every pixel depend on the
    whole tile, which breaks exact tiled inference. Sides that are multiples of 16 give aligned features.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_channels: int = 32,
        blocks: tuple[int, ...] | list[int] = (2, 2, 2, 2),
        aspp_channels: int = 128,
        aspp_rates: tuple[int, ...] | list[int] = (6, 12, 18),
        decoder_channels: int = 128,
        image_pooling: bool = False,
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or len(blocks) != 4:
            raise ValueError("in_channels and num_classes must be >= 1 and blocks must list 4 stage depths")
        self.encoder = ResNetEncoder(in_channels, base_channels, blocks)
        self.aspp = _ASPP(self.encoder.out_channels, aspp_channels, tuple(aspp_rates), image_pooling)
        self.low_proj = _conv_bn_relu(self.encoder.low_channels, 48, 1)
        self.decoder = nn.Sequential(
            _conv_bn_relu(aspp_channels + 48, decoder_channels, 3), _conv_bn_relu(decoder_channels, decoder_channels, 3)
        )
        self.head = nn.Conv2d(decoder_channels, num_classes, 1)

    output_stride = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low, high = self.encoder(x)
        y = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.decoder(torch.cat([y, self.low_proj(low)], dim=1))
        return F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)
