"""Distillation from several stores at once: their union read once per epoch with one seeded shuffle, an
equal-share draw at a fixed image count, and stores of another teacher or shape refused in one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from dfkd import store
from dfkd.distill.sources import StoreSource
from dfkd.pipelines.cli import cli
from tests.helpers import expected, fill, small_meta


def _store(path, num_samples, unit_size, teacher="fp-a", seed=7, shape=(3, 8, 8), partial=None):
    meta = small_meta(num_samples, unit_size, image_shape=shape, logits_dtype="float32", base_seed=seed)
    meta = dataclasses.replace(meta, provenance={**meta.provenance, "teacher_fingerprint": teacher})
    w = store.create(str(path), meta)
    fill(w, partial)
    w.finalize()
    return str(path), meta


@pytest.mark.parametrize("in_ram", [True, False])
@pytest.mark.parametrize("world", [1, 2])
def test_union_reads_every_sample_of_every_store_once_per_epoch(tmp_path, in_ram, world):
    a, ma = _store(tmp_path / "a.zarr", 70, 16)
    b, mb = _store(tmp_path / "b.zarr", 50, 8, seed=11)
    want = [expected(ma), expected(mb)]
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            ds = store.StoreDataset([a, b], 16, seed=3, in_ram=in_ram, rank=rank, world_size=world)
            ds.set_epoch(epoch)
            for batch in ds:
                for i, img, logit in zip(batch.indices.tolist(), batch.images.numpy(), batch.logits.numpy()):
                    k, j = (0, i) if i < 70 else (1, i - 70)
                    np.testing.assert_array_equal(img, want[k].images[j])
                    assert logit[0] == want[k].logits[j][0]
                    seen.append(i)
        assert len(seen) == len(set(seen)) == 120 // world * world  # each sample once (< world left out)
        assert set(seen) <= set(range(120))
    orders = []
    for epoch in (0, 1):
        ds = store.StoreDataset([a, b], 16, seed=3, in_ram=in_ram)
        ds.set_epoch(epoch)
        orders.append(np.concatenate([x.indices.numpy() for x in ds]))
    assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
    mixed = [(o < 70).mean() for o in np.array_split(orders[0], 4)]
    assert all(0 < m < 1 for m in mixed)  # one shuffle over both stores, not one store after the other


def test_union_skips_unfinished_units_and_one_store_reads_as_before(tmp_path):
    a, ma = _store(tmp_path / "a.zarr", 64, 16, partial=[0, 2])
    b, _ = _store(tmp_path / "b.zarr", 32, 16, seed=11)
    ds = store.StoreDataset([a, b], 8, seed=0)
    idx = np.sort(np.concatenate([x.indices.numpy() for x in ds]))
    np.testing.assert_array_equal(idx, np.r_[0:16, 32:48, 64:96])
    one, alone = store.StoreDataset([a], 8, seed=0), store.StoreDataset(a, 8, seed=0)
    np.testing.assert_array_equal(np.concatenate([x.indices.numpy() for x in one]),
                                  np.concatenate([x.indices.numpy() for x in alone]))


def test_max_images_takes_an_equal_share_of_each_store_in_whole_units(tmp_path):
    a, _ = _store(tmp_path / "a.zarr", 64, 16)
    b, _ = _store(tmp_path / "b.zarr", 64, 16, seed=11)
    ds = store.StoreDataset([a, b], 16, seed=5, max_images=64)
    idx = np.concatenate([x.indices.numpy() for x in ds])
    assert len(idx) == 64 and (idx < 64).sum() == 32
    assert len(set((idx // 16).tolist())) == 4  # whole units
    again = np.concatenate([x.indices.numpy() for x in store.StoreDataset([a, b], 16, seed=5, max_images=64)])
    np.testing.assert_array_equal(np.sort(idx), np.sort(again))
    with pytest.raises(store.StoreError, match="fewer than its share"):
        store.StoreDataset([a, b], 16, max_images=1000)


@pytest.mark.parametrize("kind, match", [("teacher", "differ in teacher"), ("shape", "image shape")])
def test_stores_of_another_teacher_or_shape_are_refused_in_one_line(tmp_path, kind, match):
    a, _ = _store(tmp_path / "a.zarr", 32, 16)
    b, _ = _store(tmp_path / "b.zarr", 32, 16, **({"teacher": "fp-b"} if kind == "teacher" else {"shape": (1, 8, 8)}))
    with pytest.raises(store.StoreError, match=match):
        StoreSource([a, b], 16)
    res = CliRunner().invoke(cli, ["distill", "--store", a, "--store", b, "--student", "lenet5_half", "--epochs", "1",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code != 0 and match in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_distill_cli_trains_on_the_union(tmp_path):
    a, _ = _store(tmp_path / "a.zarr", 32, 16, shape=(1, 28, 28))
    b, _ = _store(tmp_path / "b.zarr", 48, 16, seed=11, shape=(1, 28, 28))
    res = CliRunner().invoke(cli, ["distill", "--store", a, "--store", b, "--student", "lenet5_half", "--epochs", "1",
                                   "--batch-size", "16", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "5 batches read" in res.output and "a.zarr+" in res.output
