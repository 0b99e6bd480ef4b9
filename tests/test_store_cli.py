"""`dfkd store info | verify | convert | preview` on good, unfinished and damaged stores."""

import io
import json
import os
import tarfile

import numpy as np
import zarr
from click.testing import CliRunner
from PIL import Image

from dfkd import store
from dfkd.pipelines.cli import cli
from tests.helpers import expected, fill, small_meta


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_info_reports_counts_and_provenance(full_store):
    res = invoke("store", "info", full_store, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    exp = expected(small_meta())
    assert d["complete"] and d["units_done"] == d["units_total"] == 7
    assert d["label_counts"] == np.bincount(exp.labels[exp.labels >= 0], minlength=10).tolist()
    assert d["unlabelled"] == int((exp.labels == -1).sum())
    assert d["teacher_argmax_counts"] == np.bincount(exp.logits.astype(np.float32).argmax(1), minlength=10).tolist()
    assert d["provenance"] == {"method": "test", "hparams": {"lr": 0.25}}
    text = invoke("store", "info", full_store)
    assert text.exit_code == 0 and "100 readable of 100" in text.output and "complete" in text.output


def test_verify_ok(full_store):
    res = invoke("store", "verify", full_store)
    assert res.exit_code == 0 and res.output.startswith("OK:")


def test_verify_flags_unfinished_units(tmp_path, backend):
    path = str(tmp_path / "s")
    fill(store.create(path, small_meta(), backend=backend), units=[0, 1, 2, 5])
    res = invoke("store", "verify", path)
    assert res.exit_code == 1
    assert "3 of 7 units are not finished (units 3-4, 6)" in res.output


def test_verify_flags_nan_logits_and_bad_labels(tmp_path):
    path = str(tmp_path / "s.zarr")
    fill(store.create(path, small_meta()))
    g = zarr.open_group(path, mode="r+")
    g["logits"][20, 3] = np.nan
    g["labels"][40] = 12
    res = invoke("store", "verify", path)
    assert res.exit_code == 1
    assert "unit 1 (samples 16..31): 1 samples have NaN or inf logits" in res.output
    assert "unit 2 (samples 32..47): labels outside [-1, 10)" in res.output
    assert "unit 1 (samples 16..31) does not match its checksum (logits missing or damaged)" in res.output


def test_verify_flags_corrupt_chunk(tmp_path):
    path = str(tmp_path / "s.zarr")
    fill(store.create(path, small_meta()))
    chunk = os.path.join(path, "images", "c", "2", "0", "0", "0")
    with open(chunk, "r+b") as f:
        f.write(b"garbage!" * 4)
    res = invoke("store", "verify", path)
    assert res.exit_code == 1 and "unit 2 cannot be decoded" in res.output


def test_verify_and_reader_refuse_pickled_member(tmp_path):
    path = str(tmp_path / "s.wds")
    fill(store.create(path, small_meta()))
    shard = os.path.join(path, "shard-000001.tar")
    with tarfile.open(shard, "a") as tar:
        payload = b"\x80\x04K\x01."  # a pickle: must never be unpickled
        info = tarfile.TarInfo("0000000016.pyd")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    res = invoke("store", "verify", path)
    assert res.exit_code == 1 and "foreign member '0000000016.pyd'" in res.output
    reader = store.open(path)
    try:
        reader.read_unit(1)
        raise AssertionError("a pickled member must be refused")
    except store.StoreError as exc:
        assert "pickles are refused" in str(exc)
    assert reader.read_unit(0).labels.shape == (16,)  # the other shards stay readable


def test_verify_refuses_foreign_dir(tmp_path):
    res = invoke("store", "verify", str(tmp_path))
    assert res.exit_code == 1 and "not a dfkd store" in res.output


def test_preview_grid(tmp_path, full_store):
    out = str(tmp_path / "grid.png")
    res = invoke("store", "preview", full_store, "--out", out, "--per-class", "4")
    assert res.exit_code == 0, res.output
    img = Image.open(out)
    # 8x8 images are scaled to 32 px; 10 class rows, 4 columns, 2 px gaps, 28 px label margin
    assert img.size == (28 + 4 * 34, 10 * 34)
    # the first tile of class k shows the first stored sample of class k
    exp = expected(small_meta())
    cls = np.where(exp.labels >= 0, exp.labels, exp.logits.astype(np.float32).argmax(1))
    first = int(np.flatnonzero(cls == 0)[0])
    tile = np.asarray(img)[0:32:4, 28:60:4]
    np.testing.assert_array_equal(tile, np.moveaxis(exp.images[first], 0, -1))
