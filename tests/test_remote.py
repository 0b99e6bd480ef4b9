"""Stores at fsspec URLs: Zarr and WebDataset stores on an S3 server started on 127.0.0.1 (moto), written,
resumed and read back bit-exact."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dfkd import store
from tests.helpers import expected, fill, small_meta

pytest.importorskip("s3fs")
pytest.importorskip("moto")


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free local port; credentials and endpoint through the usual env variables."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    import fsspec
    import s3fs

    fsspec.config.conf.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    deadline = time.time() + 30
    while True:
        try:
            fs.mkdir("dfkd-test")
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    yield "s3://dfkd-test"
    proc.kill()
    proc.wait()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("suffix", [".zarr", ".wds"])
def test_store_on_s3_round_trips_bit_exact(s3, suffix):
    url = f"{s3}/run{suffix}"
    meta = small_meta()
    w = store.create_or_resume(url, meta, resume=True)
    half = w.pending_units()[: meta.num_units // 2]
    fill(w, half)  # an interrupted run: half the units
    w = store.create_or_resume(url, meta, resume=True)  # resumed from the URL: only the rest is pending
    assert w.pending_units() == [u for u in range(meta.num_units) if u not in half]
    fill(w)
    w.finalize()
    r = store.open(url)
    got, exp = r.read(0, meta.num_samples), expected(meta)
    np.testing.assert_array_equal(got.images, exp.images)
    np.testing.assert_array_equal(got.logits, exp.logits)
    np.testing.assert_array_equal(got.labels, exp.labels)
    seen = np.concatenate([b.indices.numpy() for b in store.StoreDataset(url, batch_size=16, seed=0)])
    assert sorted(seen.tolist()) == list(range(meta.num_samples))
    with pytest.raises(store.StoreError, match="already exists"):
        store.create(url, meta)


def test_generator_store_at_s3_keeps_its_artifacts_there_and_resumes_elsewhere(s3, tmp_path, monkeypatch):
    """Generator, training checkpoint and proxy student go beside the store at the URL, not to a local `s3:/`."""
    import fsspec
    from click.testing import CliRunner

    from dfkd.pipelines.cli import cli
    from tests.synth_helpers import save_tiny_teacher

    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    url = f"{s3}/gen/adv.zarr"
    args = ["synth", "--teacher", t, "--method", "adversarial", "--student", "lenet5_half", "--rounds", "2",
            "--num-images", "32", "--batch-size", "16", "--device", "cpu", "--set", "latent_dim=16", "--set", "width=8",
            "--set", "batch_size=8", "--out", url]
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    remote = fsspec.filesystem("s3")
    names = {p.rsplit("/", 1)[-1] for p in remote.ls(url.rsplit("/", 1)[0].removeprefix("s3://"))}
    assert {"adv.zarr", "adv.generator.pt", "adv.generator-train.pt", "adv.student.pt"} <= names
    assert not os.path.exists(tmp_path / "s3:")
    before = {n: remote.cat_file(f"dfkd-test/gen/{n}") for n in ("adv.generator.pt", "adv.student.pt")}
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # another node: nothing local but the teacher
    res = CliRunner().invoke(cli, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert {n: remote.cat_file(f"dfkd-test/gen/{n}") for n in before} == before
    assert store.open(url).complete and os.listdir(other) == []


def test_a_store_creation_killed_at_a_url_is_accepted_by_resume_and_overwrite(s3):
    """Object stores cannot rename, so creation writes in place: a kill after the group's metadata and before
    its arrays must still leave something --resume and --overwrite accept."""
    import zarr

    meta = small_meta()
    for i, how in enumerate(("resume", "overwrite")):
        url = f"{s3}/half{i}.zarr"
        zarr.create_group(store=url, attributes={"dfkd": meta.to_json()})  # what the kill left
        w = store.create_or_resume(url, meta, resume=how == "resume", overwrite=how == "overwrite")
        fill(w)
        assert store.open(url).complete


def test_convert_never_replaces_a_store_at_a_url(s3, tmp_path):
    from dfkd.store.convert import convert

    src = str(tmp_path / "a.zarr")
    w = store.create(src, small_meta())
    fill(w)
    w.finalize()
    convert(src, f"{s3}/c.zarr")
    with pytest.raises(store.StoreError, match="cannot swap a finished copy into place"):
        convert(src, f"{s3}/c.zarr", overwrite=True)
    assert store.open(f"{s3}/c.zarr").complete


def test_a_second_writer_process_at_a_url_is_refused_by_the_lease(s3):
    """Object stores have no locks: the writer's lease object beside the store turns another process away (one
    line naming the holder) until the writer is done, then lets the next one in."""
    url = f"{s3}/leased.zarr"
    first = store.create(url, small_meta())
    code = ("import sys\nfrom dfkd import store\ntry:\n    store.open_writer(sys.argv[1]).finalize()\n"
            "except store.StoreError as e:\n    print(e)\n    sys.exit(3)\n")
    second = [sys.executable, "-c", code, url]
    proc = subprocess.run(second, capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 3 and f"process {os.getpid()} on" in proc.stdout, proc.stdout + proc.stderr
    fill(first)
    first.finalize()  # done: the lease is gone
    proc = subprocess.run(second, capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert store.open(url).complete
