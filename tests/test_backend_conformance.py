"""Every backend passes the one conformance suite (tests/backend_conformance.py); a new backend adds a class here."""

from __future__ import annotations

from tests.backend_conformance import BackendConformance


class TestZarr(BackendConformance):
    backend, suffix = "zarr", ".zarr"
    write_steps = ("zarr.storage:LocalStore.set", "dfkd.store.toolbox.fs:write_atomic", "dfkd.store.toolbox.fs:rename")


class TestWebDataset(BackendConformance):
    backend, suffix = "webdataset", ".wds"
