"""Paths or fsspec URLs (s3://bucket/run.zarr, gs://..., memory://...): the few file-system questions the
store asks, answered by os for local paths and by fsspec for URLs (credentials and endpoints come from the
usual environment variables of each file system, e.g. AWS_ACCESS_KEY_ID / AWS_ENDPOINT_URL for s3)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
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


class NotRegularFile(OSError):
    """A path read with `regular=True` is a link, FIFO, device or folder, not a regular file."""


class TooLarge(OSError):
    """A file read with `most=N` is longer than N bytes (nothing of it was held in memory beyond N + 1)."""


def read_bytes(path: str, regular: bool = False, most: int | None = None) -> bytes:
    """A whole file; FileNotFoundError when it is absent, as for local files.

    With `regular` (a store's own files, which anyone may have made): a local path must itself be a regular file,
    never followed through a link nor opened as a FIFO or device (NotRegularFile), and is read up to the size it
    had when opened, so such a file can neither point a reader out of the store nor make it read forever. With
    `most`, a file longer than that many bytes is refused (TooLarge) before it is read (a sparse file of a few KB
    on disk can read as gigabytes)."""
    if not is_url(path):
        if not regular:
            with open(path, "rb") as f:
                data = f.read() if most is None else f.read(most + 1)
            if most is not None and len(data) > most:
                raise TooLarge(errno.EFBIG, f"larger than the {most:,} bytes it can hold", path)
            return data
        try:  # no O_NOFOLLOW (Windows): the fstat below still refuses what is not a regular file
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotRegularFile(exc.errno, "a symbolic link, not a regular file", path) from None
            raise
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFile(errno.EINVAL, "not a regular file (a FIFO, device or folder)", path)
            if most is not None and st.st_size > most:
                raise TooLarge(errno.EFBIG, f"{st.st_size:,} bytes, larger than the {most:,} it can hold", path)
            return f.read(st.st_size)
    fs, p = _fs(path)
    if most is None:
        return fs.cat_file(p)
    data = fs.cat_file(p, start=0, end=most + 1)  # one request, and never more than the limit held
    if len(data) > most:
        raise TooLarge(errno.EFBIG, f"larger than the {most:,} bytes it can hold", path)
    return data


def links_inside(path: str, most: int = 3) -> list[str]:
    """Up to `most` entries under a local folder that are links or neither files nor folders (FIFOs, devices),
    never followed; [] for URLs (object stores have no links). A store's own tree holds none of these, so one
    there points its writer (or reader) out of the store."""
    if is_url(path):
        return []
    found, todo = [], [path]
    while todo and len(found) < most:
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if e.is_symlink() or not (e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)):
                    found.append(e.path)
                elif e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
    return found[:most]


def is_partial(name: str) -> bool:
    """Whether a file name is a temporary of an interrupted write_atomic (`.NAME.partial-PID`, or `NAME.partial`
    as earlier versions named them)."""
    return name.endswith(".partial") or re.search(r"\.partial-\d+$", name) is not None


def write_atomic(path: str, data: bytes) -> None:
    """Publish `data` at `path` whole or not at all: a synced temporary (unique to this process) renamed into
    place locally, removed again if anything fails; one PUT on an object store (an object appears complete
    or not at all). The parent folder is created when missing. Every artifact dfkd writes goes through here."""
    if not is_url(path):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.partial-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if isinstance(exc, OSError) and exc.filename != path:  # name what the user asked for, not the temporary
                raise OSError(exc.errno, exc.strerror or str(exc), path) from None
            raise
        return
    fs, p = _fs(path)
    fs.pipe_file(p, data)


def write_text_atomic(path: str, text: str) -> None:
    """write_atomic for text (UTF-8): JSON metrics, reports, stage state."""
    write_atomic(path, text.encode("utf-8"))


def save_torch(obj: Any, path: str) -> None:
    """torch.save into memory, then write_atomic: a full disk never leaves a torn checkpoint (nor torch's
    cryptic zip-writer error), and the same call serves local paths and fsspec URLs."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def load_torch(path: str, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) of a local path or fsspec URL: tensors and plain values only, never code. A
    local file is read by torch from its path, which reads the zip's directory first, so a file swollen with zeros
    (sparse: a few KB on disk, gigabytes to read) is refused without being read; a FIFO or device, never opened."""
    import io

    import torch

    if is_url(path):
        return torch.load(io.BytesIO(read_bytes(path)), map_location=map_location, weights_only=True)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotRegularFile(errno.EINVAL, "not a regular file (a FIFO, device or folder)", path)
    return torch.load(path, map_location=map_location, weights_only=True)


def rename(src: str, dst: str) -> None:
    """Move a local file or folder to a new name (dst absent, or an empty folder). Object stores have no
    rename: callers that publish there write in place instead."""
    if is_url(src) or is_url(dst):
        raise ValueError(f"rename is local only, got {src} -> {dst}")
    os.rename(src, dst)


def same_location(a: str, b: str) -> bool:
    """Whether two paths/URLs name the same place (symlinks and relative parts resolved for local paths)."""
    if is_url(a) != is_url(b):
        return False
    if not is_url(a):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def sibling(path: str, tag: str) -> str:
    """A hidden name beside `path` that keeps its suffix (so backends still recognize it): dir/.name.TAG.zarr"""
    head, sep, name = path.rstrip("/").rpartition("/" if is_url(path) else os.sep)
    stem, ext = os.path.splitext(name)
    return f"{head}{sep}.{stem}.{tag}{ext}"


def remove(path: str) -> None:
    if not is_url(path):
        os.remove(path)
        return
    fs, p = _fs(path)
    fs.rm_file(p)
