"""The distillation stage's augmentation (store.toolbox.augment's seeded views) and normalization to the network's input."""

from __future__ import annotations

import torch

from ..store.toolbox import augment as _views
from ..store.toolbox.augment import MODES, augment  # noqa: F401  (the distillation stage's views)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Pixels on the 0-255 scale (uint8, as stored) -> float network input: store.toolbox.augment.normalize."""
    return _views.normalize(images.float() / 255.0, mean, std)
