"""`dfkd export`: a checkpoint as TorchScript, ONNX or safetensors, for use outside dfkd.

TorchScript and ONNX files hold the whole classifier: float32 pixels in [0, 1], N x C x H x W, in; logits out;
normalization inside. A safetensors file holds the raw weights, with the architecture, input shape and the
normalization the model expects stated in its metadata.
"""

from __future__ import annotations

import importlib.util
import io
import json

import torch
from torch import nn

from ..store.toolbox import fs

from .checkpoint import CheckpointError, ModelSpec

EXPORT_FORMATS = ("torchscript", "onnx", "safetensors")


class Classifier(nn.Module):
    """A model with its input normalization: takes pixels in [0, 1] (float) and returns logits."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def export_model(model: nn.Module, spec: ModelSpec, fmt: str, out: str) -> None:
    """Write `model` (eval mode) to `out` in `fmt`; the file appears whole or not at all."""
    if fmt not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    model = model.eval().cpu()
    example = torch.rand(1, *spec.image_shape)
    if fmt == "safetensors":
        from safetensors.torch import save

        meta = {"arch": spec.arch, "num_classes": str(spec.num_classes), "input_shape": json.dumps(spec.image_shape),
                "mean": json.dumps(spec.mean), "std": json.dumps(spec.std), "kwargs": json.dumps(spec.kwargs),
                "input": "normalized: (pixels in [0, 1] - mean) / std, per channel"}
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        fs.write_atomic(out, save(state, metadata=meta))
        return
    wrapped = Classifier(model, spec.mean, spec.std).eval()
    if fmt == "torchscript":
        with torch.no_grad():
            scripted = torch.jit.trace(wrapped, example)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        fs.write_atomic(out, buf.getvalue())
        return
    if importlib.util.find_spec("onnx") is None:  # torch.onnx writes the protobuf through it
        raise CheckpointError("ONNX export needs the onnx package: pip install 'dfkd[onnx]'")
    buf = io.BytesIO()
    torch.onnx.export(wrapped, (example,), buf, input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    fs.write_atomic(out, buf.getvalue())
