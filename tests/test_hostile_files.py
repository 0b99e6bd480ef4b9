"""Files anyone could have made (issue 33): none hangs a reader, sends it out of the store, or takes a
non-finite setting; each gets one line and nothing is lost."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd import store
from dfkd.pipelines.cli import cli
from dfkd.store.backends import tar
from dfkd.store.toolbox import fs
from dfkd.synth.methods import MethodError, method_config
from tests.helpers import fill, small_meta, unit_content


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


@pytest.mark.parametrize("field,value", [("num_classes", 4_000_000), ("num_classes", 10**9), ("image_size", 10**6)])
def test_a_checkpoint_spec_edited_to_huge_sizes_is_refused_before_building(tmp_path, field, value):
    """A 99 KB teacher edited to 4,000,000 classes took 1.86 GB before 'weights do not fit'; 10^9 a traceback."""
    import resource

    import torch

    from dfkd.distill.checkpoint import CheckpointError, load_model
    from tests.synth_helpers import save_tiny_teacher

    path = str(tmp_path / "t.pt")
    save_tiny_teacher(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["spec"][field] = value
    torch.save(ckpt, path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="weights do not fit lenet5_bn") as e:
        load_model(path, "teacher")
    assert "\n" not in str(e.value) and "its spec was changed" in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing of the huge model
    res = invoke("synth", "--teacher", path, "--method", "noise", "--num-images", "8", "--out", str(tmp_path / "s.zarr"))
    assert res.exit_code == 2 and "weights do not fit" in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("key,value,match", [
    ("num_samples", 255.5, "num_samples must be an integer"), ("provenance", [1, 2], "provenance must be an object"),
    ("mean", "abc", "mean must be a list of numbers"), ("num_samples", True, "num_samples must be an integer"),
    ("image_shape", [3, 8], "image_shape must be three integers"),
    ("num_samples", 64 * 10**9, "more than 10000000 units"),
])
@pytest.mark.parametrize("kind", ["zarr", "wds"])
def test_metadata_of_the_wrong_type_or_size_is_one_line_for_info_and_verify(tmp_path, kind, key, value, match):
    """A float sample count passed, a list of provenance made `info` raise AttributeError, 64e9 declared samples
    made info and verify run for minutes at gigabytes."""
    path = str(tmp_path / f"s.{kind}")
    fill(store.create(path, small_meta()))
    meta = os.path.join(path, "zarr.json" if kind == "zarr" else "meta.json")
    doc = json.loads(open(meta).read())
    (doc["attributes"] if kind == "zarr" else doc)["dfkd"][key] = value
    open(meta, "w").write(json.dumps(doc))
    for cmd in ("info", "verify"):
        res = invoke("store", cmd, path)
        assert res.exit_code in (1, 2), res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)  # no traceback
        assert match in res.output and "malformed dfkd metadata" in res.output, res.output


def test_odd_requests_and_files_get_one_line(tmp_path):
    """Tracebacks before: a pipeline file that is not UTF-8, a factory of another signature named in it, and a
    preview asking for 10^9 images a class (the canvas was sized by the request, not by the images)."""
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[run]\n")
    res = invoke("run", str(bad))
    assert res.exit_code == 2 and "not UTF-8 text: byte 0xff at 0" in res.output
    odd = tmp_path / "odd.toml"
    odd.write_text(f'[run]\nname = "x"\nout = "{tmp_path / "o"}"\n[data]\nname = "digits"\n'
                   '[teacher]\nmodel = "os:getcwd"\nepochs = 1\n')
    res = invoke("run", str(odd))
    assert res.exit_code == 2 and "model factory 'os:getcwd' cannot be called" in res.output, res.output
    assert isinstance(res.exception, SystemExit)
    path = str(tmp_path / "s.zarr")
    fill(store.create(path, small_meta()))
    res = invoke("store", "preview", path, "--per-class", "1000000000", "--out", str(tmp_path / "p.png"))
    assert res.exit_code == 0 and os.path.getsize(tmp_path / "p.png") > 0, res.output


def _image_folder(root, classes: int, size: int = 8) -> str:
    """An ImageFolder of train/ and test/ with `classes` classes of two RGB images each."""
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for k in range(classes):
            d = os.path.join(root, split, f"c{k}")
            os.makedirs(d)
            for i in range(2):
                Image.fromarray(np.full((size, size, 3), 20 * k + i, np.uint8)).save(os.path.join(d, f"{i}.png"))
    return str(root)


def test_distill_refuses_an_eval_set_of_other_classes_and_max_images_with_kd_data(tmp_path, wds_store):
    """--eval with 3 classes against a 10-class store scored 0% without a word; --kd-data --max-images 2048
    trained on the whole folder."""
    folder = _image_folder(tmp_path / "three", 3)
    res = invoke("distill", "--store", wds_store, "--student", "mlp", "--epochs", "1", "--eval", folder,
                 "--out", str(tmp_path / "o1"))
    assert res.exit_code == 2 and "has 3 classes but the students learn 10" in res.output, res.output
    from tests.synth_helpers import save_tiny_teacher

    teacher = str(tmp_path / "t.pt")
    save_tiny_teacher(teacher)
    res = invoke("distill", "--kd-data", folder, "--teacher", teacher, "--student", "mlp", "--epochs", "1",
                 "--max-images", "2048", "--out", str(tmp_path / "o2"))
    assert res.exit_code == 2 and "--max-images takes whole units of a store" in res.output, res.output
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_deleting_the_checksums_does_not_hide_tampering(tmp_path):
    """Logits rewritten and checksums/ deleted (Zarr) or unit_checksums stripped from a shard (WebDataset): verify
    said OK, distill trained, and convert wrote a fresh, verifying store (the tampering laundered)."""
    import shutil

    import numpy as np

    zpath = str(tmp_path / "s.zarr")
    fill(store.create(zpath, small_meta()))
    w = store.open_writer(zpath)
    w.backend.logits[16:32] = np.ones((16, 10), np.float16)  # unit 1's logits, behind the checksums' back
    shutil.rmtree(os.path.join(zpath, "checksums"))
    wpath = str(tmp_path / "s.wds")
    fill(store.create(wpath, small_meta()))
    shard = os.path.join(wpath, "shard-000001.tar")
    members = []
    for name, data in tar.members(open(shard, "rb").read(), shard):
        data = bytes(data)
        if name == "0000000016.json":
            doc = json.loads(data)
            del doc["unit_checksums"]
            data = json.dumps(doc).encode()
        members.append((name, data))
    open(shard, "wb").write(tar.pack(members))
    for path, match in ((zpath, "lacks the 'checksums' array"), (wpath, "carries no checksums")):
        res = invoke("store", "verify", path)
        assert res.exit_code == 1 and match in res.output, res.output
        res = invoke("store", "convert", path, str(tmp_path / f"laundered{os.path.splitext(path)[1]}"))
        assert res.exit_code == 2 and match in res.output, res.output
        assert not os.path.exists(tmp_path / f"laundered{os.path.splitext(path)[1]}")


def test_one_writer_per_store_and_a_killed_writer_leaves_no_stale_lock(tmp_path, wds_store):
    """Two `store label` runs at once left a store that reported itself corrupt; now the second gets one line."""
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dfkd import store; "
                               f"w = store.open_writer({wds_store!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(store.StoreError, match=f"is being written by process {holder.pid}"):
            store.open_writer(wds_store)
        from tests.synth_helpers import save_tiny_teacher

        save_tiny_teacher(str(tmp_path / "t.pt"))
        res = invoke("store", "label", wds_store, "--teacher", str(tmp_path / "t.pt"), "--views", "2")
        assert res.exit_code == 2 and f"process {holder.pid}" in res.output and len(res.output.splitlines()) == 1
        with pytest.raises(store.StoreError, match="is being written"):
            store.create(wds_store, small_meta(), overwrite=True)  # nor replaced under it
        assert store.open(wds_store).complete  # reading is never locked
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    w = store.open_writer(wds_store)  # the kernel dropped the killed holder's lock
    w2 = store.create_or_resume(wds_store, small_meta(), resume=True)  # this process may hold several writers
    assert w.lock is not None and w2.lock is not None


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB and holds almost nothing: what a decompression bomb's header says."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _replace_member(shard: str, name: str, data: bytes) -> None:
    members = [(n, data if n == name else bytes(d)) for n, d in tar.members(open(shard, "rb").read(), shard)]
    open(shard, "wb").write(tar.pack(members))


@pytest.mark.parametrize("member,make", [
    ("0000000016.png", lambda: _png_header_only(40000, 40000)),
    ("0000000016.logits.npy", lambda: _npy_header_only((10**12,), "<f2")),
])
def test_members_declaring_huge_sizes_are_refused_before_decoding(wds_store, member, make):
    """A PNG member declaring 40000x40000 raised DecompressionBombError; a .npy header of 10^12 values allocated."""
    import resource

    shard = os.path.join(wds_store, "shard-000001.tar")
    _replace_member(shard, member, make())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(store.StoreError, match="cannot be decoded") as e:
        store.open(wds_store).read_unit(1)
    assert "\n" not in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
    res = invoke("store", "verify", wds_store)
    assert res.exit_code == 1 and "shard-000001" in res.output, res.output


def _npy_header_only(shape: tuple[int, ...], descr: str) -> bytes:
    import io

    import numpy as np

    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
    return f.getvalue()


@pytest.mark.parametrize("layout", [("train/a", "test/a"), ("train", "test")])
def test_an_image_folder_without_images_names_the_folder_and_the_layout(tmp_path, wds_store, layout):
    """An empty ImageFolder said 'error: a file: Found no valid file...'."""
    for d in layout:
        os.makedirs(tmp_path / "empty" / d)
    res = invoke("distill", "--store", wds_store, "--student", "mlp", "--epochs", "1", "--eval",
                 str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "holds no images in class folders" in res.output, res.output
    assert os.path.join("empty", "train") in res.output


def test_resuming_a_finished_store_writes_nothing(tmp_path):
    """synth --resume on a finished Zarr store rewrote zarr.json (the same bytes): it failed on a read-only mount."""
    from tests.synth_helpers import save_tiny_teacher

    teacher, out = str(tmp_path / "t.pt"), str(tmp_path / "s.zarr")
    save_tiny_teacher(teacher)
    args = ["synth", "--teacher", teacher, "--method", "stat", "--num-images", "32", "--batch-size", "16",
            "--iterations", "2", "--out", out]
    assert invoke(*args).exit_code == 0
    files = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs_ in os.walk(out) for f in fs_}
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert {p: os.stat(p).st_mtime_ns for p in files} == files
    assert not os.path.exists(tmp_path / ".s.zarr.lock")  # let go when the run ended


def test_a_link_inside_a_zarr_store_is_refused_to_writers_readers_and_verify(tmp_path):
    """A symlinked chunk folder made synth --resume write outside the store (and readers read from outside it)."""
    path = str(tmp_path / "s.zarr")
    w = store.create(path, small_meta())
    fill(w, units=[0, 1])
    w.finalize()
    outside = tmp_path / "outside"
    outside.mkdir()
    chunks = os.path.join(path, "images", "c")
    os.rename(chunks, str(outside / "c"))
    os.symlink(str(outside / "c"), chunks)
    with pytest.raises(store.StoreError, match="is a link or special file inside the store"):
        store.create_or_resume(path, small_meta(), resume=True)
    with pytest.raises(store.StoreError, match="is a link or special file inside the store"):
        store.open(path)
    res = invoke("store", "verify", path)
    assert res.exit_code == 1 and "is a link or special file inside the store" in res.output, res.output
    res = invoke("distill", "--store", path, "--student", "mlp", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert res.exit_code != 0 and "is a link or special file inside the store" in res.output, res.output
    assert sorted(os.listdir(outside / "c")) == ["0", "1"]  # nothing written there


def test_a_one_class_source_is_refused(tmp_path):
    """A 1-class teacher trained at loss 0 without a word."""
    path = str(tmp_path / "one.zarr")
    fill(store.create(path, small_meta(num_classes=1)))
    res = invoke("distill", "--store", path, "--student", "mlp", "--epochs", "1", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "has 1 class; a classifier needs at least 2" in res.output, res.output


@pytest.mark.parametrize("key,value,match", [
    ("beta1", "1.5", "deepinversion.beta1 must be (>= 0, < 1), got 1.5"),
    ("jitter", "-3", "deepinversion.jitter must be (>= 0), got -3"),
    ("iterations", "0", "deepinversion.iterations must be (>= 1), got 0"),
    ("lr", "-1", "deepinversion.lr must be (> 0), got -1.0"),
])
def test_method_hyper_parameters_out_of_bounds_are_one_line_before_anything_is_written(tmp_path, key, value, match):
    """--set beta1=1.5, jitter=-3, iterations=0 were accepted (all-zero images, or a traceback)."""
    from tests.synth_helpers import save_tiny_teacher

    teacher = str(tmp_path / "t.pt")
    save_tiny_teacher(teacher)
    res = invoke("synth", "--teacher", teacher, "--method", "deepinversion", "--num-images", "8",
                 "--set", f"{key}={value}", "--out", str(tmp_path / "s.zarr"))
    assert res.exit_code == 2 and match in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not os.path.exists(tmp_path / "s.zarr")
    with pytest.raises(MethodError, match="noise.sigma must be a finite number"):
        method_config("noise", {"sigma": "nan"})


def test_a_synthesis_whose_loss_becomes_nan_says_so_and_writes_nothing_of_that_unit(tmp_path):
    """A unit optimized into NaN was written as whatever the NaN pixels quantized to, without a word."""
    import torch

    from dfkd.synth.engine import SynthConfig, synthesize
    from tests.synth_helpers import MEAN, SHAPE, STD, tiny_teacher

    teacher, _ = tiny_teacher()
    with torch.no_grad():
        next(teacher.parameters()).fill_(float("nan"))
    out = str(tmp_path / "s.zarr")
    with pytest.raises(MethodError, match="deepinversion's loss .* became nan in unit 0; nothing of that unit"):
        synthesize(teacher, "deepinversion", SynthConfig(num_images=16, out=out, batch_size=16),
                   image_shape=SHAPE, num_classes=10, mean=MEAN, std=STD, hparams={"iterations": 2})
    assert not store.open(out).done_mask().any()


@pytest.mark.parametrize("where,chunk_size", [("local", None), ("local", 8), ("url", None), ("url", 8)])
def test_a_compressed_chunk_declaring_gigabytes_is_refused_before_decoding(tmp_path, where, chunk_size):
    """A 336-byte Zarr chunk whose Blosc header was damaged to declare 1.8 GB made every reader allocate it; the
    check is on the bytes zarr fetched, so a store at a URL (memory:// here) gets it too; chunk_size 8: a shard of
    two inner chunks."""
    import uuid

    path = str(tmp_path / "s.zarr") if where == "local" else f"memory://bomb-{uuid.uuid4().hex}/s.zarr"
    w = store.create(path, small_meta(num_samples=40, unit_size=16), chunk_size=chunk_size)
    fill(w)
    w.finalize()
    chunk = fs.join(path, "logits", "c", "1", "0")
    data = bytearray(fs.read_bytes(chunk))
    data[4:8] = (2**31 - 1).to_bytes(4, "little")  # the first (inner) chunk's declared decoded size
    fs.write_atomic(chunk, bytes(data))
    with pytest.raises(store.StoreError, match="unit 1 cannot be decoded .its logits chunk declares 2147483647 bytes") as e:
        store.open(path).read(16, 32)
    assert "\n" not in str(e.value)
    report = invoke("store", "verify", path)
    assert report.exit_code == 1 and "unit 1 cannot be decoded (its logits chunk declares" in report.output
    np.testing.assert_array_equal(store.open(path).read(0, 16).images, unit_content(store.open(path).meta, 0).images)


def _strip_every_checksum(path: str) -> None:
    """What an attacker (or a dfkd before checksums) leaves: no checksums anywhere and no flag saying there were."""
    import shutil

    if path.endswith(".zarr"):
        shutil.rmtree(os.path.join(path, "checksums"))
        doc = json.loads(open(os.path.join(path, "zarr.json")).read())
        del doc["attributes"]["unit_checksums"]
        doc["consolidated_metadata"]["metadata"].pop("checksums")
        open(os.path.join(path, "zarr.json"), "w").write(json.dumps(doc))
        return
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    del meta["webdataset"]["unit_checksums"]
    open(os.path.join(path, "meta.json"), "w").write(json.dumps(meta))
    for shard in (f for f in os.listdir(path) if f.endswith(".tar")):
        members = []
        for name, data in tar.members(open(os.path.join(path, shard), "rb").read(), shard):
            data = bytes(data)
            if name.endswith(".json"):
                doc = json.loads(data)
                doc.pop("unit_checksums", None)
                data = json.dumps(doc).encode()
            members.append((name, data))
        open(os.path.join(path, shard), "wb").write(tar.pack(members))


@pytest.mark.parametrize("suffix", [".zarr", ".wds"])
def test_a_store_without_any_checksums_is_unverifiable_until_its_owner_vouches_for_it(tmp_path, suffix):
    """Checksums and the flag saying a store has them both stripped passed for a store made before checksums:
    verify said OK and every reader read it, so tampering went unseen. Now it is unverifiable (exit 1) unless
    --allow-unchecked, readers refuse it, and convert --trust-unchecked makes a checked copy of it."""
    path = str(tmp_path / f"s{suffix}")
    w = store.create(path, small_meta())
    fill(w)
    w.finalize()
    assert "checksums    CRC-32" in invoke("store", "info", path).output
    _strip_every_checksum(path)
    res = invoke("store", "info", path)  # described, with the warning, not refused
    assert res.exit_code == 0 and "checksums    NONE: its content cannot be verified" in res.output, res.output
    res = invoke("store", "verify", path)
    assert res.exit_code == 1 and "unverifiable: it carries no checksums" in res.output, res.output
    res = invoke("store", "verify", path, "--allow-unchecked")
    assert res.exit_code == 0 and "note: unverifiable" in res.output, res.output
    with pytest.raises(store.StoreError, match="carries no checksums .* --trust-unchecked") as e:
        store.open(path).read(0, 16)
    assert "\n" not in str(e.value)
    res = invoke("distill", "--store", path, "--student", "mlp", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert res.exit_code != 0 and "carries no checksums" in res.output and len(res.output.strip().splitlines()) == 1
    checked = str(tmp_path / f"checked{suffix}")
    res = invoke("store", "convert", path, checked)
    assert res.exit_code == 2 and "carries no checksums" in res.output and not os.path.exists(checked)
    res = invoke("store", "convert", path, checked, "--trust-unchecked")
    assert res.exit_code == 0, res.output
    assert invoke("store", "verify", checked).exit_code == 0
    np.testing.assert_array_equal(store.open(checked).read(0, 100).images, store.open(path).read(0, 100, check=False).images)


def test_a_swollen_checkpoint_or_pipeline_file_is_refused_without_being_read(tmp_path):
    """Sparse files (a few KB on disk, gigabytes to read): a 3 GB checkpoint took 3.5 GB of memory before its
    'cannot be read' line, a 3 GB pipeline file 6.6 GB before 'not valid TOML'."""
    import subprocess
    import sys

    from tests.synth_helpers import save_tiny_teacher

    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    os.truncate(t, 4 << 30)
    code = ("import resource, sys\nfrom dfkd.distill.checkpoint import load_model\nfrom dfkd import DfkdError\n"
            "try:\n    load_model(sys.argv[1], 'teacher')\nexcept DfkdError as e:\n    print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code, t], capture_output=True, text=True, timeout=120).stdout
    line, peak_kib = out.strip().splitlines()
    assert "cannot be read as a checkpoint" in line
    assert int(peak_kib) < 2 << 20, f"{int(peak_kib) >> 10} MiB to refuse a 4 GiB sparse checkpoint"
    toml = tmp_path / "p.toml"
    toml.write_text('[run]\nname = "x"\n')
    os.truncate(toml, 3 << 30)
    res = invoke("run", str(toml), "--dry-run")
    assert res.exit_code == 2 and "a pipeline file is a few KB of TOML" in res.output, res.output


def test_values_nested_past_the_stack_are_one_line(tmp_path):
    """JSON or TOML nested 50,000 deep (a few hundred KB) raised RecursionError tracebacks: from a WebDataset
    meta.json or shard member and from a pipeline file; a record's layer list is checked too."""
    deep = "[" * 50000 + "]" * 50000
    path = str(tmp_path / "s.wds")
    fill(store.create(path, small_meta()))
    meta = open(os.path.join(path, "meta.json")).read()
    open(os.path.join(path, "meta.json"), "w").write(meta.replace('"provenance": {', '"provenance": {"x": ' + deep + ", ", 1))
    with pytest.raises(store.StoreError, match="meta.json cannot be read .RecursionError") as e:
        store.open(path)
    assert "\n" not in str(e.value)
    path = str(tmp_path / "t.wds")
    fill(store.create(path, small_meta()))
    shard = os.path.join(path, "shard-000001.tar")
    members = [(n, bytes(d)) for n, d in tar.members(open(shard, "rb").read(), shard)]
    first = next(i for i, (n, _) in enumerate(members) if n.endswith(".json"))  # the shard's done record
    members[first] = (members[first][0], deep.encode())
    open(shard, "wb").write(tar.pack(members))
    with pytest.raises(store.StoreError, match="cannot be decoded .RecursionError"):
        store.open(path).read(16, 32)
    toml = tmp_path / "p.toml"
    toml.write_text("[run]\nname = " + deep + "\n")
    res = invoke("run", str(toml), "--dry-run")
    assert res.exit_code == 2 and "nested too deeply" in res.output and "Traceback" not in res.output, res.output
    from safetensors.torch import save_file

    from dfkd.synth.record import RecordError, TeacherStats

    rec = str(tmp_path / "r.safetensors")
    for layers in (deep, "7", "[1, 2]"):
        save_file({"x": torch.zeros(1)}, rec, metadata={"format": "dfkd-record", "layers": layers, "teacher_fingerprint": "f"})
        with pytest.raises(RecordError, match="damaged dfkd record metadata"):
            TeacherStats.load(rec)
