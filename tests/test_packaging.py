"""`pip install .` (not editable) gives one importable name, `dfkd`, with the shipped pipeline files as data."""

import os
import shutil
import subprocess
import sys
import venv
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("store", "synth", "distill", "pipelines")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built from a copy of the checkout: setuptools writes build/ and *.egg-info beside the sources it builds."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src") / "dfkd"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "runs",
                                                              ".gpu", "*.zarr", "*.wds"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, cwd=out)
    (name,) = [p for p in os.listdir(out) if p.endswith(".whl")]
    return out / name


def test_wheel_installs_one_name_and_ships_the_pipeline_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"dfkd"}, top
    shipped = {f"dfkd/pipelines/{n}" for n in os.listdir(os.path.join(REPO, "pipelines")) if n.endswith(".toml")}
    assert "dfkd/pipelines/demo.toml" in shipped and shipped <= names
    assert {f"dfkd/{s}/__init__.py" for s in STAGES} <= names


def _sees_our_dependencies(env_dir) -> None:
    """Let a new virtual environment import the packages this interpreter has (torch, zarr...), wherever they are
    installed: the system's site-packages or a user's own virtualenv. Paths in a .pth file are added as they are:
    the .pth files inside them (an editable install's import hook) are not run, so `dfkd` comes from the wheel."""
    import site
    import sysconfig

    purelib = sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)})
    dirs = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_path("purelib")]
    with open(os.path.join(purelib, "zz_test_dependencies.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(d for d in dirs if os.path.isdir(d))) + "\n")


def test_fresh_environment_imports_dfkd_store_and_not_store(wheel, tmp_path):
    """In a new virtual environment (torch from wherever this interpreter has it) only `dfkd.*` is importable."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    _sees_our_dependencies(env_dir)
    python = str(env_dir / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)
    code = ("import importlib, pkgutil, sys\n"
            "import dfkd.store, dfkd.synth.engine, dfkd.distill.trainer, dfkd.pipelines.cli\n"
            "assert dfkd.store.__file__.startswith(sys.prefix), dfkd.store.__file__\n"
            "import dfkd\n"  # every module the wheel ships imports there (not only what two entry points reach)
            "for m in pkgutil.walk_packages(dfkd.__path__, 'dfkd.'):\n"
            "    importlib.import_module(m.name)\n"
            "for name in %r:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ModuleNotFoundError:\n"
            "        continue\n"
            "    raise SystemExit(f'import {name} should fail')\n"
            "print('ok')\n") % (STAGES,)
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path)  # cwd: not the repo
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    res = subprocess.run([str(env_dir / "bin" / "dfkd"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "run" in res.stdout, res.stderr


def test_the_stages_never_import_each_other():
    """synth and distill share only store/: either stage can be installed, read and changed without the other."""
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(sorted({'.'.join(m.split('.')[:2]) for m in sys.modules} & "
            "{'dfkd.synth', 'dfkd.distill', 'dfkd.pipelines'}))")
    for stage, other in (("dfkd.synth.engine", "dfkd.distill"), ("dfkd.distill.trainer", "dfkd.synth")):
        out = subprocess.run([sys.executable, "-c", code, stage], capture_output=True, text=True, check=True).stdout
        assert other not in out and "dfkd.pipelines" not in out, (stage, out)
