"""DAFL (Chen et al. 2019): a generator trained on the teacher alone (one-hot, activation, information entropy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...store.toolbox.declared import redeclared, setting
from ..hooks import FeatureHooks
from ..losses import kl_divergence
from .base import MethodError, SynthContext, register_method
from .generator_training import GenerativeConfig, GenerativeMethod


@dataclass
class DAFLConfig(GenerativeConfig):
    """DAFL (Chen et al. 2019; MNIST code defaults): one-hot + information entropy + activation losses.

    The student learns by KL (T=1) on the same samples each iteration; `feature_layer` is the teacher
    layer whose input is the "activation" (default: the last Linear, i.e. the penultimate features).
    """

    rounds: int = redeclared(GenerativeConfig, "rounds", 24000)
    lr_g: float = redeclared(GenerativeConfig, "lr_g", 0.2)
    lr_s: float = redeclared(GenerativeConfig, "lr_s", 2e-3)
    student_optimizer: str = redeclared(GenerativeConfig, "student_optimizer", "adam")
    weight_decay_s: float = redeclared(GenerativeConfig, "weight_decay_s", 0.0)
    w_onehot: float = setting(1.0, "weight of the one-hot (confident-prediction) loss", low=0)
    w_entropy: float = setting(5.0, "weight of the class-balance (information entropy) loss", low=0)
    w_activation: float = setting(0.1, "weight of the feature-activation loss", low=0)
    feature_layer: str = setting("", "layer whose input is the penultimate feature (default: last Linear)")


@register_method
class DAFL(GenerativeMethod):
    name = "dafl"
    Config = DAFLConfig

    def __init__(self, ctx: SynthContext, config: DAFLConfig) -> None:
        layer = config.feature_layer or next((n for n, m in reversed(list(ctx.teacher.named_modules()))
                                             if isinstance(m, nn.Linear)), "")
        if not layer:
            raise MethodError("dafl needs the teacher's penultimate features and found no Linear layer; "
                              "name one with --set feature_layer=PATH (its input is used)")
        super().__init__(ctx, config)
        self.feature_layer, self.hooks = layer, None

    def setup(self) -> None:
        super().setup()
        self.hooks = FeatureHooks(self.ctx.teacher, [self.feature_layer], capture="input").__enter__()

    def train_round(self, z_gen: torch.Generator) -> dict[str, torch.Tensor]:
        c, teacher, student = self.config, self.ctx.teacher, self.ctx.student
        x = self.images(self.sample_z(c.batch_size, z_gen))
        t = teacher(x).float()
        feats = self.hooks.captured[self.feature_layer]
        onehot = F.cross_entropy(t, t.argmax(1))
        mean_p = F.softmax(t, 1).mean(0)
        entropy = (mean_p * torch.log10(mean_p.clamp_min(1e-12))).sum()  # negative entropy of the batch's classes
        activation = -feats.float().abs().mean()
        loss_g = c.w_onehot * onehot + c.w_entropy * entropy + c.w_activation * activation + self.stat_prior()
        loss_s = kl_divergence(student(x.detach()), t.detach())
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_s.zero_grad(set_to_none=True)
        (loss_g + loss_s).backward()
        self.opt_g.step()
        self.opt_s.step()
        return {"generator": loss_g.detach(), "student": loss_s.detach()}

    def close(self) -> None:
        super().close()
        if self.hooks is not None:
            self.hooks.remove()
