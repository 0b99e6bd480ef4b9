"""Model checkpoints that rebuild themselves: architecture, its arguments, normalization, weights.

Only tensors and plain values are stored, files are read with torch.load(weights_only=True), and the
architecture a file names is built only from the zoo, torchvision or timm, unless the user names that
same `package.module:factory` (`model_code`): opening a checkpoint never runs code the file chose.
Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Collection

import torch
from torch import nn

from ..store.toolbox import fs
from ..store.toolbox.errors import DfkdError

from .models import check_file_model, create_model

FORMAT = "dfkd-model"


class CheckpointError(DfkdError):
    """A checkpoint is missing, unreadable or not a dfkd model file."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and feed it: architecture, shapes, normalization."""

    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def build(self) -> nn.Module:
        """A freshly initialized model of this spec."""
        return create_model(self.arch, self.num_classes, self.in_channels, self.image_size, **self.kwargs)


def save_model(path: str, model: nn.Module, spec: ModelSpec, metrics: dict[str, Any] | None = None) -> None:
    """Write a self-describing model checkpoint."""
    d = asdict(spec)
    d["mean"], d["std"] = list(spec.mean), list(spec.std)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fs.save_torch({"format": FORMAT, "version": 1, "spec": d, "state_dict": state, "metrics": metrics or {}}, path)


def read_checkpoint(path: str, what: str = "model") -> dict[str, Any]:
    """Load a checkpoint file safely, with one clear line for a missing or foreign file."""
    if not fs.isfile(path):
        raise CheckpointError(f"{what} file {path} does not exist; check the path, or make one with "
                              "`dfkd train-teacher`" if what == "teacher" else f"{what} file {path} does not exist")
    try:
        return fs.load_torch(path)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(exc).__name__}); "
                              "it is corrupt or not a dfkd file") from None


def spec_from_file(d: Any, path: str, model_code: Collection[str] = ()) -> ModelSpec:
    """The spec a file gives, checked: plain fields only, an architecture the file may choose."""
    names = {f.name for f in fields(ModelSpec)}
    if not isinstance(d, dict) or set(d) - names or {"arch", "num_classes", "in_channels", "image_size"} - set(d):
        raise CheckpointError(f"{path} has a malformed model spec; it is corrupt or not a dfkd file")
    check_file_model(d["arch"], d.get("kwargs", {}), path, model_code)
    try:
        spec = ModelSpec(**{**d, "mean": tuple(float(v) for v in d["mean"]), "std": tuple(float(v) for v in d["std"])})
        for name in ("num_classes", "in_channels", "image_size"):
            if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
                raise ValueError(name)
    except (TypeError, ValueError, KeyError):
        raise CheckpointError(f"{path} has a malformed model spec; it is corrupt or not a dfkd file") from None
    return spec


def _check_weights_fit(state: Any, shapes: dict[str, tuple[int, ...]], spec: ModelSpec, path: str) -> None:
    """The file's weights have the names and shapes the spec's model has: checked before the model is built for
    real, so a spec edited to huge sizes is one line, not gigabytes allocated first."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no weights dictionary; it is corrupt or not a dfkd file")
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which {spec.arch} has not"
        raise CheckpointError(f"{path}: weights do not fit {spec.arch} (the file {what}); it is corrupt or its spec "
                              "was changed")
    for k, shape in shapes.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"{path}: weights do not fit {spec.arch} ({k} is {tuple(state[k].shape)} in the file, "
                                  f"{shape} for its spec of {spec.num_classes} classes, {spec.image_shape} images); it "
                                  "is corrupt or its spec was changed")


def load_model(path: str, what: str = "model", model_code: Collection[str] = ()
               ) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild a model from its checkpoint alone: (model in eval mode, spec, metrics).

    `model_code`: the `package.module:factory` names the user trusts (named on the command line or in
    the pipeline file); a file naming any other factory is refused before anything is imported.
    """
    ckpt = read_checkpoint(path, what)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dfkd model checkpoint (no '{FORMAT}' header); "
                              "bring your own weights in with `dfkd import-teacher`")
    spec = spec_from_file(ckpt.get("spec"), path, model_code)
    state = ckpt.get("state_dict")
    try:
        with torch.device("meta"):  # shapes only, no memory: a spec of 10^9 classes costs nothing to refuse
            shapes = {k: tuple(v.shape) for k, v in spec.build().state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: {spec.arch} cannot be built from the file's arguments "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    _check_weights_fit(state, shapes, spec, path)
    try:
        model = spec.build()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {spec.arch} cannot be built from the file's arguments "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {spec.arch} ({str(exc).splitlines()[0]})") from None
    return model.eval(), spec, ckpt.get("metrics", {})
