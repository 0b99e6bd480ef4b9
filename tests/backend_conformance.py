"""What every store backend must do, written once (as zarr-python's StoreTests): a backend's test module subclasses
`BackendConformance` with its name and path suffix and gets every test. The checks know no backend's layout: they
damage every file the store holds, kill a write at every step, open a second writer, and inflate the declared size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from typing import ClassVar

import numpy as np
import pytest

from dfkd import store
from dfkd.store.report import verify
from tests.helpers import expected, fill, small_meta, unit_content
from tests.kill_at import KILLED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = dict(num_samples=40, unit_size=16)  # three units, the last one short

# A run that creates (or resumes) a store and writes it whole, killed after the n-th call of any write step.
_WRITE_KILLED = """
import sys
from dfkd import store
from dfkd.store.report import verify
from tests.helpers import fill, small_meta
from tests.kill_at import kill_after
import json
path, backend, n, steps, options = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(","), sys.argv[5]
kill_after(n, *steps)
w = store.create_or_resume(path, small_meta(num_samples=40, unit_size=16), resume=True, backend=backend,
                           **json.loads(options))
fill(w)
w.finalize()
"""


def _files(root: str) -> list[str]:
    """Every regular file under `root`, relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


def _damage(path: str, kind: str, outside: str) -> None:
    """Damage one file of a store: cut it in half, flip a byte in its middle, swell it to a sparse gigabyte (a few
    KB on disk, a gigabyte to read), delete it, or make it a link."""
    if kind == "swell":
        os.truncate(path, 1 << 30)
    elif kind == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif kind == "flip":
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            if data:
                data[len(data) // 2] ^= 0x5A
                f.seek(0)
                f.write(data)
    elif kind == "delete":
        os.remove(path)
    else:  # a link to a copy of itself outside the store: the same bytes, read from elsewhere
        shutil.copy(path, outside)
        os.remove(path)
        os.symlink(outside, path)


def _same(a: store.Samples, b: store.Samples, what: str) -> None:
    """Bit-exact equality of images, logits and labels."""
    for field in ("images", "logits", "labels"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {field} {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=f"{what}: {field} differ")


def _one_line(exc: BaseException) -> bool:
    return isinstance(exc, store.StoreError) and "\n" not in str(exc).strip()


class BackendConformance:
    """The tests every backend passes; subclasses set `backend` and `suffix` (and `write_steps`: the calls a write
    is made of, module:attribute paths, at each of which a kill is tried)."""

    backend: ClassVar[str]
    suffix: ClassVar[str]
    options: ClassVar[dict] = {}  # the backend's layout options (a Zarr store's chunk_size, ...)
    write_steps: ClassVar[tuple[str, ...]] = ("dfkd.store.toolbox.fs:write_atomic", "dfkd.store.toolbox.fs:rename")

    def whole(self, root, name: str = "s") -> str:
        path = str(root / f"{name}{self.suffix}")
        w = store.create(path, small_meta(**META), backend=self.backend, **self.options)
        fill(w)
        w.finalize()
        return path

    def test_a_store_reads_back_exactly_what_was_written_and_verifies(self, tmp_path):
        path = self.whole(tmp_path)
        r = store.open(path)
        assert r.complete and r.backend.name == self.backend
        _same(r.read(0, r.meta.num_samples), expected(r.meta), "read back")
        assert verify(path).ok

    def test_any_file_damaged_any_way_never_reads_as_other_data(self, tmp_path):
        """Each file of the store cut, flipped, swollen, deleted or made a link: a reader (and verify) gives one
        line, or reads fewer finished units (to be re-made by --resume), but never returns a unit with other
        content, and never allocates more than a few times the store (a swollen file is not read whole)."""
        (tmp_path / "base").mkdir()
        base = self.whole(tmp_path / "base")
        meta = store.open(base).meta
        outcomes = set()
        for i, rel in enumerate(_files(base)):
            for kind in ("truncate", "flip", "swell", "delete", "link"):
                case = str(tmp_path / f"case{i}-{kind}{self.suffix}")
                shutil.copytree(base, case)
                _damage(os.path.join(case, rel), kind, str(tmp_path / f"outside{i}-{kind}"))
                tracemalloc.start()
                try:
                    r = store.open(case)
                    done = r.done_units()
                    for u in done:
                        _same(r.read(*meta.unit_range(u)), unit_content(meta, u), f"{rel} {kind}: unit {u}")
                    outcomes.add("fewer units" if len(done) < meta.num_units else "unchanged")
                except store.StoreError as exc:
                    assert _one_line(exc), f"{rel} {kind}: {exc!r}"
                    outcomes.add("refused")
                report = verify(case)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                assert peak < 32 << 20, f"{rel} {kind}: {peak / 2**20:.0f} MiB allocated reading a store of a few KB"
                assert all("\n" not in p.strip() for p in report.problems), f"{rel} {kind}: {report.problems}"
                if kind == "link":
                    assert not report.ok, f"{rel} made a link: verify said OK"
        assert "refused" in outcomes

    def test_a_kill_at_any_write_step_resumes_to_the_whole_store(self, tmp_path):
        """Killed (no cleanup) after each write step in turn, then resumed: the store one whole run writes, and an
        --overwrite accepts what the kill left."""
        from tests.kill_at import count_calls

        (tmp_path / "counted").mkdir()
        with count_calls(*self.write_steps) as calls:
            self.whole(tmp_path / "counted")
        assert calls[0] > 3, f"{self.write_steps} saw only {calls[0]} calls: name the backend's write steps"
        for n in range(1, calls[0] + 1):
            path = str(tmp_path / f"k{n}{self.suffix}")
            proc = subprocess.run([sys.executable, "-c", _WRITE_KILLED, path, self.backend, str(n),
                                   ",".join(self.write_steps), json.dumps(self.options)], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == KILLED, f"step {n}: {proc.stderr}"
            w = store.create_or_resume(path, small_meta(**META), resume=True, backend=self.backend, **self.options)
            fill(w)
            w.finalize()
            r = store.open(path)
            assert r.complete, f"killed at step {n}"
            _same(r.read(0, r.meta.num_samples), expected(r.meta), f"killed at step {n}")
            assert verify(path).ok, f"killed at step {n}: {verify(path).problems}"

    def test_a_second_writer_is_refused_in_one_line_and_the_first_goes_on(self, tmp_path):
        """Another process opening the store to write (resume, overwrite, append) while this one writes it."""
        path = str(tmp_path / f"s{self.suffix}")
        first = store.create(path, small_meta(**META), backend=self.backend, **self.options)
        fill(first, units=[0])
        for second in ("store.open_writer(p)", "store.create(p, m, backend=b, overwrite=True)",
                       "store.create_or_resume(p, m, resume=True, backend=b)"):
            code = (f"import sys\nfrom dfkd import store\nfrom tests.helpers import small_meta\n"
                    f"p, b, m = sys.argv[1], sys.argv[2], small_meta(num_samples=40, unit_size=16)\n"
                    f"try:\n    {second}\nexcept store.StoreError as e:\n    print(e)\n    sys.exit(3)\n")
            proc = subprocess.run([sys.executable, "-c", code, path, self.backend], cwd=REPO, capture_output=True,
                                  text=True, timeout=120)
            assert proc.returncode == 3, f"{second}: {proc.stdout}{proc.stderr}"
            assert "is being written by" in proc.stdout and proc.stdout.strip().count("\n") == 0, proc.stdout
        fill(first)
        first.finalize()
        assert store.open(path).complete and verify(path).ok
        store.open_writer(path).finalize()  # let go: the next writer gets it

    def test_a_store_declaring_a_huge_size_is_refused_in_one_line_without_allocating_it(self, tmp_path):
        path = self.whole(tmp_path)
        holders = [f for f in _files(path) if b'"num_samples": 40' in open(os.path.join(path, f), "rb").read()]
        assert holders, "no metadata file declares num_samples"
        for rel in holders:
            with open(os.path.join(path, rel), "rb") as f:
                text = f.read()
            with open(os.path.join(path, rel), "wb") as f:
                f.write(text.replace(b'"num_samples": 40', b'"num_samples": ' + json.dumps(64 * 10**9).encode()))
        tracemalloc.start()
        try:
            with pytest.raises(store.StoreError) as e:
                r = store.open(path)
                r.read(0, r.meta.num_samples)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert _one_line(e.value)
        assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated refusing it"
