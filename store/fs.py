"""Paths or fsspec URLs (s3://bucket/run.zarr, gs://..., memory://...): the few file-system questions the
store asks, answered by os for local paths and by fsspec for URLs (credentials and endpoints come from the
usual environment variables of each file system, e.g. AWS_ACCESS_KEY_ID / AWS_ENDPOINT_URL for s3)."""

from __future__ import annotations

import os
import shutil
from typing import Any


def is_url(path: str) -> bool:
    """Whether `path` names a remote (fsspec) location rather than a local path."""
    return "://" in path and not path.startswith("file://")


def _fs(path: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(path)


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts]) if is_url(path) else os.path.join(path, *parts)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    """A directory, or (on object stores) a prefix with objects under it."""
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = _fs(path)
    return fs.isfile(p)


def listdir(path: str) -> list[str]:
    if not is_url(path):
        return os.listdir(path)
    fs, p = _fs(path)
    return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)]


def rmtree(path: str) -> None:
    if not is_url(path):
        shutil.rmtree(path)
        return
    fs, p = _fs(path)
    fs.rm(p, recursive=True)


def makedirs(path: str) -> None:
    """Create a directory (object stores have none: a prefix exists once an object is under it)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def read_bytes(path: str) -> bytes:
    """A whole file; FileNotFoundError when it is absent, as for local files."""
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return fs.cat_file(p)


def write_atomic(path: str, data: bytes) -> None:
    """Publish `data` at `path` whole or not at all: a synced temporary renamed into place locally; one PUT
    on an object store (an object appears complete or not at all), so no temporary is left behind there."""
    if not is_url(path):
        tmp = path + ".partial"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, p = _fs(path)
    fs.pipe_file(p, data)


def remove(path: str) -> None:
    if not is_url(path):
        os.remove(path)
        return
    fs, p = _fs(path)
    fs.rm_file(p)
