"""The memory-bank methods (fast, nayer): their losses by value, the meta update by hand, the chain's
byte-exact resume after SIGKILL, damaged units re-made by replay, torchrun chains, nayer's embeddings file."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd import store
from dfkd.pipelines.cli import cli
from dfkd.synth.losses import agreement_kl
from dfkd.synth.methods import SynthContext
from dfkd.synth.methods.fast import add_first_order_grads, set_reptile_grads
from dfkd.synth.methods.deepinversion import StatTerms
from tests.helpers import tree_bytes
from tests.kill_at import KILLED
from tests.synth_helpers import MEAN, SHAPE, STD, save_tiny_teacher, tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--set", "g_steps=3", "--set", "kd_steps=3", "--set", "kd_batch_size=16", "--set", "warmup=1",
        "--set", "width=8"]


def _args(teacher: str, out: str, method: str = "fast", units: int = 6, *extra: str) -> list[str]:
    return ["synth", "--teacher", teacher, "--method", method, "--num-images", str(16 * units), "--batch-size", "16",
            "--student", "lenet5_half", "--device", "cpu", "--out", out, *TINY, *extra]


def _run(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "dfkd.pipelines.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def _data(store_path: str) -> dict[str, bytes]:
    """Every chunk of the store (the root metadata differs by its creation time only)."""
    return {k: v for k, v in tree_bytes(store_path).items() if k != "zarr.json"}


def _student(store_path: str) -> dict[str, torch.Tensor]:
    """The proxy student's weights as saved beside the store (its file also names the store, so not its bytes)."""
    from dfkd.distill.checkpoint import load_model

    return load_model(os.path.splitext(store_path)[0] + ".student.pt", "student")[0].state_dict()


def _generator_state(store_path: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.splitext(store_path)[0] + ".chain.pt", weights_only=True)["generator"]["model"]


# -- losses by value -------------------------------------------------------------------------------
def test_agreement_kl_counts_only_samples_where_the_top_classes_agree():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # agree on sample 0 (class 0), disagree on sample 1
    p = torch.softmax(t[0], 0)
    kl0 = float((p * (p.log() - torch.log_softmax(s[0], 0))).sum())
    assert agreement_kl(s, t).item() == pytest.approx(kl0 / 2, rel=1e-6)
    assert agreement_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


def moment_distance(mu, v, mean, var):
    return torch.linalg.vector_norm(mu - mean) + torch.linalg.vector_norm(v - var)


def test_bn_loss_with_momentum_matches_the_blend_of_this_and_earlier_batches():
    teacher, _ = tiny_teacher(bn=True)
    ctx = SynthContext(teacher, SHAPE, 10, MEAN, STD, torch.device("cpu"))
    first = StatTerms(ctx, "", "fast").paths[0]
    stats = StatTerms(ctx, first, "fast", momentum=0.9)  # the first BN layer alone
    ref_mu, ref_var = stats.refs[first]
    seen = {}
    hook = dict(teacher.named_modules())[first].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    moments, losses = [], []
    for x in (torch.randn(32, *SHAPE), torch.randn(32, *SHAPE) * 2 + 1):
        with torch.no_grad():
            teacher(x)
        moments.append((seen["x"].mean((0, 2, 3)), seen["x"].var((0, 2, 3), unbiased=False)))
        losses.append(float(stats.loss(1.0)))
        stats.update_momentum()
    hook.remove()
    stats.close()
    (mu1, v1), (mu2, v2) = moments
    assert losses[0] == pytest.approx(float(moment_distance(mu1, v1, ref_mu, ref_var)), rel=1e-5)
    blend = moment_distance(0.1 * mu2 + 0.9 * mu1, 0.1 * v2 + 0.9 * v1, ref_mu, ref_var)
    assert losses[1] == pytest.approx(float(blend), rel=1e-5)
    running_mu, _ = stats.running[first]
    torch.testing.assert_close(running_mu, 0.9 * mu1 + 0.1 * mu2)


# -- the meta update -------------------------------------------------------------------------------
def test_first_order_meta_step_by_hand():
    """Two inner SGD steps on L(w) = 1/2 ||w - a||^2 from w0: the meta gradient is g(w0) + g(w1), and the
    meta-optimizer's first Adam step moves each weight by -lr * g / (|g| + eps)."""
    torch.manual_seed(0)
    meta = torch.nn.Linear(2, 1, bias=False)
    w0 = meta.weight.detach().clone()
    a = torch.tensor([[0.5, -2.0]])
    fast = copy.deepcopy(meta)
    inner = torch.optim.SGD(fast.parameters(), lr=0.1)
    meta_opt = torch.optim.Adam(meta.parameters(), lr=0.01, betas=(0.5, 0.999))
    meta_opt.zero_grad(set_to_none=True)
    for _ in range(2):
        loss = 0.5 * (fast.weight - a).pow(2).sum()
        inner.zero_grad()
        loss.backward()
        add_first_order_grads(meta, fast)
        inner.step()
    g0 = w0 - a
    w1 = w0 - 0.1 * g0
    g = g0 + (w1 - a)
    torch.testing.assert_close(meta.weight.grad, g)
    meta_opt.step()
    torch.testing.assert_close(meta.weight.detach(), w0 - 0.01 * g / (g.abs() + 1e-8))
    set_reptile_grads(meta, fast)  # Reptile: the displacement the adaptation made
    torch.testing.assert_close(meta.weight.grad, meta.weight.detach() - (w1 - 0.1 * (w1 - a)))


# -- the chain ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fast", "nayer"])
def test_chain_fills_the_store_with_its_targets_and_saves_the_proxy_student(tmp_path, method):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    out = str(tmp_path / "s.zarr")
    res = CliRunner().invoke(cli, _args(t, out, method, 4))
    assert res.exit_code == 0, res.output
    r = store.open(out)
    assert r.complete
    labels = r.read(0, 64).labels
    assert np.bincount(labels, minlength=10).tolist() == np.bincount(np.arange(64) % 10).tolist()
    seq = r.meta.provenance["sequential"]
    assert seq["chains"] == 1 and "contiguous" in seq["order"]
    assert os.path.exists(str(tmp_path / "s.student.pt")) and os.path.exists(str(tmp_path / "s.chain.pt"))
    again = str(tmp_path / "again.zarr")
    assert CliRunner().invoke(cli, _args(t, again, method, 4)).exit_code == 0
    np.testing.assert_array_equal(r.read(0, 64).images, store.open(again).read(0, 64).images)


@pytest.mark.parametrize("seed", [int(os.environ.get("DFKD_KILL_SEED", 0))])  # replay a failure with its seed
def test_kills_after_random_units_then_resume_equals_an_uninterrupted_run(tmp_path, seed):
    """Two runs each killed (no cleanup) the moment a seeded-random unit is written, between the write and the
    chain's checkpoint (every 2 units), then a resume: the store, proxy student and generator of one whole run."""
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    cut, whole = str(tmp_path / "cut.zarr"), str(tmp_path / "whole.zarr")
    extra = ["--set", "checkpoint_every=2"]
    rng = random.Random(seed)  # the kill points: the n-th unit each run writes, two runs, 1..3 units each
    for n in (rng.randint(1, 3), rng.randint(1, 3)):
        resume = ["--resume"] if os.path.exists(cut) else []
        before = int(store.open(cut).done_mask(refresh=True).sum()) if resume else 0
        proc = subprocess.run([sys.executable, "-m", "tests.kill_at", str(n), "dfkd.store.writer:StoreWriter.write_unit",
                               *_args(t, cut, "fast", 8, *extra, *resume)], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == KILLED, proc.stderr
        assert store.open(cut).done_mask(refresh=True).sum() == before + n
    _run(_args(t, cut, "fast", 8, *extra, "--resume"))
    _run(_args(t, whole, "fast", 8, *extra))
    assert _data(cut) == _data(whole)
    for saved in (_student, _generator_state):
        a, b = saved(cut), saved(whole)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_damaged_unit_is_remade_by_replaying_the_chain(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    out = str(tmp_path / "s.zarr")
    assert CliRunner().invoke(cli, _args(t, out, "nayer", 5)).exit_code == 0
    before = tree_bytes(out)
    os.remove(os.path.join(out, "images", "c", "2", "0", "0", "0"))
    res = CliRunner().invoke(cli, _args(t, out, "nayer", 5, "--resume"))
    assert res.exit_code == 0, res.output
    assert tree_bytes(out) == before


def test_a_resume_with_other_settings_is_refused_in_one_line(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    out = str(tmp_path / "s.zarr")
    assert CliRunner().invoke(cli, _args(t, out, "fast", 3)).exit_code == 0
    res = CliRunner().invoke(cli, _args(t, out, "fast", 3, "--resume", "--set", "lr_z=0.5"))
    assert res.exit_code != 0
    assert "lr_z was 0.01, now 0.5" in res.output and len(res.output.strip().splitlines()) == 1


def test_fast_needs_a_proxy_student(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    args = [a for a in _args(t, str(tmp_path / "s.zarr"), "fast", 2) if a != "lenet5_half" and a != "--student"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and "pass --student" in res.output
    assert not os.path.exists(str(tmp_path / "s.zarr"))


# -- nayer's class embeddings -------------------------------------------------------------------------
def test_nayer_reads_class_embeddings_from_a_file_and_refuses_a_wrong_one(tmp_path):
    from safetensors.torch import save_file

    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    good, bad = str(tmp_path / "e.safetensors"), str(tmp_path / "bad.safetensors")
    save_file({"embeddings": torch.randn(10, 12)}, good)
    save_file({"embeddings": torch.randn(7, 12)}, bad)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    assert CliRunner().invoke(cli, _args(t, a, "nayer", 2)).exit_code == 0
    assert CliRunner().invoke(cli, _args(t, b, "nayer", 2, "--set", f"embeddings={good}")).exit_code == 0
    assert not np.array_equal(store.open(a).read(0, 32).images, store.open(b).read(0, 32).images)
    res = CliRunner().invoke(cli, _args(t, str(tmp_path / "c.zarr"), "nayer", 2, "--set", f"embeddings={bad}"))
    assert res.exit_code != 0 and "must hold one 10×D tensor" in res.output
    assert len(res.output.strip().splitlines()) == 1


# -- torchrun ---------------------------------------------------------------------------------------
def _torchrun(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "dfkd.pipelines.cli", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_two_rank_chains_fill_the_store_the_same_way_twice_and_resume(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    _torchrun(_args(t, a, "fast", 6))
    _torchrun(_args(t, b, "fast", 6))
    assert store.open(a).complete
    assert _data(a) == _data(b)
    for r in (0, 1):
        assert os.path.exists(str(tmp_path / f"a.chain-{r}-of-2.pt"))
    os.remove(os.path.join(b, "images", "c", "4", "0", "0", "0"))  # a unit of rank 1's chain
    _torchrun(_args(t, b, "fast", 6, "--resume"))
    assert _data(a) == _data(b)
    res = CliRunner().invoke(cli, _args(t, b, "fast", 6, "--resume"))  # one process: another store
    assert res.exit_code != 0 and "provenance.sequential.chains was 2, now 1" in res.output


def test_the_proxy_students_default_rate_follows_its_batchnorm():
    from dfkd.distill.models import create_model
    from dfkd.synth.methods.bank_chain import BankConfig, student_lr

    assert BankConfig().lr_s == 0.0  # 0: chosen from the student
    assert student_lr(create_model("lenet5_half", 10, 1, 28)) == 0.02  # BN-free: 0.2 left proxies at chance
    assert student_lr(create_model("lenet5_bn", 10, 1, 28)) == 0.2
    assert student_lr(create_model("resnet8", 10, 3, 32)) == 0.2


def test_a_chain_whose_proxy_student_dies_stops_with_the_fix(tmp_path):
    """A proxy that diverged at an absurd rate stops the chain at once, before a unit is made against NaN (it used to
    write that unit, then stop at the next)."""
    teacher = str(tmp_path / "t.pt")
    save_tiny_teacher(teacher)
    out = str(tmp_path / "s.zarr")
    args = ["synth", "--teacher", teacher, "--method", "fast", "--num-images", "64", "--batch-size", "16",
            "--student", "lenet5_half", "--device", "cpu", "--out", out, "--set", "g_steps=1", "--set", "kd_steps=100",
            "--set", "kd_batch_size=16", "--set", "warmup=0", "--set", "width=8", "--set", "lr_s=10000", "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert "the proxy student diverged after 100 steps" in res.output, res.output
    assert "--set lr_s=1000 --overwrite" in res.output
    assert store.open(out).done_mask().tolist() == [True, False, False, False]  # stopped before the second unit


def test_a_top_up_starts_its_bank_from_other_stores_and_its_proxy_from_a_student(tmp_path):
    teacher = str(tmp_path / "t.pt")
    save_tiny_teacher(teacher)
    first, top, plain = (str(tmp_path / f"{n}.zarr") for n in ("first", "top", "plain"))
    _run(_args(teacher, first, "fast", 4))
    student = os.path.splitext(first)[0] + ".student.pt"
    _run(_args(teacher, top, "fast", 2, "--bank", first, "--seed", "5") + ["--student", student])
    _run(_args(teacher, plain, "fast", 2, "--seed", "5") + ["--student", student])
    meta = store.open(top).meta
    assert meta.provenance["sequential"]["bank"] == [store.open(first).identity()]
    assert "bank" not in store.open(plain).meta.provenance["sequential"]
    chain = torch.load(os.path.splitext(top)[0] + ".chain.pt", weights_only=True)
    assert chain["identity"]["generator_from"] == os.path.splitext(first)[0] + ".chain.pt"  # the bank's generator goes on
    # the bank changes what the chain learns: its proxy trained on the first store's images too
    a, b = _student(top), _student(plain)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    res = CliRunner().invoke(cli, ["synth", "--teacher", teacher, "--method", "stat", "--num-images", "16",
                                   "--iterations", "1", "--out", str(tmp_path / "x.zarr"), "--bank", first])
    assert res.exit_code == 2 and "keeps no memory bank" in res.output
    other = str(tmp_path / "other.pt")
    from dfkd.distill.checkpoint import save_model
    save_model(other, *tiny_teacher(seed=1))
    res = CliRunner().invoke(cli, _args(other, str(tmp_path / "y.zarr"), "fast", 1, "--bank", first))
    assert res.exit_code == 2 and "was not made by this teacher" in res.output


def test_a_preloaded_bank_samples_its_top_up_rows_and_streamed_units(tmp_path):
    """Preloaded rows (a top-up's other stores) stay in RAM and are drawn with the chain's units, streamed or not."""
    from dfkd.synth.memory_bank import MemoryBank
    from tests.helpers import fill, small_meta

    path = str(tmp_path / "s.zarr")
    meta = small_meta(num_samples=32, unit_size=16, image_shape=(1, 8, 8))
    w = store.create(path, meta)
    fill(w)
    w.finalize()
    reader = store.open(path)
    for limit in (10_000, 64 * 60):  # everything in RAM; the chain's units streamed from the store
        bank = MemoryBank(path, ram_limit=limit)
        bank.preload(torch.zeros((50, 1, 8, 8), dtype=torch.uint8), "other")
        for u in (0, 1):
            bank.add(u, torch.from_numpy(reader.read_unit(u).images))
        assert len(bank) == 82 and bank.in_ram == (limit == 10_000)
        x = bank.sample(4000, torch.Generator().manual_seed(0))
        zero = (x.flatten(1) == 0).all(1).float().mean().item()
        assert 0.3 < zero < 0.9  # both the preloaded rows (all zero) and the chain's own images are drawn
    with pytest.raises(store.StoreError, match="does not fit the memory bank"):
        MemoryBank(path, ram_limit=64).preload(torch.zeros((50, 1, 8, 8), dtype=torch.uint8), "other")
