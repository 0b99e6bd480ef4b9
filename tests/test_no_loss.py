"""Nothing a user owns is destroyed: convert never eats its source or an old destination; artifacts are atomic."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from dfkd import store
from dfkd.pipelines.cli import cli
from dfkd.store.toolbox import fs
from dfkd.store.convert import convert
from tests.helpers import fill, small_meta, tree_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("spelling", ["same", "trailing-slash", "relative", "symlink"])
def test_convert_onto_its_source_is_refused(tmp_path, full_store, spelling, monkeypatch):
    before = tree_bytes(full_store)
    dst = {"same": full_store, "trailing-slash": full_store + "/", "relative": None, "symlink": None}[spelling]
    if spelling == "relative":
        monkeypatch.chdir(os.path.dirname(full_store))
        dst = os.path.join(".", os.path.basename(full_store))
    if spelling == "symlink":
        dst = str(tmp_path / "link")
        os.symlink(full_store, dst)
    res = CliRunner().invoke(cli, ["store", "convert", full_store, dst, "--overwrite"])
    assert res.exit_code == 2 and "is the source store itself" in res.output
    assert tree_bytes(full_store) == before


def test_failed_convert_leaves_the_old_destination_as_it_was(tmp_path, full_store, monkeypatch):
    dst = str(tmp_path / "old.zarr")
    w = store.create(dst, small_meta(base_seed=99))
    fill(w)
    w.finalize()
    before = tree_bytes(dst)
    calls = {"n": 0}
    real = store.StoreWriter.write_unit

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(store.StoreWriter, "write_unit", failing)
    with pytest.raises(OSError):
        convert(full_store, dst, overwrite=True)
    assert tree_bytes(dst) == before
    assert sorted(os.listdir(tmp_path)) == sorted(["old.zarr", os.path.basename(full_store)])  # no temporary left
    monkeypatch.setattr(store.StoreWriter, "write_unit", real)
    convert(full_store, dst, overwrite=True)  # and the same convert then succeeds
    assert store.open(dst).meta.base_seed == store.open(full_store).meta.base_seed


def test_convert_after_a_killed_convert(tmp_path, full_store):
    dst = str(tmp_path / "d.wds")
    leftover = fs.sibling(dst, "converting")
    os.makedirs(leftover)
    (tmp_path / leftover / "shard-000000.tar.partial").write_bytes(b"half")
    convert(full_store, dst)
    assert store.open(dst).complete and not os.path.exists(leftover)


def test_write_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        fs.write_atomic(str(target), b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.json"]


def test_resume_of_a_finished_generator_store_changes_no_file(tmp_path):
    from tests.synth_helpers import save_tiny_teacher

    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    args = ["synth", "--num-images", "32", "--batch-size", "16", "--device", "cpu", "--teacher", t, "--method",
            "adversarial", "--student", "lenet5_half", "--rounds", "2", "--out", str(tmp_path / "adv.zarr"),
            "--set", "latent_dim=16", "--set", "width=8", "--set", "batch_size=8", "--set", "student_steps=1"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    before = tree_bytes(tmp_path)
    res = CliRunner().invoke(cli, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert tree_bytes(tmp_path) == before  # the proxy student is the trained one, not a fresh one


def test_student_is_saved_with_its_generator_before_the_fill(tmp_path, monkeypatch):
    """A kill during the fill must find the trained proxy student already on disk."""
    from tests.synth_helpers import save_tiny_teacher

    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    seen = {}
    real = store.StoreWriter.write_unit

    def spy(self, *a, **k):
        seen.setdefault("files", sorted(p for p in os.listdir(tmp_path) if p.endswith(".pt")))
        return real(self, *a, **k)

    monkeypatch.setattr(store.StoreWriter, "write_unit", spy)
    args = ["synth", "--num-images", "32", "--batch-size", "16", "--device", "cpu", "--teacher", t, "--method",
            "dafl", "--student", "lenet5_half", "--rounds", "2", "--out", str(tmp_path / "d.zarr"),
            "--set", "latent_dim=16", "--set", "width=8", "--set", "batch_size=8"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert seen["files"] == ["d.generator-train.pt", "d.generator.pt", "d.student.pt", "t.pt"]


_KILL_AT = """
import os, sys
import zarr
from dfkd import store
from dfkd.store.toolbox import fs
from tests.helpers import small_meta
steps = {"n": 0}
def killer(real):
    def step(*a, **k):
        steps["n"] += 1
        if steps["n"] == int(sys.argv[2]):
            os._exit(9)  # as SIGKILL: no cleanup runs
        return real(*a, **k)
    return step
zarr.Group.create_array = killer(zarr.Group.create_array)
zarr.create_group = killer(zarr.create_group)
fs.rename = killer(fs.rename)
store.create_or_resume(sys.argv[1], small_meta(), resume=True, backend=sys.argv[3])
"""


@pytest.mark.parametrize("backend,steps", [("zarr", 7), ("webdataset", 1)])
def test_a_kill_anywhere_in_store_creation_leaves_what_resume_and_overwrite_accept(tmp_path, backend, steps):
    import subprocess
    import sys

    for kill_at in range(1, steps + 2):
        path = str(tmp_path / f"s{kill_at}")
        proc = subprocess.run([sys.executable, "-c", _KILL_AT, path, str(kill_at), backend], cwd=REPO)  # tests.helpers imports from the checkout
        assert proc.returncode in (0, 9)
        w = store.create_or_resume(path, small_meta(), resume=True, backend=backend)
        fill(w)
        assert store.open(path).complete
        store.create(path, small_meta(), backend=backend, overwrite=True)  # --overwrite accepts it as well


def test_two_creators_at_once_get_one_line_and_one_store(tmp_path, monkeypatch):
    """The second of two processes creating the same store finds the first one's in place: one line, no damage."""
    import dfkd.store.access as access

    path = str(tmp_path / "s.zarr")
    first = store.create(path, small_meta())
    fill(first)
    before = tree_bytes(path)
    monkeypatch.setattr(access, "check_target", lambda p, overwrite: False)  # both checked before either renamed
    with pytest.raises(store.StoreError, match="another process created a store at .* at the same moment"):
        store.create(path, small_meta())
    assert tree_bytes(path) == before
    assert sorted(os.listdir(tmp_path)) == [".s.zarr.lock", "s.zarr"]  # the first writer's lock, while it writes
