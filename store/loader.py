"""Streaming training loader: whole-chunk reads, seeded per-epoch shuffle, equal batches on every rank.

The epoch plan is a pure function of (done units, seed, epoch), computed identically in every rank and
DataLoader worker: units are shuffled, grouped into buffers of `buffer_units` whole chunks whose samples
are shuffled together, and the resulting sequence is cut into equal contiguous slices, one per rank
(< world_size samples are left out per epoch). Each rank's batches are split into contiguous runs, one
per worker, so every chunk is read about once per epoch.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .access import open as open_store
from .toolbox.errors import StoreError
from .toolbox.compute import rank_and_world
from .reader import StoreReader
from .schema import Samples, StoreMeta
from .units import unit_seed
from .views import ViewRecipe, view_offsets, view_pixels

DEFAULT_RAM_LIMIT = 2 << 30  # bytes; a store whose decoded size fits is loaded into RAM once


class Batch(NamedTuple):
    """One training batch: uint8 images in pixel space, stored teacher logits, labels, global indices."""

    images: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def epoch_order(meta: StoreMeta | StoreUnion, units: list[int], *, seed: int, epoch: int, shuffle: bool,
                buffer_units: int) -> np.ndarray:
    """Global sample order for one epoch: shuffled units, shuffled again inside buffers of whole units."""
    units = np.asarray(sorted(units), dtype=np.int64)
    if shuffle:
        units = np.random.default_rng([seed, epoch]).permutation(units)
    parts = []
    for b, start in enumerate(range(0, len(units), max(1, buffer_units))):
        idx = np.concatenate([np.arange(*meta.unit_range(int(u))) for u in units[start:start + buffer_units]])
        if shuffle:
            idx = np.random.default_rng([seed, epoch, b + 1]).permutation(idx)
        parts.append(idx)
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def rank_slice(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's equal, disjoint, contiguous part of the epoch order."""
    per = len(order) // world_size
    return order[rank * per:(rank + 1) * per]


def split_batches(n: int, batch_size: int, drop_last: bool) -> list[tuple[int, int]]:
    """[start, end) of each batch over n samples."""
    count = n // batch_size if drop_last else math.ceil(n / batch_size)
    return [(i * batch_size, min((i + 1) * batch_size, n)) for i in range(count)]


class StoreUnion:
    """One or several stores as one index space (store k's samples follow store k-1's), unit by unit.

    Global unit g is unit `local[g]` of store `owner[g]` and holds global samples [starts[g], ends[g]); with one
    store, global and local numbers are the same. Stores must agree on image shape and class count; logits
    are read as the widest of their dtypes.
    """

    def __init__(self, readers: list[StoreReader]) -> None:
        self.readers = readers
        first = readers[0].meta
        for r in readers[1:]:
            for what, a, b in (("image shape", first.image_shape, r.meta.image_shape),
                               ("class count", first.num_classes, r.meta.num_classes)):
                if tuple(np.atleast_1d(a)) != tuple(np.atleast_1d(b)):
                    raise StoreError(f"{r.path} has {what} {b} but {readers[0].path} has {a}; only stores of the "
                                     "same teacher and data can be read as one")
        self.image_shape, self.num_classes = tuple(first.image_shape), first.num_classes
        self.logits_dtype = np.result_type(*[r.meta.logits_dtype for r in readers])
        owner, local, starts, ends, done = [], [], [], [], []
        offset = 0
        for k, r in enumerate(readers):
            mask = r.done_mask()
            for u in range(r.meta.num_units):
                lo, hi = r.meta.unit_range(u)
                owner.append(k), local.append(u), starts.append(offset + lo), ends.append(offset + hi)
                if mask[u]:
                    done.append(len(owner) - 1)
            offset += r.meta.num_samples
        self.owner, self.local = np.asarray(owner, np.int64), np.asarray(local, np.int64)
        self.starts, self.ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        self.done = done  # snapshot: every rank and worker plans from the same done units
        self.num_samples = offset

    def unit_range(self, g: int) -> tuple[int, int]:
        return int(self.starts[g]), int(self.ends[g])

    def unit_of(self, idx: np.ndarray) -> np.ndarray:
        """The global unit holding each global sample index."""
        return np.searchsorted(self.starts, idx, side="right") - 1

    def read_unit(self, g: int, readers: list[StoreReader] | None = None) -> Samples:
        rec = (readers or self.readers)[self.owner[g]].backend.read_unit(int(self.local[g]))
        if rec.logits.dtype != self.logits_dtype:
            rec = Samples(rec.images, rec.logits.astype(self.logits_dtype), rec.labels,
                          None if rec.views is None else rec.views.astype(self.logits_dtype))
        return rec

    def view_plan(self) -> tuple[ViewRecipe, np.ndarray]:
        """The stores' common view recipe and every sample's view plan rows (num_samples × V ×
        recipe.columns, view_offsets), refused with one line when a store lacks complete view labels or the stores' views differ."""
        first = self.readers[0]
        for r in self.readers:
            if not r.meta.views:
                raise StoreError(f"{r.path} keeps no view labels; add them with `dfkd store label {r.path} --teacher "
                                 "T`, or distill on the stored logits with --no-views")
            if not r.views_complete:
                raise StoreError(f"{r.path} has view labels for only some of its finished units; finish them with "
                                 f"`dfkd store label {r.path} --teacher T --resume`, or distill with --no-views")
            if (r.meta.views, r.meta.view_recipe) != (first.meta.views, first.meta.view_recipe):
                raise StoreError(f"{r.path} keeps {r.meta.views} views ({r.meta.view_recipe}) but {first.path} keeps "
                                 f"{first.meta.views} ({first.meta.view_recipe}); label them alike to distill together")
        recipe = ViewRecipe.from_json(first.meta.view_recipe, first.path)
        offsets = np.zeros((self.num_samples, first.meta.views, recipe.columns), np.int16)
        side = first.meta.image_shape[-1]
        for g in range(len(self.owner)):
            meta = self.readers[self.owner[g]].meta
            lo, hi = self.unit_range(g)
            offsets[lo:hi] = view_offsets(recipe, unit_seed(meta.base_seed, int(self.local[g])), meta.views, hi - lo,
                                          side)
        return recipe, offsets

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.readers)

    def load_all(self) -> Samples:
        """Every done sample of every store, in global index order."""
        parts = [r.load_all() for r in self.readers]
        parts = [Samples(p.images, p.logits.astype(self.logits_dtype, copy=False), p.labels,
                         None if p.views is None else p.views.astype(self.logits_dtype, copy=False)) for p in parts]
        return parts[0] if len(parts) == 1 else Samples.concat(parts)


class StoreDataset(IterableDataset):
    """Yields whole `Batch`es (use `DataLoader(ds, batch_size=None)`); call `set_epoch` before each epoch.

    `path` may be a list of stores (paths, or readers already open): their union is shuffled as one (indices are then global, store k's after
    store k-1's). `max_images` keeps a seeded draw of whole done units, an equal share of each store.
    With `views`, each epoch gives every image one of its stored views, drawn from (seed, epoch, index): the
    batch holds that view's pixels, re-created from the stored image, and the teacher's stored logits of it.
    """

    def __init__(self, path: str | StoreReader | list[str | StoreReader], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 buffer_units: int = 8, drop_last: bool = False, rank: int | None = None,
                 world_size: int | None = None, in_ram: bool | None = None, ram_limit: int = DEFAULT_RAM_LIMIT,
                 prefetch_units: int | None = None, max_images: int | None = None, views: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise StoreError(f"batch_size must be >= 1, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise StoreError("give both rank and world_size, or neither (then torch.distributed decides)")
        self.rank, self.world_size = (rank, world_size) if rank is not None else rank_and_world()
        if not 0 <= self.rank < self.world_size:
            raise StoreError(f"rank {self.rank} is outside a world of size {self.world_size}")
        given = list(path) if isinstance(path, (list, tuple)) else [path]  # paths, or readers opened already
        if not given:
            raise StoreError("give at least one store")
        readers = [p if isinstance(p, StoreReader) else open_store(str(p)) for p in given]
        self.paths = [p.path if isinstance(p, StoreReader) else str(p) for p in given]
        self.path = self.paths[0] if len(self.paths) == 1 else "+".join(self.paths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.buffer_units, self.drop_last, self.epoch = buffer_units, drop_last, 0
        self.prefetch_units = buffer_units + 2 if prefetch_units is None else prefetch_units
        self.union = StoreUnion(readers)
        self.meta = self.union.readers[0].meta
        self.units = self.union.done if max_images is None else self._draw(max_images)
        self.views = views
        self._view_recipe, self._view_offsets = self.union.view_plan() if views else (None, None)
        self._choice, self._choice_epoch = np.empty(0, np.int64), -1  # the view of each sample, for one epoch
        self.in_ram = self.union.nbytes() <= ram_limit if in_ram is None else in_ram
        self._readers: list[StoreReader] | None = None if self.in_ram else self.union.readers
        self._ram: Samples | None = None
        self._pos: np.ndarray | None = None
        if self.in_ram:  # loaded once, before workers fork, so they share it
            self._ram = self.union.load_all()
            self._pos = np.full(self.union.num_samples, -1, np.int64)
            all_done = self.union.done
            done_idx = np.concatenate([np.arange(*self.union.unit_range(u)) for u in all_done]) if all_done \
                else np.empty(0, np.int64)
            self._pos[done_idx] = np.arange(len(done_idx))

    def _draw(self, max_images: int) -> list[int]:
        """Whole done units, an equal share of `max_images` from each store, drawn with the seed."""
        share = max_images // len(self.paths)
        rng = np.random.default_rng([self.seed, 7919])
        keep = []
        for k, path in enumerate(self.paths):
            mine = [g for g in self.union.done if self.union.owner[g] == k]
            picked, n = [], 0
            for g in rng.permutation(mine).tolist():
                if n >= share:
                    break
                picked.append(g)
                n += int(self.union.ends[g] - self.union.starts[g])
            if n < share:
                raise StoreError(f"{path} has {n} finished images, fewer than its share {share} of max_images "
                                 f"{max_images}; lower max_images or finish the store")
            keep += picked
        return sorted(keep)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle the next iteration uses (same on every rank)."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        total = sum(hi - lo for lo, hi in map(self.union.unit_range, self.units))
        return total // self.world_size

    def __len__(self) -> int:
        """Batches this rank yields per epoch (equal on every rank)."""
        return len(split_batches(self.num_samples, self.batch_size, self.drop_last))

    def _plan(self) -> list[np.ndarray]:
        buffer = len(self.units) if self.in_ram else self.buffer_units
        order = epoch_order(self.union, self.units, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                            buffer_units=buffer)
        mine = rank_slice(order, self.rank, self.world_size)
        batches = split_batches(len(mine), self.batch_size, self.drop_last)
        info = get_worker_info()
        if info is not None:
            k, n = info.id, info.num_workers
            batches = batches[k * len(batches) // n:(k + 1) * len(batches) // n]
        return [mine[s:e] for s, e in batches]

    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan()
        if self.views and self._view_recipe.mixes:  # each batch also reads its partners (same units: no extra reads)
            plan = [np.concatenate([idx, self._partners(idx)]) for idx in plan]
        batches = self._iter_ram(plan) if self.in_ram else self._iter_stream(plan)
        yield from (map(self._to_view, batches) if self.views else batches)

    def _partners(self, idx: np.ndarray) -> np.ndarray:
        """The global index of each sample's partner in this epoch's mixed view (a sample of its own unit)."""
        v = self._view_choice()[idx]
        return self.union.starts[self.union.unit_of(idx)] + self._view_offsets[idx, v, 3]

    def _view_choice(self) -> np.ndarray:
        """This epoch's view of every sample: a pure function of (seed, epoch), the same on every rank."""
        if self._choice_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch, 104729])
            self._choice = rng.integers(0, self.meta.views, self.union.num_samples)
            self._choice_epoch = self.epoch
        return self._choice

    def _to_view(self, b: Batch) -> Batch:
        """A batch of stored images and view labels (and, for mixed views, their partners' images after them) ->
        the chosen views' pixels and the teacher's logits of them."""
        n = len(b.indices) // 2 if self._view_recipe.mixes else len(b.indices)
        partners = b.images[n:] if self._view_recipe.mixes else None
        idx = b.indices[:n].numpy()
        v = self._view_choice()[idx]
        images = view_pixels(b.images[:n], self._view_offsets[idx, v], self._view_recipe, partners)
        return Batch(images, b.logits[torch.arange(n), torch.from_numpy(v)], b.labels[:n], b.indices[:n])

    def _iter_ram(self, plan: list[np.ndarray]) -> Iterator[Batch]:
        # torch's index_select gathers rows ~2x faster than numpy fancy indexing
        targets = self._ram.views if self.views else self._ram.logits  # with views: N×V×K, chosen in _to_view
        images, logits, labels = (torch.from_numpy(a) for a in (self._ram.images, targets, self._ram.labels))
        identity = len(self._ram) == self.union.num_samples  # complete stores: position == index
        for idx in plan:
            rows = torch.from_numpy(idx if identity else self._pos[idx])
            yield Batch(images.index_select(0, rows), logits.index_select(0, rows), labels.index_select(0, rows),
                        torch.from_numpy(idx))

    def _iter_stream(self, plan: list[np.ndarray]) -> Iterator[Batch]:
        if self._readers is None or get_worker_info() is not None:
            self._readers = [open_store(p) for p in self.paths]  # each worker process opens its own handles
        union, readers = self.union, self._readers
        first_use: list[int] = []  # units in the order the plan first needs them: the read-ahead order
        last_use: dict[int, int] = {}
        for j, idx in enumerate(plan):
            for u in np.unique(union.unit_of(idx)).tolist():
                if u not in last_use:
                    first_use.append(u)
                last_use[u] = j
        cache: dict[int, Future] = {}
        ahead = 0
        # one background reader overlaps decoding the next chunks with assembling the current batch
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfkd-read") as pool:
            for j, idx in enumerate(plan):
                owner = union.unit_of(idx)
                need = np.unique(owner).tolist()
                while ahead < len(first_use) and (first_use[ahead] in need or len(cache) < self.prefetch_units):
                    u = first_use[ahead]
                    cache[u] = pool.submit(union.read_unit, u, readers)  # one whole chunk
                    ahead += 1
                if len(need) == 1:
                    rec = cache[need[0]].result().take(idx - union.starts[need[0]])
                else:
                    rec = _gather({u: cache[u].result() for u in need}, need, owner, idx, union, self.views)
                yield _to_batch(rec, idx, self.views)
                for u in need:
                    if last_use[u] == j:
                        del cache[u]


def _gather(cache: dict[int, Samples], need: list[int], owner: np.ndarray, idx: np.ndarray, union: StoreUnion,
            views: bool = False) -> Samples:
    """Assemble one batch whose samples come from several cached units."""
    n = len(idx)
    first = cache[need[0]]
    out = Samples(np.empty((n, *union.image_shape), np.uint8), np.empty((n, union.num_classes), union.logits_dtype),
                  np.empty(n, np.int64), np.empty((n, *first.views.shape[1:]), union.logits_dtype) if views else None)
    for u in need:
        sel = owner == u
        src = cache[u].take(idx[sel] - union.starts[u])
        out.images[sel], out.logits[sel], out.labels[sel] = src.images, src.logits, src.labels
        if views:
            out.views[sel] = src.views
    return out


def _to_batch(rec: Samples, idx: np.ndarray, views: bool = False) -> Batch:
    """Tensors of one batch; with `views` the logits slot holds the N×V×K view logits (one is chosen later)."""
    targets = rec.views if views else rec.logits
    return Batch(torch.from_numpy(np.ascontiguousarray(rec.images)), torch.from_numpy(np.ascontiguousarray(targets)),
                 torch.from_numpy(np.ascontiguousarray(rec.labels)), torch.from_numpy(np.ascontiguousarray(idx)))
