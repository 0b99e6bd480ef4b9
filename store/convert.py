"""Copy a store into another backend (or unit size) with identical content and provenance.

The copy is written to a hidden sibling of the destination and renamed into place only when complete,
so a failed or interrupted convert leaves an existing local destination exactly as it was, and a source
is never its own destination. (At an object-store URL, which cannot rename, the copy is written in place,
and an existing store there is never replaced.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from .toolbox import fs
from .access import check_target, create, open_writer
from .lock import acquire
from .access import open as open_store
from .backends import backend_for_new
from .schema import unchecked_error
from .toolbox.errors import StoreError
from .toolbox.progress import progress
from .writer import StoreWriter


def convert(src: str, dst: str, *, backend: str | None = None, unit_size: int | None = None,
            overwrite: bool = False, trust_unchecked: bool = False, **options: Any) -> StoreWriter:
    """Write every sample of `src` into a new store at `dst`; the destination backend comes from its path.

    A source written without checksums is refused (the copy's fresh checksums would vouch for content nothing
    checked) unless `trust_unchecked`: its owner vouches for it, and the copy is a checked store."""
    if fs.same_location(src, dst):
        raise StoreError(f"{dst} is the source store itself; converting in place would destroy it, "
                         "give another destination")
    reader = open_store(src)
    if not reader.backend.checked and not trust_unchecked:
        raise unchecked_error(src)
    meta = reader.meta
    if unit_size is not None and unit_size != meta.unit_size:
        if not reader.complete:
            raise StoreError(f"{src} is unfinished; changing the unit size needs a complete store "
                             "(finish it with --resume, or convert with the same unit size)")
        meta = dataclasses.replace(meta, unit_size=unit_size)
    if meta.views and not reader.views_complete:
        raise StoreError(f"{src} has view labels for only some of its finished units; finish them with "
                         "`dfkd store label --resume` before converting (the copy keeps every unit's views)")
    held = acquire(dst)  # one writer of dst; the writer returned holds its own lease
    try:
        return _convert_into(reader, meta, dst, backend, overwrite, check=reader.backend.checked, **options)
    finally:
        if held is not None:
            held.release()


def _convert_into(reader: Any, meta: Any, dst: str, backend: str | None, overwrite: bool, check: bool = True,
                  **options: Any) -> StoreWriter:
    """convert's work once dst is locked: check it, copy into a temporary, publish."""
    replace = check_target(dst, overwrite)  # refused now, before any work, if dst may not be replaced
    backend = backend or backend_for_new(dst, None).name
    remote = fs.is_url(dst)  # object stores cannot rename: the copy is written in place (after the checks)
    tmp = dst if remote else fs.sibling(dst, "converting")
    if remote and replace:
        raise StoreError(f"{dst} already holds a store; an object store cannot swap a finished copy into place, so "
                         "dfkd will not delete it first: convert to a new URL, then remove the old store yourself")
    if not remote and fs.exists(tmp):  # the leftover of a killed convert to this same destination
        fs.rmtree(tmp)
    try:
        writer = create(tmp, meta, backend=backend, lock=False, **options)  # a private name, under dst's lock
        same_units = meta.unit_size == reader.meta.unit_size
        units = reader.done_units() if same_units else range(meta.num_units)
        for u in progress(units, desc=f"converting to {writer.backend.name}", unit="unit"):
            rec = reader.read_unit(u, check) if same_units else reader.read(*meta.unit_range(u), check=check)
            writer.write_unit(u, rec.images, rec.logits, rec.labels, rec.views)
        writer.finalize()
        if not remote:
            _publish(tmp, dst, replace)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rmtree(tmp)
        raise
    return open_writer(dst)


def _publish(tmp: str, dst: str, replace: bool) -> None:
    """Move the finished copy to `dst`; an old store there is moved aside first and removed only after."""
    old = fs.sibling(dst, "replaced")
    if replace:
        if fs.exists(old):
            fs.rmtree(old)
        fs.rename(dst, old)
    try:
        fs.rename(tmp, dst)  # replaces an empty folder; refuses one that another process filled meanwhile
    except BaseException:
        if replace:
            fs.rename(old, dst)
        raise
    if replace:
        fs.rmtree(old)
