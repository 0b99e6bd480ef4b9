"""One writer per store: an advisory lock beside the store that every command writing it holds.

The lock is the POSIX record lock (`fcntl.lockf`) of `.NAME.lock` next to the store: the kernel drops it when the
holder exits, however it ends, so a killed writer leaves no stale lock (at most the small file, which the next
writer takes over). The file is removed when its last writer lets go. One process may hold several writers of a
store (a resume in the same program); ranks of one torchrun job share rank 0's lock. Object-store URLs have no
such lock: one writer there is up to the user.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from .toolbox import fs
from .toolbox.errors import StoreError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None  # type: ignore[assignment]


def lock_path(path: str) -> str:
    """Where the lock of the store at `path` lies: a hidden file beside it (so replacing the store keeps it)."""
    head, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    return os.path.join(head, f".{name}.lock")


class Lease:
    """This process's hold on one store's lock; the lock is let go when the last lease of the store is released
    (POSIX locks belong to the process: closing any one file of the lock would drop it for every writer)."""

    def __init__(self, where: str) -> None:
        self.where, self.held = where, True
        _held[where][1] += 1

    def release(self) -> None:
        """Let go of this lease (also on garbage collection); the last one removes the lock file and unlocks."""
        if not self.held:
            return
        self.held = False
        entry = _held.get(self.where)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[self.where]
            with contextlib.suppress(OSError):  # removed while locked: a taker re-checks the name (acquire)
                os.remove(self.where)
            entry[0].close()

    def __del__(self) -> None:
        self.release()


_held: dict[str, list] = {}  # lock file -> [open file holding the lock, leases]


def acquire(path: str) -> Lease | None:
    """Hold the writer lock of the store at `path` for this process: a lease (keep it referenced while writing), or
    None where there is no lock (URLs, Windows, a read-only folder, where nobody writes). A store another process
    writes: one line naming the holder."""
    if fs.is_url(path) or fcntl is None:
        return None
    where = lock_path(path)
    while where not in _held:
        try:
            f = open(where, "a+", encoding="utf-8")
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES):  # a read-only mount: no writer can be at work there
                return None
            raise
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise StoreError(f"{path} is being written by {holder}; wait for it to finish (or stop it and rerun with "
                             "--resume): two writers at once would mix their units and metadata") from None
        try:  # the file may have been removed by its last holder between our open and our lock: take the new one
            same = os.stat(where).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}")
        f.flush()
        _held[where] = [f, 0]
    return Lease(where)
