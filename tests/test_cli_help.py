"""Every --help is fast (torch never imported), every option explains itself, progress reaches logs."""

import io
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from dfkd.pipelines.cli import cli
from dfkd.store.toolbox import progress as progress_mod
from tests.synth_helpers import save_tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


COMMANDS = [path for path, _ in _commands(cli)]


@pytest.mark.parametrize("path", [()] + COMMANDS, ids=lambda p: " ".join(p) or "dfkd")
def test_help_does_not_import_torch(path):
    code = ("import sys\nfrom dfkd.pipelines.cli import cli\n"
            "try:\n    cli(sys.argv[1:], prog_name='dfkd')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('HEAVY', sorted({'torch', 'torchvision', 'zarr'} & set(sys.modules)))\n")
    res = subprocess.run([sys.executable, "-c", code, *path, "--help"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout and res.stdout.rstrip().endswith("HEAVY []"), res.stdout[-300:]


def test_every_option_has_help_text():
    missing = [f"{' '.join(path)} {p.opts[0]}" for path, cmd in _commands(cli) for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert missing == []


def test_help_lists_the_zoo_and_methods_as_registered():
    from dfkd.distill.models import list_models
    from dfkd.pipelines.commands.options import method_names, zoo_names
    from dfkd.synth.methods import list_methods

    assert zoo_names() == list_models() and method_names() == list_methods()
    text = CliRunner().invoke(cli, ["distill", "--help"], terminal_width=400).output
    assert all(name in text for name in list_models())


def test_methods_lists_each_hyper_parameter_with_its_default():
    res = CliRunner().invoke(cli, ["methods"])
    assert res.exit_code == 0 and all(m in res.output for m in ("deepinversion", "fast", "nayer", "stat"))
    res = CliRunner().invoke(cli, ["methods", "fast"])
    row = next(line for line in res.output.splitlines() if line.startswith("kd_steps "))
    assert row.split()[1:3] == ["int", "400"] and "papers' 400" in row
    assert "meta " in res.output and "'maml'" in res.output
    assert CliRunner().invoke(cli, ["methods", "nope"]).exit_code == 2


def test_log_progress_lines_every_few_percent(monkeypatch):
    monkeypatch.setattr(progress_mod, "MIN_INTERVAL_S", 0.0)
    out = io.StringIO()
    bar = progress_mod.LogProgress(range(40), desc="synth", unit="batch", stream=out)
    assert list(bar) == list(range(40))
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and lines[-1].startswith("synth: 40/40 batch (100%)") and "left 0:00" in lines[-1]
    assert lines[0].startswith("synth: 2/40 batch (5%)")


def test_synth_prints_progress_when_not_a_terminal_and_quiet_silences_it(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_mod, "MIN_INTERVAL_S", 0.0)
    teacher = str(tmp_path / "t.pt")
    save_tiny_teacher(teacher)
    args = ["synth", "--teacher", teacher, "--method", "stat", "--num-images", "32", "--batch-size", "8",
            "--iterations", "1", "--device", "cpu"]
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "a.zarr")])
    assert res.exit_code == 0, res.output
    assert "stat -> " in res.stderr and "4/4 batch (100%)" in res.stderr, res.stderr
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "b.zarr"), "--quiet"])
    progress_mod.set_quiet(False)
    assert res.exit_code == 0 and res.stderr == "", res.stderr


def test_every_hyper_parameter_has_a_meaning():
    from dfkd.pipelines.method_params import undocumented
    from dfkd.synth.methods import list_methods

    assert {m: undocumented(m) for m in list_methods() if undocumented(m)} == {}


def test_import_dfkd_is_light_and_its_api_resolves():
    code = ("import sys, dfkd\nassert 'torch' not in sys.modules\n"
            "assert dfkd.__version__ and callable(dfkd.synthesize) and callable(dfkd.distill_students)\n"
            "assert 'lenet5_half' in dfkd.list_models() and 'fast' in dfkd.list_methods()\n"
            "assert dfkd.open_store.__module__ == 'dfkd.store.access' and dfkd.load_model.__name__ == 'load_model'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr


def test_python_api_synthesizes_and_distills(tmp_path):
    import dfkd

    teacher = str(tmp_path / "t.pt")
    save_tiny_teacher(teacher)
    res = dfkd.synthesize(teacher, "noise", 24, str(tmp_path / "n.zarr"), batch_size=8, progress=False)
    assert res["units"] == 3 and dfkd.open_store(str(tmp_path / "n.zarr")).complete
    metrics = dfkd.distill_students(str(tmp_path / "n.zarr"), ["lenet5_half"], str(tmp_path / "d"), epochs=1, progress=False)
    assert metrics["images"] == 24 and os.path.isfile(tmp_path / "d" / "lenet5_half.pt")
    model, spec, _ = dfkd.load_model(str(tmp_path / "d" / "lenet5_half.pt"))
    assert spec.num_classes == 10
