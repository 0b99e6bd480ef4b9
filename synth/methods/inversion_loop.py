"""The model-inversion loop shared by stat, spectral, DeepInversion and ADI.

Images are optimized in the teacher's input space from Gaussian noise with Adam and a cosine
schedule, under random jitter (roll) and flips; pixels are kept in the valid range; each image keeps
its best iterate (lowest cross-entropy to its target; `keep_best=false` keeps the last). Subclasses
only add loss terms.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...store.toolbox.declared import setting
from .base import Method


@dataclass
class InversionConfig:
    """Loop settings common to every inversion method (defaults measured on small teachers: BENCHMARKS.md)."""

    iterations: int = setting(200, "Adam steps per batch (the budget)", low=1)
    lr: float = setting(0.25, "Adam learning rate on the pixels, cosine to 0", low=0, low_open=True)
    beta1: float = setting(0.5, "Adam beta1", low=0, high=1, high_open=True)
    beta2: float = setting(0.9, "Adam beta2", low=0, high=1, high_open=True)
    jitter: int = setting(2, "random roll of up to this many pixels per step", low=0)
    flip: bool = setting(True, "random horizontal flip per step")
    w_ce: float = setting(1.0, "weight of cross-entropy to the target class", low=0)
    keep_best: bool = setting(True, "keep each image's lowest-loss iterate, not the last")


class InversionMethod(Method):
    """Optimizes a batch of inputs; `terms` returns the method's weighted losses for one forward pass."""

    units_in_flight = True

    def __init__(self, ctx, config) -> None:
        super().__init__(ctx, config)
        self._graphed_loops: dict[tuple, InversionLoop] = {}  # with CUDA graphs: one captured loop per batch shape

    def terms(self, x: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
              groups: int = 1) -> dict[str, torch.Tensor]:
        """Weighted loss terms besides cross-entropy, for inputs x (jittered view) and teacher logits; with `groups`
        G (units in flight), x holds G units' images and each term is the sum of each unit's own."""
        return {}

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.teacher(x)

    def synthesize(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self._make([targets], [gen])[0]

    def synthesize_units(self, targets: list[torch.Tensor], gens: list[torch.Generator]
                         ) -> list[tuple[torch.Tensor, dict[str, float]]]:
        if not self.units_in_flight or len(targets) == 1:
            return super().synthesize_units(targets, gens)
        return self._make(targets, gens)

    def _make(self, targets: list[torch.Tensor], gens: list[torch.Generator]) -> list[tuple[torch.Tensor, dict]]:
        """G units optimized side by side in one batch, each from its own generator (noise, then every iteration's
        jitter and flip, in the order one unit alone draws them) and matched on its own statistics."""
        cfg, ctx = self.config, self.ctx
        groups = len(targets)
        if len({len(t) for t in targets}) != 1:
            raise ValueError("units in flight must have the same size")
        x0s, rows, cols = [], [], []
        for t, gen in zip(targets, gens):
            x0s.append(torch.randn((len(t), *ctx.image_shape), generator=gen, device="cpu"))
            r, c = jitter_indices(cfg, ctx.image_shape, gen, ctx.device)  # every iteration's, drawn now
            rows.append(r)
            cols.append(c)
        x0, target = torch.cat(x0s).to(ctx.device), torch.cat(targets)
        if groups == 1:
            rows, cols = rows[0], cols[0]
        else:  # iteration by iteration, each unit's indices: G x H and G x W
            rows, cols = [torch.stack(r) for r in zip(*rows)], [torch.stack(c) for c in zip(*cols)]
        loop = self._loop(x0, target, groups)
        loop.reset(x0, target)
        step = loop.graphed(rows[0], cols[0]) if loop.graphs and cfg.iterations else loop.step
        parts, loss = {}, None
        for it in range(cfg.iterations):
            loop.set_lr(0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations)))  # cosine to 0
            parts, loss = step(rows[it], cols[it])
        # reading values syncs the device: once per batch; with several units, the mean of their losses
        last = {k: float(v.detach()) / groups for k, v in parts.items()}
        if loss is not None:
            last["total"] = float(loss.detach()) / groups
        images = ctx.denormalize(loop.result()).clamp(0, 1)
        return [(x, dict(last)) for x in images.chunk(groups)]

    def _loop(self, x0: torch.Tensor, targets: torch.Tensor, groups: int) -> "InversionLoop":
        """A loop for this batch shape: a new one per batch, or with CUDA graphs the one captured for the shape."""
        if not InversionLoop.can_graph(self.ctx):
            return InversionLoop(self, x0, targets, graphs=False, groups=groups)
        key = (tuple(x0.shape), x0.dtype, groups)
        if key not in self._graphed_loops:
            self._graphed_loops[key] = InversionLoop(self, x0, targets, graphs=True, groups=groups)
        return self._graphed_loops[key]


def per_group(term, x: torch.Tensor, groups: int) -> torch.Tensor:
    """A batch-level term summed over `groups` equal groups of images, each group's own."""
    return term(x) if groups == 1 else functools.reduce(operator.add, (term(c) for c in x.chunk(groups)))


def jitter_indices(cfg: InversionConfig, image_shape: tuple[int, int, int], gen: torch.Generator,
                   device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each iteration's row and column gather indices: the random roll by (dy, dx) <= jitter and the random
    horizontal flip, drawn from `gen` in the order the loop always drew them, as index tensors so a graph can
    replay any of them (view[..., i, j] = x[..., rows[i], cols[j]])."""
    _, h, w = image_shape
    shifts, flips = [], []
    for _ in range(cfg.iterations):
        shifts.append(torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen).tolist() if cfg.jitter
                      else [0, 0])
        flips.append(bool(cfg.flip) and torch.rand((), generator=gen).tolist() < 0.5)
    down, right = torch.tensor(shifts, dtype=torch.long).reshape(-1, 2).unbind(1)  # torch.roll's (dims 2, 3)
    flip = torch.tensor(flips, dtype=torch.bool).view(-1, 1)
    rows = (torch.arange(h).view(1, -1) - down.view(-1, 1)) % h  # torch.roll: out[i] = x[(i - shift) % n]
    j = torch.arange(w).view(1, -1)
    cols = (torch.where(flip, w - 1 - j, j) - right.view(-1, 1)) % w  # the flip reads the rolled row backwards
    return list(rows.to(device).unbind(0)), list(cols.to(device).unbind(0))


class InversionLoop:
    """One batch's optimization, written graph-safe: the pixels, their best iterate and Adam's state are tensors
    updated in place, the jitter and flip come in as index tensors and the learning rate as a tensor, and nothing
    reads a device value on the host. The same `step` runs eagerly (CPU, and CUDA without graphs) and captured as
    a CUDA graph (`SynthContext.cuda_graphs`, one capture per batch shape, reused for every batch of that shape)."""

    def __init__(self, method: InversionMethod, x0: torch.Tensor, targets: torch.Tensor, graphs: bool,
                 groups: int = 1) -> None:
        cfg, ctx = method.config, method.ctx
        self.method, self.graphs, self.groups = method, graphs, groups
        self.x = x0.clone().requires_grad_(True)
        self.targets, self.tgt = targets.clone(), targets.view(-1, 1).clone()
        self.lo = ctx.normalize(torch.zeros(1, ctx.image_shape[0], 1, 1, device=ctx.device))
        self.hi = ctx.normalize(torch.ones(1, ctx.image_shape[0], 1, 1, device=ctx.device))
        self.track = bool(cfg.w_ce and cfg.keep_best)  # each image keeps its best iterate, scored by its log-prob
        self.best = x0.clone()
        self.best_score = torch.full((len(targets), 1), -math.inf, device=ctx.device)
        self.shifted = bool(cfg.jitter or cfg.flip)
        # a graph replays the learning rate it was captured with unless it is a tensor the host writes before
        self.lr = torch.tensor(cfg.lr, device=ctx.device) if graphs else cfg.lr
        self.opt = torch.optim.Adam([self.x], lr=self.lr, betas=(cfg.beta1, cfg.beta2), fused=True,
                                    capturable=graphs)  # fused: one kernel per step
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp == torch.float16)  # fp16 scales
        self._graph = None

    @staticmethod
    def can_graph(ctx) -> bool:
        """CUDA graphs were asked for, on CUDA, without fp16 loss scaling (its inf check reads the device)."""
        return ctx.cuda_graphs and ctx.device.type == "cuda" and ctx.amp != torch.float16

    def reset(self, x0: torch.Tensor, targets: torch.Tensor) -> None:
        """Start a batch: these pixels and targets, no best iterate yet, Adam as new."""
        with torch.no_grad():
            self.x.copy_(x0)
            self.best.copy_(x0)
            self.best_score.fill_(-math.inf)
            self.targets.copy_(targets)
            self.tgt.copy_(targets.view(-1, 1))
            for state in self.opt.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        v.zero_()

    def set_lr(self, lr: float) -> None:
        if torch.is_tensor(self.lr):
            self.lr.fill_(lr)
        else:
            self.opt.param_groups[0]["lr"] = lr

    def graphed(self, rows: torch.Tensor, cols: torch.Tensor):
        """`step` as a CUDA graph (captured on first use; the capture's warm-up steps are undone by `reset`)."""
        if self._graph is None:
            from ...store.toolbox.cuda_graph import GraphedStep

            x0, targets = self.x.detach().clone(), self.targets.clone()
            self._graph = GraphedStep(self.step, (rows, cols))
            self.reset(x0, targets)
        return self._graph

    def step(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One iteration: the jittered, flipped view, the losses, the best iterate, Adam, the clamp."""
        cfg, ctx, x = self.method.config, self.method.ctx, self.x
        groups = self.groups
        view = self._view(rows, cols) if self.shifted else x
        with ctx.autocast():
            logits = self.method.forward_teacher(view)
            parts = {}
            if cfg.w_ce:  # cross-entropy as log-softmax + NLL, so the best-iterate score reuses the log-probs
                log_p = F.log_softmax(logits.float(), 1)
                ce = F.nll_loss(log_p, self.targets)
                w = cfg.w_ce * groups  # G units: the sum of each unit's mean
                parts["ce"] = ce if w == 1 else w * ce
            parts.update(self.method.terms(view, logits, self.targets, groups))
            loss = functools.reduce(operator.add, parts.values())
        if self.track:
            with torch.no_grad():  # keep each image's best iterate (the one scored by this forward)
                score = log_p.gather(1, self.tgt)  # minus its cross-entropy
                torch.where((score > self.best_score).view(-1, *([1] * (x.dim() - 1))), x, self.best, out=self.best)
                torch.fmax(score, self.best_score, out=self.best_score)  # a NaN score never wins
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        with torch.no_grad():
            x.clamp_(min=self.lo, max=self.hi)
        return parts, loss

    def _view(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The jittered, flipped view: rows then columns gathered by index (G units: each by its own)."""
        x = self.x
        if self.groups == 1:
            return x.index_select(2, rows).index_select(3, cols)
        g = x.unflatten(0, (self.groups, -1))  # G x B x C x H x W
        n, b, c, h, w = g.shape
        g = g.gather(3, rows.view(n, 1, 1, h, 1).expand(n, b, c, h, w))
        return g.gather(4, cols.view(n, 1, 1, 1, w).expand(n, b, c, h, w)).flatten(0, 1)

    def result(self) -> torch.Tensor:
        """The batch's images in the teacher's input space: each one's best iterate, or the last."""
        return (self.best if self.track else self.x.detach()).clone()
