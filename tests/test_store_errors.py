"""Bad input gets one clear error line and leaves existing data intact."""

import json
import os

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from dfkd import store
from dfkd.pipelines.cli import cli
from tests.helpers import expected, fill, small_meta, tree_bytes, unit_content
from tests.test_store_roundtrip import assert_same


def test_directory_that_is_not_a_store(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"not an image really")
    with pytest.raises(store.StoreError, match="not a dfkd store") as e:
        store.open(str(d))
    assert "\n" not in str(e.value)
    with pytest.raises(store.StoreError, match="not a dfkd store; refusing to overwrite"):
        store.create(str(d), small_meta(), overwrite=True)
    assert (d / "cat.jpg").read_bytes() == b"not an image really"


def test_missing_path_and_file_path(tmp_path):
    with pytest.raises(store.StoreError, match="does not exist"):
        store.open(str(tmp_path / "nope.zarr"))
    f = tmp_path / "file.zarr"
    f.write_text("x")
    with pytest.raises(store.StoreError, match="is a file"):
        store.open(str(f))


def test_foreign_zarr_group(tmp_path):
    path = str(tmp_path / "other.zarr")
    g = zarr.create_group(store=path, attributes={"project": "someone else"})
    g.create_array("x", shape=(4,), dtype="int8")
    with pytest.raises(store.StoreError, match="not a dfkd store"):
        store.open(path)


def test_foreign_webdataset_folder(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"name": "imagenet shards"}))
    with pytest.raises(store.StoreError, match="not a dfkd store"):
        store.open(str(d))


def _edit_metadata(path, backend_name, **changes):
    """Change a finished store's dfkd metadata in place, as another release (or a hand) would."""
    if backend_name == "zarr":
        g = zarr.open_group(path, mode="r+")
        g.attrs["dfkd"] = {**g.attrs["dfkd"], **changes}
    else:
        doc = json.load(open(os.path.join(path, "meta.json")))
        doc["dfkd"].update(changes)
        json.dump(doc, open(os.path.join(path, "meta.json"), "w"))


@pytest.mark.parametrize("backend_name", ["zarr", "webdataset"])
def test_other_schema_version(tmp_path, backend_name):
    path = str(tmp_path / "s")
    fill(store.create(path, small_meta(), backend=backend_name))
    _edit_metadata(path, backend_name, schema_version=99)
    with pytest.raises(store.StoreError, match="schema version 99, this dfkd reads version 1"):
        store.open(path)


@pytest.mark.parametrize("backend_name", ["zarr", "webdataset"])
def test_metadata_from_a_newer_release_says_upgrade_not_corrupt(tmp_path, backend_name):
    path = str(tmp_path / "s")
    meta = small_meta()
    meta.provenance["dfkd_version"] = "9.0"
    fill(store.create(path, meta, backend=backend_name))
    _edit_metadata(path, backend_name, crop_labels=4)
    with pytest.raises(store.StoreError, match=r"written by a newer dfkd \(9.0\) with metadata this release does "
                                               r"not know \(crop_labels\); upgrade dfkd"):
        store.open(path)


def test_array_that_disagrees_with_metadata(tmp_path):
    path = str(tmp_path / "s.zarr")
    store.create(path, small_meta())
    g = zarr.open_group(path, mode="r+")
    del g["logits"]
    g.create_array("logits", shape=(100, 5), dtype="float16", chunks=(16, 5))
    with pytest.raises(store.StoreError, match="array 'logits' is float16\\(100, 5\\)"):
        store.open(path)


@pytest.mark.parametrize("bad,match", [
    (lambda r: (r.images.astype(np.float32), r.logits, r.labels), "images must be a uint8"),
    (lambda r: (r.images[:, :, :4], r.logits, r.labels), r"images have shape \(16, 3, 4, 8\)"),
    (lambda r: (r.images[:15], r.logits[:15], r.labels[:15]), r"expects \(16, 3, 8, 8\)"),
    (lambda r: (r.images, r.logits[:, :9], r.labels), r"logits have shape \(16, 9\)"),
    (lambda r: (r.images, r.logits, np.full(16, 10)), r"labels must lie in \[-1, 10\)"),
    (lambda r: (r.images, r.logits, np.full(16, -2)), r"labels must lie in \[-1, 10\)"),
    (lambda r: (r.images, np.full((16, 10), np.nan), r.labels), "NaN or inf"),
    (lambda r: (r.images, np.full((16, 10), 1e6), r.labels), "NaN or inf"),  # overflows float16
    (lambda r: (r.images, r.logits, r.labels.astype(np.float64)), "labels must be integers"),
])
def test_bad_records_are_refused_and_nothing_is_lost(tmp_path, backend, bad, match):
    path = str(tmp_path / "s")
    meta = small_meta()
    w = store.create(path, meta, backend=backend)
    fill(w, units=[0, 1])
    before = tree_bytes(path)
    with pytest.raises(store.StoreError, match=match) as e:
        w.write_unit(1, *bad(unit_content(meta, 1)))
    assert "\n" not in str(e.value)
    assert tree_bytes(path) == before
    assert_same(store.open(path).read(0, 32), expected(meta).take(slice(0, 32)))


def test_create_over_existing_store_needs_overwrite(tmp_path, full_store):
    before = tree_bytes(full_store)
    with pytest.raises(store.StoreError, match="already exists.*--resume.*--overwrite"):
        store.create(full_store, small_meta(base_seed=99))
    assert tree_bytes(full_store) == before


def test_bad_meta_values():
    with pytest.raises(store.StoreError, match="image_shape"):
        store.StoreMeta(num_samples=10, image_shape=(8, 8), num_classes=10, unit_size=4)
    with pytest.raises(store.StoreError, match="logits_dtype"):
        store.StoreMeta(num_samples=10, image_shape=(1, 8, 8), num_classes=10, unit_size=4, logits_dtype="int8")
    with pytest.raises(store.StoreError, match="mean has 1 values but images have 3"):
        store.StoreMeta(num_samples=10, image_shape=(3, 8, 8), num_classes=10, unit_size=4, mean=(0.5,))


def test_cli_prints_one_line_and_exits_2(tmp_path):
    d = tmp_path / "notastore"
    d.mkdir()
    (d / "x.txt").write_text("hello")
    res = CliRunner().invoke(cli, ["store", "info", str(d)])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0
    assert res.output.startswith("error: ") and "not a dfkd store" in res.output
    assert "Traceback" not in res.output
