"""What a file may make dfkd do: build only zoo, torchvision and timm models, never import code it names."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dfkd.distill.checkpoint import CheckpointError, ModelSpec, load_model, save_model
from dfkd.distill.models import ModelError


def _crafted(path, arch, kwargs=None, **spec):
    d = {"arch": arch, "num_classes": 10, "in_channels": 1, "image_size": 8, "mean": [0.5], "std": [0.25],
         "kwargs": kwargs or {}, **spec}
    torch.save({"format": "dfkd-model", "version": 1, "spec": d, "state_dict": {}, "metrics": {}}, path)
    return str(path)


@pytest.mark.parametrize("arch,kwargs", [
    ("this:x", {}),  # importing `this` prints the Zen of Python
    ("torch.hub:load", {"repo_or_dir": "/tmp", "model": "m", "source": "local"}),
    ("tests.model_factories:tiny_mlp", {}),
])
def test_checkpoint_naming_a_factory_imports_nothing(tmp_path, arch, kwargs):
    path = _crafted(tmp_path / "evil.pt", arch, kwargs)
    code = ("import sys\nfrom dfkd.distill.checkpoint import load_model\n"
            f"try:\n    load_model({path!r})\nexcept Exception as e:\n    print('refused:', e)\n"
            "print('imported:', [m for m in ('this', 'tests.model_factories') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "never imports code a file names" in out and f"--model-code {arch}" in out
    assert "imported: []" in out and "Beautiful is better" not in out


def test_model_code_named_by_the_user_is_built(tmp_path):
    from tests.model_factories import tiny_mlp

    spec = ModelSpec("tests.model_factories:tiny_mlp", 10, 1, 8, (0.5,), (0.25,), {"hidden": 12})
    model = spec.build()  # a caller naming the factory in Python is the user naming it
    save_model(str(tmp_path / "m.pt"), model, spec)
    with pytest.raises(ModelError, match="--model-code tests.model_factories:tiny_mlp"):
        load_model(str(tmp_path / "m.pt"))
    loaded, spec2, _ = load_model(str(tmp_path / "m.pt"), model_code=("tests.model_factories:tiny_mlp",))
    x = torch.randn(3, 1, 8, 8)
    assert spec2 == spec and torch.equal(loaded(x), model.eval()(x))
    assert isinstance(tiny_mlp(10), torch.nn.Sequential)


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden": {"__class__": "x"}}, "plain numbers"),
    ({"weights": "DEFAULT"}, "load weights from elsewhere"),
    ({"bogus": 3}, "takes no argument 'bogus'"),
    ({"num_classes": 3}, "takes no argument 'num_classes'"),
])
def test_file_kwargs_are_declared_scalars(tmp_path, kwargs, match):
    path = _crafted(tmp_path / "k.pt", "mlp", kwargs)
    with pytest.raises(ModelError, match=match):
        load_model(path)


def test_malformed_spec_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="malformed model spec"):
        load_model(_crafted(tmp_path / "m.pt", "mlp", unexpected=1))
    with pytest.raises(CheckpointError, match="malformed model spec"):
        load_model(_crafted(tmp_path / "n.pt", "mlp", num_classes="10"))
