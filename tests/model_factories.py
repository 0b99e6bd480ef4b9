"""A user's own model factory (package.module:factory), for tests of what a checkpoint may name."""

from torch import nn


def tiny_mlp(num_classes: int, in_channels: int = 1, image_size: int = 8, hidden: int = 16) -> nn.Module:
    """Flatten -> Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
