"""Tiny teachers for synthesis tests."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.distill.checkpoint import ModelSpec, save_model

SHAPE = (1, 8, 8)
MEAN, STD = (0.3,), (0.4,)


def tiny_teacher(bn: bool = True, seed: int = 0) -> tuple[nn.Module, ModelSpec]:
    """A LeNet-5 (with or without BN) on 1×8×8 with BN statistics moved off their init by a few batches."""
    torch.manual_seed(seed)
    spec = ModelSpec("lenet5_bn" if bn else "lenet5", 10, 1, 8, MEAN, STD)
    model = spec.build()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, *SHAPE) * 0.8 + 0.2)
    return model.eval(), spec


def save_tiny_teacher(path: str, bn: bool = True) -> None:
    model, spec = tiny_teacher(bn)
    save_model(path, model, spec)
