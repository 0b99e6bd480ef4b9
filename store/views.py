"""View labels: K seeded augmented views of every stored image, whose teacher logits the store keeps.

A view is a pure function of (unit seed, view index, position in the unit) and the stored uint8 image, so
a reader re-creates its pixels exactly and the logits stored for it are the teacher's answer on exactly
those pixels (FKD's stored soft labels of random crops). Pixel work only: the teacher's forward lives in
synth/views.py; this module knows no model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .toolbox.augment import VIEW_MODES, crop_flip, default_pad
from .toolbox.errors import StoreError


@dataclass(frozen=True)
class ViewRecipe:
    """How views are drawn: a random crop after `pad` zeros each side, mirrored half of the time for flip-crop."""

    mode: str = "flip-crop"
    pad: int = 0  # 0: about 1/8 of the image side (default_pad)

    def __post_init__(self) -> None:
        if self.mode not in VIEW_MODES:
            raise StoreError(f"unknown view mode {self.mode!r}; choose one of {VIEW_MODES}")
        if self.pad < 0:
            raise StoreError(f"view pad must be >= 0, got {self.pad}")

    def resolved(self, side: int) -> "ViewRecipe":
        """The recipe with its padding fixed for images of this side (what the store records)."""
        return ViewRecipe(self.mode, self.pad or default_pad(side))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "seed": "numpy default_rng(SeedSequence([unit seed, view])): oy, ox, flip per sample"}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "ViewRecipe":
        """Parse a stored recipe, refusing one this dfkd cannot re-create with one line."""
        if not isinstance(d, dict):
            raise StoreError(f"{where} records views but no view recipe; the store is corrupt, label it again "
                             "with `dfkd store label --overwrite`")
        try:
            return cls(str(d["mode"]), int(d["pad"]))
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{where} has a malformed view recipe {d!r}; label it again with "
                             "`dfkd store label --overwrite`") from None


def view_seed(unit_seed: int, view: int) -> int:
    """The seed of one view of one unit (63 bits, independent of who reads or writes it)."""
    state = np.random.SeedSequence([unit_seed, view]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def view_offsets(recipe: ViewRecipe, unit_seed: int, views: int, n: int) -> np.ndarray:
    """Crop offsets and flips of every view of a unit of n samples: int16 n×K×3 (oy, ox, flip)."""
    p = recipe.pad
    out = np.zeros((n, views, 3), np.int16)
    for v in range(views):
        rng = np.random.default_rng(view_seed(unit_seed, v))
        out[:, v, 0] = rng.integers(0, 2 * p + 1, n)
        out[:, v, 1] = rng.integers(0, 2 * p + 1, n)
        flips = rng.random(n) < 0.5
        out[:, v, 2] = flips if recipe.mode == "flip-crop" else 0
    return out


def view_pixels(images: torch.Tensor, offsets: torch.Tensor | np.ndarray, pad: int) -> torch.Tensor:
    """Each image's view given its (oy, ox, flip) row: images N×C×H×W, offsets N×3; same dtype out."""
    offsets = torch.as_tensor(np.asarray(offsets)).long()
    return crop_flip(images, offsets[:, 0], offsets[:, 1], offsets[:, 2], pad)


def unit_views(images: torch.Tensor, recipe: ViewRecipe, unit_seed: int, views: int) -> torch.Tensor:
    """Every view of one unit's images: K×N×C×H×W (view-major, so each view is one batch)."""
    off = view_offsets(recipe, unit_seed, views, len(images))
    return torch.stack([view_pixels(images, off[:, v], recipe.pad) for v in range(views)])
