"""One writer per store: an advisory lock beside the store that every command writing it holds.

The lock is the POSIX record lock (`fcntl.lockf`) of `.NAME.lock` next to the store: the kernel drops it when the
holder exits, however it ends, so a killed writer leaves no stale lock (at most the small file, which the next
writer takes over). The file is removed when its last writer lets go. One process may hold several writers of a
store (a resume in the same program); ranks of one torchrun job share rank 0's lock.

Object stores have no locks and no atomic create-if-absent, so a store at a URL gets a lease instead: `.NAME.lease`
beside it holds the writer's name, a random token and an expiry; the writer renews it every third of its life
while it writes and deletes it when done. A lease is taken only when none is there or the one there has lapsed (a
killed writer's lease lapses after LEASE_SECONDS), and is read back after SETTLE_SECONDS: of two writers that took
it at the same moment, only the one whose token is there goes on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid

from .toolbox import fs
from .toolbox.errors import StoreError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None  # type: ignore[assignment]


LEASE_SECONDS = 120.0  # an object-store lease's life without renewal: how long a killed writer's lease blocks
SETTLE_SECONDS = 1.0  # between writing a lease and reading it back: a writer racing for it has written by then


def lock_path(path: str) -> str:
    """Where the lock of the store at `path` lies: a hidden file beside it (so replacing the store keeps it); at a
    URL, its lease object."""
    if fs.is_url(path):
        head, _, name = path.rstrip("/").rpartition("/")
        return f"{head}/.{name}.lease"
    head, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    return os.path.join(head, f".{name}.lock")


def _holder() -> str:
    return f"process {os.getpid()} on {socket.gethostname()}"


def _busy(path: str, holder: str, until: float | None = None) -> StoreError:
    lapse = "" if until is None else (f" (its lease runs until {time.strftime('%H:%M:%S UTC', time.gmtime(until))} "
                                      "and is renewed while it writes)")
    return StoreError(f"{path} is being written by {holder}{lapse}; wait for it to finish (or stop it and rerun with "
                      "--resume): two writers at once would mix their units and metadata")


class _FileHold:
    """The open lock file whose POSIX lock this process holds."""

    def __init__(self, f) -> None:
        self.f = f

    def close(self, where: str) -> None:
        with contextlib.suppress(OSError):  # removed while locked: a taker re-checks the name (acquire)
            os.remove(where)
        self.f.close()


class _LeaseHold:
    """This process's lease on a store at a URL, renewed by a daemon thread until closed."""

    def __init__(self, where: str, token: str) -> None:
        self.where, self.token, self.stop = where, token, threading.Event()
        self.thread = threading.Thread(target=self._renew, name=f"dfkd lease {where}", daemon=True)
        self.thread.start()

    def _renew(self) -> None:
        while not self.stop.wait(LEASE_SECONDS / 3):
            with contextlib.suppress(Exception):  # a failed renewal is retried; the lease lapses only after its life
                _write_lease(self.where, self.token)

    def close(self, where: str) -> None:
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(Exception):
            if (_read_lease(where) or {}).get("token") == self.token:
                fs.remove(where)


def _read_lease(where: str) -> dict | None:
    """The lease at `where`, or None where there is none (or only an unreadable one, which binds nobody)."""
    try:
        lease = json.loads(fs.read_bytes(where, most=1 << 16))
    except (FileNotFoundError, fs.TooLarge, ValueError, RecursionError):
        return None
    ok = isinstance(lease, dict) and isinstance(lease.get("expires"), (int, float)) and "token" in lease
    return lease if ok else None


def _write_lease(where: str, token: str) -> None:
    fs.write_atomic(where, json.dumps({"holder": _holder(), "token": token,
                                       "expires": time.time() + LEASE_SECONDS}).encode())


def _acquire_lease(path: str, where: str) -> _LeaseHold:
    """Take the lease of the store at URL `path`, or say who holds it."""
    current = _read_lease(where)
    if current is not None and current["expires"] > time.time():
        raise _busy(path, str(current.get("holder", "another process")), current["expires"])
    token = uuid.uuid4().hex
    _write_lease(where, token)
    time.sleep(SETTLE_SECONDS)
    back = _read_lease(where)
    if back is None or back["token"] != token:  # another writer took it at the same moment, and won
        raise _busy(path, str((back or {}).get("holder", "another process")))
    return _LeaseHold(where, token)


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
            entry[0].close(self.where)

    def __del__(self) -> None:
        self.release()


_held: dict[str, list] = {}  # lock file or lease -> [what holds it (_FileHold, _LeaseHold), leases]


def acquire(path: str) -> Lease | None:
    """Hold the writer lock of the store at `path` for this process (at a URL its lease): a Lease (keep it referenced
    while writing), or None where there is no lock (Windows, a read-only folder, where nobody writes). A store
    another process writes: one line naming the holder."""
    where = lock_path(path)
    if fs.is_url(path):
        if where not in _held:
            _held[where] = [_acquire_lease(path, where), 0]
        return Lease(where)
    if fcntl is None:
        return None
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
            raise _busy(path, holder) from None
        try:  # the file may have been removed by its last holder between our open and our lock: take the new one
            same = os.stat(where).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(_holder())
        f.flush()
        _held[where] = [_FileHold(f), 0]
    return Lease(where)
