"""The distillation stage's augmentation (store.toolbox.augment's seeded views) and normalization to the network's input."""

from __future__ import annotations

import torch

from ..store.toolbox.augment import MODES, augment  # noqa: F401  (the distillation stage's views)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 pixels -> float network input ((x/255 - mean) / std per channel)."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s
