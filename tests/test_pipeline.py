"""`dfkd run`: stage reuse by fingerprint, partial re-runs, dry runs, resume, and invalid files."""

import dataclasses
import json
import os

import pytest
from click.testing import CliRunner

from dfkd.pipelines.cli import cli
from dfkd.pipelines.runner import Runner
from dfkd.pipelines.spec import PipelineError, load_pipeline

TINY = """
[run]
name = "tiny"
out = "{out}"

[data]
name = "digits"

[teacher]
model = "lenet5_bn"
epochs = 2
batch_size = 128

[[synth]]
name = "noise"
method = "noise"
num_images = 64
batch_size = 32

[[synth]]
name = "stat"
method = "stat"
num_images = 64
batch_size = 32
params = {{ iterations = {iterations} }}

[[distill]]
name = "s"
students = ["mlp"]
epochs = 1
"""


def _write(tmp_path, iterations=2, text=TINY):
    path = tmp_path / "p.toml"
    path.write_text(text.format(out=tmp_path / "out", iterations=iterations))
    return str(path)


def _run(path, *args):
    res = CliRunner().invoke(cli, ["run", path, *args])
    assert res.exit_code == 0, res.output
    return res.output


def _actions(output):
    """stage -> 'running' | 'reused' | 'resuming' from the run's log lines."""
    out = {}
    for line in output.splitlines():
        if line.startswith("[") and "] " in line:
            key, _, rest = line[1:].partition("] ")
            if rest.split()[0] in ("running", "reused", "resuming"):
                out[key] = rest.split()[0]
    return out


def test_second_run_reuses_every_stage_and_reports(tmp_path):
    path = _write(tmp_path)
    first = _run(path)
    assert set(_actions(first).values()) == {"running"} and len(_actions(first)) == 5
    assert "| teacher | stat | stat | mlp | mlp |" in first
    second = _run(path)
    assert _actions(second) == {k: "reused" for k in _actions(first)}
    listed = [line.split() for line in _run(path, "--dry-run").splitlines() if line.split()[:1] in (["teacher"],
              ["synth:noise"], ["synth:stat"], ["distill:s/noise"], ["distill:s/stat"])]
    assert len(listed) == 5 and all(words[1] == "reuse" for words in listed)  # downstream of reused stages too
    assert _actions(_run(path, "--only", "distill:s/stat")) == {"distill:s/stat": "reused"}  # upstream not re-run
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "report.png").exists()
    assert "| teacher | noise | noise | mlp |" in (tmp_path / "out" / "report.md").read_text()


def test_changing_a_synth_option_reruns_that_store_and_its_students_only(tmp_path):
    _run(_write(tmp_path, iterations=2))
    acts = _actions(_run(_write(tmp_path, iterations=3)))
    assert acts == {"teacher": "reused", "synth:noise": "reused", "distill:s/noise": "reused",
                    "synth:stat": "running", "distill:s/stat": "running"}


def test_dry_run_lists_stages_without_running(tmp_path):
    out = _run(_write(tmp_path), "--dry-run")
    lines = [l.split() for l in out.splitlines()]
    assert [l[0] for l in lines] == ["teacher", "synth:noise", "synth:stat", "distill:s/noise", "distill:s/stat"]
    assert all(l[1] == "run" for l in lines)
    assert not (tmp_path / "out").exists()


def test_an_interrupted_stage_resumes_and_only_selects_stages(tmp_path):
    path = _write(tmp_path)
    _run(path, "--only", "teacher")
    assert not (tmp_path / "out" / "stores").exists()
    state_file = tmp_path / "out" / "stages" / "teacher.json"
    state = json.loads(state_file.read_text())
    state["done"] = False  # as if killed mid-training: same fingerprint, not finished
    state_file.write_text(json.dumps(state))
    assert "teacher                                  resume" in _run(path, "--dry-run")
    assert _actions(_run(path, "--only", "teacher"))["teacher"] == "resuming"
    res = CliRunner().invoke(cli, ["run", path, "--only", "distill"])
    assert res.exit_code == 2 and "synth:noise" in res.output and "--only" in res.output


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace('method = "stat"', 'method = "statt"'), ["[[synth]] #2 (stat)", "key 'method'", "choose one of"]),
    (lambda t: t.replace('model = "lenet5_bn"', 'checkpoint = "missing.pt"'),
     ["[teacher]", "key 'checkpoint'", "missing.pt does not exist", "dfkd train-teacher"]),
    (lambda t: t.replace("epochs = 2", 'epochs = "two"'), ["[teacher]", "key 'epochs' must be int"]),
    (lambda t: t.replace("epochs = 2", 'epochs = 2\noptimizer = "rmsprop"'),
     ["[teacher]", "key 'optimizer' must be one of sgd, adam, got 'rmsprop'"]),
    (lambda t: t.replace("iterations = 2", "iteration = 2"), ["[[synth]] #2", "no hyper-parameter 'iteration'"]),
    (lambda t: t.replace('students = ["mlp"]', 'students = ["nope"]'), ["[[distill]] #1 (s)", "key 'students'"]),
    (lambda t: t + "\n[extra]\n", ["unknown section [extra]"]),
    (lambda t: t.replace('name = "s"', 'name = "../../escaped"'), ["[[distill]] #1", "key 'name' must be a plain word"]),
    (lambda t: t.replace('name = "stat"', 'name = ".."'), ["[[synth]] #2", "key 'name' must be a plain word"]),
])
def test_invalid_files_name_file_section_key_and_fix(tmp_path, edit, expected):
    path = tmp_path / "bad.toml"
    path.write_text(edit(TINY.format(out=tmp_path / "out", iterations=2)))
    res = CliRunner().invoke(cli, ["run", str(path)])
    assert res.exit_code == 2
    assert str(path) in res.output and res.output.strip().count("\n") == 0
    for e in expected:
        assert e in res.output, res.output


def test_shipped_pipelines_parse_and_dry_run(tmp_path):
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines")
    shipped = sorted(n for n in os.listdir(here) if n.endswith(".toml"))
    assert {"demo.toml", "fashion_mnist.toml", "cifar10_resnet34_resnet18.toml"} <= set(shipped)
    for name in shipped:
        p = load_pipeline(os.path.join(here, name))
        p.run.out = str(tmp_path / name)
        lines: list[str] = []
        Runner(p, echo=lines.append).execute(dry_run=True)
        assert lines and all(l.split()[1] == "run" for l in lines)
        assert lines[0].startswith("teacher")
    with pytest.raises(PipelineError, match="does not exist"):
        load_pipeline(str(tmp_path / "none.toml"))


def test_report_states_each_student_against_real_data_kd_of_its_teacher_arch_and_image_count():
    from dfkd.pipelines.run_report import seed_groups, with_real_ratio

    def row(teacher, method, arch, top1, distill="d", store="x", images=100, setting=None):
        return {"teacher": teacher, "method": method, "arch": arch, "test_top1": top1, "distill": distill,
                "store": store, "images": None if distill == "(proxy)" else images, "synth_s": 10.0,
                "student": arch, "setting": setting}
    rows = with_real_ratio([row("A", "real", "s", 0.80), row("A", "deepinversion", "s", 0.72, store="di"),
                            row("A", "adversarial", "s", 0.40, distill="(proxy)", store="di"),
                            row("A", "noise", "t", 0.10), row("A", "mix", "s", 0.70, images=200),
                            row("A", "real", "s", 0.90, images=200),
                            row("B", "real", "s", 0.50), row("B", "stat", "s", 0.25)])
    assert [r["vs_real"] for r in rows] == pytest.approx([1.0, 0.9, 0.5, None, 0.7 / 0.9, 1.0, 1.0, 0.5])
    online = with_real_ratio([row("A", "real", "s", 0.80), row("A", "fast", "s", 0.76, store="f"),
                              row("A", "real", "s", 0.84, distill="online"), row("A", "fast", "s", 0.78, "online", "f")])
    assert [r["vs_real"] for r in online] == pytest.approx([1.0, 0.95, 1.0, 0.78 / 0.84])  # each its own recipe's
    seeds = seed_groups(with_real_ratio([row("A", "real", "s", 0.80), row("A", "fast", "s", 0.70, setting="k"),
                                         row("A", "fast", "s", 0.74, setting="k"), row("A", "nayer", "s", 0.6, setting="j")]))
    assert len(seeds) == 1 and seeds[0]["mean"] == pytest.approx(0.72) and seeds[0]["sd"] == pytest.approx(0.0283, abs=1e-4)
    assert seeds[0]["ratio"] == pytest.approx(0.9)


def test_a_synth_section_with_views_stores_them_and_its_students_train_on_them(tmp_path):
    text = TINY.replace('name = "noise"\nmethod = "noise"', 'name = "noise"\nmethod = "noise"\nviews = 2')
    text = text.replace('name = "stat"\nmethod = "stat"', 'name = "stat"\nmethod = "stat"\nviews = 0')
    path = _write(tmp_path, text=text)
    out = _run(path)
    from dfkd import store

    runner = Runner(load_pipeline(path))
    assert store.open(runner.store_path("noise")).meta.views == 2
    assert not store.open(runner.store_path("stat")).meta.views
    keys = {s.key: s.config for s in runner.stages}
    assert keys["synth:noise"]["views"] == 2
    assert "views" not in keys["synth:stat"]  # views 0: the stores made before views existed keep their fingerprint
    assert "distill:s/noise" in out


def test_a_synth_section_without_views_keeps_the_default_eight_and_is_not_an_old_store(tmp_path):
    path = _write(tmp_path)
    runner = Runner(load_pipeline(path))
    keys = {s.key: s.config for s in runner.stages}
    assert keys["synth:stat"]["views"] == 8  # unlike a store made before views (0): a new fingerprint, a new store


def _family(family):
    """(command, section class, settings class, API defaults, options the section holds elsewhere)."""
    from dfkd.pipelines.commands.distill import distill_cmd
    from dfkd.pipelines.commands.synth import synth_cmd
    from dfkd.pipelines.commands.teacher import train_teacher
    from dfkd.pipelines.jobs import DistillJob, SynthJob
    from dfkd.pipelines.settings import DistillSettings, SynthSettings, TeacherSettings
    from dfkd.pipelines.spec import DistillSection, SynthSection, TeacherSection

    if family == "distill":  # a pipeline's stores, [data], [run] and `dfkd run` flags hold the rest
        return (distill_cmd, DistillSection, DistillSettings, DistillJob("s.zarr", ["mlp"], "out"),
                {"store_path", "kd_data", "students", "eval_data", "eval_every", "data_root", "device", "out", "resume",
                 "model_code", "quiet"}, {"name", "students", "stores"})
    if family == "synth":  # the method and its --set keys are the method's config (`dfkd methods`)
        return (synth_cmd, SynthSection, SynthSettings, SynthJob("noise", 8, "s.zarr"),
                {"teacher", "method", "num_images", "out", "stats", "student", "bank", "generator", "rounds",
                 "iterations", "sets", "resume", "overwrite", "device", "model_code", "quiet"},
                {"name", "method", "teacher", "num_images", "student", "stats", "params", "bank"})
    return (train_teacher, TeacherSection, TeacherSettings, TeacherSettings(),
            {"arch", "data", "data_root", "device", "out", "quiet"},
            {"name", "checkpoint", "model", "record", "record_layers", "record_per_class"})


@pytest.mark.parametrize("family", ["distill", "synth", "teacher"])
def test_every_option_is_a_section_key_of_the_same_name_with_one_default(family):
    """A command's recipe options and its pipeline section's keys are one declaration (pipelines/settings.py)."""
    command, section_cls, settings_cls, api, run_level, section_only = _family(family)
    options = {p.name: p.default for p in command.params if p.name not in run_level}
    keys = {f.name for f in dataclasses.fields(section_cls)} - section_only
    assert set(options) == keys == {f.name for f in dataclasses.fields(settings_cls)}
    section = {"distill": lambda: section_cls(name="d", students=["mlp"]),
               "synth": lambda: section_cls(name="s", method="noise"), "teacher": lambda: section_cls(model="mlp")}[family]()
    for name, default in options.items():
        assert getattr(api, name) == default, name
        if name != "seed":  # a section's seed defaults to [run].seed
            assert getattr(section, name) == default, name
    assert section.seed is None and getattr(api, "lr", None) is None


def test_an_unset_rate_is_the_optimizers_measured_default():
    from dfkd.pipelines.jobs import DistillJob
    from dfkd.pipelines.settings import TeacherSettings

    assert DistillJob("s", ["mlp"], "o").peak_lr == 0.02 and DistillJob("s", ["mlp"], "o", optimizer="adam").peak_lr == 1e-3
    assert TeacherSettings().peak_lr == 0.05 and TeacherSettings(lr=0.1).peak_lr == 0.1


@pytest.mark.parametrize("key, value, expected", [
    ("optimizer", '"rmsprop"', "key 'optimizer' must be one of sgd, adam"),
    ("lr", "0.0", "key 'lr' must be (> 0)"),
    ("augment", '"mixup"', "key 'augment' must be one of none, crop, flip-crop"),
    ("max_images", "0", "key 'max_images' must be (>= 1)"),
    ("amp", '"fp8"', "key 'amp' must be one of auto, off, bf16, fp16"),
    ("teacher", '"Z"', "key 'teacher': no teacher named 'Z'"),
])
def test_distill_keys_are_checked_like_the_cli_options(tmp_path, key, value, expected):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.format(out=tmp_path / "out", iterations=2) + f"{key} = {value}\n")
    res = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert res.exit_code == 2 and expected in res.output and "[[distill]] #1" in res.output, res.output


def test_the_api_refuses_a_setting_outside_its_choices_in_one_line():
    from dfkd.pipelines.jobs import DistillJob
    from dfkd.pipelines.settings import SettingError

    with pytest.raises(SettingError, match="optimizer must be one of sgd, adam, got 'lbfgs'"):
        DistillJob("s.zarr", ["mlp"], "out", optimizer="lbfgs")
    with pytest.raises(SettingError, match="kd and ce_teacher are both 0"):
        DistillJob("s.zarr", ["mlp"], "out", kd=0)


def test_a_distill_section_with_a_teacher_relabels_views_online_and_depends_on_it(tmp_path, monkeypatch):
    """`teacher = "<[[teacher]] name>"` runs the online-teacher recipe, which `dfkd distill --teacher` runs."""
    from dfkd.pipelines import runner as runner_module

    text = TINY.replace('students = ["mlp"]\n', 'students = ["mlp"]\nteacher = "teacher"\naugment = "flip-crop"\n')
    path = _write(tmp_path, text=text)
    r = Runner(load_pipeline(path))
    stage = next(s for s in r.stages if s.key == "distill:s/noise")
    assert "teacher" in stage.deps and stage.config["teacher"] == "teacher"
    plain = {s.key: s.config for s in Runner(load_pipeline(_write(tmp_path / "..", text=TINY))).stages}
    assert "teacher" not in plain["distill:s/noise"]  # unset keys keep the fingerprints of earlier files
    seen = []
    real_run = runner_module.run_distill
    monkeypatch.setattr(runner_module, "run_distill", lambda job, *a, **k: seen.append(job) or real_run(job, *a, **k))
    _run(path, "--only", "teacher", "--only", "synth:noise", "--only", "distill:s/noise")
    assert seen and seen[0].teacher == r.teacher_path("teacher") and seen[0].augment == "flip-crop"
