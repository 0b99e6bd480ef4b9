"""Forward hooks addressed by module path, so any user model works unchanged; removed after use."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..store.toolbox.errors import DfkdError


class HookError(DfkdError):
    """A layer path that the teacher does not have."""


def resolve(model: nn.Module, paths: list[str]) -> dict[str, nn.Module]:
    """Modules by dotted path (as in model.named_modules()), with one clear error for a wrong path."""
    named = dict(model.named_modules())
    missing = [p for p in paths if p not in named]
    if missing:
        sample = ", ".join(list(n for n in named if n)[:12])
        raise HookError(f"the teacher has no layer {missing[0]!r}; layer paths look like: {sample}")
    return {p: named[p] for p in paths}


class FeatureHooks:
    """Captures the input (or output) of chosen layers on every forward; a context manager that cleans up.

    `captured[path]` holds the latest tensor, still attached to the graph so losses can flow through it.
    With `transform(path, tensor)`, the layer sees (and `captured` holds) the transformed tensor instead:
    a pre-hook replaces the input, a forward hook the output (synth.moment_match's taps use this).
    """

    def __init__(self, model: nn.Module, paths: list[str], capture: str = "input",
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        if capture not in ("input", "output"):
            raise ValueError("capture must be 'input' or 'output'")
        self.modules = resolve(model, paths)
        self.capture = capture
        self.transform = transform
        self.captured: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, path: str) -> Callable:
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.captured[path] = inputs[0] if self.capture == "input" else output
        return fn

    def _transforming_hook(self, path: str) -> Callable:
        def pre(module: nn.Module, inputs: tuple) -> tuple:
            self.captured[path] = self.transform(path, inputs[0])
            return (self.captured[path], *inputs[1:])

        def post(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            self.captured[path] = self.transform(path, output)
            return self.captured[path]
        return pre if self.capture == "input" else post

    def __enter__(self) -> "FeatureHooks":
        make = self._hook if self.transform is None else self._transforming_hook
        pre = self.transform is not None and self.capture == "input"
        self._handles = [(m.register_forward_pre_hook if pre else m.register_forward_hook)(make(p))
                         for p, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach every hook and drop captured tensors: the model is left exactly as it was."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.captured = {}


def bn_layers(model: nn.Module) -> list[str]:
    """Paths of the BatchNorm layers that track running statistics, in forward-definition order."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]
