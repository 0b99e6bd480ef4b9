"""Synthesis stage: exact loss values, clean hooks, methods that lower their loss, engine, resume, errors."""

import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from dfkd import store
from dfkd.pipelines.cli import cli
from dfkd.synth import losses
from dfkd.synth.engine import SynthConfig, frozen, synthesize
from dfkd.synth.hooks import FeatureHooks, HookError, bn_layers
from dfkd.synth.methods import SynthContext, create_method
from dfkd.synth.methods.deepinversion import StatTerms
from dfkd.synth.moment_match import MomentMatch, _affine, tap
from dfkd.synth.record import TeacherStats, record
from dfkd.synth.teacher import fingerprint
from tests.kill_at import KILLED
from tests.synth_helpers import MEAN, SHAPE, STD, save_tiny_teacher, tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- loss terms on fixed tiny inputs ---------------------------------------------------------------
def plain_stat_loss(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """DeepInversion's feature-distribution term by plain autograd: ||mu(x) - mean||_2 + ||var(x) - var||_2."""
    dims = [0, *range(2, x.dim())]
    return (torch.linalg.vector_norm(x.mean(dims) - mean.to(x.dtype))
            + torch.linalg.vector_norm(x.var(dims, unbiased=False) - var.to(x.dtype)))


def stat_loss(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """One layer's stat loss as the methods compute it (MomentMatch, untapped)."""
    return MomentMatch([(mean, var)], torch.device("cpu")).loss([x], [None], [1.0])


def test_stat_loss_hand_computed():
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])  # N=2, C=1, 1×2: mean 4, biased var 5
    got = stat_loss(x, torch.tensor([1.0]), torch.tensor([1.0]))
    assert got.item() == pytest.approx(abs(4 - 1) + abs(5 - 1))
    v = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # N×C vectors: means (2, 4), vars (1, 4)
    assert stat_loss(v, torch.zeros(2), torch.zeros(2)).item() == pytest.approx(math.sqrt(20) + math.sqrt(17))


def test_stacked_moment_loss_and_gradient_match_plain_autograd_layer_by_layer():
    """Layers of every rank in one loss, weighted, untapped and tapped: the plain per-layer formula's value and
    gradient (float64), and a layer whose moments equal the reference gets gradient 0, not NaN."""
    torch.manual_seed(0)
    shapes = [(4, 3), (3, 2, 5), (2, 3, 4, 5), (2, 6, 3, 3)]
    xs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes[:3]]
    xs.append(torch.zeros(shapes[3], dtype=torch.float64, requires_grad=True))  # moments exactly the reference's
    refs = [(torch.randn(s[1], dtype=torch.float64), torch.rand(s[1], dtype=torch.float64)) for s in shapes[:3]]
    refs.append((torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)))
    weights = [10.0, 1.0, 0.5, 2.0]
    plain = sum(w * plain_stat_loss(x, m, v) for w, x, (m, v) in zip(weights, xs, refs))
    want = torch.autograd.grad(plain, xs[:3])
    match = MomentMatch(refs, torch.device("cpu"))
    got = match.loss(xs, [None] * 4, weights)
    assert got.item() == pytest.approx(plain.item(), rel=1e-12)
    grads = torch.autograd.grad(got, xs)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))  # exact match: no gradient, no NaN
    taps = [tap(x) for x in xs]  # tapped: the moment gradient reaches x through the tap, not the loss
    loss = match.loss([t for t, _ in taps], [s for _, s in taps], weights)
    tapped = torch.autograd.grad(loss + sum((t * 0.0).sum() for t, _ in taps), xs)
    for g, w in zip(tapped, grads):
        torch.testing.assert_close(g, w)


def test_moment_loss_gradcheck():
    torch.manual_seed(1)
    xs = (torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True))
    match = MomentMatch([(torch.zeros(2), torch.ones(2)), (torch.ones(3), torch.ones(3) * 2)], torch.device("cpu"))
    assert torch.autograd.gradcheck(lambda a, b: match.loss([a, b], [None, None], [3.0, 1.0]), xs)


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_moments_are_each_groups_own_loss_and_gradient(groups):
    """Units side by side: each group of samples is matched on its own moments, as if it were alone."""
    torch.manual_seed(4)
    xs = [torch.randn(groups * 4, 3, 5, 5, dtype=torch.float64, requires_grad=True),
          torch.randn(groups * 4, 6, dtype=torch.float64, requires_grad=True)]
    refs = [(torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)),
            (torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64))]
    match = MomentMatch(refs, torch.device("cpu"))
    alone = sum(match.loss([x[g * 4:(g + 1) * 4] for x in xs], [None, None], [10.0, 1.0]) for g in range(groups))
    want = torch.autograd.grad(alone, xs)
    got = match.loss(xs, [None, None], [10.0, 1.0], groups=groups)
    assert got.item() == pytest.approx(alone.item(), rel=1e-12)
    for g, w in zip(torch.autograd.grad(got, xs), want):
        torch.testing.assert_close(g, w)
    taps = [tap(x) for x in xs]  # and through taps, as the methods use it
    loss = match.loss([t for t, _ in taps], [s for _, s in taps], [10.0, 1.0], groups=groups)
    for g, w in zip(torch.autograd.grad(loss + sum((t * 0.0).sum() for t, _ in taps), xs), want):
        torch.testing.assert_close(g, w)


def test_moments_blend_with_running_ones():
    torch.manual_seed(2)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    ref = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    running = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)
    match = MomentMatch([ref], torch.device("cpu"))
    got = match.loss([x], [None], [1.0], running=match.join([running]), momentum=0.9)
    mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    want = (torch.linalg.vector_norm(0.1 * mu + 0.9 * running[0] - ref[0])
            + torch.linalg.vector_norm(0.1 * var + 0.9 * running[1] - ref[1]))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    (last_mu, last_var), = match.split(match.last)
    torch.testing.assert_close(last_mu, mu.detach())
    torch.testing.assert_close(last_var, var.detach())


def test_tv_and_l2_hand_computed():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # width diffs (-1, -2), height (-2, -3), anti-diagonal x[1,0]-x[0,1] = 1, diagonal x[0,0]-x[1,1] = -4
    assert losses.tv_l2(x).item() == pytest.approx(math.sqrt(5) + math.sqrt(13) + 1 + 4)
    assert losses.tv_l1(x).item() == pytest.approx(1.5 + 2.5 + 1 + 4)
    assert losses.l2_prior(x).item() == pytest.approx(math.sqrt(21))


@pytest.mark.parametrize("conv", [False, True], ids=["slices", "convolution"])
@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (1, 2, 1, 4), (3, 1, 7, 1)])
def test_tv_l2_value_and_gradient_match_autograd_of_the_plain_formula(shape, conv, monkeypatch):
    monkeypatch.setattr(losses, "tv_by_convolution", lambda device: conv)  # CUDA's form, here on the CPU
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(losses.tv_l2, (x,))
    plain = sum(torch.linalg.vector_norm(d) for d in losses._diffs(x))
    for weight in (1.0, 2.5e-5):
        got = losses.tv_l2(x, weight)
        assert got.item() == pytest.approx(weight * plain.item(), rel=1e-12)
        want = torch.autograd.grad(plain, x, retain_graph=True)[0]
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], weight * want)
    big = torch.randn(64, 3, 32, 32)  # fp32: the one-convolution sum is as close to float64 as the plain one
    exact = sum(torch.linalg.vector_norm(d) for d in losses._diffs(big.double())).item()
    assert losses.tv_l2(big).item() == pytest.approx(exact, rel=2e-6)
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


def plain_competition(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """ADI's competition term written with autograd's own ops: the reference for the fused one."""
    p, q = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    kl = lambda a: F.kl_div(torch.log(a.clamp(0.01, 0.99)), m, reduction="batchmean")
    return 1.0 - (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])  # probabilities inside, across and beyond the clamps
def test_competition_value_and_gradient_match_autograd_of_the_plain_formula(spread):
    torch.manual_seed(3)
    s, t = (torch.randn(6, 10, dtype=torch.float64, requires_grad=True) * spread for _ in range(2))
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    got, want = losses.competition(s, t, 3.0), plain_competition(s, t, 3.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for g, w in zip(torch.autograd.grad(got, (s, t)), torch.autograd.grad(want, (s, t))):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(lambda a, b: losses.competition(a, b, 2.0), (s, t))


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
    assert stat_loss(data, bn.running_mean, bn.running_var).item() < 0.01  # running var is unbiased
    assert stat_loss(torch.randn(4096, 4, 5, 5), bn.running_mean, bn.running_var).item() > 1


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
    mu, var = feats.mean((0, 2, 3)), feats.var((0, 2, 3), unbiased=False)
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


def test_a_kill_after_a_unit_then_resume_gives_the_uninterrupted_store(tmp_path):
    """Killed (no cleanup) the moment its third unit is written, then resumed: the store an uninterrupted run makes."""
    teacher_path = str(tmp_path / "t.pt")
    save_tiny_teacher(teacher_path)
    killed, fresh = str(tmp_path / "killed.zarr"), str(tmp_path / "fresh.zarr")
    args = ["synth", "--teacher", teacher_path, "--method", "deepinversion", "--num-images", "160", "--batch-size",
            "16", "--iterations", "20", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "tests.kill_at", "3", "dfkd.store.writer:StoreWriter.write_unit",
                           *args, "--out", killed], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == KILLED, proc.stderr
    assert store.open(killed).done_mask(refresh=True).sum() == 3
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
            one = (stat_loss(m.stats.hooks.captured[first], rec.mean[first], rec.var[first]) if method == "stat"
                   else losses.spectral_loss(m.hooks.captured[first], rec.amplitude[first])).item()
            m.close()
    assert len(rec.layers) > 1 and one > 0
    assert got[4.0] - got[1.0] == pytest.approx(3.0 * one, rel=1e-5)


def _plain_stat_loss(teacher, x):
    """The BN-statistics loss (first layer x10) by plain autograd on hooked BN inputs: the reference."""
    mods, paths = dict(teacher.named_modules()), bn_layers(teacher)
    with FeatureHooks(teacher, paths) as hooks:
        logits = teacher(x)
        return logits, sum((10.0 if i == 0 else 1.0) * plain_stat_loss(hooks.captured[p], mods[p].running_mean,
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


def reference_inversion(ctx: SynthContext, targets: torch.Tensor, gen: torch.Generator, cfg) -> torch.Tensor:
    """The inversion loop as first written, every term by plain autograd (BN statistics per layer through hooks,
    TV from the four slices, cross-entropy per image, the competition as the published formula)."""
    teacher = ctx.teacher
    x = torch.randn((len(targets), *ctx.image_shape), generator=gen).requires_grad_(True)
    lo, hi = ctx.normalize(torch.zeros(1, 1, 1, 1)), ctx.normalize(torch.ones(1, 1, 1, 1))
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    best, best_score = x.detach().clone(), torch.full((len(targets),), math.inf)
    mods, paths = dict(teacher.named_modules()), bn_layers(teacher)
    with FeatureHooks(teacher, paths) as hooks:
        for it in range(cfg.iterations):
            opt.param_groups[0]["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations))
            dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen))
            view = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            if bool(torch.rand((), generator=gen) < 0.5):
                view = view.flip(3)
            logits = teacher(view)
            ce_each = F.cross_entropy(logits, targets, reduction="none")
            bn = sum((cfg.first_multiplier if i == 0 else 1.0) * plain_stat_loss(
                hooks.captured[p], mods[p].running_mean, mods[p].running_var) for i, p in enumerate(paths))
            loss = ce_each.mean() + cfg.w_bn * bn + cfg.w_tv_l2 * sum(
                torch.linalg.vector_norm(d) for d in losses._diffs(view))
            if hasattr(cfg, "w_competition"):
                loss = loss + cfg.w_competition * plain_competition(ctx.student(view), logits, cfg.temperature)
            with torch.no_grad():
                better = ce_each < best_score
                best = torch.where(better.view(-1, 1, 1, 1), x, best)
                best_score = torch.where(better, ce_each, best_score)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(min=lo, max=hi)
    return ctx.denormalize(best).clamp(0, 1)


@contextlib.contextmanager
def float64_context():
    """A frozen tiny BN teacher and BN-free student in float64, float64 the default dtype, for the duration."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        teacher, _ = tiny_teacher()
        student, _ = tiny_teacher(bn=False, seed=1)
        teacher.double(), student.double()
        with frozen(teacher, student):
            yield SynthContext(teacher, SHAPE, 10, MEAN, STD, torch.device("cpu"), student=student)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("method", ["deepinversion", "adi"])
def test_inversion_images_equal_the_plain_autograd_loop(method):
    """The fused terms change how many ops an iteration dispatches, not the images: float64, to 1e-6 (Adam scales
    a pixel's step by its gradient's size, so near-zero gradients carry their last-bit differences to ~1e-9)."""
    with float64_context() as ctx:
        targets = torch.arange(12) % 10
        m = create_method(method, ctx, {"iterations": 8, "w_tv_l2": 1e-3, "w_competition": 1.0} if method == "adi"
                          else {"iterations": 8, "w_tv_l2": 1e-3})
        got, _ = m.synthesize(targets, torch.Generator().manual_seed(5))
        m.close()
        want = reference_inversion(ctx, targets, torch.Generator().manual_seed(5), m.config)
    assert got.dtype == torch.float64 and not torch.equal(got, torch.zeros_like(got))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_moment_gradient_joins_a_half_precision_gradient_in_fp32():
    x = (torch.randn(512, 3, 6, 6) * 2).half()  # n = 18432: 2 g_var / n is below fp16's normal range
    scale, shift = torch.full((1, 3, 1, 1), 2e-2 / 18432), torch.full((1, 3, 1, 1), 1e-6)
    into = (torch.randn(512, 3, 6, 6) * 1e-5).half()
    got = _affine(x, scale, shift, into)
    want = (x.float() * scale + shift + into.float()).half()
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


# -- host work per iteration -----------------------------------------------------------------------
def _extra_ops(model: str, shape: tuple[int, int, int], method: str) -> tuple[float, float, int]:
    """(ops per iteration of `method`, its floor's ops, the teacher's BN layers) at batch 2."""
    from benchmarks.op_count import floor_ops, inversion_ops
    from dfkd.distill.models import create_model

    torch.manual_seed(0)
    teacher = create_model(model, 10, shape[0], shape[1]).eval()
    targets = torch.arange(2)
    ctx = SynthContext(teacher, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0], torch.device("cpu"))
    with frozen(teacher):
        floor = floor_ops(teacher, torch.randn(2, *shape), targets)
        m = create_method(method, ctx, {"jitter": 1, "flip": True})
        try:
            return inversion_ops(m, targets), floor, len(bn_layers(teacher))
        finally:
            m.close()


@pytest.mark.parametrize("method", ["stat", "deepinversion"])
def test_an_iteration_dispatches_a_few_ops_per_bn_layer_over_its_floor(method, monkeypatch):
    """Each matched layer costs a tap, three reductions and an addcmul + add in the backward; distances, norms and
    weights are stacked (layer by layer with autograd it was ~45 ops a layer, 5.6x the floor on LeNet-5-BN).
    Counted with TV in its CUDA form (one convolution each way; the CPU's slices dispatch ~28 more)."""
    monkeypatch.setattr(losses, "tv_by_convolution", lambda device: True)
    ops, floor, _ = _extra_ops("lenet5_bn", SHAPE, method)
    assert ops <= 2.5 * floor
    small, small_floor, small_layers = _extra_ops("resnet8", (3, 8, 8), method)
    big, big_floor, big_layers = _extra_ops("resnet20", (3, 8, 8), method)
    per_layer = ((big - big_floor) - (small - small_floor)) / (big_layers - small_layers)
    assert per_layer <= 7


def test_the_graph_safe_loop_is_reused_across_batches_with_its_rate_as_a_tensor(monkeypatch):
    """What CUDA graphs run, stepped eagerly here: one loop per batch shape (tensor learning rate, capturable Adam),
    reset for each new batch, makes the images of a fresh loop per batch."""
    from dfkd.synth.methods.inversion_loop import InversionLoop

    teacher, _ = tiny_teacher()
    ctx = SynthContext(teacher, SHAPE, 10, MEAN, STD, torch.device("cpu"))
    batches = [(torch.arange(8) % 10, 11), (torch.arange(8) % 10, 12), (torch.arange(8) % 10, 11)]
    with frozen(teacher):
        m = create_method("deepinversion", ctx, {"iterations": 5})
        fresh = [m.synthesize(t, torch.Generator().manual_seed(s))[0] for t, s in batches]
        monkeypatch.setattr(InversionLoop, "can_graph", staticmethod(lambda ctx: True))
        monkeypatch.setattr(InversionLoop, "graphed", lambda self, rows, cols: self.step)
        reused = [m.synthesize(t, torch.Generator().manual_seed(s))[0] for t, s in batches]
        loops = list(m._graphed_loops.values())
        m.close()
    assert len(loops) == 1 and torch.is_tensor(loops[0].lr)
    for a, b in zip(fresh, reused):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(fresh[0], fresh[1]) and torch.equal(reused[0], reused[2])


@pytest.mark.parametrize("method", ["stat", "deepinversion", "adi"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_units_in_flight_each_get_the_images_they_get_alone(method, groups):
    """G units in one batch, each from its own generator and matched on its own statistics (float64: to 1e-6, as
    Adam carries last-bit differences of near-zero gradients)."""
    with float64_context() as ctx:
        targets = [torch.randperm(10, generator=torch.Generator().manual_seed(g))[:6] for g in range(groups)]
        m = create_method(method, ctx, {"iterations": 6, "jitter": 2})
        alone = [m.synthesize(t, torch.Generator().manual_seed(40 + g)) for g, t in enumerate(targets)]
        together = m.synthesize_units(targets, [torch.Generator().manual_seed(40 + g) for g in range(groups)])
        m.close()
    assert len(together) == groups
    for (a, la), (b, lb) in zip(alone, together):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    if groups > 1:
        assert not torch.equal(alone[0][0], alone[1][0])
        mean_total = sum(la["total"] for _, la in alone) / groups
        assert together[0][1]["total"] == pytest.approx(mean_total, rel=1e-6)


def test_a_store_made_with_units_in_flight_resumes_to_the_same_bytes(tmp_path):
    """--units-in-flight 2: the images of one unit at a time to float rounding (uint8 within 1), groups fixed by
    index so a resume re-makes a group as the uninterrupted run did (bytes), a shorter last unit alone."""
    teacher, _ = tiny_teacher()
    kw = {"image_shape": SHAPE, "num_classes": 10, "mean": MEAN, "std": STD, "hparams": {"iterations": 3}}
    cfg = lambda name, g, **k: SynthConfig(num_images=72, out=str(tmp_path / name), batch_size=16, seed=3,
                                           units_in_flight=g, **k)  # 5 units, the last of 8 images
    synthesize(teacher, "deepinversion", cfg("one.zarr", 1), **kw)
    synthesize(teacher, "deepinversion", cfg("two.zarr", 2), **kw)
    one, two = (store.open(str(tmp_path / n)).read(0, 72) for n in ("one.zarr", "two.zarr"))
    diff = np.abs(one.images.astype(int) - two.images.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    np.testing.assert_array_equal(one.labels, two.labels)
    assert store.open(str(tmp_path / "two.zarr")).meta.provenance["compute"]["units_in_flight"] == 2
    w = store.open_writer(str(tmp_path / "two.zarr"))
    for u in (1, 4):  # lost: one unit of the group (0, 1), and the short last unit
        w.backend.mark_pending(u)
    synthesize(teacher, "deepinversion", cfg("two.zarr", 2, resume=True), **kw)
    again = store.open(str(tmp_path / "two.zarr")).read(0, 72)
    np.testing.assert_array_equal(again.images, two.images)
    np.testing.assert_array_equal(again.logits, two.logits)
    with pytest.raises(Exception, match="units_in_flight"):  # another grouping would give other float rounding
        synthesize(teacher, "deepinversion", cfg("two.zarr", 3, resume=True), **kw)


def test_units_in_flight_is_refused_for_a_method_that_makes_one_unit_at_a_time(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    res = CliRunner().invoke(cli, ["synth", "--teacher", t, "--method", "noise", "--num-images", "32",
                                   "--units-in-flight", "2", "--out", str(tmp_path / "n.zarr")])
    assert res.exit_code == 2 and "noise makes one unit at a time" in res.output and "deepinversion" in res.output
    assert not os.path.exists(tmp_path / "n.zarr")


def test_a_kill_inside_a_group_in_flight_resumes_to_the_uninterrupted_store(tmp_path):
    """Killed (no cleanup) after the first unit of the group (0, 1) is written and before the second: the resume
    makes the group again, writes only unit 1, and the store is the one an uninterrupted run with the same
    --units-in-flight makes, byte for byte."""
    teacher_path = str(tmp_path / "t.pt")
    save_tiny_teacher(teacher_path)
    args = ["synth", "--teacher", teacher_path, "--method", "deepinversion", "--num-images", "72", "--batch-size", "16",
            "--iterations", "5", "--units-in-flight", "2", "--views", "2", "--device", "cpu"]
    killed, whole = str(tmp_path / "killed.zarr"), str(tmp_path / "whole.zarr")
    proc = subprocess.run([sys.executable, "-m", "tests.kill_at", "1", "dfkd.store.writer:StoreWriter.write_unit",
                           *args, "--out", killed], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == KILLED, proc.stderr
    assert store.open(killed).done_units(refresh=True) == [0]
    assert CliRunner().invoke(cli, args + ["--out", killed, "--resume"]).exit_code == 0
    assert CliRunner().invoke(cli, args + ["--out", whole]).exit_code == 0
    a, b = store.open(killed).read(0, 72), store.open(whole).read(0, 72)
    for field in ("images", "logits", "labels", "views"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
