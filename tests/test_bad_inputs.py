"""A table of bad inputs a user or an ordinary fault can cause: each gets its exit code, exactly one line on
stderr, no traceback, and every file that existed before is byte-identical afterwards."""

from __future__ import annotations

import errno
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from dfkd import store
from dfkd.pipelines.cli import cli
from dfkd.store.schema import checksums
from dfkd.synth.record import record
from tests.helpers import tree_bytes
from tests.synth_helpers import SHAPE, save_tiny_teacher, tiny_teacher


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A teacher, a finished Zarr store and a WebDataset store made from it, a record of another teacher."""
    root = tmp_path_factory.mktemp("base")
    save_tiny_teacher(str(root / "t.pt"))
    res = CliRunner().invoke(cli, ["synth", "--teacher", str(root / "t.pt"), "--method", "noise", "--num-images", "32",
                                   "--batch-size", "16", "--device", "cpu", "--out", str(root / "s.zarr")])
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(cli, ["store", "convert", str(root / "s.zarr"), str(root / "s.wds")]).exit_code == 0
    other, _ = tiny_teacher(bn=False, seed=5)
    data = [(torch.randn(32, *SHAPE), torch.randint(0, 10, (32,)))]
    record(other, data).save(str(root / "other.record.safetensors"))
    return root


def _zarr_set(path, name, index, value):
    """Change stored values, keeping checksums that match (as a foreign writer that stored them would)."""
    g = zarr.open_group(path, mode="r+")
    g[name][index] = value
    backend = store.open(path).backend
    for u in range(g["done"].shape[0]):
        g["checksums"][u] = checksums(backend.read_unit(u, check=False))


def _zarr_attr(path, **changes):
    g = zarr.open_group(path, mode="r+")
    attrs = dict(g.attrs["dfkd"])
    attrs.update(changes)
    g.attrs["dfkd"] = attrs


def _tar_member(ws, kind):
    shard = ws / "s.wds" / "shard-000001.tar"
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("../escape.png" if kind == "dotdot" else "0000000016.link")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            import io

            tar.addfile(info, io.BytesIO(b"abc"))


def _crafted_teacher(ws, arch="torch.hub:load"):
    torch.save({"format": "dfkd-model", "version": 1, "spec": {
        "arch": arch, "num_classes": 10, "in_channels": 1, "image_size": 8, "mean": [0.3], "std": [0.4],
        "kwargs": {"repo_or_dir": str(ws), "model": "m", "source": "local"}}, "state_dict": {}, "metrics": {}},
        ws / "evil.pt")


def _enospc(monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)


def _zarr_write_enospc(monkeypatch):
    from dfkd.store.backends.zarr import ZarrBackend

    def full(self, unit, records):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ZarrBackend, "write_unit", full)


SYNTH = ["synth", "--teacher", "{ws}/t.pt", "--method", "noise", "--num-images", "32", "--batch-size", "16",
         "--device", "cpu"]
DISTILL = ["distill", "--store", "{ws}/s.zarr", "--student", "mlp", "--epochs", "1", "--device", "cpu",
           "--out", "{ws}/run"]
TOML_TYPO = '[run]\nname = "x"\nseeed = 1\n'
TOML_SYNTAX = '[run\nname = "x"\n'

# (id, setup(ws, monkeypatch) or None, argv with {ws}, exit code, text the one line must hold)
CASES = [
    ("checkpoint-names-a-factory", lambda ws, mp: _crafted_teacher(ws),
     [*SYNTH[:2], "{ws}/evil.pt", *SYNTH[3:], "--out", "{ws}/o.zarr"], 2, "never imports code a file names"),
    ("checkpoint-names-a-module", lambda ws, mp: _crafted_teacher(ws, "this:x"),
     ["distill", "--store", "{ws}/s.zarr", "--teacher", "{ws}/evil.pt", "--student", "mlp", "--out", "{ws}/run"], 2,
     "--model-code this:x"),
    ("pickled-checkpoint", lambda ws, mp: torch.save(torch.nn.Linear(2, 2), ws / "pickled.pt"),
     [*SYNTH[:2], "{ws}/pickled.pt", *SYNTH[3:], "--out", "{ws}/o.zarr"], 2, "cannot be read as a checkpoint"),
    ("foreign-checkpoint", lambda ws, mp: torch.save({"weights": torch.zeros(2)}, ws / "f.pt"),
     [*SYNTH[:2], "{ws}/f.pt", *SYNTH[3:], "--out", "{ws}/o.zarr"], 2, "not a dfkd model checkpoint"),
    ("missing-teacher", None, [*SYNTH[:2], "{ws}/none.pt", *SYNTH[3:], "--out", "{ws}/o.zarr"], 2, "does not exist"),
    ("unknown-model", None, [*DISTILL[:4], "nope", *DISTILL[5:]], 2, "unknown model 'nope'"),
    ("unknown-method", None, [*SYNTH[:4], "nope", *SYNTH[5:], "--out", "{ws}/o.zarr"], 2, "Invalid value for '--method'"),
    ("unknown-set-key", None, [*SYNTH, "--set", "bogus=1", "--out", "{ws}/o.zarr"], 2, "has no hyper-parameter 'bogus'"),
    ("num-images-zero", None, [*SYNTH[:6], "0", *SYNTH[7:], "--out", "{ws}/o.zarr"], 2, "'--num-images': 0 is not in"),
    ("num-images-negative", None, [*SYNTH[:6], "-3", *SYNTH[7:], "--out", "{ws}/o.zarr"], 2, "'--num-images': -3"),
    ("batch-size-zero", None, [*DISTILL, "--batch-size", "0"], 2, "'--batch-size': 0 is not in"),
    ("workers-negative", None, [*DISTILL, "--workers", "-1"], 2, "'--workers': -1 is not in"),
    ("kd-zero", None, [*DISTILL, "--kd", "0"], 2, "kd and ce_teacher are both 0"),
    ("epochs-zero", None, [*DISTILL[:6], "0", *DISTILL[7:]], 2, "'--epochs': 0 is not in"),
    ("foreign-folder-as-store", lambda ws, mp: (ws / "foreign").mkdir() or (ws / "foreign" / "x.txt").write_text("x"),
     [*DISTILL[:2], "{ws}/foreign", *DISTILL[3:]], 2, "is not a dfkd store"),
    ("missing-store", None, [*DISTILL[:2], "{ws}/none.zarr", *DISTILL[3:]], 2, "the path does not exist"),
    ("synth-over-foreign-folder", lambda ws, mp: (ws / "foreign.zarr").mkdir() or (ws / "foreign.zarr" / "a").write_text("x"),
     [*SYNTH, "--out", "{ws}/foreign.zarr", "--overwrite"], 2, "is not a dfkd store; refusing to overwrite it"),
    ("wrong-schema-version", lambda ws, mp: _zarr_attr(str(ws / "s.zarr"), schema_version=99),
     DISTILL, 2, "schema version 99"),
    ("wrong-dtype-array", lambda ws, mp: _zarr_attr(str(ws / "s.zarr"), logits_dtype="float16"),
     DISTILL, 2, "array 'logits' is float32"),
    ("truncated-chunk", lambda ws, mp: open(ws / "s.zarr" / "logits" / "c" / "1" / "0", "r+b").truncate(10),
     DISTILL, 2, "unit 1 cannot be decoded"),
    ("deleted-chunk", lambda ws, mp: os.remove(ws / "s.zarr" / "labels" / "c" / "1"),
     DISTILL, 2, "unit 1 (samples 16..31) does not match its checksum (labels missing or damaged)"),
    ("deleted-chunk-verify", lambda ws, mp: os.remove(ws / "s.zarr" / "images" / "c" / "0" / "0" / "0" / "0"),
     ["store", "verify", "{ws}/s.zarr"], 1, "FAILED: 1 problem(s)"),
    ("nan-logits", lambda ws, mp: _zarr_set(str(ws / "s.zarr"), "logits", (3, 2), np.nan),
     DISTILL, 2, "hold NaN or inf logits"),
    ("labels-out-of-range", lambda ws, mp: _zarr_set(str(ws / "s.zarr"), "labels", 20, 10),
     DISTILL, 2, "hold labels outside [-1, 10)"),
    ("record-of-another-teacher", None,
     [*SYNTH[:4], "stat", *SYNTH[5:], "--stats", "{ws}/other.record.safetensors", "--out", "{ws}/o.zarr"], 2,
     "another teacher"),
    ("record-not-safetensors", lambda ws, mp: (ws / "junk.safetensors").write_bytes(b"junk"),
     [*SYNTH[:4], "stat", *SYNTH[5:], "--stats", "{ws}/junk.safetensors", "--out", "{ws}/o.zarr"], 2,
     "cannot be read as a safetensors record"),
    ("tar-member-dotdot", lambda ws, mp: _tar_member(ws, "dotdot"), [*DISTILL[:2], "{ws}/s.wds", *DISTILL[3:]], 2,
     "foreign member '../escape.png'"),
    ("tar-member-symlink", lambda ws, mp: _tar_member(ws, "symlink"), [*DISTILL[:2], "{ws}/s.wds", *DISTILL[3:]], 2,
     "is not a regular file"),
    ("toml-typo", lambda ws, mp: (ws / "typo.toml").write_text(TOML_TYPO), ["run", "{ws}/typo.toml"], 2,
     "has no key 'seeed'"),
    ("toml-syntax", lambda ws, mp: (ws / "bad.toml").write_text(TOML_SYNTAX), ["run", "{ws}/bad.toml"], 2,
     "not valid TOML"),
    ("convert-onto-itself", None, ["store", "convert", "{ws}/s.zarr", "{ws}/s.zarr", "--overwrite"], 2,
     "is the source store itself"),
    ("preview-under-a-file", None, ["store", "preview", "{ws}/s.zarr", "--out", "{ws}/t.pt/grid.png"], 2,
     "a file stands where a folder is needed"),
    ("distill-out-under-a-file", None, [*DISTILL[:-1], "{ws}/t.pt/run"], 2, "a file stands where a folder is needed"),
    ("disk-full-checkpoint", lambda ws, mp: _enospc(mp), DISTILL, 2, "run/mlp.pt: No space left on device"),
    ("disk-full-store-write", lambda ws, mp: _zarr_write_enospc(mp), [*SYNTH, "--out", "{ws}/o.zarr"], 2,
     "o.zarr: No space left on device while writing unit 0"),
    ("resume-with-other-settings", None, [*SYNTH[:9], "--seed", "3", *SYNTH[9:], "--out", "{ws}/s.zarr", "--resume"],
     2, "base_seed was 0, now 3"),
    ("store-exists-without-resume", None, [*SYNTH, "--out", "{ws}/s.zarr"], 2, "pass --resume to finish it"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, base, tmp_path, monkeypatch):
    name, setup, argv, code, text = case
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    if setup is not None:
        setup(ws, monkeypatch)
    before = tree_bytes(ws)
    res = CliRunner().invoke(cli, [a.replace("{ws}", str(ws)) for a in argv])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)  # no traceback
    assert len(lines) == 1, res.stderr
    assert text in res.output, res.output
    after = tree_bytes(ws)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed before was changed"
    if name == "distill-out-under-a-file" or name.startswith("checkpoint") or name == "kd-zero":
        assert not (ws / "run").exists()


def test_the_table_covers_at_least_thirty_inputs():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
