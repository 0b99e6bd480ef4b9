"""Files anyone could have made (issue 33): none hangs a reader, sends it out of the store, or takes a
non-finite setting; each gets one line and nothing is lost."""

import json
import os

import pytest
from click.testing import CliRunner

from dfkd import store
from dfkd.pipelines.cli import cli
from dfkd.store.backends import tar
from dfkd.store.toolbox import fs
from dfkd.synth.methods import MethodError, method_config
from tests.helpers import fill, small_meta


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def _with_size_field(buf: bytes, field: bytes) -> bytes:
    """The first member's header with another size field and a checksum that fits it."""
    head = bytearray(buf[:tar.BLOCK])
    head[124:136] = field.ljust(12, b"\0")
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head) + buf[tar.BLOCK:]


@pytest.mark.parametrize("field", [b"-0000001000", b"+0000001000", b"0_1000", b"0000000009"])
def test_a_tar_size_field_that_is_not_octal_digits_is_corrupt_not_a_loop(field):
    """A negative size with a valid checksum used to land the parser on the same header forever."""
    buf = _with_size_field(tar.pack([("0000000000.cls", b"1"), ("0000000000.json", b"{}")]), field)
    with pytest.raises(store.StoreError, match="bad tar header at byte 0"):
        list(tar.members(buf, "shard"))


def test_octal_fields_padded_with_spaces_or_nuls_still_parse():
    buf = _with_size_field(tar.pack([("a.cls", b"7")]), b"   1 \0")
    assert [(n, bytes(d)) for n, d in tar.members(buf, "shard")] == [("a.cls", b"7")]


@pytest.fixture
def wds_store(tmp_path):
    path = str(tmp_path / "s.wds")
    fill(store.create(path, small_meta()))
    return path


def test_a_shard_that_links_elsewhere_is_refused_not_followed(tmp_path, wds_store):
    """`shard-000001.tar -> /dev/zero` made verify read until memory ran out."""
    shard = os.path.join(wds_store, "shard-000001.tar")
    os.remove(shard)
    os.symlink("/dev/zero", shard)
    res = invoke("store", "verify", wds_store)
    assert res.exit_code == 1 and "a symbolic link, not a regular file" in res.output
    with pytest.raises(store.StoreError, match="only regular files"):
        store.open(wds_store).read_unit(1)
    assert store.open(wds_store).read_unit(0).labels.shape == (16,)  # the rest stays readable


def test_a_fifo_in_place_of_a_shard_or_the_metadata_does_not_block(tmp_path, wds_store):
    shard = os.path.join(wds_store, "shard-000002.tar")
    os.remove(shard)
    os.mkfifo(shard)  # nobody writes to it: a plain open would wait forever
    with pytest.raises(store.StoreError, match="not a regular file"):
        store.open(wds_store).read_unit(2)
    meta = os.path.join(wds_store, "meta.json")
    os.rename(meta, meta + ".bak")
    os.mkfifo(meta)
    with pytest.raises(store.StoreError, match="not a regular file|not a dfkd store"):
        store.open(wds_store)


def test_read_bytes_regular_reads_files_and_refuses_links(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    os.symlink(f, tmp_path / "link.bin")
    assert fs.read_bytes(str(f), regular=True) == b"abc"
    assert fs.read_bytes(str(tmp_path / "link.bin")) == b"abc"  # what the user names may be a link
    with pytest.raises(fs.NotRegularFile):
        fs.read_bytes(str(tmp_path / "link.bin"), regular=True)
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(str(tmp_path / "none.bin"), regular=True)


def test_a_killed_writes_temporary_is_cleared_on_resume_and_is_not_foreign(tmp_path):
    """write_atomic's temporaries are `.NAME.partial-PID`: verify called one foreign and --resume left it."""
    path = str(tmp_path / "s.wds")
    w = store.create(path, small_meta())
    fill(w, units=[0, 1])
    leftover = os.path.join(path, f".shard-000003.tar.partial-{os.getpid() + 1}")
    with open(leftover, "wb") as f:
        f.write(b"half a shard")
    assert fs.is_partial(os.path.basename(leftover)) and not fs.is_partial("shard-000003.tar")
    findings = store.open_writer(path).backend.audit()
    assert findings and not any(serious for serious, _ in findings)
    w = store.create_or_resume(path, small_meta(), resume=True)
    assert not os.path.exists(leftover)
    fill(w)
    w.finalize()
    res = invoke("store", "verify", path)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_distill_refuses_a_non_finite_learning_rate(tmp_path, wds_store, value):
    """`--lr nan` saved a student of NaN weights and exited 0."""
    res = invoke("distill", "--store", wds_store, "--student", "mlp", "--epochs", "1", "--lr", value,
                 "--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert ("must be a finite number" if value != "-inf" else "not in the range") in res.output
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("key,value", [("lr", "nan"), ("w_bn", "inf"), ("lr", float("nan"))])
def test_method_hyper_parameters_must_be_finite(key, value):
    with pytest.raises(MethodError, match=f"deepinversion.{key} must be a finite number"):
        method_config("deepinversion", {key: value})


def test_a_huge_view_count_is_refused_before_anything_is_written(tmp_path, wds_store):
    """`store label --views 100000000 --overwrite` rewrote the metadata, then crashed: the old labels were gone."""
    before = open(os.path.join(wds_store, "meta.json"), "rb").read()
    res = invoke("store", "label", wds_store, "--teacher", str(tmp_path / "t.pt"), "--views", "100000000",
                 "--overwrite")
    assert res.exit_code == 2 and "100000000" in res.output and len(res.output.strip().splitlines()) == 1
    assert open(os.path.join(wds_store, "meta.json"), "rb").read() == before
    res = invoke("synth", "--teacher", str(tmp_path / "t.pt"), "--method", "noise", "--num-images", "16",
                 "--views", "100000000", "--out", str(tmp_path / "n.zarr"))
    assert res.exit_code == 2 and "--views" in res.output and not os.path.exists(tmp_path / "n.zarr")
    doc = json.loads(before)
    doc["dfkd"]["views"], doc["dfkd"]["view_recipe"] = 10**8, {"mode": "flip-crop", "pad": 2}
    open(os.path.join(wds_store, "meta.json"), "w").write(json.dumps(doc))
    with pytest.raises(store.StoreError, match=r"views must lie in \[0, 256\]"):
        store.open(wds_store)
