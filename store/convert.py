"""Copy a store into another backend (or unit size) with identical content and provenance."""

from __future__ import annotations

import dataclasses
from typing import Any

from .api import create
from .api import open as open_store
from .errors import StoreError
from .progress import progress
from .writer import StoreWriter


def convert(src: str, dst: str, *, backend: str | None = None, unit_size: int | None = None,
            overwrite: bool = False, **options: Any) -> StoreWriter:
    """Write every sample of `src` into a new store at `dst`; the destination backend comes from its path."""
    reader = open_store(src)
    meta = reader.meta
    if unit_size is not None and unit_size != meta.unit_size:
        if not reader.complete:
            raise StoreError(f"{src} is unfinished; changing the unit size needs a complete store "
                             "(finish it with --resume, or convert with the same unit size)")
        meta = dataclasses.replace(meta, unit_size=unit_size)
    writer = create(dst, meta, backend=backend, overwrite=overwrite, **options)
    same_units = meta.unit_size == reader.meta.unit_size
    units = reader.done_units() if same_units else range(meta.num_units)
    for u in progress(units, desc=f"converting to {writer.backend.name}"):
        rec = reader.read_unit(u) if same_units else reader.read(*meta.unit_range(u))
        writer.write_unit(u, rec.images, rec.logits, rec.labels)
    writer.finalize()
    return writer
