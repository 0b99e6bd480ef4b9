"""`dfkd import-teacher` (state_dict, safetensors, TorchScript) and `dfkd export` (TorchScript, safetensors, ONNX)."""

import importlib.util
import os

import pytest
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dfkd.distill.augment import normalize
from dfkd.distill.checkpoint import load_model
from dfkd.pipelines.cli import cli
from tests.synth_helpers import save_tiny_teacher

MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval()


def _import(tmp_path, weights, arch="torchvision:resnet18", classes="7", shape="3,32,32"):
    out = str(tmp_path / "teacher.pt")
    res = CliRunner().invoke(cli, ["import-teacher", "--arch", arch, "--weights", str(weights), "--input-shape", shape,
                                   "--num-classes", classes, "--mean", MEAN, "--std", STD, "--out", out])
    return res, out


def _same_logits(model, path):
    loaded, spec, _ = load_model(path, "teacher")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert spec.mean == (0.485, 0.456, 0.406) and spec.num_classes == 7 and spec.image_shape == (3, 32, 32)


@pytest.mark.parametrize("kind", ["state_dict", "wrapped_state_dict", "safetensors", "torchscript"])
def test_import_teacher_gives_the_original_logits(tmp_path, resnet, kind):
    path = tmp_path / {"safetensors": "w.safetensors", "torchscript": "w.ts"}.get(kind, "w.pth")
    if kind == "state_dict":
        torch.save(resnet.state_dict(), path)
    elif kind == "wrapped_state_dict":  # a training script's checkpoint, saved from DataParallel
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, path)
    elif kind == "safetensors":
        save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(path))
    else:
        torch.jit.save(torch.jit.trace(resnet, torch.rand(1, 3, 32, 32)), str(path))
    res, out = _import(tmp_path, path)
    assert res.exit_code == 0, res.output
    assert "11,180,103 parameters" in res.output or "parameters" in res.output
    _same_logits(resnet, out)


def test_import_teacher_refuses_what_does_not_fit(tmp_path, resnet):
    path = tmp_path / "w.pth"
    torch.save(resnet.state_dict(), path)
    res, out = _import(tmp_path, path, classes="10")
    assert res.exit_code == 2 and "fc.weight is (7, 512) in the file, (10, 512)" in res.output
    assert not os.path.exists(out)
    res, out = _import(tmp_path, path, arch="torchvision:resnet34")
    assert res.exit_code == 2 and "do not fit torchvision:resnet34" in res.output and "missing" in res.output
    torch.save(resnet, tmp_path / "whole.pth")  # a pickled module: loading it would run code
    res, out = _import(tmp_path, tmp_path / "whole.pth")
    assert res.exit_code == 2 and "not a readable state_dict file" in res.output and not os.path.exists(out)
    res, _ = _import(tmp_path, tmp_path / "nope.pth")
    assert res.exit_code == 2 and "does not exist" in res.output
    res, _ = _import(tmp_path, path, shape="3,32,24")
    assert res.exit_code == 2 and "square" in res.output


@pytest.fixture
def student(tmp_path):
    path = str(tmp_path / "s.pt")
    save_tiny_teacher(path)
    return path


def test_export_torchscript_takes_pixels_and_gives_the_checkpoints_logits(tmp_path, student):
    out = str(tmp_path / "s.ts")
    res = CliRunner().invoke(cli, ["export", "--model", student, "--format", "torchscript", "--out", out])
    assert res.exit_code == 0 and "float pixels in [0, 1]" in res.output, res.output
    model, spec, _ = load_model(student)
    x = torch.rand(5, *spec.image_shape)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(out)(x), model(normalize(x * 255, spec.mean, spec.std)), atol=1e-6)


def test_export_safetensors_holds_the_weights_and_states_the_normalization(tmp_path, student):
    out = str(tmp_path / "s.safetensors")
    res = CliRunner().invoke(cli, ["export", "--model", student, "--format", "safetensors", "--out", out])
    assert res.exit_code == 0, res.output
    model, spec, _ = load_model(student)
    rebuilt = spec.build().eval()
    rebuilt.load_state_dict(load_file(out))
    x = normalize(torch.rand(3, *spec.image_shape) * 255, spec.mean, spec.std)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == spec.arch and "mean" in meta and "std" in meta


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx extra is not installed")
def test_export_onnx(tmp_path, student):
    import onnx

    out = str(tmp_path / "s.onnx")
    res = CliRunner().invoke(cli, ["export", "--model", student, "--format", "onnx", "--out", out])
    assert res.exit_code == 0, res.output
    graph = onnx.load(out)
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["pixels"]
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        model, spec, _ = load_model(student)
        x = torch.rand(2, *spec.image_shape)
        (y,) = onnxruntime.InferenceSession(out).run(None, {"pixels": x.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(y), model(normalize(x * 255, spec.mean, spec.std)), atol=1e-4)


def test_import_and_export_never_replace_a_file_unasked(tmp_path, resnet, student):
    path = tmp_path / "w.pth"
    torch.save(resnet.state_dict(), path)
    (tmp_path / "teacher.pt").write_bytes(b"mine")
    res, out = _import(tmp_path, path)
    assert res.exit_code == 2 and "--overwrite" in res.output and open(out, "rb").read() == b"mine"
    before = open(student, "rb").read()
    res = CliRunner().invoke(cli, ["export", "--model", student, "--format", "safetensors", "--out", student,
                                   "--overwrite"])
    assert res.exit_code == 2 and "input file itself" in res.output and open(student, "rb").read() == before
