"""Gaussian noise images, labelled by the teacher: the floor every synthesis method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...store.toolbox.declared import setting
from .base import Method, register_method


@dataclass
class NoiseConfig:
    """Pixels ~ N(mean, sigma) in [0, 1] pixel space, clipped."""

    mean: float = setting(0.5, "mean of the Gaussian pixels (clipped to [0, 1])")
    sigma: float = setting(0.25, "standard deviation of the Gaussian pixels", low=0)


@register_method
class Noise(Method):
    name = "noise"
    Config = NoiseConfig

    def synthesize(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x = torch.randn((len(targets), *self.ctx.image_shape), generator=gen) * self.config.sigma + self.config.mean
        return x.clamp(0, 1).to(self.ctx.device), {}
