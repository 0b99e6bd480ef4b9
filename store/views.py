"""View labels: K seeded augmented views of every stored image, whose teacher logits the store keeps.

A view is a pure function of (unit seed, view index, position in the unit) and the stored uint8 images of
its unit, so a reader re-creates its pixels exactly and the logits stored for it are the teacher's answer on
exactly those pixels (FKD's stored soft labels of random crops). A CutMix view (SRe2L's relabelled mixes)
pastes a box of a partner image from the same unit, so a unit stays self-contained. Pixel work only: the
teacher's forward lives in synth/view_labels.py; this module knows no model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .toolbox.augment import VIEW_MODES, crop_flip, default_pad, resized_crop
from .toolbox.errors import StoreError

MIN_SIDE = 0.7  # flip-resized-crop: the square's side is drawn from [MIN_SIDE, 1] of the image's side


@dataclass(frozen=True)
class ViewRecipe:
    """How views are drawn: a random crop after `pad` zeros each side, mirrored half of the time for flip-crop;
    flip-crop-cutmix first pastes a random box (a uniform share of the area) of a partner image of the unit;
    flip-resized-crop takes a random square of MIN_SIDE-1 of the side, scaled back up (no padding)."""

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
        if self.resizes:
            return {**asdict(self), "min_side": MIN_SIDE,
                    "seed": "numpy default_rng(SeedSequence([unit seed, view])): side, y0, x0, flip per sample"}
        drawn = "oy, ox, flip" + (", partner, box y0 y1 x0 x1" if self.mixes else "")
        return {**asdict(self), "seed": f"numpy default_rng(SeedSequence([unit seed, view])): {drawn} per sample"}

    @property
    def columns(self) -> int:
        """How many numbers a view's plan row holds (view_offsets)."""
        return 8 if self.mixes else 4 if self.resizes else 3

    @property
    def resizes(self) -> bool:
        """Whether a view is a scaled square (plan rows y0, x0, flip, side) rather than a padded crop."""
        return self.mode == "flip-resized-crop"

    @property
    def mixes(self) -> bool:
        """Whether a view holds a box of a partner image (its plan rows then carry partner and box)."""
        return self.mode == "flip-crop-cutmix"

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


def view_offsets(recipe: ViewRecipe, unit_seed: int, views: int, n: int, side: int = 0) -> np.ndarray:
    """How every view of a unit of n samples is drawn: int16 n×K×3 (oy, ox, flip), for a mixing recipe
    n×K×8 (oy, ox, flip, partner's position in the unit, box y0 y1 x0 x1 on images of this side), for a
    resizing one n×K×4 (y0, x0, flip, side of the square)."""
    p = recipe.pad
    if (recipe.mixes or recipe.resizes) and side < 1:
        raise ValueError(f"the {recipe.mode} view recipe needs the image side")
    out = np.zeros((n, views, recipe.columns), np.int16)
    for v in range(views):
        rng = np.random.default_rng(view_seed(unit_seed, v))
        if recipe.resizes:
            s = rng.integers(max(1, round(MIN_SIDE * side)), side + 1, n)  # the whole image among them
            out[:, v, 3] = s
            out[:, v, 0] = np.floor(rng.random(n) * (side - s + 1))
            out[:, v, 1] = np.floor(rng.random(n) * (side - s + 1))
            out[:, v, 2] = rng.random(n) < 0.5
            continue
        out[:, v, 0] = rng.integers(0, 2 * p + 1, n)
        out[:, v, 1] = rng.integers(0, 2 * p + 1, n)
        flips = rng.random(n) < 0.5
        out[:, v, 2] = flips if recipe.mode != "crop" else 0
        if recipe.mixes:  # drawn after the crop, so a mix's crop is flip-crop's crop
            out[:, v, 3] = (np.arange(n) + rng.integers(1, max(2, n), n)) % n  # another sample (itself if alone)
            cut = np.floor(side * np.sqrt(rng.random(n))).astype(np.int64)  # CutMix: the box's share is uniform
            cy, cx = rng.integers(0, side, n), rng.integers(0, side, n)
            out[:, v, 4], out[:, v, 5] = np.clip(cy - cut // 2, 0, side), np.clip(cy + cut - cut // 2, 0, side)
            out[:, v, 6], out[:, v, 7] = np.clip(cx - cut // 2, 0, side), np.clip(cx + cut - cut // 2, 0, side)
    return out


def view_pixels(images: torch.Tensor, offsets: torch.Tensor | np.ndarray, recipe: ViewRecipe,
                partners: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's view given its plan row (view_offsets' rows, N×3, N×4 or N×8; a mixing recipe needs
    `partners`: each row's partner image, whose box is pasted before the crop): images N×C×H×W; same dtype out."""
    offsets = torch.as_tensor(np.asarray(offsets)).long()
    if recipe.resizes:
        return resized_crop(images, offsets[:, 0], offsets[:, 1], offsets[:, 3], offsets[:, 2])
    if recipe.mixes:
        if partners is None or partners.shape != images.shape:
            raise ValueError("mixed views need each image's partner image, of the images' shape")
        h, w = images.shape[2:]
        ys, xs = torch.arange(h), torch.arange(w)
        inside = (((ys >= offsets[:, 4:5]) & (ys < offsets[:, 5:6]))[:, :, None]
                  & ((xs >= offsets[:, 6:7]) & (xs < offsets[:, 7:8]))[:, None, :])  # N×H×W
        images = torch.where(inside[:, None].to(images.device), partners, images)
    return crop_flip(images, offsets[:, 0], offsets[:, 1], offsets[:, 2], recipe.pad)


def unit_views(images: torch.Tensor, recipe: ViewRecipe, unit_seed: int, views: int) -> torch.Tensor:
    """Every view of one unit's images: K×N×C×H×W (view-major, so each view is one batch)."""
    off = view_offsets(recipe, unit_seed, views, len(images), images.shape[-1])
    mates = lambda v: images[torch.from_numpy(off[:, v, 3].astype(np.int64))] if recipe.mixes else None
    return torch.stack([view_pixels(images, off[:, v], recipe, mates(v)) for v in range(views)])
