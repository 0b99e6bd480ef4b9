"""Every backend passes the one conformance suite (tests/backend_conformance.py); a new backend adds a class here."""

from __future__ import annotations

from tests.backend_conformance import BackendConformance


class TestZarr(BackendConformance):
    backend, suffix = "zarr", ".zarr"
    write_steps = ("zarr.storage:LocalStore.set", "dfkd.store.toolbox.fs:write_atomic", "dfkd.store.toolbox.fs:rename")


class TestZarrSharded(TestZarr):
    options = {"chunk_size": 4}  # a unit is one shard of four inner chunks


class TestZarrUncompressed(TestZarr):
    options = {"compressor": "none"}


class TestWebDataset(BackendConformance):
    backend, suffix = "webdataset", ".wds"


class TestWebDatasetNpy(TestWebDataset):
    options = {"image_format": "npy"}
