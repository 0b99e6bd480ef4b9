"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis), pre-activation blocks, no dropout."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_model


class WideBlock(nn.Module):
    """BN-ReLU-conv twice, with a 1×1 shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """conv 16, three stages of (depth-4)/6 blocks at widths 16k, 32k, 64k, BN-ReLU, pool, classifier."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n, widths = (depth - 4) // 6, [16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks, cin = [], 16
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(WideBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_model
def wrn16_1(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes, in_channels)


@register_model
def wrn16_2(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes, in_channels)


@register_model
def wrn40_2(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """WRN-40-2."""
    return WideResNet(40, 2, num_classes, in_channels)
