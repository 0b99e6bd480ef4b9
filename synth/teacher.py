"""The teacher's identity and its answers: a fingerprint that ties a store or a record to one set of weights, and
the logits it gives the uint8 images exactly as a store holds them (so the stored targets match the stored inputs)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..store.toolbox.augment import normalize
from ..store.toolbox.identity import weights_fingerprint

Labeller = Callable[[torch.Tensor], torch.Tensor]  # uint8 N×C×H×W images -> float32 N×K logits on the CPU


def fingerprint(model: nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes): ties a store or record to one teacher."""
    return weights_fingerprint(model.state_dict())


def teacher_labeller(teacher: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], device: str | torch.device,
                     batch_size: int = 1024) -> Labeller:
    """The teacher's float32 logits of uint8 pixels, normalized as the store records, `batch_size` images a pass."""
    dev = torch.device(device)

    @torch.no_grad()
    def logits_of(images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        return torch.cat([teacher(normalize(images[i:i + batch_size].to(dev).float() / 255.0, mean, std)).float().cpu()
                          for i in range(0, max(1, len(images)), batch_size)])
    return logits_of
