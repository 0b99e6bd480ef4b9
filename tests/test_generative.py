"""Generator methods (adversarial, dafl): the min-max moves each way, resume, filling, bad inputs."""

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd import store
from dfkd.distill.checkpoint import ModelSpec, load_model
from dfkd.pipelines.cli import cli
from dfkd.synth.engine import SynthConfig, frozen, synthesize
from dfkd.synth.generators import (GeneratorError, GeneratorSpec, create_generator, load_generator, load_snapshots,
                              save_generator)
from dfkd.synth.methods import SynthContext, create_method
from dfkd.synth.methods.adversarial import Adversarial
from tests.synth_helpers import MEAN, SHAPE, STD, save_tiny_teacher, tiny_teacher

SMALL = {"rounds": 4, "batch_size": 32, "latent_dim": 16, "width": 8, "checkpoint_every": 2}


def _student(seed: int = 1):
    torch.manual_seed(seed)
    return ModelSpec("lenet5_half", 10, 1, 8, MEAN, STD).build()


def _ctx(teacher, student):
    return SynthContext(teacher, SHAPE, 10, MEAN, STD, torch.device("cpu"), "fp", student=student)


def _discrepancy(m: Adversarial, z: torch.Tensor) -> float:
    with torch.no_grad():
        x = m.images(z)
        return float(m.discrepancy(m.ctx.student(x), m.ctx.teacher(x)))


def _ready(teacher, student, **hparams) -> Adversarial:
    """An adversarial method set up for single steps, its generator's BN statistics fixed (eval mode), so the
    same z gives the same images before and after a step."""
    torch.manual_seed(0)
    m = create_method("adversarial", _ctx(teacher, student), {**SMALL, "lr_g": 0.01, **hparams})
    m.setup()
    m.generator_model.eval()
    student.train()
    return m


def test_generator_step_raises_and_student_step_lowers_the_discrepancy():
    teacher, _ = tiny_teacher()
    student = _student()
    with frozen(teacher):
        m = _ready(teacher, student, lr_s=0.05)
        z = torch.randn(64, 16)
        before = _discrepancy(m, z)
        m.generator_step(z)
        after_g = _discrepancy(m, z)
        assert after_g > before
        m.student_step(z)
        assert _discrepancy(m, z) < after_g
        assert all(p.grad is None for p in teacher.parameters())  # the teacher never gets weight gradients


def _train(tmp_path, name, hparams, teacher, stop_at=None):
    """Run the generator training of `adversarial` into tmp_path/name; optionally die at round `stop_at`."""
    student = _student()
    with frozen(teacher, student):
        m = create_method("adversarial", _ctx(teacher, student), hparams)
        if stop_at is not None:
            real, count = m.train_round, [0]

            def dying(z_gen):
                count[0] += 1
                if count[0] == stop_at:
                    raise KeyboardInterrupt
                return real(z_gen)
            m.train_round = dying
        m.prepare(str(tmp_path / name), resume=True, seed=3, show=False)
    return m, student


def test_generator_training_killed_and_resumed_continues_from_its_checkpoint(tmp_path):
    teacher, _ = tiny_teacher()
    whole, s_whole = _train(tmp_path, "whole", SMALL, teacher)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "cut", SMALL, teacher, stop_at=4)  # dies in round 4, after the checkpoint of round 2
    state = torch.load(tmp_path / "cut.generator-train.pt", weights_only=True)
    assert state["rounds_done"] == 2 and not os.path.exists(tmp_path / "cut.generator.pt")
    resumed, s_resumed = _train(tmp_path, "cut", SMALL, teacher)
    assert resumed.rounds_done == 4
    for a, b in zip(whole.generator_model.state_dict().values(), resumed.generator_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(s_whole.state_dict().values(), s_resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    g, spec, extra = load_generator(str(tmp_path / "cut.generator.pt"))
    assert spec == GeneratorSpec("dcgan", 16, SHAPE, 8) and extra["rounds"] == 4


def test_snapshots_along_training_survive_a_kill_and_each_fill_an_equal_share(tmp_path):
    teacher, _ = tiny_teacher()
    half, _ = _train(tmp_path, "half", {**SMALL, "rounds": 2}, teacher)  # the generator as it is at round 2
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "snap", {**SMALL, "snapshots": 2}, teacher, stop_at=4)  # after round 2's checkpoint
    _train(tmp_path, "snap", {**SMALL, "snapshots": 2}, teacher)
    (snap,) = load_snapshots(str(tmp_path / "snap.generator.pt"))
    for k, v in half.generator_model.state_dict().items():
        torch.testing.assert_close(snap[k], v, rtol=0, atol=0)
    assert load_snapshots(str(tmp_path / "half.generator.pt")) == []

    student = _student()
    with frozen(teacher, student):
        m = create_method("adversarial", _ctx(teacher, student), {"latent_dim": 16,
                                                                  "generator": str(tmp_path / "snap.generator.pt")})
        x, _ = m.synthesize(torch.arange(16) % 10, torch.Generator().manual_seed(5))
        z = torch.randn((16, 16), generator=torch.Generator().manual_seed(5))
        final = load_generator(str(tmp_path / "snap.generator.pt"))[0].train()
        parts = torch.cat([half.generator_model.train()(z[:8]), final(z[8:])])
    torch.testing.assert_close(x, m.ctx.denormalize(parts).clamp(0, 1))
    assert not torch.equal(x[:8], m.ctx.denormalize(final(z)[:8]).clamp(0, 1))


def _cli(*args):
    return CliRunner().invoke(cli, ["synth", "--num-images", "48", "--batch-size", "16", "--device", "cpu", *args])


def test_cli_trains_fills_and_refills_deterministically_from_the_saved_generator(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    sets = [x for k, v in SMALL.items() if k != "rounds" for x in ("--set", f"{k}={v}")]
    res = _cli("--teacher", t, "--method", "adversarial", "--student", "lenet5_half", "--rounds", "2",
               "--out", str(tmp_path / "adv.zarr"), *sets)
    assert res.exit_code == 0, res.output
    gen_file, stu_file = tmp_path / "adv.generator.pt", tmp_path / "adv.student.pt"
    assert gen_file.exists() and stu_file.exists()
    proxy, spec, _ = load_model(str(stu_file), "student")
    assert spec.arch == "lenet5_half" and spec.image_shape == SHAPE

    teacher, _ = load_model(t, "teacher")[:2]
    rec = store.open(str(tmp_path / "adv.zarr")).read(0, 48)
    with torch.no_grad():
        expected = teacher((torch.from_numpy(rec.images).float() / 255 - MEAN[0]) / STD[0]).numpy()
    np.testing.assert_array_equal(rec.logits, expected)  # logits of the stored uint8 images
    np.testing.assert_array_equal(rec.labels, expected.argmax(1))  # labels: the teacher's argmax

    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        res = _cli("--teacher", t, "--method", "adversarial", "--generator", str(gen_file), "--seed", str(seed),
                   "--set", "latent_dim=16", "--out", str(tmp_path / f"{name}.zarr"))
        assert res.exit_code == 0, res.output
        outs[name] = store.open(str(tmp_path / f"{name}.zarr")).read(0, 48).images
    np.testing.assert_array_equal(outs["a"], outs["b"])
    assert not np.array_equal(outs["a"], outs["c"])


def test_dafl_trains_its_generator_and_student_and_fills_a_store(tmp_path):
    teacher, _ = tiny_teacher()
    student = _student()
    before = [p.detach().clone() for p in student.parameters()]
    out = str(tmp_path / "dafl.zarr")
    synthesize(teacher, "dafl", SynthConfig(num_images=32, out=out, batch_size=16), image_shape=SHAPE, num_classes=10,
               mean=MEAN, std=STD, hparams={**SMALL, "rounds": 3}, student=student)
    assert store.open(out).meta.provenance["hparams"]["w_entropy"] == 5.0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # the proxy student learned
    assert os.path.exists(tmp_path / "dafl.generator.pt")
    assert all(p.requires_grad for p in student.parameters())  # the engine gave the student back as it was


def test_bad_generator_inputs_give_one_line(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t)
    g = str(tmp_path / "g.pt")
    save_generator(g, create_generator("dcgan", 16, SHAPE, 8), GeneratorSpec("dcgan", 16, SHAPE, 8))
    res = _cli("--teacher", t, "--method", "adversarial", "--generator", g, "--set", "latent_dim=32",
               "--out", str(tmp_path / "o.zarr"))
    assert res.exit_code == 2 and "latent vectors of size 16" in res.output and res.output.strip().count("\n") == 0
    other = str(tmp_path / "g12.pt")
    save_generator(other, create_generator("dcgan", 16, (1, 12, 12), 8), GeneratorSpec("dcgan", 16, (1, 12, 12), 8))
    res = _cli("--teacher", t, "--method", "adversarial", "--generator", other, "--set", "latent_dim=16",
               "--out", str(tmp_path / "o.zarr"))
    assert res.exit_code == 2 and "makes (1, 12, 12) images" in res.output
    with pytest.raises(GeneratorError, match="multiples of 4"):
        create_generator("dcgan", 16, (3, 30, 30))
    res = _cli("--teacher", t, "--method", "adversarial", "--out", str(tmp_path / "o.zarr"))
    assert res.exit_code == 2 and "--student" in res.output
    res = _cli("--teacher", t, "--method", "adversarial", "--student", "lenet5_half", "--rounds", "2",
               "--set", "snapshots=3", "--out", str(tmp_path / "o.zarr"))
    assert res.exit_code == 2 and "snapshots must lie in [1, rounds=2]" in res.output
    assert not os.path.exists(tmp_path / "o.zarr")  # nothing was written


def _stat_after_forward(m: Adversarial, z: torch.Tensor) -> float:
    with torch.no_grad():
        m.ctx.teacher(m.images(z))
        return float(m.stats.loss(1.0))


def test_stat_prior_pulls_generator_samples_toward_the_teachers_bn_statistics():
    teacher, _ = tiny_teacher()
    student = _student()
    with frozen(teacher):
        m = _ready(teacher, student, w_stat=100.0)
        z = torch.randn(64, 16)
        before = _stat_after_forward(m, z)
        for _ in range(3):
            m.generator_step(z)
        assert _stat_after_forward(m, z) < before
        m.close()
    assert not teacher._forward_hooks and not any(mod._forward_hooks for mod in teacher.modules())


def test_stat_prior_without_bn_or_record_fails_with_one_line(tmp_path):
    t = str(tmp_path / "t.pt")
    save_tiny_teacher(t, bn=False)
    res = _cli("--teacher", t, "--method", "adversarial", "--student", "lenet5_half", "--set", "w_stat=1",
               "--out", str(tmp_path / "o.zarr"))
    assert res.exit_code == 2 and "dfkd record" in res.output and res.output.strip().count("\n") == 0
    assert not os.path.exists(tmp_path / "o.zarr")


def test_stat_prior_hooks_leave_the_teacher_when_training_ends(tmp_path):
    teacher, _ = tiny_teacher()
    student = _student()
    with frozen(teacher, student):
        m = create_method("adversarial", _ctx(teacher, student), {**SMALL, "w_stat": 1.0})
        assert any(mod._forward_hooks or mod._forward_pre_hooks for mod in teacher.modules())
        m.prepare(str(tmp_path / "g"), seed=0, show=False)
        assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in teacher.modules())
        m.close()
