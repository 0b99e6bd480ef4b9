"""Bring your own teacher: weights from a state_dict, safetensors or TorchScript file, checked, as a dfkd checkpoint."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, ModelSpec, save_model
from .models import ModelError, create_model


def weights_format(path: str) -> str:
    """What a weights file holds, from its content: safetensors, TorchScript (a zip with code/), or a state_dict."""
    import zipfile

    if path.endswith(".safetensors"):
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist()):
                return "torchscript"
    return "state_dict"


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file. state_dicts load with weights_only=True (no pickled code runs); a TorchScript
    file is a program, loaded by torch.jit on the CPU for its parameters and buffers only: import files you trust."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {path} does not exist; check the path")
    kind = weights_format(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        if kind == "torchscript":
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a damaged or foreign file
        raise CheckpointError(f"{path} is not a readable {kind} file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for key in ("state_dict", "model", "model_state_dict"):  # the common wrappers of training scripts
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (a mapping of names to tensors); save one with "
                              "torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel/DDP prefixes


def import_teacher(arch: str, weights: str, input_shape: tuple[int, int, int], num_classes: int,
                   mean: tuple[float, ...], std: tuple[float, ...], out: str, **kwargs: Any) -> tuple[nn.Module, ModelSpec]:
    """Build `arch`, load `weights` into it (every tensor must fit), check a forward pass gives `num_classes`
    logits, and write a dfkd checkpoint to `out`. Returns the model (eval mode) and its spec."""
    c, h, w = input_shape
    if h != w:
        raise CheckpointError(f"dfkd models take square images; the input shape {c},{h},{w} is not (resize to {c},{h},{h})")
    if len(mean) != c or len(std) != c:
        raise CheckpointError(f"--mean and --std need one value per channel ({c}); got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise CheckpointError("--std values must be positive")
    state = read_weights(weights)
    spec = ModelSpec(arch, num_classes, c, h, tuple(mean), tuple(std), dict(kwargs))
    try:
        model = create_model(arch, num_classes, c, h, **kwargs)
    except TypeError as exc:
        raise ModelError(f"{arch} cannot be built for {num_classes} classes and {c} channels ({exc})") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]]
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    if wrong or missing or unexpected:  # torch's own error is a page, and names one kind of problem
        what = (f"{wrong[0]} is {tuple(state[wrong[0]].shape)} in the file, {shapes[wrong[0]]} in {arch}" if wrong else
                f"{arch} needs {missing[0]}, which the file lacks" if missing else
                f"the file has {unexpected[0]}, which {arch} lacks")
        raise CheckpointError(f"the weights in {weights} do not fit {arch} with {num_classes} classes: {what} "
                              f"({len(wrong)} wrong shapes, {len(missing)} missing, {len(unexpected)} unexpected); "
                              "check --arch and --num-classes")
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, c, h, w))
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CheckpointError(f"{arch} gives {got} for a batch of 2 images of {c}x{h}x{w}, not 2 x {num_classes} "
                              "logits; check --input-shape and --num-classes")
    save_model(out, model, spec, {"imported_from": os.path.basename(weights)})
    return model, spec
