"""Deterministic store contents for tests, importable by subprocesses (python -c 'from tests.helpers ...')."""

from __future__ import annotations

import sys
import time

import numpy as np

from dfkd import store
from dfkd.store import Samples, StoreMeta


def small_meta(num_samples: int = 100, unit_size: int = 16, image_shape=(3, 8, 8), num_classes: int = 10,
               logits_dtype: str = "float16", base_seed: int = 7) -> StoreMeta:
    """A tiny store plan with provenance, like the synthesis engine would write."""
    return StoreMeta(num_samples=num_samples, image_shape=image_shape, num_classes=num_classes, unit_size=unit_size,
                     logits_dtype=logits_dtype, base_seed=base_seed, mean=(0.5,) * image_shape[0],
                     std=(0.25,) * image_shape[0], provenance={"method": "test", "hparams": {"lr": 0.25}})


def unit_content(meta: StoreMeta, unit: int) -> Samples:
    """What a unit holds, decided by its seed alone; logits column 0 carries the global index when float32."""
    lo, hi = meta.unit_range(unit)
    rng = np.random.default_rng(store.unit_seed(meta.base_seed, unit))
    n = hi - lo
    images = rng.integers(0, 256, (n, *meta.image_shape), dtype=np.uint8)
    logits = rng.normal(size=(n, meta.num_classes)).astype(meta.logits_dtype)
    if meta.logits_dtype == "float32":
        logits[:, 0] = np.arange(lo, hi)
    labels = rng.integers(-1, meta.num_classes, n).astype(np.int64)
    return Samples(images, logits, labels)


def fill(writer: store.StoreWriter, units=None, delay: float = 0.0) -> None:
    """Write the given (default: all pending) units with their seeded content."""
    for u in writer.pending_units() if units is None else units:
        rec = unit_content(writer.meta, u)
        if delay:
            time.sleep(delay)
        writer.write_unit(u, rec.images, rec.logits, rec.labels)


def expected(meta: StoreMeta) -> Samples:
    """The whole store as an uninterrupted run writes it."""
    return Samples.concat([unit_content(meta, u) for u in range(meta.num_units)])


def write_share(path: str, rank: int, world_size: int) -> int:
    """One of several concurrent writer processes (ranks of one job: lock=False, they share its one lock): writes its
    disjoint share of the pending units."""
    writer = store.open_writer(path, lock=False)
    units = writer.pending_units(rank, world_size)
    fill(writer, units)
    return len(units)


def slow_run(path: str, backend: str, delay: float) -> None:
    """A synthesis-like run that creates or resumes the store and writes slowly (to be killed)."""
    meta = small_meta(num_samples=200, unit_size=10)
    writer = store.create_or_resume(path, meta, resume=True, backend=backend)
    fill(writer, delay=delay)
    writer.finalize()


if __name__ == "__main__":
    slow_run(sys.argv[1], sys.argv[2], float(sys.argv[3]))


def tree_bytes(root) -> dict[str, bytes]:
    """Every file under `root` (or the file itself) with its bytes: to assert nothing was changed."""
    import os

    root = str(root)
    if os.path.isfile(root):
        with open(root, "rb") as f:
            return {root: f.read()}
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out
