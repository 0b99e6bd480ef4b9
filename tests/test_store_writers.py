"""Concurrent writers lose nothing; a killed writer resumes to the exact uninterrupted store."""

import dataclasses
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dfkd.store.toolbox.identity import ResumeError

from dfkd import store
from tests.helpers import expected, fill, small_meta, write_share
from tests.test_store_roundtrip import assert_same

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_four_processes_write_disjoint_units(tmp_path, backend):
    path = str(tmp_path / "s")
    meta = small_meta(num_samples=500, unit_size=8)  # 63 units, the last one short
    store.create(path, meta, backend=backend)
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        written = pool.starmap(write_share, [(path, r, 4) for r in range(4)])
    assert sum(written) == meta.num_units
    writer = store.open_writer(path)
    writer.finalize()
    reader = store.open(path)
    assert reader.complete and len(reader) == 500
    assert_same(reader.read(0, 500), expected(meta))


def _done_count(path: str) -> int:
    try:
        return int(store.open(path).done_mask(refresh=True).sum())
    except store.StoreError:
        return 0


@pytest.mark.parametrize("backend_name", ["zarr", "webdataset"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, backend_name):
    path = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers", path, backend_name, "0.03"], cwd=REPO)
    deadline = time.time() + 60
    while _done_count(path) < 4 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader = store.open(path)
    done = int(reader.done_mask(refresh=True).sum())
    assert 4 <= done < reader.meta.num_units, "the writer must be killed mid-run"
    # a reader of the killed store sees only finished units
    assert len(reader) == sum(hi - lo for lo, hi in map(reader.meta.unit_range, reader.done_units()))

    from tests.helpers import slow_run
    slow_run(path, backend_name, 0.0)  # resume: same settings, fills exactly the missing units

    fresh = str(tmp_path / "fresh")
    slow_run(fresh, backend_name, 0.0)
    a, b = store.open(path), store.open(fresh)
    assert a.complete and b.complete
    assert store.plan_key(a.meta) == store.plan_key(b.meta)
    assert_same(a.read(0, a.meta.num_samples), b.read(0, b.meta.num_samples))


def test_torn_unit_is_rewritten_on_resume(tmp_path):
    """A writer that died after a unit's image chunk but before its done mark leaves the unit pending."""
    import zarr

    path = str(tmp_path / "s.zarr")
    meta = small_meta()
    w = store.create(path, meta)
    fill(w, units=[0, 1])
    lo, hi = meta.unit_range(2)
    zarr.open_group(path, mode="r+")["images"][lo:hi] = 255  # torn write: data without its done mark
    w = store.create_or_resume(path, meta, resume=True)
    assert w.pending_units() == list(range(2, meta.num_units))
    fill(w)
    assert_same(store.open(path).read(0, meta.num_samples), expected(meta))


def test_resume_with_other_settings_is_refused(tmp_path):
    path = str(tmp_path / "s.zarr")
    store.create(path, small_meta(base_seed=1))
    with pytest.raises(ResumeError, match="base_seed was 1, now 2"):
        store.create_or_resume(path, small_meta(base_seed=2), resume=True)
    with pytest.raises(ResumeError, match=r'provenance.hparams.lr was 0.25, now 0.5'):
        meta = small_meta(base_seed=1)
        store.create_or_resume(path, dataclasses.replace(meta, provenance={**meta.provenance, "hparams": {"lr": 0.5}}),
                               resume=True)


def test_resume_ignores_creation_time(tmp_path):
    path = str(tmp_path / "s.zarr")
    meta = small_meta()
    later = store.StoreMeta(**{**meta.__dict__, "provenance": {**meta.provenance, "created": "later"}})
    store.create(path, meta)
    assert store.create_or_resume(path, later, resume=True).pending_units() == list(range(meta.num_units))


def test_pending_units_split_across_ranks(tmp_path):
    path = str(tmp_path / "s.zarr")
    w = store.create(path, small_meta(num_samples=100, unit_size=10))
    fill(w, units=[0, 3])
    assert np.array_equal(w.done_mask(), np.isin(np.arange(10), [0, 3]))
    static = [w.pending_units(r, 3) for r in range(3)]
    assert static == [[6, 9], [1, 4, 7], [2, 5, 8]]  # u % 3 == rank, minus the done ones
    snapshot = w.done_mask()
    balanced = [w.pending_units(r, 3, done=snapshot) for r in range(3)]
    assert balanced == [[1, 5, 8], [2, 6, 9], [4, 7]]  # the snapshot's pending units dealt out evenly
    fill(w, units=[1])
    assert w.pending_units(0, 3, done=snapshot) == [1, 5, 8]  # the shared snapshot, not the live mask


def test_the_cli_names_exactly_the_registered_backends():
    """`dfkd store convert --backend` lists store.backend_choices.BACKENDS without importing the backends; the
    registry the backends fill must hold exactly those names."""
    from dfkd.store.backend_choices import BACKENDS
    from dfkd.store.backends import list_backends

    assert sorted(BACKENDS) == list_backends()
