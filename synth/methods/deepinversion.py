"""Statistical feature matching (`stat`), DeepInversion and ADI: inversion with feature-statistics terms.

Reference statistics are the teacher's BatchNorm running statistics (matched on each BN layer's input)
or, with a record, the recorded channel mean/variance of chosen layers' outputs — the way teachers
without BatchNorm are served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...store.toolbox.declared import setting
from ..moment_match import MomentMatch, MomentSlot, tap
from ..hooks import FeatureHooks, bn_layers
from ..losses import competition, l2_prior, tv_l1, tv_l2
from .base import MethodError, SynthContext, layer_list, register_method
from .inversion_loop import InversionConfig, InversionMethod, per_group


class StatTerms:
    """Hooks on the matched layers and their reference (mean, var); removed by `close`.

    Each BN input passes a tap (synth.moment_match), so its statistics' gradient is formed when the backward
    pass reaches the layer instead of all at once at the loss: same gradient, less memory. Every layer's
    distance is computed in one stacked pass (`MomentMatch`), a fixed number of ops whatever the layer count.
    """

    def __init__(self, ctx: SynthContext, layers: str, method: str, momentum: float = 0.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise MethodError(f"{method}.bn_momentum must lie in [0, 1), got {momentum}")
        # momentum > 0 (Fast, NAYER): each batch is matched blended with the earlier batches' moments, so the
        # store as a whole, not every batch alone, has to fit the reference statistics.
        self.momentum, self._running = momentum, None
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
        self.match = MomentMatch([self.refs[p] for p in paths], ctx.device)
        self.slots: dict[str, MomentSlot | None] = {}
        # Taps on BN inputs only: a recorded layer's output is often changed in place by the activation after
        # it (the record reads it after the forward, as the loss does here), which a tap's output cannot allow.
        self.hooks = FeatureHooks(ctx.teacher, paths, capture=capture,
                                  transform=self._tap if capture == "input" else None).__enter__()

    def _tap(self, path: str, x: torch.Tensor) -> torch.Tensor:
        out, self.slots[path] = tap(x)
        return out

    def loss(self, first_multiplier: float, weight: float = 1.0, groups: int = 1) -> torch.Tensor:
        """weight x the sum over matched layers of the stat loss; the first layer weighted by `first_multiplier`;
        with `groups` G (units side by side), the sum of each group's own."""
        weights = [weight * (first_multiplier if i == 0 else 1.0) for i in range(len(self.paths))]
        xs = [self.hooks.captured[p] for p in self.paths]
        return self.match.loss(xs, [self.slots.get(p) for p in self.paths], weights,
                               self._running if self.momentum else None, self.momentum, groups)

    @property
    def running(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The running (mean, var) of each matched layer (momentum > 0), as a chain's checkpoint keeps them."""
        if self._running is None:
            return {}
        return {p: (m.clone(), v.clone()) for p, (m, v) in zip(self.paths, self.match.split(self._running))}

    @running.setter
    def running(self, value: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._running = self.match.join([value[p] for p in self.paths]).to(self.match.device) if value else None

    def update_momentum(self) -> None:
        """Fold the last scored batch's moments into the running ones (call once per finished batch)."""
        last, self.match.last = self.match.last, None
        if last is not None and self.momentum:
            self._running = last if self._running is None else torch.lerp(last, self._running, self.momentum)

    def close(self) -> None:
        self.hooks.remove()
        self.slots = {}


@dataclass
class StatConfig(InversionConfig):
    """Cross-entropy to the target + feature statistics; `layers`: comma-separated paths (default: all).

    The first matched layer weighs x10, as in DeepInversion: on Fashion-MNIST's BN-free LeNet-5 with a
    record, 66.3% of student accuracy against 41.3% at x1 (BENCHMARKS.md).
    """

    w_stat: float = setting(1.0, "weight of the feature-statistics loss (BN running stats or the record)", low=0)
    first_multiplier: float = setting(10.0, "extra weight of the first matched layer", low=0)
    layers: str = setting("", "comma-separated layer paths to match (default: all BN / recorded layers)")


@register_method
class Stat(InversionMethod):
    name = "stat"
    Config = StatConfig

    def __init__(self, ctx: SynthContext, config: StatConfig) -> None:
        super().__init__(ctx, config)
        self.stats = StatTerms(ctx, config.layers, self.name)

    def terms(self, x, logits, targets, groups=1):
        return {"stat": self.stats.loss(self.config.first_multiplier, self.config.w_stat, groups)}

    def close(self) -> None:
        self.stats.close()


@dataclass
class DeepInversionConfig(InversionConfig):
    """DeepInversion (Yin et al. 2020): CE + BN statistics (first layer x10) + TV (L1, L2) + L2 prior.

    w_bn 1 with the first layer x10 and Adam lr 0.25, betas (0.5, 0.9) were measured best on small
    teachers (the CIFAR code's w_bn 100 / lr 0.1 suit ResNets); TV L2 2.5e-5 is the CIFAR code's.
    """

    w_bn: float = setting(1.0, "weight of the BN-statistics loss", low=0)
    first_multiplier: float = setting(10.0, "extra weight of the first matched layer", low=0)
    w_tv_l2: float = setting(2.5e-5, "weight of the L2 total-variation prior", low=0)
    w_tv_l1: float = setting(0.0, "weight of the L1 total-variation prior", low=0)
    w_l2: float = setting(0.0, "weight of the L2 norm of the image", low=0)
    layers: str = setting("", "comma-separated layer paths to match (default: all BN / recorded layers)")


@register_method
class DeepInversion(InversionMethod):
    name = "deepinversion"
    Config = DeepInversionConfig

    def __init__(self, ctx: SynthContext, config: DeepInversionConfig) -> None:
        super().__init__(ctx, config)
        self.stats = StatTerms(ctx, config.layers, self.name)

    def terms(self, x, logits, targets, groups=1):
        c = self.config
        out = {"bn": self.stats.loss(c.first_multiplier, c.w_bn, groups)}
        if c.w_tv_l2:
            out["tv_l2"] = tv_l2(x, c.w_tv_l2, groups)
        if c.w_tv_l1:
            out["tv_l1"] = c.w_tv_l1 * per_group(tv_l1, x, groups)
        if c.w_l2:
            out["l2"] = c.w_l2 * per_group(l2_prior, x, groups)
        return out

    def close(self) -> None:
        self.stats.close()


@dataclass
class ADIConfig(DeepInversionConfig):
    """Adaptive DeepInversion: DeepInversion + competition (1 - JS between teacher and student at T)."""

    w_competition: float = setting(0.2, "weight of the competition term (1 - JS teacher/student)", low=0)
    temperature: float = setting(3.0, "temperature of the competition's softmaxes", low=0, low_open=True)


@register_method
class ADI(DeepInversion):
    name = "adi"
    Config = ADIConfig

    def __init__(self, ctx: SynthContext, config: ADIConfig) -> None:
        if ctx.student is None:
            raise MethodError("adi needs a student to compete with; pass --student STUDENT.pt")
        super().__init__(ctx, config)

    def terms(self, x, logits, targets, groups=1):
        out = super().terms(x, logits, targets, groups)
        out["competition"] = self.config.w_competition * competition(self.ctx.student(x), logits,
                                                                      self.config.temperature, groups)
        return out
