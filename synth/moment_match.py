"""The feature-statistics loss of many layers in one stacked pass, its gradient applied where the backward
pass reaches each layer.

DeepInversion-style matching sums, over every matched layer, ||mean(x) - ref_mean|| + ||var(x) - ref_var||
(channel moments over batch and space). Written layer by layer with autograd that is ~45 dispatched ops
per layer and iteration (a CUDA kernel each). Here each layer costs two reductions (the channel sum and the
channel norm of x); every layer's moments are concatenated into one vector, so the distances, norms, weights
and their backward are a fixed dozen ops whatever the number of layers.

The gradient: d/dx of (mean, var) is the per-channel affine map scale * x + shift with scale = 2 g_var / n and
shift = g_mean / n - scale * mean. The loss's backward computes every layer's (scale, shift) at once. A layer
whose input passes a tap (`tap`, identity) gets them in its tap's slot, and the tap adds scale * x + shift to
the gradient coming back through the network when the backward pass reaches the layer (an addcmul and an
add): no activation-sized moment gradient is formed at the loss and held while the rest of the network is
differentiated (for a ResNet-34 at batch 256 that was most of a second copy of the activations). A layer
without a tap (recorded statistics of layer outputs) gets its input gradient from the loss's backward.
"""

from __future__ import annotations

from typing import Sequence

import torch


EPS = 1e-30  # where each squared distance starts (MomentMatch.floor)


class MomentSlot:
    """What the loss's backward leaves for a tap: the (scale, shift) of its tensor's moment gradient."""

    __slots__ = ("scale", "shift")

    def __init__(self) -> None:
        self.scale: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None

    def add(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Accumulate (the moments of one tapped tensor may enter the loss more than once)."""
        if self.scale is None:
            self.scale, self.shift = scale, shift
        else:
            self.scale, self.shift = self.scale + scale, self.shift + shift

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The accumulated (scale, shift), leaving the slot empty for another backward pass."""
        out = self.scale, self.shift
        self.scale = self.shift = None
        return out


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (G, C, 1, 1) per-channel tensor shaped to broadcast over a G x N x C x ... tensor of 1 + `ndim` dims
    (G = 1: over the N x C x ... tensor itself)."""
    if t.shape[0] == 1:
        return t if ndim == 4 else t.view(1, -1, *([1] * (ndim - 2)))
    return t.view(t.shape[0], 1, t.shape[1], *([1] * (ndim - 2)))


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
    """scale * x + shift per channel, plus `into` when given (fp32: added in place; half: summed in fp32 first,
    since 2 g_var / n underflows in fp16). With G > 1 rows of (scale, shift), x holds G groups of samples."""
    groups = scale.shape[0]
    if groups > 1:
        x = x.unflatten(0, (groups, -1))
        into = None if into is None else into.unflatten(0, (groups, -1))
    scale, shift = _channel_view(scale, x.dim() - (groups > 1)), _channel_view(shift, x.dim() - (groups > 1))
    if into is None:
        out = torch.addcmul(shift, x, scale).to(x.dtype)
    elif into.dtype == scale.dtype:
        out = torch.addcmul(into, x, scale).add_(shift)
    else:
        out = (torch.addcmul(shift, x, scale) + into).to(into.dtype)
    return out.flatten(0, 1) if groups > 1 else out


class _Tap(torch.autograd.Function):
    """Identity forward; backward = incoming gradient + the slot's scale * x + shift."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: MomentSlot) -> torch.Tensor:
        ctx.slot = slot
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)  # the layer saves this tensor too: no extra memory
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        scale, shift = ctx.slot.take()
        if scale is None:
            return grad, None
        (x,) = ctx.saved_tensors
        return _affine(x, scale, shift, grad), None


def tap(x: torch.Tensor) -> tuple[torch.Tensor, MomentSlot | None]:
    """x behind a tap, and the tap's slot; x itself (slot None) when no gradient will flow through it."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x, None
    slot = MomentSlot()
    return _Tap.apply(x, slot), slot


class MomentMatch:
    """sum_i w_i (||mean_i - ref_mean_i||_2 + ||var_i - ref_var_i||_2) over layers i, from their inputs.

    `refs` are each layer's (mean, var) of C_i channels. Batch moments may be blended with running ones
    (`running`, the same layout as `last`): (1 - m) * batch + m * running, as Fast and NAYER match the store.
    """

    def __init__(self, refs: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.sizes = [int(m.numel()) for m, _ in refs]
        self.total = sum(self.sizes)
        self.device = device
        self.ref = torch.cat([m.detach().cpu().double().reshape(-1) for m, _ in refs]  # cast to the loss's dtype
                             + [v.detach().cpu().double().reshape(-1) for _, v in refs]).view(1, -1, 1, 1)
        segments = torch.arange(2 * len(refs)).repeat_interleave(torch.tensor(self.sizes * 2))
        self.segments = segments.to(device)  # the layer-half (mean i, var i) each element belongs to
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # the sums of squares start at EPS, so a distance of exactly 0 has gradient 0 (not NaN) without a clamp
        self.floor = torch.full((1, 2 * len(refs), 1, 1), EPS, dtype=torch.float64)  # moves a distance <= 1e-15
        self.last: torch.Tensor | None = None  # the last batch's moments (1, 2T, 1, 1): means, then variances

    def split(self, stats: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (mean, var), each of C_i values, from a (1, 2T, 1, 1) moments vector."""
        flat = stats.reshape(-1)
        means, variances = flat[:self.total].split(self.sizes), flat[self.total:].split(self.sizes)
        return list(zip(means, variances))

    def join(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The inverse of `split`."""
        return torch.cat([m.reshape(-1) for m, _ in pairs] + [v.reshape(-1) for _, v in pairs]).view(1, -1, 1, 1)

    def coefficients(self, counts: tuple[int, ...], weights: tuple[float, ...], blend: float,
                     dtype: torch.dtype = torch.float32, groups: int = 1) -> tuple:
        """(to moments, loss weights, backward weights, reference, floor) for these per-layer element counts (per
        group) and weights, in this dtype, for `groups` groups of samples each matched on its own; made once."""
        key = (counts, weights, blend, dtype, groups)
        if key not in self._cache:
            dev, rep = self.device, lambda v: [a for a, c in zip(v, self.sizes) for _ in range(c)]
            to_moments = rep([1 / n for n in counts]) + rep([n ** -0.5 for n in counts])  # sums -> E[x], sqrt(E[x^2])
            back = [w * k / n * (1 - blend) for k in (1, 2) for w, n in zip(weights, counts)]  # d mean, d var / dx
            self._cache[key] = tuple(torch.tensor(v, dtype=dtype, device=dev).view(1, -1, 1, 1)
                                     for v in (to_moments, list(weights) * 2, back)) + (
                self.ref.to(dtype).to(dev), self.floor.to(dtype).expand(groups, -1, -1, -1).contiguous().to(dev))
        return self._cache[key]

    def loss(self, xs: Sequence[torch.Tensor], slots: Sequence[MomentSlot | None], weights: Sequence[float],
             running: torch.Tensor | None = None, momentum: float = 0.0, groups: int = 1) -> torch.Tensor:
        """The weighted loss of these layer inputs (channels on dim 1); sets `last` to their batch moments.

        With `groups` G, each input holds G equal groups of samples (units made side by side), each matched on its
        own moments: the loss is the sum of the G losses, so each group's gradient is the one it gets alone."""
        if groups > 1 and running is not None:
            raise ValueError("running moments are blended for one group of samples at a time")
        return _MomentLoss.apply(self, list(slots), tuple(float(w) for w in weights), running, momentum, groups, *xs)


class _MomentLoss(torch.autograd.Function):
    """MomentMatch's loss with a hand-written backward over the stacked moments."""

    @staticmethod
    def forward(ctx, mm: MomentMatch, slots, weights, running, momentum, groups, *xs: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
        sums, norms = [], []
        for x in xs:  # accumulated in fp32 (or fp64) whatever x's precision (autocast), without a converted copy
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            g = x if groups == 1 else x.unflatten(0, (groups, -1))  # G x N x C x ...: the batch dim is 1, not 0
            batch = int(groups > 1)
            dims = [batch, *range(batch + 2, g.dim())]
            keep = groups == 1
            s = g.sum(dims, keepdim=keep, dtype=acc)
            # space, then batch: one norm over (0, 2, 3) at once loses ~4e-5 of E[x^2] on CPU and is 7x slower
            q = torch.linalg.vector_norm(torch.linalg.vector_norm(g, dim=dims[1:], keepdim=keep, dtype=acc), dim=batch,
                                         keepdim=keep) if len(dims) > 1 else torch.linalg.vector_norm(
                                             g, dim=batch, keepdim=keep, dtype=acc)
            four = keep and x.dim() == 4  # already G x C x 1 x 1
            sums.append(s if four else s.view(groups, -1, 1, 1))
            norms.append(q if four else q.view(groups, -1, 1, 1))
        counts = tuple(x.numel() // (x.shape[1] * groups) for x in xs)
        blend = momentum if running is not None else 0.0
        to_moments, w, back, ref, floor = mm.coefficients(counts, weights, blend, dtype, groups)
        mean, rms = (torch.cat(sums + norms, dim=1) * to_moments).split(mm.total, dim=1)  # E[x], sqrt(E[x^2])
        var = torch.addcmul(rms * rms, mean, mean, value=-1)  # E[x^2] - E[x]^2
        stats = torch.cat([mean, var], dim=1)
        mm.last = stats
        if running is not None:
            stats = torch.lerp(running, stats, 1 - momentum)
        diff = stats - ref
        per_half = floor.index_add(1, mm.segments, diff * diff).sqrt_()
        ctx.mm, ctx.slots, ctx.back = mm, slots, back
        ctx.save_for_backward(diff, per_half, mean, *(x if s is None else None for x, s in zip(xs, slots)))
        return (per_half * w).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple:
        diff, per_half, mean, *xs = ctx.saved_tensors
        mm = ctx.mm
        coef = torch.div(ctx.back, per_half).mul_(g)
        part, scale = (coef.index_select(1, mm.segments) * diff).split(mm.total, dim=1)  # g_mean / n, 2 g_var / n
        shift = torch.addcmul(part, scale, mean, value=-1)
        grads = []
        for x, slot, a, b in zip(xs, ctx.slots, scale.split(mm.sizes, dim=1), shift.split(mm.sizes, dim=1)):
            if slot is not None:
                slot.add(a, b)
                grads.append(None)
            else:
                grads.append(_affine(x, a, b, None))
        return (None, None, None, None, None, None, *grads)
