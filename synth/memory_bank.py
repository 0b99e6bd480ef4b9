"""The memory bank of the sequential methods: every image a chain has written to the store so far.

The store is the bank: a chain's proxy student trains on the units it has already written. They are kept
in RAM while they fit in `ram_limit` bytes; beyond that the units that do not fit are read back from the
store (whole units, through `store/`), so a bank of any size works at the cost of those reads.
"""

from __future__ import annotations

import torch

from .. import store


class MemoryBank:
    """uint8 images of a chain's finished units, sampled uniformly (in RAM) or a few units at a time (streamed)."""

    def __init__(self, path: str, ram_limit: int = 2 << 30, units_per_draw: int = 8) -> None:
        self.path, self.ram_limit, self.units_per_draw = path, ram_limit, max(1, units_per_draw)
        self.preloaded = 0  # images of other stores the bank starts from (a top-up), held in RAM
        self.units: list[int] = []
        self.spans: list[tuple[int, int] | None] = []  # each unit's rows in the RAM buffer, None: in the store only
        self._buf: torch.Tensor | None = None  # grown by doubling: adding a unit copies only that unit
        self._rows = 0
        self._reader: store.StoreReader | None = None

    def __len__(self) -> int:
        """Images in the bank."""
        return self._rows + sum(self._size(u) for u, span in zip(self.units, self.spans) if span is None)

    @property
    def in_ram(self) -> bool:
        """Whether every unit of the bank is held in memory."""
        return all(span is not None for span in self.spans)

    def preload(self, images: torch.Tensor, where: str) -> None:
        """Start the bank from another store's images (a top-up learns from what is already made); in RAM."""
        if self.units:
            raise ValueError("preload the bank before the chain adds its own units")
        if (self._rows + len(images)) * images[0].numel() > self.ram_limit:
            raise store.StoreError(f"the bank store {where} does not fit the memory bank's RAM limit; raise "
                                   "--set bank_ram_mb or top up from fewer images")
        self.add(-1, images)
        self.units.pop(), self.spans.pop()  # its rows stay in the buffer, outside any unit of this store
        self.preloaded += len(images)

    def add(self, unit: int, images: torch.Tensor) -> None:
        """A unit just written to the store (its uint8 images as stored)."""
        self.units.append(unit)
        n, per = len(images), images[0].numel()
        if (self._rows + n) * per > self.ram_limit:
            self.spans.append(None)
            return
        if self._buf is None or self._rows + n > len(self._buf):
            cap = min(max(2 * (self._rows + n), 1024), max(self.ram_limit // per, self._rows + n))
            grown = torch.empty((cap, *images.shape[1:]), dtype=images.dtype)
            if self._buf is not None:
                grown[:self._rows] = self._buf[:self._rows]
            self._buf = grown
        self._buf[self._rows:self._rows + n] = images.cpu()
        self.spans.append((self._rows, self._rows + n))
        self._rows += n

    def _size(self, unit: int) -> int:
        lo, hi = self._store().meta.unit_range(unit)
        return hi - lo

    def _store(self) -> store.StoreReader:
        if self._reader is None:
            self._reader = store.open(self.path)
        return self._reader

    def _unit_images(self, i: int) -> torch.Tensor:
        span = self.spans[i]
        if span is not None:
            return self._buf[span[0]:span[1]]
        return torch.from_numpy(self._store().read_unit(self.units[i]).images)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n images drawn with replacement: uniformly over the bank when it is in RAM, else uniformly over the
        images of `units_per_draw` units drawn at random (each read once for the draw)."""
        if not self.units and not self.preloaded:
            raise ValueError("the memory bank is empty")
        if self.in_ram:
            return self._buf[torch.randint(self._rows, (n,), generator=gen)]
        pick = sorted(torch.randperm(len(self.units), generator=gen)[:self.units_per_draw].tolist())
        images = torch.cat([self._unit_images(i) for i in pick])
        if not self.preloaded:
            return images[torch.randint(len(images), (n,), generator=gen)]
        # a top-up's preloaded rows are drawn where they lie, not copied out of the buffer every draw
        idx = torch.randint(len(images) + self.preloaded, (n,), generator=gen)
        own = idx < len(images)
        out = torch.empty((n, *images.shape[1:]), dtype=images.dtype)
        out[own], out[~own] = images[idx[own]], self._buf[idx[~own] - len(images)]
        return out
