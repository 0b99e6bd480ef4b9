"""Top-1 accuracy of a model on uint8 test images."""

from __future__ import annotations

import torch
from torch import nn

from .augment import normalize


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
             std: tuple[float, ...], batch_size: int = 1000, device: str = "cpu") -> float:
    """Fraction of images whose argmax prediction equals the label (model put in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device), mean, std)
        correct += int((model(x).argmax(1).cpu() == labels[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(images))
