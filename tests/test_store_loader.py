"""The streaming loader: equal batches per rank, disjoint samples, seeded shuffles, done units only."""

import pytest
import torch
from torch.utils.data import DataLoader

from dfkd import store
from dfkd.store.loader import epoch_order
from tests.helpers import fill, small_meta


@pytest.fixture(scope="module")
def indexed_store(tmp_path_factory):
    """301 samples in units of 16 (the last one short); logits column 0 holds each sample's index."""
    path = str(tmp_path_factory.mktemp("loader") / "s.zarr")
    w = store.create(path, small_meta(num_samples=301, unit_size=16, logits_dtype="float32"))
    fill(w)
    w.finalize()
    return path


def run_epoch(path, rank, world, workers, in_ram, epoch=0, **kw):
    ds = store.StoreDataset(path, batch_size=10, rank=rank, world_size=world, in_ram=in_ram, seed=3, **kw)
    ds.set_epoch(epoch)
    batches = list(DataLoader(ds, batch_size=None, num_workers=workers))
    for b in batches:  # every field belongs to the sample it says it is
        assert torch.equal(b.logits[:, 0].long(), b.indices)
        assert b.images.dtype == torch.uint8 and b.labels.dtype == torch.int64
    return ds, batches


@pytest.mark.parametrize("in_ram", [False, True], ids=["stream", "ram"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_equal_batches_disjoint_samples(indexed_store, world, workers, in_ram):
    counts, seen = [], []
    for rank in range(world):
        ds, batches = run_epoch(indexed_store, rank, world, workers, in_ram)
        counts.append(len(batches))
        assert len(batches) == len(ds)
        idx = torch.cat([b.indices for b in batches]).tolist()
        assert len(idx) == 301 // world
        seen.append(set(idx))
    assert len(set(counts)) == 1, f"ranks got different batch counts: {counts}"
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 301 // world * world
    assert set().union(*seen) <= set(range(301))


def test_same_samples_with_and_without_workers(indexed_store):
    _, a = run_epoch(indexed_store, 1, 2, 0, False, epoch=5)
    _, b = run_epoch(indexed_store, 1, 2, 2, False, epoch=5)
    _, c = run_epoch(indexed_store, 1, 2, 0, True, epoch=5)
    assert set(torch.cat([x.indices for x in a]).tolist()) == set(torch.cat([x.indices for x in b]).tolist())
    # workers take contiguous runs of batches (each chunk read once), so only the interleaving differs
    assert sorted(len(x.indices) for x in a) == sorted(len(x.indices) for x in b)
    assert len(c) == len(a)


def test_shuffle_is_seeded_per_epoch(indexed_store):
    order = lambda e: torch.cat([b.indices for b in run_epoch(indexed_store, 0, 1, 0, False, epoch=e)[1]])
    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == list(range(301))
    _, plain = run_epoch(indexed_store, 0, 1, 0, False, shuffle=False)
    assert torch.cat([b.indices for b in plain]).tolist() == list(range(301))


def test_buffer_shuffle_keeps_chunks_together():
    """With a buffer of 2 units, consecutive 32 samples of the order come from 2 whole units."""
    meta = small_meta(num_samples=128, unit_size=16)
    order = epoch_order(meta, list(range(8)), seed=0, epoch=0, shuffle=True, buffer_units=2)
    assert sorted(order.tolist()) == list(range(128))
    for start in range(0, 128, 32):
        assert len(set((order[start:start + 32] // 16).tolist())) == 2


def test_drop_last(indexed_store):
    ds, batches = run_epoch(indexed_store, 0, 2, 0, False, drop_last=True)
    assert len(batches) == 150 // 10 == len(ds)
    assert all(len(b.indices) == 10 for b in batches)


@pytest.mark.parametrize("in_ram", [False, True])
def test_reader_during_writing_sees_only_finished_units(tmp_path, backend, in_ram):
    path = str(tmp_path / "s")
    meta = small_meta(num_samples=100, unit_size=10, logits_dtype="float32")
    w = store.create(path, meta, backend=backend)
    fill(w, units=[0, 2, 5])
    reader = store.open(path)
    assert len(reader) == 30 and not reader.complete
    with pytest.raises(store.StoreError, match="unit 1 .* not finished"):
        reader.read(5, 15)
    assert reader.read(20, 30).labels.shape == (10,)
    ds = store.StoreDataset(path, batch_size=4, in_ram=in_ram)
    got = torch.cat([b.indices for b in DataLoader(ds, batch_size=None)])
    assert sorted(got.tolist()) == list(range(0, 10)) + list(range(20, 30)) + list(range(50, 60))
    fill(w, units=[1])  # finished later: a new reader (or a refreshed one) sees it
    assert len(store.open(path)) == 40
    assert int(reader.done_mask(refresh=True).sum()) == 4


def test_in_ram_is_automatic_under_the_limit(indexed_store):
    assert store.StoreDataset(indexed_store, batch_size=8).in_ram
    assert not store.StoreDataset(indexed_store, batch_size=8, ram_limit=1000).in_ram


def test_bad_loader_arguments(indexed_store):
    with pytest.raises(store.StoreError, match="batch_size"):
        store.StoreDataset(indexed_store, batch_size=0)
    with pytest.raises(store.StoreError, match="rank 4 is outside"):
        store.StoreDataset(indexed_store, batch_size=8, rank=4, world_size=4)
