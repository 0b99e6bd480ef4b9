"""Both stages under torchrun (gloo on CPU): the same store whatever the rank count, restarts with other counts."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from dfkd import store
from tests.synth_helpers import save_tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _synth_args(teacher: str, iterations: int) -> list[str]:
    return ["synth", "--teacher", teacher, "--method", "deepinversion", "--num-images", "96", "--batch-size", "16",
            "--iterations", str(iterations), "--device", "cpu"]


def _torchrun(nproc: int, args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             "-m", "dfkd.pipelines.cli", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _single(args: list[str]) -> None:
    """One plain process with the same thread count as each torchrun rank (so float reductions match)."""
    res = subprocess.run([sys.executable, "-m", "dfkd.pipelines.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def _same(a: str, b: str) -> None:
    x, y = store.open(a).read(0, 96), store.open(b).read(0, 96)
    np.testing.assert_array_equal(x.images, y.images)
    np.testing.assert_array_equal(x.logits, y.logits)
    np.testing.assert_array_equal(x.labels, y.labels)


def test_two_ranks_write_the_store_one_process_writes(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    two, one = str(tmp_path / "two.zarr"), str(tmp_path / "one.zarr")
    proc = _torchrun(2, _synth_args(t, 3) + ["--out", two])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert out.count("wrote ") == 1  # rank 0 reports; the other rank stays quiet
    _single(_synth_args(t, 3) + ["--out", one])
    assert store.open(two).done_mask().all()
    _same(two, one)


def test_two_rank_run_killed_then_finished_by_one_rank(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    cut, fresh = str(tmp_path / "cut.zarr"), str(tmp_path / "fresh.zarr")
    proc = _torchrun(2, _synth_args(t, 80) + ["--out", cut], start_new_session=True)
    deadline, done = time.time() + 240, 0
    while time.time() < deadline and done < 2:
        time.sleep(0.1)
        try:
            done = int(store.open(cut).done_mask(refresh=True).sum())
        except store.StoreError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= done < 6
    _single(_synth_args(t, 80) + ["--out", cut, "--resume"])
    _single(_synth_args(t, 80) + ["--out", fresh])
    _same(cut, fresh)


def test_two_rank_distillation_takes_equal_steps_and_writes_one_checkpoint(tmp_path):
    import json

    from tests.helpers import fill, small_meta

    path = str(tmp_path / "s.zarr")
    w = store.create(path, small_meta(num_samples=200, unit_size=16))
    fill(w)
    w.finalize()
    out = tmp_path / "run"
    args = ["distill", "--store", path, "--student", "mlp", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
            "--out", str(out)]
    proc = _torchrun(2, args)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    reads = m["batches_read_per_rank"]
    assert reads[0] == reads[1] == 2 * 7  # 200 samples / 2 ranks = 100 each -> 7 batches of <= 16 per epoch
    assert sorted(os.listdir(out)) == ["metrics.json", "mlp.pt", "run.pt"]  # rank 0 alone writes
    assert log.count("distilled from") == 1
    proc = _torchrun(2, args + ["--resume"])  # a finished run resumes to nothing and stays as it was
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log


def test_an_error_on_rank_0_during_generator_training_ends_every_rank_with_one_line(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    (tmp_path / "adv.generator-train.pt").write_bytes(b"not a checkpoint")  # rank 0 fails reading it
    args = ["synth", "--teacher", t, "--method", "adversarial", "--student", "lenet5_half", "--rounds", "2",
            "--num-images", "32", "--batch-size", "16", "--device", "cpu", "--set", "latent_dim=16", "--set", "width=8",
            "--set", "batch_size=8", "--out", str(tmp_path / "adv.zarr"), "--resume"]
    proc = _torchrun(2, args)
    out, _ = proc.communicate(timeout=300)  # no rank is left waiting
    assert proc.returncode != 0
    errors = [l for l in out.splitlines() if l.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], out  # the same one line from both ranks
    assert "cannot read the training checkpoint" in errors[0]
    ours = [l for l in out.splitlines() if 'File "' in l and "/torch/" not in l and "<frozen" not in l]
    assert ours == [], out  # no traceback from dfkd itself (torchrun reports the failed ranks in its own way)
