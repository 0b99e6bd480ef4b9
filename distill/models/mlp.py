"""A multi-layer perceptron, for tiny images such as scikit-learn's 8×8 digits."""

from __future__ import annotations

from torch import nn

from .registry import register_model


@register_model
def mlp(num_classes: int, in_channels: int = 1, image_size: int = 8, hidden: tuple[int, ...] = (128, 64)) -> nn.Module:
    """Flatten, then Linear+ReLU per hidden size, then a linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
