"""A training step replayed as one CUDA graph: the host issues one launch per step instead of hundreds.

The step must be graph-safe: its inputs are tensors (copied into the graph's static inputs before each replay),
every update is in place, nothing reads a device value on the host, and its shapes never change. Capturing
needs a few warm-up steps first (lazy optimizer state, cuBLAS workspaces, cached constants); they move what the
step optimizes, so the caller resets its state after building a GraphedStep and before the first replay.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

WARMUP_STEPS = 3  # as PyTorch's own whole-network capture example, on a side stream


class GraphedStep:
    """`step(*inputs)` captured once; calling it copies new inputs in, replays, and returns the captured outputs
    (the same tensors every time, overwritten by each replay)."""

    def __init__(self, step: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> None:
        self.inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            for static, t in zip(self.inputs, inputs):
                static.copy_(t)
        self.graph.replay()
        return self.outputs
