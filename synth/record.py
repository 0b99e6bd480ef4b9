"""The record: what a data owner can release instead of data — per-layer channel mean/variance and mean
amplitude spectra of a teacher's activations on real data, in one safetensors file with JSON metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..store.toolbox.errors import DfkdError

from .hooks import FeatureHooks
from .losses import amplitudes, class_sums
from .teacher import fingerprint

FORMAT = "dfkd-record"


class RecordError(DfkdError):
    """A missing, foreign or mismatched record."""


def default_layers(model: nn.Module) -> list[str]:
    """Every conv and linear layer except the last (the classifier): where feature statistics live."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return names[:-1] if len(names) > 1 else names


@dataclass
class TeacherStats:
    """A teacher's record (dfkd record): per-layer statistics of its outputs on real data (not a store's Samples)."""

    teacher_fingerprint: str
    layers: list[str]
    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    amplitude: dict[str, torch.Tensor]
    class_amplitude: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> K×spectrum (optional)
    num_images: int = 0
    data: str = ""

    def save(self, path: str) -> int:
        """Write the safetensors file atomically; returns its size in bytes."""
        from safetensors.torch import save

        from ..store.toolbox import fs

        tensors = {}
        for layer in self.layers:
            tensors[f"{layer}/mean"] = self.mean[layer].contiguous()
            tensors[f"{layer}/var"] = self.var[layer].contiguous()
            tensors[f"{layer}/amplitude"] = self.amplitude[layer].contiguous()
            if layer in self.class_amplitude:
                tensors[f"{layer}/class_amplitude"] = self.class_amplitude[layer].contiguous()
        meta = {"format": FORMAT, "version": "1", "teacher_fingerprint": self.teacher_fingerprint,
                "layers": json.dumps(self.layers), "num_images": str(self.num_images), "data": self.data}
        data = save(tensors, metadata=meta)
        fs.write_atomic(path, data)
        return len(data)

    @classmethod
    def load(cls, path: str) -> "TeacherStats":
        """Read a record file, refusing anything that is not one."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise RecordError(f"record file {path} does not exist; make one with `dfkd record --teacher T --data D --out {path}`")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise RecordError(f"{path} cannot be read as a safetensors record ({type(exc).__name__}); re-create it with dfkd record") from None
        if meta.get("format") != FORMAT:
            raise RecordError(f"{path} is not a dfkd record (no '{FORMAT}' metadata); make one with dfkd record")
        try:
            layers = json.loads(meta["layers"])
            if not isinstance(layers, list) or not all(isinstance(l, str) for l in layers):
                raise ValueError("layers is not a list of layer paths")
            pick = lambda suffix: {l: tensors[f"{l}/{suffix}"] for l in layers if f"{l}/{suffix}" in tensors}
            return cls(meta["teacher_fingerprint"], layers, pick("mean"), pick("var"), pick("amplitude"),
                       pick("class_amplitude"), int(meta.get("num_images", 0)), meta.get("data", ""))
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            raise RecordError(f"{path} has damaged dfkd record metadata ({type(exc).__name__}: {exc}); re-create it "
                              "with dfkd record") from None

    def check_teacher(self, fp: str, where: str) -> None:
        """Refuse a record made with another teacher."""
        if fp != self.teacher_fingerprint:
            raise RecordError(f"{where} was recorded with another teacher (fingerprint {self.teacher_fingerprint[:12]}, "
                              f"this teacher is {fp[:12]}); record this teacher with dfkd record")


@torch.no_grad()
def record(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], layers: list[str] | None = None,
           num_classes: int = 0, data: str = "") -> TeacherStats:
    """One pass over (normalized images, labels): exact channel mean/var and mean amplitude per layer."""
    model.eval()
    layers = layers or default_layers(model)
    sums: dict[str, list] = {}
    n = 0
    with FeatureHooks(model, layers, capture="output") as hooks:
        for x, y in batches:
            model(x)
            n += len(x)
            for l in layers:
                a = hooks.captured[l].float()
                dims = [0] + list(range(2, a.dim()))
                count = a.numel() // a.shape[1]
                each = amplitudes(a)  # one FFT per layer and batch serves both the mean and the per-class spectra
                amp = each.sum(0)
                s = sums.setdefault(l, [0, 0, 0, 0, None])
                s[0] += a.sum(dims).double()
                s[1] += (a.double() ** 2).sum(dims)
                s[2] += count
                s[3] = s[3] + amp
                if num_classes:
                    per = class_sums(each, y, num_classes)[0]
                    s[4] = per if s[4] is None else s[4] + per
            counts = torch.bincount(y, minlength=num_classes) if num_classes else None
            if num_classes:
                sums.setdefault("__counts__", [torch.zeros(num_classes)])[0] += counts
    mean, var, amp, cls_amp = {}, {}, {}, {}
    for l in layers:
        s1, s2, c, a, per = sums[l]
        mu = s1 / c
        mean[l], var[l], amp[l] = mu.float(), (s2 / c - mu ** 2).clamp_min(0).float(), (a / n).float()
        if per is not None:
            k = sums["__counts__"][0].clamp_min(1).view(-1, *([1] * (per.dim() - 1)))
            cls_amp[l] = (per / k).float()
    return TeacherStats(fingerprint(model), layers, mean, var, amp, cls_amp, n, data)
