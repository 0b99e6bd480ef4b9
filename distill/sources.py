"""Where training batches come from: a synthetic store, or real images held in memory.

Both yield (uint8 images, teacher logits or None, labels or None) and reshuffle per epoch from
(seed, epoch) alone, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import store
from ..store.toolbox.compute import rank_and_world

Triple = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class Source(Protocol):
    """A re-iterable, seeded stream of batches with the metadata a student needs."""

    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def set_epoch(self, epoch: int) -> None: ...
    def identity(self) -> dict: ...
    def images_per_rank(self) -> int: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Triple]: ...


class StoreSource:
    """Batches of one synthetic store, or of the union of several (one seeded shuffle over all their samples):
    stored images and the teacher's stored logits, or, with `views` on stores that keep view labels, one
    stored view per image and epoch with the teacher's logits of that view (`self.views` says which)."""

    def __init__(self, path: str | list[str], batch_size: int, seed: int = 0, workers: int = 0, views: bool = False,
                 **loader_kw) -> None:
        paths = [path] if isinstance(path, str) else list(path)
        readers = [store.open(p) for p in paths]
        check_same_teacher(readers)
        self.views = bool(views) and any(r.meta.views for r in readers)  # views: a store without them says so
        self.dataset = store.StoreDataset(readers, batch_size, seed=seed, views=self.views, **loader_kw)  # opened once
        meta = self.dataset.meta
        self.num_classes, self.image_shape, self.name = meta.num_classes, meta.image_shape, "store:" + "+".join(paths)
        for r in readers:
            if r.meta.mean is None or r.meta.std is None:
                raise store.StoreError(f"{r.path} records no normalization mean/std; the synthesis stage writes the "
                                       "teacher's, re-create the store with dfkd synth")
        self.mean, self.std = meta.mean, meta.std
        self.workers = workers
        if len(self.dataset) == 0:
            raise store.StoreError(f"{'+'.join(paths)} has no finished samples to distill from; finish it with --resume")
        self.readers = readers
        for r in readers:
            check_targets(r)
        self.batch_size, self.seed, self.max_images = batch_size, seed, loader_kw.get("max_images")

    def identity(self) -> dict:
        """The stores' identities (plan, done units, checksums) and how they are batched."""
        ids = [r.identity() for r in self.readers]
        out = {"store": ids[0] if len(ids) == 1 else ids, "batch_size": self.batch_size, "seed": self.seed}
        if self.views:
            out["views"] = True
        if self.max_images is not None:
            out["max_images"] = self.max_images
        return out

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def images_per_rank(self) -> int:
        """Images this rank trains on per epoch."""
        return self.dataset.num_samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Triple]:
        # without workers the dataset is iterated directly: the DataLoader's per-batch cost is pure overhead
        it = self.dataset if self.workers == 0 else DataLoader(self.dataset, batch_size=None, num_workers=self.workers)
        for b in it:
            labels = b.labels if bool((b.labels >= 0).all()) else None
            yield b.images, b.logits, labels


class TensorSource:
    """Batches of real labelled images held in memory (teacher training, classical KD)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, mean: tuple[float, ...],
                 std: tuple[float, ...], batch_size: int, seed: int = 0, name: str = "real") -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {images.dtype}{tuple(images.shape)}")
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
        self.num_classes, self.mean, self.std, self.name = num_classes, mean, std, name
        self.image_shape = tuple(images.shape[1:])
        self.epoch = 0
        self.rank, self.world = rank_and_world()
        self.per_rank = len(images) // self.world  # equal shares: every rank takes the same number of steps

    def identity(self) -> dict:
        """The data by name and size, and how it is batched."""
        return {"data": self.name, "images": len(self.images), "batch_size": self.batch_size, "seed": self.seed}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def images_per_rank(self) -> int:
        """Images this rank trains on per epoch."""
        return self.per_rank

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[Triple]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.images), generator=gen)  # the same on every rank; each takes its slice
        order = order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.images[idx], None, self.labels[idx]


def check_same_teacher(readers: list[store.StoreReader]) -> None:
    """Stores read as one must come from one teacher (its weights' fingerprint) with one normalization; a store
    mixed with others must record its teacher."""
    if len(readers) < 2:
        return
    first = readers[0]
    for r in readers:
        if not r.meta.provenance.get("teacher_fingerprint"):
            raise store.StoreError(f"{r.path} records no teacher fingerprint, so it cannot be checked against the "
                                   "other stores; distill from it alone, or re-make it with this version of dfkd")
    for r in readers[1:]:
        a, b = first.meta, r.meta
        for what, x, y in (("image shape", tuple(a.image_shape), tuple(b.image_shape)),
                           ("class count", a.num_classes, b.num_classes),
                           ("teacher", a.provenance["teacher_fingerprint"], b.provenance["teacher_fingerprint"]),
                           ("normalization", (tuple(a.mean or ()), tuple(a.std or ())),
                            (tuple(b.mean or ()), tuple(b.std or ())))):
            if x != y:
                raise store.StoreError(f"{r.path} and {first.path} differ in {what} ({y} against {x}); distill "
                                       "together only stores made from the same teacher")


def check_targets(reader: store.StoreReader) -> None:
    """Refuse a store whose logits are not finite or whose labels are out of range, naming the units: training
    on them gives NaN students or wrong targets. Reads logits and labels only (no images)."""
    k, nonfinite, out_of_range = reader.meta.num_classes, [], []
    for u in reader.done_units():
        logits, labels = reader.backend.read_targets(u)
        if not np.isfinite(logits).all():
            nonfinite.append(u)
        if len(labels) and (labels.min() < -1 or labels.max() >= k):
            out_of_range.append(u)
    for units, what in ((nonfinite, "NaN or inf logits"), (out_of_range, f"labels outside [-1, {k})")):
        if units:
            shown = ", ".join(map(str, units[:8])) + (", ..." if len(units) > 8 else "")
            raise store.StoreError(f"{reader.path}: unit(s) {shown} hold {what}; `dfkd store verify {reader.path}` lists "
                                   "them: re-make the store with its synthesis (--overwrite) before distilling")
