"""The crash-safe writer: whole units only, done mark last, per-unit seeds, exact resume."""

from __future__ import annotations

import numpy as np

from .backends import Backend
from .toolbox.errors import StoreError
from .schema import Samples, StoreMeta, check_samples
from .units import share, unit_seed


class StoreWriter:
    """Hands out pending write units and writes each one whole; safe with many disjoint writers."""

    def __init__(self, backend: Backend) -> None:
        if not backend.writable:
            raise StoreError(f"{backend.path} was opened read-only; open it with store.open_writer to write")
        self.backend = backend
        self.reopened: list[int] = []  # units a resume found damaged and will write again
        self.lock = None  # the store's writer lock while this writer lives (store.lock), set by store.access

    @property
    def meta(self) -> StoreMeta:
        return self.backend.meta

    @property
    def path(self) -> str:
        return self.backend.path

    def unit_seed(self, unit: int) -> int:
        """The seed that alone decides the content of `unit`."""
        return unit_seed(self.meta.base_seed, unit)

    def unit_range(self, unit: int) -> tuple[int, int]:
        """Sample indices [lo, hi) of `unit`."""
        return self.meta.unit_range(unit)

    def done_mask(self) -> np.ndarray:
        """One flag per unit, read fresh from the store."""
        return self.backend.done_mask()

    def pending_units(self, rank: int = 0, world_size: int = 1, done: np.ndarray | None = None) -> list[int]:
        """This rank's disjoint share of the units not yet done, in index order.

        Without `done`, rank r takes the pending units u with u % world_size == r: correct whatever the
        timing of the other writers. With `done` (one snapshot of the done mask that every rank shares,
        e.g. broadcast by rank 0), the pending units of that snapshot are dealt out evenly instead, which
        balances a resume whose finished units are unevenly spread.
        """
        if done is None:
            mask = self.done_mask()
            return [u for u in share(list(range(self.meta.num_units)), rank, world_size) if not mask[u]]
        done = np.asarray(done, dtype=bool)
        if done.shape != (self.meta.num_units,):
            raise StoreError(f"done snapshot has shape {done.shape}, the store has {self.meta.num_units} units")
        return share(np.flatnonzero(~done).tolist(), rank, world_size)

    def write_unit(self, unit: int, images: np.ndarray, logits: np.ndarray, labels: np.ndarray,
                   views: np.ndarray | None = None) -> None:
        """Validate then write one whole unit (with its view labels where the store keeps them) and mark it
        done; nothing is written if validation fails."""
        lo, hi = self.unit_range(unit)
        rec = check_samples(self.meta, Samples(images, logits, labels, views), hi - lo, f"unit {unit} of {self.path}")
        try:
            self.backend.write_unit(unit, rec)
        except OSError as exc:  # a full disk or a lost mount: the unit stays pending; name the store, not a chunk
            raise OSError(exc.errno, f"{exc.strerror or exc} while writing unit {unit}", self.path) from None

    def damaged_units(self) -> list[int]:
        """Done units whose data cannot be read back as written (a lost or changed chunk, a torn shard)."""
        bad = []
        for u in np.flatnonzero(self.done_mask()).tolist():
            try:
                self.backend.read_unit(u)
            except StoreError:
                bad.append(u)
        return bad

    def reopen_damaged(self) -> list[int]:
        """Mark damaged done units pending again so this run re-makes exactly them (their seeds decide them)."""
        bad = self.damaged_units()
        for u in bad:
            self.backend.mark_pending(u)
        return bad

    def finalize(self) -> None:
        """Finish the run: consolidate metadata (once, after the last unit of every writer), and let go of the
        store's writer lock."""
        self.backend.finalize()
        if self.lock is not None:
            self.lock.release()

    @property
    def complete(self) -> bool:
        """Whether every unit is done."""
        return bool(self.done_mask().all())
