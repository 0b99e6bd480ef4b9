"""CIFAR-style residual networks: ResNet-8/20/32 (16-32-64) and ResNet-18/34 (64-128-256-512, 3×3 stem).

Any channel count and image size: the stem keeps resolution and a global average pool ends the net.
"""

from __future__ import annotations

from torch import nn

from .registry import register_model


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity or 1×1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of BasicBlocks (the first of each later stage halves resolution), pool, classifier."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stage = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            layers.append(nn.Sequential(*stage))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def _cifar(depth: int, num_classes: int, in_channels: int) -> ResNet:
    n = (depth - 2) // 6
    return ResNet([n, n, n], [16, 32, 64], num_classes, in_channels)


@register_model
def resnet8(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-8 (He et al. CIFAR family, 1 block per stage)."""
    return _cifar(8, num_classes, in_channels)


@register_model
def resnet20(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-20 (3 blocks per stage)."""
    return _cifar(20, num_classes, in_channels)


@register_model
def resnet32(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-32 (5 blocks per stage)."""
    return _cifar(32, num_classes, in_channels)


@register_model
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-18 as DAFL/DFAD/DeepInversion use it on CIFAR (3×3 stem, no max-pool)."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels)


@register_model
def resnet34(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-34, CIFAR variant: the usual data-free KD teacher."""
    return ResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels)
