"""Seeded, label-preserving views of image batches: random crops after zero padding, horizontal flips.

Pure tensor work on pixels, no model: the distillation stage augments stored images with it, the
memory-bank synthesis methods augment their batches and their bank with it, and stored view labels
(store/views.py) re-create their views' pixels with `crop_flip` from offsets they draw themselves.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MODES = ("none", "crop", "flip-crop")  # the augmentations of training batches
VIEW_MODES = ("crop", "flip-crop", "flip-crop-cutmix", "flip-resized-crop")  # how a stored view is drawn (store/views.py)
VIEW_MODE_HELP = ("How the views are drawn: a random crop after zero padding of 1/8 of the side (crop), also mirrored "
                  "half of the time (flip-crop), after pasting a random box of another image of the unit "
                  "(flip-crop-cutmix); or a random square of 0.7-1 of the side scaled back up, mirrored half of the "
                  "time (flip-resized-crop). Measured on Fashion-MNIST (BENCHMARKS.md): flip-crop for synthetic "
                  "stores, flip-crop-cutmix for BN-free students, flip-resized-crop for real images with BN students.")


def normalize(x01: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Pixels in [0, 1] -> a network's input, (x - mean) / std per channel: the one normalization of both stages
    (synthesis methods, stored logits and views, students, evaluation)."""
    import torch

    m = torch.tensor(mean, device=x01.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x01.device).view(1, -1, 1, 1)
    return (x01 - m) / s


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """A network's input -> pixels in [0, 1] (not clipped): the inverse of `normalize` on float pixels."""
    import torch

    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x * s + m


def default_pad(side: int) -> int:
    """The crop's zero padding: about 1/8 of the image side, at least one pixel."""
    return max(1, side // 8)


def _flat_index(rows: torch.Tensor, cols: torch.Tensor, flip: torch.Tensor | None, width: int) -> torch.Tensor:
    """Where output pixel (i, j) of image n reads in its source's flat pixels: rows[n, i], cols[n, j], the
    columns mirrored where `flip`; B×(h*w), for one gather (1.6x faster on the CPU than 4-D advanced indexing)."""
    import torch

    if flip is not None:
        cols = torch.where(flip.bool()[:, None].to(cols.device), cols.flip(1), cols)
    return (rows[:, :, None] * width + cols[:, None, :]).reshape(len(rows), -1)


def _gather(source: torch.Tensor, flat: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Each image's pixels at its flat indices (_flat_index), every channel alike: B×C×h×w."""
    b, c = source.shape[:2]
    index = flat.to(source.device).view(b, 1, h * w).expand(b, c, h * w)
    return source.reshape(b, c, -1).gather(2, index).view(b, c, h, w)


def crop_flip(images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor | None,
              pad: int) -> torch.Tensor:
    """Each image padded by `pad` zeros, cropped back to its size at offsets (oy, ox) in [0, 2*pad], mirrored
    where `flip`; exact on any dtype (uint8 pixels stay the same uint8 pixels)."""
    import torch.nn.functional as F

    h, w = images.shape[2:]
    combo = (oy.long() * (2 * pad + 1) + ox.long()) * 2 + (0 if flip is None else flip.long())
    flat = _crop_table(h, w, pad, str(images.device)).index_select(0, combo.to(images.device))
    return _gather(F.pad(images, (pad, pad, pad, pad)), flat, h, w)


@functools.lru_cache(maxsize=16)
def _crop_table(h: int, w: int, pad: int, device: str) -> torch.Tensor:
    """Every crop_flip choice's source pixels in the padded image, one row per (oy, ox, flip) of the
    (2*pad+1)^2*2 choices: a batch's gather indices are then one row lookup (0.12 against 0.19 ms building them
    per 256-image batch on 2 CPU cores)."""
    import torch

    k = 2 * pad + 1
    oy, ox, flip = (g.reshape(-1) for g in torch.meshgrid(torch.arange(k), torch.arange(k), torch.arange(2),
                                                           indexing="ij"))
    return _flat_index(oy[:, None] + torch.arange(h), ox[:, None] + torch.arange(w), flip, w + 2 * pad).to(device)


def resized_crop(images: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, side: torch.Tensor,
                 flip: torch.Tensor | None) -> torch.Tensor:
    """Each image's square box (y0, x0, side) scaled back to the image's size by nearest-neighbour sampling,
    mirrored where `flip`: integer arithmetic only, so exact on any device and dtype."""
    import torch

    h, w = images.shape[2:]
    side = side.long()[:, None]
    rows, cols = y0.long()[:, None] + torch.arange(h) * side // h, x0.long()[:, None] + torch.arange(w) * side // w
    return _gather(images, _flat_index(rows, cols, flip, w), h, w)


def augment(images: torch.Tensor, mode: str, gen: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Random crop after zero padding (pad ~ 1/8 of the side) and, for flip-crop, horizontal flips."""
    import torch

    if mode == "none":
        return images
    if mode not in MODES:
        raise ValueError(f"unknown augmentation {mode!r}; choose one of {MODES}")
    b, _, h, _ = images.shape
    p = default_pad(h) if pad is None else pad
    oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5 if mode == "flip-crop" else None
    return crop_flip(images, oy, ox, flip, p)
