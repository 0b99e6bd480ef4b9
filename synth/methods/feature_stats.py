"""Statistical feature matching (`stat`), DeepInversion and ADI: inversion with feature-statistics terms.

Reference statistics are the teacher's BatchNorm running statistics (matched on each BN layer's input)
or, with a record, the recorded channel mean/variance of chosen layers' outputs — the way teachers
without BatchNorm are served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..moment_taps import MomentSlot, tap, tapped_channel_stats
from ..hooks import FeatureHooks, bn_layers
from ..losses import channel_stats, competition, l2_prior, moment_distance, tv_l1, tv_l2
from .base import MethodError, SynthContext, layer_list, register_method
from .inversion import InversionConfig, InversionMethod


class StatTerms:
    """Hooks on the matched layers and their reference (mean, var); removed by `close`.

    Each BN input passes a tap (synth.moment_taps), so its statistics' gradient is formed when the backward
    pass reaches the layer instead of all at once at the loss: same gradient, less memory.
    """

    def __init__(self, ctx: SynthContext, layers: str, method: str, momentum: float = 0.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise MethodError(f"{method}.bn_momentum must lie in [0, 1), got {momentum}")
        # momentum > 0 (Fast, NAYER): each batch is matched blended with the earlier batches' moments, so the
        # store as a whole, not every batch alone, has to fit the reference statistics.
        self.momentum, self.running, self.last = momentum, {}, {}
        if ctx.record is not None:
            paths = layer_list(layers, ctx.record.layers)
            missing = [p for p in paths if p not in ctx.record.mean]
            if missing:
                raise MethodError(f"the record has no statistics for layer {missing[0]!r}; it holds {ctx.record.layers}")
            self.refs = {p: (ctx.record.mean[p].to(ctx.device), ctx.record.var[p].to(ctx.device)) for p in paths}
            capture = "output"
        else:
            paths = layer_list(layers, bn_layers(ctx.teacher))
            if not paths:
                raise MethodError(f"{method} needs BatchNorm statistics, and this teacher has no BatchNorm layers; "
                                  "record statistics on real data with `dfkd record` and pass --stats FILE")
            mods = dict(ctx.teacher.named_modules())
            not_bn = [p for p in paths if p not in bn_layers(ctx.teacher)]
            if not_bn:
                raise MethodError(f"layer {not_bn[0]!r} is not a BatchNorm layer; without --stats only BN layers "
                                  "have reference statistics")
            self.refs = {p: (mods[p].running_mean, mods[p].running_var) for p in paths}
            capture = "input"
        self.paths = paths
        self.slots: dict[str, MomentSlot | None] = {}
        # Taps on BN inputs only: a recorded layer's output is often changed in place by the activation after
        # it (the record reads it after the forward, as the loss does here), which a tap's output cannot allow.
        self.hooks = FeatureHooks(ctx.teacher, paths, capture=capture,
                                  transform=self._tap if capture == "input" else None).__enter__()

    def _tap(self, path: str, x: torch.Tensor) -> torch.Tensor:
        out, self.slots[path] = tap(x)
        return out

    def loss(self, first_multiplier: float) -> torch.Tensor:
        """Sum over matched layers of the stat loss; the first layer weighted by `first_multiplier`."""
        total = 0.0
        for i, p in enumerate(self.paths):
            x, slot = self.hooks.captured[p], self.slots.get(p)
            mu, v = channel_stats(x) if slot is None else tapped_channel_stats(x, slot)
            if self.momentum:
                self.last[p] = (mu.detach(), v.detach())
                if p in self.running:
                    m, (run_mu, run_v) = self.momentum, self.running[p]
                    mu, v = (1 - m) * mu + m * run_mu, (1 - m) * v + m * run_v
            total = total + (first_multiplier if i == 0 else 1.0) * moment_distance(mu, v, *self.refs[p])
        return total

    def update_momentum(self) -> None:
        """Fold the last scored batch's moments into the running ones (call once per finished batch)."""
        for p, (mu, v) in self.last.items():
            old = self.running.get(p)
            self.running[p] = (mu, v) if old is None else tuple(self.momentum * o + (1 - self.momentum) * n
                                                                for o, n in zip(old, (mu, v)))
        self.last = {}

    def close(self) -> None:
        self.hooks.remove()
        self.slots = {}


@dataclass
class StatConfig(InversionConfig):
    """Cross-entropy to the target + feature statistics; `layers`: comma-separated paths (default: all).

    The first matched layer weighs x10, as in DeepInversion: on Fashion-MNIST's BN-free LeNet-5 with a
    record, 66.3% of student accuracy against 41.3% at x1 (BENCHMARKS.md).
    """

    w_stat: float = 1.0  # weight of the feature-statistics loss (BN running stats or the record)
    first_multiplier: float = 10.0  # extra weight of the first matched layer
    layers: str = ""  # comma-separated layer paths to match (default: all BN / recorded layers)


@register_method
class Stat(InversionMethod):
    name = "stat"
    Config = StatConfig

    def __init__(self, ctx: SynthContext, config: StatConfig) -> None:
        super().__init__(ctx, config)
        self.stats = StatTerms(ctx, config.layers, self.name)

    def terms(self, x, logits, targets):
        return {"stat": self.config.w_stat * self.stats.loss(self.config.first_multiplier)}

    def close(self) -> None:
        self.stats.close()


@dataclass
class DeepInversionConfig(InversionConfig):
    """DeepInversion (Yin et al. 2020): CE + BN statistics (first layer x10) + TV (L1, L2) + L2 prior.

    w_bn 1 with the first layer x10 and Adam lr 0.25, betas (0.5, 0.9) were measured best on small
    teachers (the CIFAR code's w_bn 100 / lr 0.1 suit ResNets); TV L2 2.5e-5 is the CIFAR code's.
    """

    w_bn: float = 1.0  # weight of the BN-statistics loss
    first_multiplier: float = 10.0  # extra weight of the first matched layer
    w_tv_l2: float = 2.5e-5  # weight of the L2 total-variation prior
    w_tv_l1: float = 0.0  # weight of the L1 total-variation prior
    w_l2: float = 0.0  # weight of the L2 norm of the image
    layers: str = ""  # comma-separated layer paths to match (default: all BN / recorded layers)


@register_method
class DeepInversion(InversionMethod):
    name = "deepinversion"
    Config = DeepInversionConfig

    def __init__(self, ctx: SynthContext, config: DeepInversionConfig) -> None:
        super().__init__(ctx, config)
        self.stats = StatTerms(ctx, config.layers, self.name)

    def terms(self, x, logits, targets):
        c = self.config
        out = {"bn": c.w_bn * self.stats.loss(c.first_multiplier)}
        if c.w_tv_l2:
            out["tv_l2"] = c.w_tv_l2 * tv_l2(x)
        if c.w_tv_l1:
            out["tv_l1"] = c.w_tv_l1 * tv_l1(x)
        if c.w_l2:
            out["l2"] = c.w_l2 * l2_prior(x)
        return out

    def close(self) -> None:
        self.stats.close()


@dataclass
class ADIConfig(DeepInversionConfig):
    """Adaptive DeepInversion: DeepInversion + competition (1 - JS between teacher and student at T)."""

    w_competition: float = 0.2  # weight of the competition term (1 - JS teacher/student)
    temperature: float = 3.0  # temperature of the competition's softmaxes


@register_method
class ADI(DeepInversion):
    name = "adi"
    Config = ADIConfig

    def __init__(self, ctx: SynthContext, config: ADIConfig) -> None:
        if ctx.student is None:
            raise MethodError("adi needs a student to compete with; pass --student STUDENT.pt")
        super().__init__(ctx, config)

    def terms(self, x, logits, targets):
        out = super().terms(x, logits, targets)
        out["competition"] = self.config.w_competition * competition(self.ctx.student(x), logits,
                                                                      self.config.temperature)
        return out
