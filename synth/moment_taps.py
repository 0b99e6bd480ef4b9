"""Feature-statistics gradients applied where the backward pass reaches each layer, not at the loss.

A loss on channel moments sits next to the loss in the graph, so plain autograd computes its gradient
for every matched layer (one activation-sized tensor each) at the very start of the backward pass and
holds them all while the rest of the network is still being differentiated: for a ResNet-34 at batch
256 that is most of a second copy of the activations. Here a tap (identity) is put on each matched
tensor; the moments are computed from the tap's output, and their backward only leaves (g_mean, g_var)
— two C-vectors — in a slot. The tap's backward runs after every user of its output is done (so after
the moments' backward) and adds the moment gradient to the one coming back through the network (a
multiply-add and an add, where plain autograd also allocated the moment gradient and summed it). The gradient is exactly the plain one; only when and where it is formed changes.
"""

from __future__ import annotations

import torch

from .losses import at_least_fp32, moments, moments_grad


class MomentSlot:
    """What the moments' backward hands to the tap: the loss gradient w.r.t. the channel mean and variance."""

    __slots__ = ("mean", "g_mean", "g_var")

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None
        self.g_mean: torch.Tensor | None = None
        self.g_var: torch.Tensor | None = None

    def add(self, g_mean: torch.Tensor | None, g_var: torch.Tensor | None) -> None:
        """Accumulate (the moments of one tapped tensor may enter the loss more than once)."""
        if g_mean is not None:
            self.g_mean = g_mean if self.g_mean is None else self.g_mean + g_mean
        if g_var is not None:
            self.g_var = g_var if self.g_var is None else self.g_var + g_var

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The accumulated gradients, leaving the slot empty for another backward pass."""
        out = self.g_mean, self.g_var
        self.g_mean = self.g_var = None
        return out


class _Tap(torch.autograd.Function):
    """Identity forward; backward = incoming gradient + the slot's moment gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: MomentSlot) -> torch.Tensor:
        ctx.slot = slot
        ctx.save_for_backward(x)  # the layer saves this tensor too: no extra memory
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        g_mean, g_var = ctx.slot.take()
        if g_mean is None and g_var is None:
            return grad, None
        (x,) = ctx.saved_tensors
        if grad is None:
            return moments_grad(x, ctx.slot.mean, g_mean, g_var).to(x.dtype), None
        return moments_grad(x, ctx.slot.mean, g_mean, g_var, into=grad), None


class _DeferredMoments(torch.autograd.Function):
    """Channel moments of a tapped tensor whose backward only fills the tap's slot (no input gradient here)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: MomentSlot) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.slot = slot
        mean, var = moments(at_least_fp32(x))
        slot.mean = mean.detach()
        return mean, var

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor | None, g_var: torch.Tensor | None) -> tuple[None, None]:
        ctx.slot.add(g_mean, g_var)
        return None, None


def tap(x: torch.Tensor) -> tuple[torch.Tensor, MomentSlot | None]:
    """x behind a tap, and the tap's slot; x itself (slot None) when no gradient will flow through it."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x, None
    slot = MomentSlot()
    return _Tap.apply(x, slot), slot


def tapped_channel_stats(x: torch.Tensor, slot: MomentSlot) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of a tensor returned by `tap`; its input gradient is applied at the tap."""
    return _DeferredMoments.apply(x, slot)
