"""The modes a method puts the teacher and the proxy student in for a while: train or eval, gradients on or off,
both restored afterwards (one context for the frozen teacher, the training student and the generator's step)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def modes(*models: nn.Module | None, train: bool | None, grads: bool) -> Iterator[None]:
    """Each model in train (True) or eval (False) mode, or as it is (None), and its parameters' gradients on or
    off, for the duration; every mode and flag restored afterwards, however the block ends."""
    saved = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in models if m is not None]
    try:
        for m, _, _ in saved:
            if train is not None:
                m.train(train)
            for p in m.parameters():
                p.requires_grad_(grads)
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)


def frozen(*models: nn.Module | None) -> contextlib.AbstractContextManager[None]:
    """Eval mode and no parameter gradients for the duration (the teacher while a method synthesizes)."""
    return modes(*models, train=False, grads=False)


def training(*models: nn.Module | None) -> contextlib.AbstractContextManager[None]:
    """Train mode and parameter gradients for the duration (a proxy student between the method's other steps)."""
    return modes(*models, train=True, grads=True)
