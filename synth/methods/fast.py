"""Fast (Fang et al., AAAI 2022, "Up to 100x faster data-free knowledge distillation"): a meta-generator.

For each unit a copy of the meta-generator G and a fresh latent batch z are optimized together for
`g_steps` steps (the presets: 2, 5, 10); the best iterate is the unit, and G moves by the first-order meta
gradient of that adaptation (`meta=maml`: the copy's gradients summed over the steps; `meta=reptile`: the
displacement G - copy), so that a few steps from G suffice for the next batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...store.toolbox.declared import setting
from ..generators import create_generator
from .base import register_method
from .bank_chain import BankConfig, BankMethod


def add_first_order_grads(meta: nn.Module, fast: nn.Module) -> None:
    """First-order MAML: add the adapted copy's current gradients to the meta-generator's (one call per step)."""
    for p, q in zip(meta.parameters(), fast.parameters()):
        if q.grad is not None:
            p.grad = q.grad.detach().clone() if p.grad is None else p.grad.add_(q.grad)


def set_reptile_grads(meta: nn.Module, fast: nn.Module) -> None:
    """Reptile: the meta gradient is the displacement the adaptation made, meta - adapted (Adam takes its scale)."""
    for p, q in zip(meta.parameters(), fast.parameters()):
        p.grad = (p.detach() - q.detach()).clone()


@dataclass
class FastConfig(BankConfig):
    """Fast's meta-generator: latent size, z's own learning rate, meta gradient. Presets (CIFAR code):
    g_steps 2 / 5 / 10 with lr_g 5e-3 / 3e-3 / 2e-3 and lr_z 0.015 / 0.01 / 0.01; the meta-optimizer is Adam
    with lr lr_g x g_steps, betas (0.5, 0.999)."""

    latent_dim: int = setting(256, "size of each unit's latent z", low=1)
    lr_z: float = setting(0.01, "Adam learning rate of z", low=0, low_open=True)
    meta: str = setting("maml", "meta gradient: maml (first order) or reptile", choices=("maml", "reptile"))


@register_method
class Fast(BankMethod):
    """Fast (Fang et al. 2022): a meta-generator adapted g_steps per unit against a proxy student on the memory bank."""

    name = "fast"
    Config = FastConfig

    def __init__(self, ctx: Any, config: FastConfig) -> None:
        super().__init__(ctx, config)

    def init_chain(self, seed: int) -> None:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = create_generator("dcgan", c.latent_dim, self.ctx.image_shape, c.width, head="tanh")
        self.generator.to(self.ctx.device).train()
        self.meta_opt = torch.optim.Adam(self.generator.parameters(), lr=c.lr_g * c.g_steps, betas=(0.5, 0.999))

    def generator_state(self) -> dict[str, Any]:
        return {"model": self.generator.state_dict(), "opt": self.meta_opt.state_dict()}

    def load_generator_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["model"])
        self.meta_opt.load_state_dict(state["opt"])

    def make_batch(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        z = torch.randn((len(targets), c.latent_dim), generator=gen).to(self.ctx.device).requires_grad_(True)
        fast = copy.deepcopy(self.generator)
        opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": c.lr_z}], lr=c.lr_g,
                               betas=(0.5, 0.999))
        self.meta_opt.zero_grad(set_to_none=True)
        maml = (lambda: add_first_order_grads(self.generator, fast)) if c.meta == "maml" else None
        best, parts = self.optimize(lambda: fast(z), opt, targets, gen, after_backward=maml)
        if c.meta == "reptile":
            set_reptile_grads(self.generator, fast)
        self.meta_opt.step()
        return best, parts
