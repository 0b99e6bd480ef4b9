"""`pip install .` (not editable) gives a working `dfkd run`: the shipped pipeline files are package data."""

import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_ships_the_pipeline_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    shipped = {f"pipelines/{n}" for n in os.listdir(os.path.join(REPO, "pipelines")) if n.endswith(".toml")}
    assert "pipelines/demo.toml" in shipped and shipped <= names


def test_the_stages_never_import_each_other():
    """synth and distill share only store/: either stage can be installed, read and changed without the other."""
    import subprocess
    import sys

    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'synth', 'distill', 'pipelines'}))")
    for stage, other in (("synth.engine", "distill"), ("distill.trainer", "synth")):
        out = subprocess.run([sys.executable, "-c", code, stage], capture_output=True, text=True, check=True).stdout
        assert other not in out and "pipelines" not in out, (stage, out)
