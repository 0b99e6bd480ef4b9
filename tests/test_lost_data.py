"""Lost data is found: checksums kept with each done flag, verify names damaged units, readers refuse them,
`dfkd synth --resume` re-makes exactly them; distillation refuses bad targets and a diverging loss."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from dfkd import store
from dfkd.pipelines.cli import cli
from tests.helpers import tree_bytes
from tests.synth_helpers import save_tiny_teacher


def _synth(tmp_path, out, *extra):
    t = str(tmp_path / "t.pt")
    if not os.path.exists(t):
        save_tiny_teacher(t)
    args = ["synth", "--teacher", t, "--method", "deepinversion", "--num-images", "64", "--batch-size", "16",
            "--iterations", "2", "--device", "cpu", "--out", out, *extra]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return res


def _chunk(path, array, unit):
    return os.path.join(path, array, "c", str(unit), *["0"] * (3 if array == "images" else 1 if array == "logits" else 0))


@pytest.mark.parametrize("array", ["images", "logits", "labels"])
def test_deleted_chunk_is_found_refused_and_remade_to_the_exact_bytes(tmp_path, array):
    path = str(tmp_path / "s.zarr")
    _synth(tmp_path, path)
    before = tree_bytes(path)
    os.remove(_chunk(path, array, 2))
    res = CliRunner().invoke(cli, ["store", "verify", path])
    assert res.exit_code == 1
    assert f"unit 2 (samples 32..47) does not match its checksum ({array} missing or damaged)" in res.output
    with pytest.raises(store.StoreError, match="unit 2 .* does not match its checksum"):
        store.open(path).read_unit(2)
    _synth(tmp_path, path, "--resume")
    assert tree_bytes(path) == before  # re-made from the unit's seed: identical bytes, nothing else touched
    assert CliRunner().invoke(cli, ["store", "verify", path]).exit_code == 0


def test_resume_reopens_only_damaged_units(tmp_path):
    path = str(tmp_path / "s.zarr")
    _synth(tmp_path, path)
    with open(_chunk(path, "images", 1), "r+b") as f:
        f.seek(40)
        f.write(b"\x00" * 8)
    writer = store.create_or_resume(path, store.open(path).meta, resume=True)
    assert writer.reopened == [1] and writer.pending_units() == [1]


def _store_with(tmp_path, logits=None, label=None):
    path = str(tmp_path / "bad.zarr")
    _synth(tmp_path, path)
    g = zarr.open_group(path, mode="r+")
    if logits is not None:
        g["logits"][20, 3] = logits
    if label is not None:
        g["labels"][40] = label
    backend = store.open(path).backend  # as a writer that stored them so would: checksums that match
    for u in (1, 2):
        g["checksums"][u] = store.schema.checksums(backend.read_unit(u, check=False))
    return path


@pytest.mark.parametrize("logits,label,match", [
    (np.nan, None, r"unit\(s\) 1 hold NaN or inf logits"),
    (np.inf, None, r"unit\(s\) 1 hold NaN or inf logits"),
    (None, 12, r"unit\(s\) 2 hold labels outside"),
])
def test_distill_refuses_bad_targets_and_writes_nothing(tmp_path, logits, label, match):
    path = _store_with(tmp_path, logits, label)
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["distill", "--store", path, "--student", "mlp", "--epochs", "1", "--device", "cpu",
                                   "--out", str(out)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert re.search(match, res.output), res.output
    assert not out.exists()


def test_diverging_loss_stops_with_one_line_and_keeps_no_nan_student(tmp_path):
    path = str(tmp_path / "s.zarr")
    _synth(tmp_path, path)
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["distill", "--store", path, "--student", "mlp", "--epochs", "2", "--lr", "1e30",
                                   "--optimizer", "sgd", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 2 and "loss became" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    if (out / "mlp.pt").exists():  # an earlier, finite epoch's checkpoint may stay; a NaN one never is written
        from dfkd.distill.checkpoint import load_model
        import torch

        model = load_model(str(out / "mlp.pt"))[0]
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("change,setting", [
    (["--temperature", "2"], "objective.temperature was 20.0, now 2.0"),
    (["--lr", "0.01"], "students[0].lr was 0.02, now 0.01"),
    (["--batch-size", "8"], "source.batch_size was 16, now 8"),
    (["--weight-decay", "0"], "students[0].weight_decay was 0.0005, now 0"),
    (["--optimizer", "adam"], "students[0].optimizer was \"sgd\", now \"adam\""),
])
def test_distillation_resumed_with_a_changed_setting_is_refused(tmp_path, change, setting):
    path = str(tmp_path / "s.zarr")
    _synth(tmp_path, path)
    base = ["distill", "--store", path, "--student", "mlp", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    assert CliRunner().invoke(cli, base[:6] + ["1"] + base[7:]).exit_code == 0  # stopped after epoch 1 of ...
    state = tmp_path / "run" / "run.pt"
    import torch
    st = torch.load(state, weights_only=True)
    st["identity"]["epochs"] = 2  # ... a 2-epoch run (as a kill after epoch 1 leaves it)
    torch.save(st, state)
    before = tree_bytes(tmp_path / "run")
    args = base + ["--resume"]
    for i, a in enumerate(change[::2]):
        j = args.index(a) if a in args else None
        if j is None:
            args += [a, change[2 * i + 1]]
        else:
            args[j + 1] = change[2 * i + 1]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and setting in res.output, res.output
    assert tree_bytes(tmp_path / "run") == before
    assert CliRunner().invoke(cli, base + ["--resume"]).exit_code == 0  # unchanged settings continue


def test_distillation_of_a_store_that_grew_is_not_resumed(tmp_path):
    path = str(tmp_path / "s.zarr")
    _synth(tmp_path, path)
    g = zarr.open_group(path, mode="r+")
    g["done"][3] = False  # the store as it was while unfinished
    base = ["distill", "--store", path, "--student", "mlp", "--epochs", "1", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    assert CliRunner().invoke(cli, base).exit_code == 0
    g["done"][3] = True  # and after its synthesis finished
    res = CliRunner().invoke(cli, base + ["--resume"])
    assert res.exit_code == 2 and "source.store.units_done was 3, now 4" in res.output, res.output


def test_changed_webdataset_member_is_found_and_remade(tmp_path):
    from dfkd.store.backends import tar

    path = str(tmp_path / "s.wds")
    _synth(tmp_path, path)
    before = tree_bytes(path)
    shard = os.path.join(path, "shard-000001.tar")
    with open(shard, "rb") as f:
        members = [(name, bytes(data)) for name, data in tar.members(f.read(), shard)]
    name, data = next((n, d) for n, d in members if n.endswith(".logits.npy"))
    changed = data[:-1] + bytes([data[-1] ^ 1])  # one bit of one logit: still decodes, no longer matches
    with open(shard, "wb") as f:
        f.write(tar.pack([(n, changed if n == name else d) for n, d in members]))
    res = CliRunner().invoke(cli, ["store", "verify", path])
    assert res.exit_code == 1 and "unit 1 (samples 16..31) does not match its checksum (logits" in res.output
    _synth(tmp_path, path, "--resume")
    assert tree_bytes(path) == before
