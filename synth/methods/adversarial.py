"""Adversarial distillation: DFAD (L1 on logits) and ZSKT (KL + attention transfer), a generator against a proxy student."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...store.toolbox.declared import setting
from ..hooks import FeatureHooks
from ..losses import attention, kl_divergence
from ..modes import modes
from .base import MethodError, SynthContext, register_method
from .generator_training import GenerativeConfig, GenerativeMethod


@dataclass
class AdversarialConfig(GenerativeConfig):
    """DFAD (Fang et al. 2019; MNIST code defaults): L1 on logits, 5 student steps per generator step.

    `discrepancy=kl` with `w_at` > 0 and `at_layers` ("teacher.path:student.path,...") is ZSKT's
    (Micaelli & Storkey 2019) KL + attention transfer (their β = 250); the generator maximizes the KL.
    """

    student_steps: int = setting(5, "proxy student steps per generator step", low=1)
    discrepancy: str = setting("l1", "l1 on logits (DFAD) or kl (ZSKT)", choices=("l1", "kl"))
    w_at: float = setting(0.0, "weight of attention transfer (ZSKT; needs at_layers)", low=0)
    at_layers: str = setting("", "teacher.path:student.path pairs for attention, comma-separated")


@register_method
class Adversarial(GenerativeMethod):
    name = "adversarial"
    Config = AdversarialConfig

    def __init__(self, ctx: SynthContext, config: AdversarialConfig) -> None:
        pairs = [p.split(":") for p in config.at_layers.split(",") if p.strip()]
        if config.w_at and (not pairs or any(len(p) != 2 for p in pairs)):
            raise MethodError("adversarial.w_at needs at_layers as teacher.path:student.path pairs, comma-separated")
        super().__init__(ctx, config)
        self.pairs = [(t.strip(), s.strip()) for t, s in pairs] if config.w_at else []
        self.t_hooks = self.s_hooks = None

    def setup(self) -> None:
        super().setup()
        if self.pairs:
            self.t_hooks = FeatureHooks(self.ctx.teacher, [t for t, _ in self.pairs], capture="output").__enter__()
            self.s_hooks = FeatureHooks(self.ctx.student, [s for _, s in self.pairs], capture="output").__enter__()

    def discrepancy(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        if self.config.discrepancy == "l1":
            return F.l1_loss(s_logits.float(), t_logits.float())
        return kl_divergence(s_logits, t_logits)

    def at_loss(self) -> torch.Tensor:
        return sum((attention(self.s_hooks.captured[s]) - attention(self.t_hooks.captured[t].detach())).pow(2).mean()
                   for t, s in self.pairs)

    def student_step(self, z: torch.Tensor) -> torch.Tensor:
        """The student learns to agree with the teacher on G(z) (G and teacher without gradients)."""
        with torch.no_grad():
            x = self.images(z)
            t = self.ctx.teacher(x)
        loss = self.discrepancy(self.ctx.student(x), t)
        if self.pairs:
            loss = loss + self.config.w_at * self.at_loss()
        self.opt_s.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_s.step()
        return loss.detach()

    def generator_step(self, z: torch.Tensor) -> torch.Tensor:
        """G moves toward samples where they disagree; gradients flow to G only (no teacher/student weights)."""
        with modes(self.ctx.student, train=None, grads=False):  # the student stays in train mode
            x = self.images(z)
            loss = -self.discrepancy(self.ctx.student(x), self.ctx.teacher(x)) + self.stat_prior()
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_g.step()
        return loss.detach()

    def train_round(self, z_gen: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.config
        for _ in range(c.student_steps):
            loss_s = self.student_step(self.sample_z(c.batch_size, z_gen))
        loss_g = self.generator_step(self.sample_z(c.batch_size, z_gen))
        return {"student": loss_s, "generator": loss_g}

    def close(self) -> None:
        super().close()
        for h in (self.t_hooks, self.s_hooks):
            if h is not None:
                h.remove()
