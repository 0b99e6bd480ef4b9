"""NAYER (Tran et al., CVPR 2024, "NAYER: Noisy layer data generation"): class embeddings through a noisy layer.

The generator maps each target's class embedding (BatchNorm, then a linear "noisy layer" re-drawn from
N(0, 1) for every batch, one per `chunk` samples) into a DCGAN body; the body persists across batches and
is rebuilt every `g_life` units. The paper embeds class names with a text encoder; dfkd reads embeddings
from a file (`embeddings=FILE.safetensors`, one row per class, any width) or, without one, draws fixed
random embeddings from the chain's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...store.toolbox.declared import setting
from ..generators import create_generator
from .base import MethodError, register_method
from .bank_chain import BankConfig, BankMethod


def load_embeddings(path: str, num_classes: int) -> torch.Tensor:
    """A K×D float tensor from a safetensors file holding one tensor (or one named `embeddings`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise MethodError(f"nayer.embeddings: cannot read {path} as safetensors ({e}); pass a .safetensors file "
                          "with one K×D tensor") from None
    t = tensors.get("embeddings", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if t is None or t.dim() != 2 or len(t) != num_classes:
        shape = None if t is None else tuple(t.shape)
        raise MethodError(f"nayer.embeddings: {path} must hold one {num_classes}×D tensor (one row per class), "
                          f"got {shape if shape else sorted(tensors)}")
    return t.float()


class NoisyLayerGenerator(nn.Module):
    """Class embedding -> BatchNorm -> noisy linear layer(s) -> DCGAN body (pixels in [0, 1])."""

    def __init__(self, embeddings: torch.Tensor, noise_dim: int, image_shape: tuple[int, int, int], width: int,
                 chunk: int) -> None:
        super().__init__()
        self.register_buffer("embeddings", embeddings.clone())
        self.norm = nn.BatchNorm1d(embeddings.shape[1])
        self.body = create_generator("dcgan", noise_dim, image_shape, width, head="tanh")
        self.noise_dim, self.chunk = noise_dim, chunk
        self.noisy: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch, never saved

    def redraw(self, n: int, gen: torch.Generator) -> list[torch.Tensor]:
        """New noisy layers for a batch of n (weights N(0, 1), biases 0); returns them to be optimized."""
        d, dev = self.embeddings.shape[1], self.embeddings.device
        self.noisy = [(torch.randn((self.noise_dim, d), generator=gen).to(dev).requires_grad_(True),
                       torch.zeros(self.noise_dim, device=dev, requires_grad=True)) for _ in range(math.ceil(n / self.chunk))]
        return [t for layer in self.noisy for t in layer]

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        e = self.norm(self.embeddings[targets])
        v = torch.cat([part @ w.t() + b for part, (w, b) in zip(e.split(self.chunk), self.noisy)])
        return self.body(v)


@dataclass
class NayerConfig(BankConfig):
    """NAYER's settings (CIFAR-10 code: g_steps 30, lr_g 4e-3, a new generator every 10 epochs of 2 batches)."""

    g_steps: int = setting(30, "generator steps per unit", low=1)
    lr_g: float = setting(4e-3, "Adam learning rate of the generator", low=0, low_open=True)
    g_life: int = setting(20, "units before the generator is rebuilt", low=1)
    noise_dim: int = setting(256, "width of the noisy layer's input", low=1)
    chunk: int = setting(100, "samples per re-drawn noisy layer", low=1)
    embeddings: str = setting("", "class embeddings file (.safetensors, one row per class); else random")
    embedding_dim: int = setting(512, "width of the random embeddings used without a file", low=1)


@register_method
class Nayer(BankMethod):
    """NAYER (Tran et al. 2024): class embeddings through a re-drawn noisy layer, the generator rebuilt every g_life."""

    name = "nayer"
    Config = NayerConfig

    def __init__(self, ctx: Any, config: NayerConfig) -> None:
        for key in ("g_life", "noise_dim", "chunk", "embedding_dim"):
            if getattr(config, key) < 1:
                raise MethodError(f"nayer.{key} must be >= 1, got {getattr(config, key)}")
        super().__init__(ctx, config)
        self.class_embeddings = load_embeddings(config.embeddings, ctx.num_classes) if config.embeddings else None

    def init_chain(self, seed: int) -> None:
        if self.class_embeddings is None:  # fixed for the whole chain, drawn from its seed (one per rank under torchrun)
            self.class_embeddings = torch.randn((self.ctx.num_classes, self.config.embedding_dim),
                                                generator=torch.Generator().manual_seed(seed))
        self._build(seed)

    def _build(self, seed: int) -> None:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            g = NoisyLayerGenerator(self.class_embeddings, c.noise_dim, self.ctx.image_shape, c.width, c.chunk)
        self.generator = g.to(self.ctx.device).train()

    def generator_state(self) -> dict[str, Any]:
        return {"model": self.generator.state_dict()}

    def load_generator_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["model"])

    def make_batch(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        if self.position and self.position % c.g_life == 0:  # a new generator for the next stretch of units
            self._build(int(torch.randint(2**62, (), generator=self.chain_gen)))
        noisy = self.generator.redraw(len(targets), gen)
        opt = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": noisy}], lr=c.lr_g,
                               betas=(0.5, 0.999))
        return self.optimize(lambda: self.generator(targets), opt, targets, gen)
