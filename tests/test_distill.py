"""Distillation stage: zoo, checkpoints, KD loss, multi-student single pass, resume, CLI and bad inputs."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from dfkd.distill.checkpoint import CheckpointError, load_model, save_model
from dfkd.distill.losses import Objective, kd_loss
from dfkd.distill.models import ModelError, create_model, list_models
from dfkd.distill.sources import StoreSource
from dfkd.distill.trainer import StudentSpec, TrainConfig, Trainer
from dfkd.pipelines.cli import cli
from tests.distill_helpers import teacher_store, train_digits_teacher


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    acc = train_digits_teacher(path)
    return path, acc


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, digits_teacher):
    path = str(tmp_path_factory.mktemp("store") / "digits.zarr")
    model, spec, _ = load_model(digits_teacher[0])
    teacher_store(path, model, spec)
    return path


@pytest.mark.parametrize("name", list_models())
def test_zoo_models_run_on_all_shapes(name):
    for c, s in [(1, 8), (1, 28), (3, 32)]:
        torch.manual_seed(0)
        model = create_model(name, num_classes=7, in_channels=c, image_size=s).eval()
        with torch.no_grad():
            y = model(torch.randn(2, c, s, s))
        assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_student_sizes_match_the_literature():
    count = lambda n: sum(p.numel() for p in create_model(n, 10, 1, 28).parameters())
    assert count("lenet5") == 61706              # the classic 61.7k LeNet-5
    assert abs(count("lenet5_half") - 16_000) < 500       # DAFL/DFAD LeNet-5-half, ~16k
    assert abs(count("lenet5_half_zskd") - 35_800) < 100  # Lopes/ZSKD LeNet-5-half, ~35.8k


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model 'lenet6'.*choose one of"):
        create_model("lenet6", 10)


def test_checkpoint_rebuilds_identical_model(tmp_path):
    from dfkd.distill.checkpoint import ModelSpec

    spec = ModelSpec("resnet8", 10, 3, 32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    torch.manual_seed(1)
    model = spec.build()
    model.train()(torch.randn(8, 3, 32, 32))  # move the BN running stats off their init
    save_model(str(tmp_path / "m.pt"), model, spec, {"note": "x"})
    loaded, spec2, metrics = load_model(str(tmp_path / "m.pt"))
    assert spec2 == spec and metrics == {"note": "x"}
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*dfkd train-teacher"):
        load_model(str(tmp_path / "none.pt"), "teacher")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dfkd model checkpoint"):
        load_model(str(tmp_path / "foreign.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(str(tmp_path / "junk.pt"))


def test_kd_loss_hand_computed():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 1.0, 0.0]])
    T = 2.0
    ps = [math.exp(v / T) for v in (1, 2, 3)]
    pt = [math.exp(v / T) for v in (3, 1, 0)]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt))
    assert kd_loss(s, t, T).item() == pytest.approx(kl * T * T, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    obj = Objective(kd=0.5, ce_teacher=2.0, temperature=T)
    ce = -math.log(math.exp(1) / sum(math.exp(v) for v in (1, 2, 3)))  # teacher argmax is class 0
    assert obj(s, t, None).item() == pytest.approx(0.5 * kl * T * T + 2.0 * ce, rel=1e-6)


class CountingSource:
    """Wraps a source and counts the batches it yields."""

    def __init__(self, inner):
        self.inner, self.reads = inner, 0
        for k in ("num_classes", "image_shape", "mean", "std", "name"):
            setattr(self, k, getattr(inner, k))

    def set_epoch(self, e):
        self.inner.set_epoch(e)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for b in self.inner:
            self.reads += 1
            yield b


def test_three_students_one_read_per_batch(digits_store):
    src = CountingSource(StoreSource(digits_store, batch_size=128))
    trainer = Trainer(src, [StudentSpec("mlp"), StudentSpec("lenet5_half"), StudentSpec("mlp")],
                      TrainConfig(epochs=2))
    before = [[p.detach().clone() for p in s.model.parameters()] for s in trainer.students]
    trainer.fit()
    assert src.reads == 2 * len(src) == trainer.batches_read
    assert [s.name for s in trainer.students] == ["mlp", "lenet5_half", "mlp-2"]
    for s, b in zip(trainer.students, before):
        assert s.optimizer.state[next(iter(s.model.parameters()))]["momentum_buffer"] is not None
        assert all(not torch.equal(p, q) for p, q in zip(s.model.parameters(), b)), f"{s.name} was not updated"
    # same architecture, different seeds -> different students
    assert not torch.equal(next(trainer.students[0].model.parameters()), next(trainer.students[2].model.parameters()))


class EagerGraph:
    """store.toolbox.cuda_graph.GraphedStep's contract on the CPU: its warm-up steps run, then each call runs the step."""

    def __init__(self, step, inputs):
        self.step = step
        for _ in range(3):  # what a capture's warm-up does to the weights, BN statistics and optimizer state
            step(*inputs)

    def __call__(self, *inputs):
        self.step(*inputs)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_students_stepped_as_graphs_train_as_without(monkeypatch, digits_store, clip):
    """What CUDA graphs run, on the CPU: a rate tensor the scheduler writes, fused optimizers, sums on the device,
    the capture's warm-up undone, other batch sizes eager, a gradient clip: the weights and metrics of a run
    without graphs."""
    import dfkd.distill.trainer as trainer_module
    import dfkd.store.toolbox.cuda_graph as cuda_graph

    def run(graphs: bool, clip: float = clip) -> Trainer:
        tr = Trainer(StoreSource(digits_store, batch_size=96, seed=2), [StudentSpec("lenet5_half"),
                     StudentSpec("mlp", "adam")], TrainConfig(epochs=2, augment="flip-crop", seed=2, cuda_graphs=graphs,
                                                              clip_grad_norm=clip))
        tr.fit()
        return tr

    plain = run(False)
    if clip:  # the clip bites: both students end elsewhere without it
        for a, b in zip(plain.students, run(False, 0.0).students):
            assert not torch.equal(next(a.model.parameters()), next(b.model.parameters())), a.name
    monkeypatch.setattr(trainer_module, "graphs_on", lambda config, *a: config.cuda_graphs)
    monkeypatch.setattr(cuda_graph, "GraphedStep", EagerGraph)
    graphed = run(True)
    from dfkd import store

    assert store.open(digits_store).meta.num_samples % 96  # a last batch of another size: eager in both
    for a, b in zip(plain.students, graphed.students):
        assert b.graph is not None and torch.is_tensor(b.optimizer.param_groups[0]["lr"])
        for (k, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=f"{a.name}.{k}")
        for ra, rb in zip(a.history, b.history):
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
            assert rb["train_agreement"] == pytest.approx(ra["train_agreement"], abs=1e-3)


def test_a_clipped_step_moves_the_weights_along_the_gradient_by_the_rate_times_the_norm(digits_store):
    """--clip-grad-norm: the first SGD step (Nesterov, momentum 0.9, no weight decay) moves the weights by 1.9 lr x the
    clipped gradient, in the direction of the unclipped one; a norm above the gradient's changes nothing."""
    def first_step(clip: float) -> torch.Tensor:
        src = StoreSource(digits_store, batch_size=64, seed=1)
        tr = Trainer(src, [StudentSpec("mlp", lr=0.1, weight_decay=0.0)], TrainConfig(epochs=1, clip_grad_norm=clip))
        s = tr.students[0]
        s.sums = [torch.zeros(()), torch.zeros(())]
        before = torch.cat([p.detach().flatten().clone() for p in s.model.parameters()])
        images, stored, _ = next(iter(src))
        x = (images.float() / 255 - torch.tensor(src.mean).view(1, -1, 1, 1)) / torch.tensor(src.std).view(1, -1, 1, 1)
        tr._step(s, (x, stored.float(), None, stored.argmax(1)))
        return torch.cat([p.detach().flatten() for p in s.model.parameters()]) - before

    free, clipped, loose = first_step(0.0), first_step(1e-3), first_step(1e6)
    assert free.norm() > 1.9 * 0.1 * 1e-2  # the gradient is far above the clip, so clipping has something to do
    assert clipped.norm().item() == pytest.approx(1.9 * 0.1 * 1e-3, rel=1e-4)
    assert torch.nn.functional.cosine_similarity(clipped, free, dim=0) > 0.9999  # (weights' float32 steps: 1e-8)
    torch.testing.assert_close(loose, free, rtol=1e-6, atol=1e-9)


def test_a_run_resumes_only_with_its_own_gradient_clip(tmp_path, digits_store):
    """The clip shapes the weights, so it is part of the run's identity (absent when off, as in runs before it)."""
    def run(clip: float) -> Trainer:
        return Trainer(StoreSource(digits_store, batch_size=100, seed=5), [StudentSpec("mlp")],
                       TrainConfig(epochs=2, out_dir=str(tmp_path), resume=True, clip_grad_norm=clip))

    assert "clip_grad_norm" not in run(0.0).identity and run(5.0).identity["clip_grad_norm"] == 5.0
    first = run(5.0)
    first.cfg.epochs = 1
    first.fit()
    assert run(5.0).start_epoch == 1
    with pytest.raises(Exception, match="original settings"):
        run(0.0)


class Stop(Exception):
    pass


def test_killed_after_epoch_one_resumes_to_same_weights(tmp_path, digits_store):
    def run(out, resume=False, stop_after=None):
        def hook(epoch, _):
            if stop_after is not None and epoch == stop_after:
                raise Stop
        cfg = TrainConfig(epochs=3, augment="flip-crop", out_dir=str(out), resume=resume, seed=5)
        tr = Trainer(StoreSource(digits_store, batch_size=100, seed=5), [StudentSpec("lenet5_half"), StudentSpec("mlp", "adam")],
                     cfg, on_epoch_end=hook)
        try:
            tr.fit()
        except Stop:
            pass
        return tr

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=0)
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed.start_epoch == 1
    for a, b in zip(full.students, resumed.students):
        for (ka, pa), (kb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            assert ka == kb and torch.equal(pa, pb), f"{a.name}.{ka} differs after resume"
        assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_cli_distill_with_eval_reports_accuracy(tmp_path, digits_store, digits_teacher):
    out = tmp_path / "run"
    res = invoke("distill", "--store", digits_store, "--student", "mlp", "--student", "lenet5_half",
                 "--epochs", "5", "--optimizer", "adam", "--lr", "0.01", "--temperature", "4", "--eval", "digits",
                 "--out", str(out),
                 "--teacher", digits_teacher[0])
    assert res.exit_code == 0, res.output
    assert "| teacher | mlp |" in res.output and "| lenet5_half | lenet5_half |" in res.output
    m = json.loads((out / "metrics.json").read_text())
    acc = m["students"]["mlp"]["final"]["test_top1"]
    assert 0.5 < acc <= 1.0  # 5 epochs from a perfect store lands far above chance (0.1)
    assert f"{100 * acc:.2f}%" in res.output
    assert (out / "mlp.pt").exists() and (out / "lenet5_half.pt").exists()
    load_model(str(out / "lenet5_half.pt"))  # a student checkpoint rebuilds from the file alone
    again = invoke("distill", "--store", digits_store, "--student", "mlp", "--epochs", "3", "--out", str(out))
    assert again.exit_code == 2 and "--resume" in again.output
    assert m["config"]["clip_grad_norm"] == 10.0  # the default clip reaches the trainer


def test_cli_clip_grad_norm_reaches_the_trainer_and_zero_turns_it_off(tmp_path, digits_store):
    for clip in ("2.5", "0"):
        out = tmp_path / clip
        res = invoke("distill", "--store", digits_store, "--student", "mlp", "--epochs", "1", "--clip-grad-norm", clip,
                     "--out", str(out))
        assert res.exit_code == 0, res.output
        assert json.loads((out / "metrics.json").read_text())["config"]["clip_grad_norm"] == float(clip)
    res = invoke("distill", "--store", digits_store, "--student", "mlp", "--clip-grad-norm", "-1", "--out",
                 str(tmp_path / "bad"))
    assert res.exit_code == 2 and "clip-grad-norm" in res.output


def test_eval_every_scores_only_those_epochs_and_trains_the_same(tmp_path, digits_store):
    runs = {}
    for every in ("0", "2", "1"):
        out = tmp_path / f"every{every}"
        res = invoke("distill", "--store", digits_store, "--student", "mlp", "--epochs", "5", "--eval", "digits",
                     "--eval-every", every, "--out", str(out), "--quiet")
        assert res.exit_code == 0, res.output
        history = json.loads((out / "metrics.json").read_text())["students"]["mlp"]["history"]
        runs[every] = ([r["epoch"] for r in history if "test_top1" in r], history[-1]["test_top1"],
                       torch.load(out / "mlp.pt", weights_only=True))
    assert runs["0"][0] == [5] and runs["2"][0] == [2, 4, 5] and runs["1"][0] == [1, 2, 3, 4, 5]
    assert runs["0"][1] == runs["2"][1] == runs["1"][1]  # scoring never changes what the student learns
    weights = [r[2]["state_dict"] for r in runs.values()]
    assert weights[0] and all(w.keys() == weights[0].keys() for w in weights)
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]) and torch.equal(value, weights[2][name])


def test_cli_classical_kd_and_train_teacher(tmp_path, digits_teacher):
    t = str(tmp_path / "t.pt")
    res = invoke("train-teacher", "--model", "mlp", "--data", "digits", "--epochs", "10", "--out", t)
    assert res.exit_code == 0, res.output
    assert "test top-1" in res.output
    _, spec, metrics = load_model(t)
    assert spec.image_shape == (1, 8, 8) and 0.5 < metrics["test_top1"] <= 1
    res = invoke("distill", "--kd-data", "digits", "--teacher", digits_teacher[0], "--student", "mlp",
                 "--epochs", "2", "--eval", "digits", "--out", str(tmp_path / "kd"))
    assert res.exit_code == 0, res.output
    assert "kd:digits" in res.output


@pytest.mark.parametrize("args,match", [
    (["--student", "lenet6"], "unknown model 'lenet6'"),
    (["--student", "mlp", "--teacher", "/nonexistent/teacher.pt"], "teacher file /nonexistent/teacher.pt does not exist"),
    (["--student", "mlp", "--eval", "cifar11"], "unknown dataset 'cifar11'"),
])
def test_cli_bad_inputs_one_line(tmp_path, digits_store, args, match):
    res = invoke("distill", "--store", digits_store, "--epochs", "1", "--out", str(tmp_path / "r"), *args)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and match in res.output
    assert res.output.strip().count("\n") == 0 and "Traceback" not in res.output


def test_class_count_and_shape_mismatches(tmp_path, digits_teacher):
    model, spec, _ = load_model(digits_teacher[0])
    three = str(tmp_path / "three.zarr")
    teacher_store(three, model, spec, num_classes=3)
    res = invoke("distill", "--store", three, "--student", "mlp", "--epochs", "1", "--eval", "digits",
                 "--out", str(tmp_path / "a"))
    assert res.exit_code == 2 and "--eval digits has 10 classes but the students learn 3" in res.output
    res = invoke("distill", "--store", three, "--student", "mlp", "--epochs", "1", "--teacher", digits_teacher[0],
                 "--out", str(tmp_path / "b"))
    assert res.exit_code == 2 and "the teacher has 10 classes but" in res.output
    t28 = str(tmp_path / "t28.pt")
    from dfkd.distill.checkpoint import ModelSpec
    s28 = ModelSpec("mlp", 10, 1, 28, (0.5,), (0.5,))
    save_model(t28, s28.build(), s28)
    res = invoke("distill", "--kd-data", "digits", "--teacher", t28, "--student", "mlp", "--epochs", "1",
                 "--out", str(tmp_path / "c"))
    assert res.exit_code == 2 and "takes (1, 28, 28) images but digits holds (1, 8, 8)" in res.output



def test_a_student_that_learned_nothing_is_said_to_have(tmp_path, digits_store):
    res = CliRunner().invoke(cli, ["distill", "--store", digits_store, "--student", "mlp", "--epochs", "5", "--lr", "2",
                                   "--out", str(tmp_path / "run"), "-q"])
    assert res.exit_code == 0, res.output
    assert "warning: student mlp ended agreeing with its targets at chance" in res.stderr
    ok = CliRunner().invoke(cli, ["distill", "--store", digits_store, "--student", "mlp", "--epochs", "2",
                                  "--optimizer", "adam", "--lr", "0.01", "--temperature", "4", "--out",
                                  str(tmp_path / "ok"), "-q"])
    assert ok.exit_code == 0 and "warning" not in ok.stderr


def test_every_student_of_a_multi_rank_run_is_scored_over_the_same_image_count(monkeypatch, digits_store):
    """The epoch's image count was summed over ranks once per student, in place: the second student of a two-rank run
    had its loss and agreement divided by twice the images. Two identical ranks (every sum doubled) must give every
    student the rows one rank gives it."""
    import dfkd.distill.trainer as trainer_module

    trainer = Trainer(StoreSource(digits_store, batch_size=128), [StudentSpec("mlp"), StudentSpec("lenet5_half")],
                      TrainConfig(epochs=1, progress=False))
    seen = trainer._train_epoch(0)
    trainer._score_epoch(0, seen, 1.0)
    alone = [s.history.pop() for s in trainer.students]
    monkeypatch.setattr(trainer_module, "_reduce_sums", lambda values, world, device: [2 * float(v) for v in values])
    trainer._score_epoch(0, seen, 1.0)
    twin = [s.history.pop() for s in trainer.students]
    assert twin == alone
    assert 0.0 < alone[1]["train_agreement"] <= 1.0
