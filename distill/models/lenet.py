"""LeNet-5 and the two students the literature calls "LeNet-5-half".

conv(5×5, pad 2) → pool → conv(5×5) → pool → FC → FC → classifier; the second conv pads only when the
map is too small for a valid 5×5 (so 28×28 gives the classic 16×5×5 = 400 features, and 8×8 works).
"""

from __future__ import annotations

from torch import nn

from .registry import register_model


class LeNet5(nn.Module):
    """LeNet-5 with configurable widths, optional BatchNorm after every hidden layer."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, convs: tuple[int, int],
                 fcs: tuple[int, int], bn: bool = False) -> None:
        super().__init__()
        c1, c2 = convs
        pad2 = 0 if image_size // 2 >= 10 else 2
        side = (image_size // 2 + 2 * pad2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs images of at least 4×4, got {image_size}")

        def block(conv: nn.Module, width: int) -> list[nn.Module]:
            return [conv, *( [nn.BatchNorm2d(width)] if bn else []), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(nn.Conv2d(in_channels, c1, 5, padding=2), c1),
                                      *block(nn.Conv2d(c1, c2, 5, padding=pad2), c2))
        f1, f2 = fcs
        norm = (lambda w: [nn.BatchNorm1d(w)]) if bn else (lambda w: [])
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, f1), *norm(f1), nn.ReLU(inplace=True),
            nn.Linear(f1, f2), *norm(f2), nn.ReLU(inplace=True), nn.Linear(f2, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model
def lenet5(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """LeNet-5 (6-16-120-84), no BatchNorm: ~61.7k parameters at 28×28."""
    return LeNet5(num_classes, in_channels, image_size, (6, 16), (120, 84))


@register_model
def lenet5_bn(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """LeNet-5 with BatchNorm after each conv and hidden FC (its statistics serve BN-matching methods)."""
    return LeNet5(num_classes, in_channels, image_size, (6, 16), (120, 84), bn=True)


@register_model
def lenet5_half(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """DAFL/DFAD's LeNet-5-half (3-8-60-42): ~15.7k parameters at 28×28."""
    return LeNet5(num_classes, in_channels, image_size, (3, 8), (60, 42))


@register_model
def lenet5_half_zskd(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Lopes et al. / ZSKD's LeNet-5-half (conv 3-8, FC 120-84): ~35.8k parameters at 28×28."""
    return LeNet5(num_classes, in_channels, image_size, (3, 8), (120, 84))
