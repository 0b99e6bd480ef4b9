"""Synthesis stage: exact loss values, clean hooks, methods that lower their loss, engine, resume, errors."""

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dfkd import store
from dfkd.pipelines.cli import cli
from dfkd.synth import losses
from dfkd.synth.engine import SynthConfig, frozen, synthesize
from dfkd.synth.hooks import FeatureHooks, HookError, bn_layers
from dfkd.synth.methods import SynthContext, create_method
from dfkd.synth.methods.feature_stats import StatTerms
from dfkd.synth.record import TeacherStats, record
from dfkd.synth.teacher import fingerprint
from tests.synth_helpers import MEAN, SHAPE, STD, save_tiny_teacher, tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- loss terms on fixed tiny inputs ---------------------------------------------------------------
def test_stat_loss_hand_computed():
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])  # N=2, C=1, 1×2: mean 4, biased var 5
    got = losses.stat_loss(x, torch.tensor([1.0]), torch.tensor([1.0]))
    assert got.item() == pytest.approx(abs(4 - 1) + abs(5 - 1))
    v = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # N×C vectors: means (2, 4), vars (1, 4)
    assert losses.stat_loss(v, torch.zeros(2), torch.zeros(2)).item() == pytest.approx(math.sqrt(20) + math.sqrt(17))


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 3, 4, 5)])
def test_channel_stats_gradient_matches_autograd(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: losses.channel_stats(t), (x,))
    mean, var = losses.channel_stats(x)
    dims = [0] + list(range(2, x.dim()))
    assert torch.allclose(mean, x.mean(dims)) and torch.allclose(var, x.var(dims, unbiased=False))
    (g_only_var,) = torch.autograd.grad(losses.channel_stats(x)[1].sum(), x)  # one output unused
    (ref,) = torch.autograd.grad(x.var(dims, unbiased=False).sum(), x)
    assert torch.allclose(g_only_var, ref)


def test_tv_and_l2_hand_computed():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # width diffs (-1, -2), height (-2, -3), anti-diagonal x[1,0]-x[0,1] = 1, diagonal x[0,0]-x[1,1] = -4
    assert losses.tv_l2(x).item() == pytest.approx(math.sqrt(5) + math.sqrt(13) + 1 + 4)
    assert losses.tv_l1(x).item() == pytest.approx(1.5 + 2.5 + 1 + 4)
    assert losses.l2_prior(x).item() == pytest.approx(math.sqrt(21))


def test_tv_l2_gradient_matches_autograd_of_the_plain_formula():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(losses.tv_l2, (x,))
    (got,) = torch.autograd.grad(losses.tv_l2(x), x)
    (ref,) = torch.autograd.grad(sum(torch.linalg.vector_norm(d) for d in losses._diffs(x)), x)
    assert torch.allclose(got, ref)
    flat = torch.zeros(1, 1, 4, 4, requires_grad=True)  # every difference 0: gradient 0, not NaN
    losses.tv_l2(flat).backward()
    assert torch.equal(flat.grad, torch.zeros_like(flat))


def test_competition_hand_computed():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 0.0]])  # T=3: teacher probs (e/(1+e), 1/(1+e))
    q = [math.e / (1 + math.e), 1 / (1 + math.e)]
    p = [0.5, 0.5]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda a: sum(mi * math.log(mi / ai) for ai, mi in zip(a, m))
    expected = 1 - (0.5 * kl(p) + 0.5 * kl(q))
    assert losses.competition(s, t, 3.0).item() == pytest.approx(expected, rel=1e-5)
    assert losses.competition(t, t, 3.0).item() == pytest.approx(1.0)  # agreement is the worst case


def test_spectral_loss_hand_computed_and_zero_on_own_spectrum():
    v = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # impulse: flat amplitude 0.5 with ortho norm over 3 rfft bins
    np.testing.assert_allclose(losses.amplitude(v).numpy(), [0.5, 0.5, 0.5])
    assert losses.spectral_loss(v, torch.tensor([1.0, 0.5, 0.5])).item() == pytest.approx(0.5 / math.sqrt(1.5))
    feats = torch.randn(16, 3, 6, 6)
    assert losses.spectral_loss(feats, losses.amplitude(feats)).item() == pytest.approx(0.0, abs=1e-6)


def test_class_spectral_loss_hand_computed_and_zero_on_the_recorded_classes(tiny_record):
    v = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # flat 0.5, zero, flat 0.5
    ref = torch.tensor([[1.0, 0.5, 0.5], [9.0, 9.0, 9.0], [0.5, 0.5, 0.5]])  # class 1 is absent: its row is ignored
    got = losses.class_spectral_loss(v, torch.tensor([0, 2, 2]), ref)
    class2 = math.sqrt(3 * 0.25 ** 2) / math.sqrt(3 * 0.25)  # mean of the zero and the impulse: flat 0.25
    assert got.item() == pytest.approx((0.5 / math.sqrt(1.5) + class2) / 2)
    teacher, _, data = tiny_record
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    rec = record(teacher, [(x, y)], num_classes=10)
    with FeatureHooks(teacher, rec.layers, capture="output") as hooks, torch.no_grad():
        teacher(x)
        feats = dict(hooks.captured)
    for layer in rec.layers:
        assert losses.class_spectral_loss(feats[layer], y, rec.class_amplitude[layer]).item() == pytest.approx(0, abs=1e-5)


def test_per_class_spectral_needs_a_per_class_record(tiny_record):
    teacher, _, data = tiny_record
    rec = record(teacher, data)  # no per-class spectra
    ctx = SynthContext(teacher, SHAPE, 10, MEAN, STD, torch.device("cpu"), record=rec)
    with pytest.raises(Exception, match="dfkd record --per-class"):
        create_method("spectral", ctx, {"per_class": True})


def test_bn_loss_is_near_zero_on_the_data_behind_the_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=None)  # cumulative average: one batch gives exactly its statistics
    data = torch.randn(4096, 4, 5, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 1.5
    bn.train()(data)
    assert losses.stat_loss(data, bn.running_mean, bn.running_var).item() < 0.01  # running var is unbiased
    assert losses.stat_loss(torch.randn(4096, 4, 5, 5), bn.running_mean, bn.running_var).item() > 1


# -- hooks ------------------------------------------------------------------------------------------
def test_hooks_leave_no_trace():
    teacher, _ = tiny_teacher()
    x = torch.randn(5, *SHAPE)
    before = teacher(x)
    flags = [p.requires_grad for p in teacher.parameters()]
    with FeatureHooks(teacher, bn_layers(teacher)) as hooks:
        teacher(x)
        assert set(hooks.captured) == set(bn_layers(teacher))
    assert all(not m._forward_hooks for m in teacher.modules())
    assert torch.equal(teacher(x), before)
    ctx = SynthContext(teacher, SHAPE, 10, MEAN, STD, torch.device("cpu"))
    with frozen(teacher):
        m = create_method("deepinversion", ctx, {"iterations": 2})
        m.synthesize(torch.arange(4), torch.Generator().manual_seed(0))
        m.close()
    assert all(not m._forward_hooks for m in teacher.modules())
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert torch.equal(teacher(x), before)


def test_unknown_layer_path():
    teacher, _ = tiny_teacher()
    with pytest.raises(HookError, match="no layer 'features.99'"):
        FeatureHooks(teacher, ["features.99"])


# -- methods lower their loss -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_record():
    teacher, _ = tiny_teacher(bn=False)
    torch.manual_seed(1)
    data = [(torch.randn(64, *SHAPE) * 0.5, torch.randint(0, 10, (64,))) for _ in range(3)]
    return teacher, record(teacher, data, num_classes=10), data


@pytest.mark.parametrize("method,bn", [("stat", True), ("deepinversion", True), ("adi", True), ("stat", False),
                                       ("spectral", False), ("spectral-per-class", False)])
def test_each_method_lowers_its_loss(method, bn, tiny_record):
    teacher = tiny_teacher(bn)[0] if bn else tiny_record[0]
    student = tiny_teacher(bn=True, seed=3)[0]
    rec = None if bn else tiny_record[1]
    extra = {}
    if method == "spectral-per-class":
        method, extra = "spectral", {"per_class": True}  # the fixture's record has per-class spectra
    ctx = SynthContext(teacher, SHAPE, 10, MEAN, STD, torch.device("cpu"), record=rec, student=student)
    targets = torch.arange(16) % 10
    totals = []
    with frozen(teacher, student):
        for iters in (1, 15):
            m = create_method(method, ctx, {"iterations": iters, "jitter": 0, "flip": False, **extra})
            x, last = m.synthesize(targets, torch.Generator().manual_seed(0))
            m.close()
            totals.append(last["total"])
            assert x.shape == (16, *SHAPE) and 0 <= x.min() and x.max() <= 1
    assert totals[1] < totals[0], f"{method}: loss {totals[0]:.4f} -> {totals[1]:.4f}"


def test_record_round_trip_and_exact_stats(tmp_path, tiny_record):
    teacher, rec, data = tiny_record
    path = str(tmp_path / "r.safetensors")
    assert rec.save(path) > 0
    back = TeacherStats.load(path)
    assert back.layers == rec.layers and back.teacher_fingerprint == fingerprint(teacher)
    layer = rec.layers[0]
    with FeatureHooks(teacher, [layer], capture="output") as h, torch.no_grad():
        feats = torch.cat([(teacher(x), h.captured[layer])[1] for x, _ in data])
    mu, var = losses.channel_stats(feats)
    torch.testing.assert_close(back.mean[layer], mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.var[layer], var, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(back.amplitude[layer], losses.amplitude(feats), rtol=1e-5, atol=1e-6)
    assert back.class_amplitude[layer].shape == (10, *back.amplitude[layer].shape)


# -- the engine ------------------------------------------------------------------------------------
def test_stored_logits_are_the_teachers_on_stored_images(tmp_path):
    teacher, _ = tiny_teacher()
    out = str(tmp_path / "s.zarr")
    synthesize(teacher, "deepinversion", SynthConfig(num_images=40, out=out, batch_size=16), image_shape=SHAPE,
               num_classes=10, mean=MEAN, std=STD, hparams={"iterations": 3})
    r = store.open(out)
    rec = r.read(0, 40)
    x = torch.from_numpy(rec.images).float() / 255
    with torch.no_grad():
        expected = teacher((x - MEAN[0]) / STD[0]).numpy()
    np.testing.assert_array_equal(rec.logits, expected)
    assert np.bincount(rec.labels, minlength=10).tolist() == [4] * 10  # class-balanced targets
    p = r.meta.provenance
    assert p["method"] == "deepinversion" and p["hparams"]["iterations"] == 3 and p["hparams"]["w_bn"] == 1.0
    assert p["teacher_fingerprint"] == fingerprint(teacher)


def test_same_seed_same_store_other_seed_other_images(tmp_path):
    teacher, _ = tiny_teacher()
    kw = {"image_shape": SHAPE, "num_classes": 10, "mean": MEAN, "std": STD, "hparams": {"iterations": 2}}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        synthesize(teacher, "stat", SynthConfig(num_images=48, out=str(tmp_path / f"{name}.zarr"), batch_size=16,
                                                seed=seed), **kw)
    a, b, c = (store.open(str(tmp_path / f"{n}.zarr")).read(0, 48) for n in "abc")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.logits, b.logits)
    assert not np.array_equal(a.images, c.images)


def test_sigkill_and_resume_gives_the_uninterrupted_store(tmp_path):
    teacher_path = str(tmp_path / "t.pt")
    save_tiny_teacher(teacher_path)
    killed, fresh = str(tmp_path / "killed.zarr"), str(tmp_path / "fresh.zarr")
    proc = subprocess.Popen([sys.executable, "-m", "tests.synth_helpers", teacher_path, killed, "60"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and done < 2:
        time.sleep(0.05)
        try:
            done = int(store.open(killed).done_mask(refresh=True).sum())
        except store.StoreError:
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= done < 10
    args = ["synth", "--teacher", teacher_path, "--method", "deepinversion", "--num-images", "160", "--batch-size",
            "16", "--iterations", "60", "--device", "cpu"]
    assert CliRunner().invoke(cli, args + ["--out", killed, "--resume"]).exit_code == 0
    assert CliRunner().invoke(cli, args + ["--out", fresh]).exit_code == 0
    a, b = store.open(killed).read(0, 160), store.open(fresh).read(0, 160)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.labels, b.labels)


# -- bad inputs -------------------------------------------------------------------------------------
def _synth(tmp_path, *extra):
    return CliRunner().invoke(cli, ["synth", "--num-images", "8", "--batch-size", "8", "--iterations", "1",
                                    "--out", str(tmp_path / "o.zarr"), "--device", "cpu", *extra])


def test_stat_without_bn_or_record_says_run_dfkd_record(tmp_path):
    t = str(tmp_path / "nobn.pt")
    save_tiny_teacher(t, bn=False)
    for method in ("stat", "deepinversion", "spectral"):
        res = _synth(tmp_path, "--teacher", t, "--method", method)
        assert res.exit_code == 2, res.output
        assert "dfkd record" in res.output and res.output.strip().count("\n") == 0
    assert not os.path.exists(tmp_path / "o.zarr" / "images" / "c")  # nothing was synthesized


def test_mismatched_record_is_rejected(tmp_path, tiny_record):
    _, rec, _ = tiny_record
    rpath = str(tmp_path / "r.safetensors")
    rec.save(rpath)
    t = str(tmp_path / "other.pt")
    save_tiny_teacher(t, bn=True)  # another teacher: other fingerprint
    res = _synth(tmp_path, "--teacher", t, "--method", "stat", "--stats", rpath)
    assert res.exit_code == 2 and "recorded with another teacher" in res.output


def test_unknown_hyper_parameter_and_missing_record(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    res = _synth(tmp_path, "--teacher", t, "--method", "deepinversion", "--set", "w_bnn=2")
    assert res.exit_code == 2 and "no hyper-parameter 'w_bnn'" in res.output
    res = _synth(tmp_path, "--teacher", t, "--method", "stat", "--stats", str(tmp_path / "none.safetensors"))
    assert res.exit_code == 2 and "dfkd record" in res.output
    res = _synth(tmp_path, "--teacher", t, "--method", "adi")
    assert res.exit_code == 2 and "--student" in res.output


def test_amp_is_off_on_cpu_and_named_modes_need_cuda():
    from dfkd.store.toolbox.errors import DfkdError
    from dfkd.store.toolbox.compute import amp_dtype

    assert amp_dtype("auto", "cpu") is None and amp_dtype("off", "cpu") is None
    with pytest.raises(DfkdError, match="needs a CUDA device"):
        amp_dtype("bf16", "cpu")
    with pytest.raises(DfkdError, match="amp must be one of"):
        amp_dtype("fp8", "cpu")


@pytest.mark.parametrize("method,term", [("stat", "stat"), ("spectral", "spectral")])
def test_first_multiplier_weighs_only_the_first_recorded_layer(method, term, tiny_record):
    teacher, rec, data = tiny_record
    ctx = SynthContext(teacher, SHAPE, 10, MEAN, STD, torch.device("cpu"), record=rec)
    x, targets = data[0][0][:16], data[0][1][:16]
    got = {}
    with frozen(teacher):
        for mult in (1.0, 4.0):
            m = create_method(method, ctx, {"first_multiplier": mult})
            logits = teacher(x)
            got[mult] = m.terms(x, logits, targets)[term].item()
            first = rec.layers[0]
            one = (losses.stat_loss(m.stats.hooks.captured[first], rec.mean[first], rec.var[first]) if method == "stat"
                   else losses.spectral_loss(m.hooks.captured[first], rec.amplitude[first])).item()
            m.close()
    assert len(rec.layers) > 1 and one > 0
    assert got[4.0] - got[1.0] == pytest.approx(3.0 * one, rel=1e-5)


def _plain_stat_loss(teacher, x):
    """The BN-statistics loss (first layer x10) by plain autograd on hooked BN inputs: the reference."""
    mods, paths = dict(teacher.named_modules()), bn_layers(teacher)
    with FeatureHooks(teacher, paths) as hooks:
        logits = teacher(x)
        return logits, sum((10.0 if i == 0 else 1.0) * losses.stat_loss(hooks.captured[p], mods[p].running_mean,
                                                                       mods[p].running_var) for i, p in enumerate(paths))


def test_tapped_bn_statistics_give_the_plain_gradient_and_pass_others_through():
    teacher, _ = tiny_teacher()
    teacher.double()
    ctx = SynthContext(teacher, SHAPE, 10, MEAN, STD, torch.device("cpu"))
    x = torch.randn(16, *SHAPE, dtype=torch.float64, requires_grad=True)
    with frozen(teacher):
        logits, plain = _plain_stat_loss(teacher, x)
        (want,) = torch.autograd.grad(plain + logits.logsumexp(1).mean(), x)
        (no_stats,) = torch.autograd.grad(teacher(x).logsumexp(1).mean(), x)
        terms = StatTerms(ctx, "", "stat")
        try:
            logits = teacher(x)
            tapped = terms.loss(10.0)
            assert tapped.item() == pytest.approx(plain.item())
            assert set(terms.slots) == set(bn_layers(teacher))
            (got,) = torch.autograd.grad(tapped + logits.logsumexp(1).mean(), x)
            torch.testing.assert_close(got, want)
            (got,) = torch.autograd.grad(teacher(x).logsumexp(1).mean(), x)  # taps on, statistics unused
            torch.testing.assert_close(got, no_stats)
            logits = teacher(x)  # the statistics entering the loss twice: their gradient twice, no more
            (got,) = torch.autograd.grad(terms.loss(10.0) + terms.loss(10.0) + logits.logsumexp(1).mean(), x)
            (ref,) = torch.autograd.grad(2 * _plain_stat_loss(teacher, x)[1], x)
            torch.testing.assert_close(got, ref + no_stats)
        finally:
            terms.close()


def test_moment_gradient_joins_a_half_precision_gradient_in_fp32():
    x = (torch.randn(512, 3, 6, 6) * 2).half()  # n = 18432: 2 g_var / n is below fp16's normal range
    mean = x.float().mean((0, 2, 3))
    g_var, into = torch.full((3,), 1e-2), (torch.randn(512, 3, 6, 6) * 1e-5).half()
    got = losses.moments_grad(x, mean, None, g_var, into=into)
    want = (losses.moments_grad(x.float(), mean, None, g_var) + into.float()).half()
    assert got.dtype == torch.float16 and torch.equal(got, want)


@pytest.mark.parametrize("method,sets", [
    ("deepinversion", ["--set", "layers=features.1"]),
    ("dafl", ["--student", "lenet5_half", "--rounds", "1", "--set", "feature_layer=classifier.2"]),
    ("adversarial", ["--student", "lenet5_half", "--rounds", "1", "--set", "w_at=1",
                     "--set", "at_layers=features.0:features.0"]),
])
def test_layer_paths_work_with_compile(tmp_path, monkeypatch, method, sets):
    """--compile compiles the teacher in place, so layer paths need no `_orig_mod.` prefix (eager backend: CPU-fast)."""
    real = torch.nn.Module.compile
    compiled = []

    def eager(self, *a, **k):
        compiled.append(type(self).__name__)
        return real(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager)
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    small = ["--set", "latent_dim=16", "--set", "width=8", "--set", "batch_size=8"] if method != "deepinversion" \
        else ["--iterations", "2"]
    res = CliRunner().invoke(cli, ["synth", "--teacher", t, "--method", method, "--num-images", "16", "--batch-size",
                                   "16", "--device", "cpu", "--compile", "--out", str(tmp_path / "s.zarr"), *sets, *small])
    assert res.exit_code == 0, res.output
    assert compiled == ["LeNet5"] and store.open(str(tmp_path / "s.zarr")).complete
