"""Seeded, label-preserving views of image batches: random crops after zero padding, horizontal flips.

Pure tensor work on pixels, no model: the distillation stage augments stored images with it, and the
memory-bank synthesis methods augment their batches and their bank with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("none", "crop", "flip-crop")


def augment(images: torch.Tensor, mode: str, gen: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Random crop after zero padding (pad ~ 1/8 of the side) and, for flip-crop, horizontal flips."""
    if mode == "none":
        return images
    if mode not in MODES:
        raise ValueError(f"unknown augmentation {mode!r}; choose one of {MODES}")
    b, c, h, w = images.shape
    p = max(1, h // 8) if pad is None else pad
    padded = F.pad(images, (p, p, p, p))
    oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h)).to(images.device)
    cols = (ox[:, None] + torch.arange(w)).to(images.device)
    if mode == "flip-crop":
        flip = torch.rand(b, generator=gen) < 0.5
        cols = torch.where(flip[:, None].to(images.device), cols.flip(1), cols)
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    ci = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
