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

from .base import Method


@dataclass
class InversionConfig:
    """Loop settings common to every inversion method (defaults measured on small teachers, see DESIGN)."""

    iterations: int = 200  # Adam steps per batch (the budget)
    lr: float = 0.25  # Adam learning rate on the pixels, cosine to 0
    beta1: float = 0.5  # Adam beta1
    beta2: float = 0.9  # Adam beta2
    jitter: int = 2  # random roll of up to this many pixels per step
    flip: bool = True  # random horizontal flip per step
    w_ce: float = 1.0  # weight of cross-entropy to the target class
    keep_best: bool = True  # keep each image's lowest-loss iterate, not the last


class InversionMethod(Method):
    """Optimizes a batch of inputs; `terms` returns the method's weighted losses for one forward pass."""

    def terms(self, x: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted loss terms besides cross-entropy, for inputs x (jittered view) and teacher logits."""
        return {}

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.teacher(x)

    def synthesize(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, ctx = self.config, self.ctx
        dev = ctx.device
        b = len(targets)
        x = torch.randn((b, *ctx.image_shape), generator=gen, device="cpu").to(dev).requires_grad_(True)
        lo = ctx.normalize(torch.zeros(1, ctx.image_shape[0], 1, 1, device=dev))
        hi = ctx.normalize(torch.ones(1, ctx.image_shape[0], 1, 1, device=dev))
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)  # one kernel per step
        track = bool(cfg.w_ce and cfg.keep_best)  # each image keeps its best iterate: scored by its target log-prob
        best, best_score, tgt = x.detach().clone(), torch.full((b, 1), -math.inf, device=dev), targets.view(-1, 1)
        last: dict[str, float] = {}
        scaler = torch.amp.GradScaler(dev.type, enabled=ctx.amp == torch.float16)  # fp16 needs loss scaling
        for it in range(cfg.iterations):
            for g in opt.param_groups:  # cosine schedule to 0
                g["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations))
            dx, dy = torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen).tolist() if cfg.jitter else (0, 0)
            view = torch.roll(x, shifts=(dx, dy), dims=(2, 3)) if (dx or dy) else x
            if cfg.flip and torch.rand((), generator=gen).tolist() < 0.5:
                view = view.flip(3)
            with ctx.autocast():
                logits = self.forward_teacher(view)
                parts = {}
                if cfg.w_ce:  # cross-entropy as log-softmax + NLL, so the best-iterate score reuses the log-probs
                    log_p = F.log_softmax(logits.float(), 1)
                    ce = F.nll_loss(log_p, targets)
                    parts["ce"] = ce if cfg.w_ce == 1 else cfg.w_ce * ce
                parts.update(self.terms(view, logits, targets))
                loss = functools.reduce(operator.add, parts.values())
            if track:
                with torch.no_grad():  # keep each image's best iterate (the one scored by this forward)
                    score = log_p.gather(1, tgt)  # minus its cross-entropy
                    best = torch.where((score > best_score).view(-1, *([1] * (x.dim() - 1))), x, best)  # no sync
                    best_score = torch.fmax(score, best_score)  # the higher of the two; a NaN score never wins
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                x.clamp_(min=lo, max=hi)
            if it == cfg.iterations - 1:  # reading values syncs the device: only once per batch
                last = {k: float(v.detach()) for k, v in parts.items()}
                last["total"] = float(loss.detach())
        out = best if track else x.detach()
        return ctx.denormalize(out).clamp(0, 1), last
