"""One writer per store at a URL, where object stores have no locks: a lease object beside the store, renewed while
its writer writes, lapsing when a killed writer stops renewing it (store/lock.py). An fsspec memory:// store
stands in for an object store; the cross-process case runs against a local S3 server in tests/test_remote.py."""

from __future__ import annotations

import json
import time
import uuid

import fsspec
import pytest

from dfkd import store
from dfkd.store import lock
from dfkd.store.toolbox import fs
from tests.helpers import fill, small_meta


@pytest.fixture
def url(monkeypatch):
    monkeypatch.setattr(lock, "SETTLE_SECONDS", 0.0)
    path = f"memory://lease-{uuid.uuid4().hex}/s.zarr"
    yield path
    fsspec.filesystem("memory").rm(path.split("/s.zarr")[0].replace("memory://", "/"), recursive=True)


def foreign(where: str, expires: float) -> None:
    fs.write_atomic(where, json.dumps({"holder": "process 7 on elsewhere", "token": "theirs",
                                       "expires": expires}).encode())


def test_a_writer_at_a_url_holds_a_lease_while_it_writes_and_removes_it_when_done(url):
    where = lock.lock_path(url)
    assert where.endswith("/.s.zarr.lease")
    w = store.create(url, small_meta())
    lease = json.loads(fs.read_bytes(where))
    assert lease["expires"] > time.time() + lock.LEASE_SECONDS / 2 and str(lease["holder"]).startswith("process ")
    fill(w)
    w.finalize()
    assert not fs.exists(where)
    assert store.open(url).complete


def test_a_store_another_process_holds_is_refused_in_one_line_naming_it(url):
    store.create(url, small_meta()).finalize()
    foreign(lock.lock_path(url), time.time() + 60)
    for write in (lambda: store.open_writer(url), lambda: store.create(url, small_meta(), overwrite=True)):
        with pytest.raises(store.StoreError, match="is being written by process 7 on elsewhere") as e:
            write()
        assert "\n" not in str(e.value) and "its lease runs until" in str(e.value)
    assert json.loads(fs.read_bytes(lock.lock_path(url)))["token"] == "theirs"  # theirs is left alone


def test_a_lapsed_lease_of_a_killed_writer_is_taken_over(url):
    store.create(url, small_meta()).finalize()
    foreign(lock.lock_path(url), time.time() - 1)  # its writer stopped renewing it
    w = store.open_writer(url)
    assert json.loads(fs.read_bytes(lock.lock_path(url)))["token"] != "theirs"
    w.finalize()
    assert not fs.exists(lock.lock_path(url))


def test_of_two_writers_taking_a_lease_at_once_only_the_one_read_back_goes_on(url, monkeypatch):
    """The other writer's lease lands between ours and our read-back: we step back with one line."""
    store.create(url, small_meta()).finalize()
    where, real = lock.lock_path(url), lock._write_lease

    def raced(at: str, token: str) -> None:
        real(at, token)
        foreign(at, time.time() + 60)  # written just after ours, so theirs is what stays

    monkeypatch.setattr(lock, "_write_lease", raced)
    with pytest.raises(store.StoreError, match="is being written by process 7 on elsewhere"):
        store.open_writer(url)
    assert json.loads(fs.read_bytes(where))["token"] == "theirs"


def test_the_lease_is_renewed_while_its_writer_writes(url, monkeypatch):
    monkeypatch.setattr(lock, "LEASE_SECONDS", 0.3)  # renewed every 0.1 s
    w = store.create(url, small_meta())
    first = json.loads(fs.read_bytes(lock.lock_path(url)))["expires"]
    deadline = time.time() + 10
    while json.loads(fs.read_bytes(lock.lock_path(url)))["expires"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads(fs.read_bytes(lock.lock_path(url)))["expires"] > first
    w.finalize()
    assert not fs.exists(lock.lock_path(url))
