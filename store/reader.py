"""Random access to the finished part of a store: only done units are ever returned."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from .backends import Backend
from .toolbox.errors import StoreError
from .schema import Samples, StoreMeta, plan_key


class StoreReader:
    """Length, metadata and reads by unit or index range over any backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._done: np.ndarray | None = None

    @property
    def meta(self) -> StoreMeta:
        return self.backend.meta

    @property
    def path(self) -> str:
        return self.backend.path

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def done_mask(self, refresh: bool = False) -> np.ndarray:
        """One flag per unit; cached, re-read from the store when `refresh`."""
        if self._done is None or refresh:
            self._done = self.backend.done_mask()
        return self._done

    def done_units(self, refresh: bool = False) -> list[int]:
        """Indices of the finished units."""
        return np.flatnonzero(self.done_mask(refresh)).tolist()

    def __len__(self) -> int:
        """Number of readable samples (those in done units)."""
        return sum(hi - lo for lo, hi in map(self.meta.unit_range, self.done_units()))

    @property
    def complete(self) -> bool:
        """Whether every unit is done."""
        return bool(self.done_mask().all())

    def read_unit(self, unit: int, check: bool = True) -> Samples:
        """One whole unit; refused when the unit is not done (or, with `check`, not as its checksums say)."""
        self.meta.unit_range(unit)  # bounds check
        if not self.done_mask()[unit] and not self.done_mask(refresh=True)[unit]:
            lo, hi = self.meta.unit_range(unit)
            raise StoreError(f"{self.path}: unit {unit} (samples {lo}..{hi - 1}) is not finished; "
                             "finish the store with --resume or read only done units")
        return self.backend.read_unit(unit, check=check)

    def read(self, lo: int, hi: int, check: bool = True) -> Samples:
        """Samples [lo, hi) by global index; every unit the range touches must be done."""
        n = self.meta.num_samples
        if not 0 <= lo <= hi <= n:
            raise StoreError(f"index range [{lo}, {hi}) is outside the store's [0, {n})")
        if lo == hi:
            return self._empty()
        u0, u1 = lo // self.meta.unit_size, (hi - 1) // self.meta.unit_size
        parts = []
        for u in range(u0, u1 + 1):
            ulo, _ = self.meta.unit_range(u)
            rec = self.read_unit(u, check)
            parts.append(rec.take(slice(max(lo, ulo) - ulo, min(hi - ulo, len(rec)))))
        return parts[0] if len(parts) == 1 else Samples.concat(parts)

    def _empty(self) -> Samples:
        c, h, w = self.meta.image_shape
        return Samples(np.empty((0, c, h, w), np.uint8), np.empty((0, self.meta.num_classes), self.meta.logits_dtype),
                       np.empty(0, np.int64))

    def iter_units(self, units: list[int] | None = None) -> Iterator[tuple[int, Samples]]:
        """(unit, samples) for the given units, or for every done unit in order."""
        for u in self.done_units() if units is None else units:
            yield u, self.read_unit(u)

    def nbytes(self) -> int:
        """Decoded size of the readable samples (what loading them into RAM costs)."""
        m = self.meta
        per = int(np.prod(m.image_shape)) + (1 + m.views) * m.num_classes * np.dtype(m.logits_dtype).itemsize + 8
        return per * len(self)

    @property
    def views_complete(self) -> bool:
        """Whether the store keeps view labels and every finished unit has them."""
        return bool(self.meta.views) and bool((self.backend.views_done_mask() | ~self.done_mask()).all())

    def load_all(self) -> Samples:
        """Every done sample, in index order, in memory (the next chunk decodes while one is copied); with
        their view labels when every finished unit has them."""
        units = self.done_units()
        m = self.meta
        n = sum(hi - lo for lo, hi in map(m.unit_range, units))
        out = Samples(np.empty((n, *m.image_shape), np.uint8), np.empty((n, m.num_classes), m.logits_dtype),
                      np.empty(n, np.int64),
                      np.empty((n, m.views, m.num_classes), m.logits_dtype) if self.views_complete else None)
        pos = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfkd-load") as pool:
            for rec in pool.map(self.read_unit, units):
                k = len(rec)
                out.images[pos:pos + k], out.logits[pos:pos + k], out.labels[pos:pos + k] = rec.images, rec.logits, rec.labels
                if out.views is not None:
                    out.views[pos:pos + k] = rec.views
                pos += k
        return out

    def identity(self) -> dict[str, Any]:
        """What a run trained on this store depends on: its plan, which units are done and their checksums
        (not its path: a moved store is the same store; a store that grew is not)."""
        from .toolbox.identity import digest

        done = self.done_mask(refresh=True)
        return {"plan": digest(plan_key(self.meta)), "units_done": int(done.sum()),
                "content": digest({"done": done.tolist(), "checksums": self.backend.checksum_table()})}

    def options(self) -> dict[str, Any]:
        """Backend layout options (compressor, image format...)."""
        return self.backend.options()
