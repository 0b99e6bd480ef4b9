"""Opening and creating stores: `open` to read, `create` / `open_writer` / `create_or_resume` to write."""

from __future__ import annotations

import os
from typing import Any, Callable

from .toolbox import fs
from .backends import backend_for_existing, backend_for_new, get_backend, list_backends
from .toolbox.errors import StoreError
from .toolbox.identity import check_same_run
from .lock import acquire
from .reader import StoreReader
from .schema import StoreMeta, plan_key
from .writer import StoreWriter


def open(path: str | os.PathLike) -> StoreReader:  # noqa: A001 - the store's own `open`, like zarr.open
    """Open a store for reading; the backend is picked from what is at `path`."""
    path = os.fspath(path)
    return StoreReader(backend_for_existing(path).open(path, writable=False))


def open_writer(path: str | os.PathLike, *, lock: bool = True) -> StoreWriter:
    """Open an existing store to write its pending units (resume, or, with `lock=False`, another rank of the same
    run, which shares rank 0's lock); a store another process writes is refused (store.lock)."""
    path = os.fspath(path)
    return _locked(path, lock, lambda: StoreWriter(backend_for_existing(path).open(path, writable=True)))


def _locked(path: str, lock: bool, make: Callable[[], StoreWriter]) -> StoreWriter:
    """make() under the store's writer lock, which the writer then keeps (let go again if make fails)."""
    held = acquire(path) if lock else None
    try:
        writer = make()
    except BaseException:
        if held is not None:
            held.release()
        raise
    writer.lock = held
    return writer


def _is_store(path: str) -> bool:
    try:
        backend_for_existing(path).open(path)
        return True
    except StoreError:
        return False


def _half_created(path: str) -> bool:
    return any(get_backend(name).half_created(path) for name in list_backends())


def check_target(path: str, overwrite: bool) -> bool:
    """Whether a new store may go to `path`: False when nothing is there, True when a dfkd store is there and
    `overwrite` allows replacing it; anything else (a file, a foreign folder, a store without overwrite) is
    refused with one line, before anything is written."""
    if not fs.exists(path):
        return False
    if not fs.isdir(path):
        raise StoreError(f"{path} exists and is a file; choose another path for the store")
    if not fs.listdir(path):
        return False
    if _half_created(path):  # a creation killed before its arrays (object stores, which write in place)
        return True
    if not _is_store(path):
        raise StoreError(f"{path} exists and is not a dfkd store; refusing to overwrite it, choose another path")
    if not overwrite:
        raise StoreError(f"a store already exists at {path}; pass --resume to finish it or --overwrite to replace it")
    return True


def create(path: str | os.PathLike, meta: StoreMeta, *, backend: str | None = None, overwrite: bool = False,
           lock: bool = True, **options: Any) -> StoreWriter:
    """Create a store at its final size, every unit pending; never clobbers data that is not a dfkd store."""
    path = os.fspath(path)
    cls = backend_for_new(path, backend)  # locked before looking: a store another process writes is not replaced
    return _locked(path, lock, lambda: _create(path, cls, meta, overwrite, **options))


def _create(path: str, cls: Any, meta: StoreMeta, overwrite: bool, **options: Any) -> StoreWriter:
    replace = check_target(path, overwrite)
    if fs.is_url(path):  # object stores cannot rename a prefix: the few metadata objects are written in place
        if replace:
            fs.rmtree(path)
        return StoreWriter(cls.create(path, meta, **options))  # no lock on object stores (store.lock)
    # Laid out beside the target and renamed into place: a kill at any point leaves either nothing at `path`
    # (or the old store) or a complete empty store, which --resume and --overwrite both accept.
    tmp = fs.sibling(path, f"creating-{os.getpid()}")
    try:
        cls.create(tmp, meta, **options)
        if replace:
            fs.rmtree(path)
        try:
            fs.rename(tmp, path)  # replaces an empty folder; refuses one another process has filled meanwhile
        except OSError:
            if fs.exists(path) and _is_store(path):
                raise StoreError(f"another process created a store at {path} at the same moment; rerun with "
                                 "--resume to join it, or choose another path") from None
            raise
    except BaseException:
        if fs.exists(tmp):
            fs.rmtree(tmp)
        raise
    return StoreWriter(cls.open(path, writable=True))


def create_or_resume(path: str | os.PathLike, meta: StoreMeta, *, resume: bool = False, overwrite: bool = False,
                     backend: str | None = None, **options: Any) -> StoreWriter:
    """Start a run, or continue one: a resumed store must have been planned exactly like `meta`."""
    path = os.fspath(path)
    if resume and fs.exists(path) and not overwrite and not (fs.isdir(path) and not fs.listdir(path)) \
            and not _half_created(path):
        writer = open_writer(path)
        check_same_run(plan_key(writer.meta), plan_key(meta), path,
                       "rerun with the original settings, or pass --overwrite to start again")
        writer.backend.clear_partials()
        writer.reopened = writer.reopen_damaged()
        return writer
    return create(path, meta, backend=backend, overwrite=overwrite, **options)
