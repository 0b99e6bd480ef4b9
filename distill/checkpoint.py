"""Model checkpoints that rebuild themselves: architecture, its arguments, normalization, weights.

Only tensors and plain values are stored, and files are read with torch.load(weights_only=True), so
opening a checkpoint never runs code. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from store.errors import DfkdError

from .models import create_model

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


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_model(path: str, model: nn.Module, spec: ModelSpec, metrics: dict[str, Any] | None = None) -> None:
    """Write a self-describing model checkpoint."""
    d = asdict(spec)
    d["mean"], d["std"] = list(spec.mean), list(spec.std)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": FORMAT, "version": 1, "spec": d, "state_dict": state, "metrics": metrics or {}}, path)


def read_checkpoint(path: str, what: str = "model") -> dict[str, Any]:
    """Load a checkpoint file safely, with one clear line for a missing or foreign file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} file {path} does not exist; check the path, or make one with "
                              "`dfkd train-teacher`" if what == "teacher" else f"{what} file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(exc).__name__}); "
                              "it is corrupt or not a dfkd file") from None


def load_model(path: str, what: str = "model") -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild a model from its checkpoint alone: (model in eval mode, spec, metrics)."""
    ckpt = read_checkpoint(path, what)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dfkd model checkpoint (no '{FORMAT}' header); "
                              "save models with dfkd, or wrap your weights with distill.checkpoint.save_model")
    d = dict(ckpt["spec"])
    spec = ModelSpec(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})
    model = spec.build()
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {spec.arch} ({str(exc).splitlines()[0]})") from None
    return model.eval(), spec, ckpt.get("metrics", {})
