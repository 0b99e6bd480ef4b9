"""How many ATen ops an inversion iteration dispatches, beside its floor's: the host work a GPU waits on.

On a GPU every dispatched op is at least one kernel launch, and a loop of small launches leaves the card idle
however fast it is. Counts are exact and the same on any machine (unlike milliseconds on a busy 2-core box),
so they are measured here on CPU. Everything the dispatcher sees is counted, views and the optimizer's
profiler markers included (they launch no kernel: the count is an upper bound on launches).

    python -m benchmarks.synth_overhead --ops   (a column of these beside ms/iter)
"""

from __future__ import annotations

import collections
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched inside the `with` block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> collections.Counter[str]:
    """The ops `fn()` dispatches, by name."""
    with OpCounter() as c:
        fn()
    return c.counts


def floor_ops(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> int:
    """One forward + backward to the input pixels (cross-entropy, frozen model, no hooks): the floor."""
    x = x.detach().requires_grad_(True)

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x).float(), targets).backward()
    return sum(count_ops(step).values())


def inversion_ops(method, targets: torch.Tensor, seed: int = 0, iterations: tuple[int, int] = (4, 8)) -> float:
    """Ops per iteration of an inversion method's `synthesize`: the difference of two runs' counts over the
    difference of their iterations, so setup and the last iteration's read-out cancel."""
    totals = []
    for n in iterations:
        method.config.iterations = n
        totals.append(sum(count_ops(lambda: method.synthesize(targets, torch.Generator().manual_seed(seed))).values()))
    return (totals[1] - totals[0]) / (iterations[1] - iterations[0])
