"""Generators G(z) -> images for the generative methods: a registry, the DCGAN-style family, checkpoints.

A generator's `output_space` says what it emits: "input" (the teacher's normalized input space, as the
published DAFL/DFAD generators do: tanh then a non-affine BatchNorm, which keeps every batch spread out
and the min-max game from collapsing) or "pixel" ([0, 1]: tanh mapped to pixels, so the store holds
exactly what the teacher saw — but measured here it saturates, and DAFL collapsed to one black image).
Input-space samples are clipped to the valid pixel range when stored; the stored logits are the
teacher's on the stored images either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..store.toolbox import fs
from ..store.toolbox.errors import DfkdError
from ..store.toolbox.registry import Registry

FORMAT = "dfkd-generator"


class GeneratorError(DfkdError):
    """A generator that cannot be built for this image shape, or a generator file that does not fit."""


@dataclass
class GeneratorSpec:
    """What rebuilds a generator: architecture, latent size, output image shape, base width."""

    arch: str
    latent_dim: int
    image_shape: tuple[int, int, int]
    width: int
    head: str = "bn"

    def build(self) -> nn.Module:
        return create_generator(self.arch, self.latent_dim, self.image_shape, self.width, self.head)


_GENERATORS: Registry[Callable[..., nn.Module]] = Registry("generator", GeneratorError)
register_generator = _GENERATORS.register  # a generator factory under its function name


def create_generator(arch: str, latent_dim: int, image_shape: tuple[int, int, int], width: int = 64,
                     head: str = "bn") -> nn.Module:
    """Build a generator by name for (latent size, C×H×W output); head "bn" (published) or "tanh" (pixels)."""
    if head not in ("bn", "tanh"):
        raise GeneratorError(f"generator head must be bn (published: teacher input space) or tanh (pixels), got {head!r}")
    return _GENERATORS.get(arch)(latent_dim, tuple(image_shape), width, head)


class DCGAN(nn.Module):
    """DCGAN-style generator of DAFL/DFAD: linear to (2w)×(H/4)×(W/4), two nearest ×2 upsamplings, 3×3 convs."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], width: int, head: str = "bn") -> None:
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4 or h < 4 or w < 4:
            raise GeneratorError(f"the dcgan generator makes images whose sides are multiples of 4; "
                                 f"{h}×{w} is not (resize the teacher's input, or register another generator)")
        self.latent_dim, self.image_shape, self.init = latent_dim, (c, h, w), (h // 4, w // 4)
        self.project = nn.Linear(latent_dim, 2 * width * self.init[0] * self.init[1])
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, 2 * width, 3, padding=1),
                                 nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2, inplace=True))
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1),
                                 nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Conv2d(width, c, 3, padding=1), nn.Tanh())
        self.output_space = "input" if head == "bn" else "pixel"
        self.out_bn = nn.BatchNorm2d(c, affine=False) if head == "bn" else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise GeneratorError(f"this generator takes latent vectors of size {self.latent_dim}, got {tuple(z.shape)}")
        x = self.up2(self.up1(self.bn0(self.project(z).view(len(z), -1, *self.init))))
        return self.out_bn(x) if self.out_bn is not None else (x + 1) / 2  # teacher input space / pixels


@register_generator
def dcgan(latent_dim: int, image_shape: tuple[int, int, int], width: int = 64, head: str = "bn") -> nn.Module:
    """DAFL/DFAD's generator ("GeneratorA"), any channel count, sides a multiple of 4."""
    return DCGAN(latent_dim, image_shape, width, head)


def save_generator(path: str, model: nn.Module, spec: GeneratorSpec, extra: dict[str, Any] | None = None,
                   snapshots: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Self-describing generator file (spec + weights + plain metadata, + optional snapshots), written atomically.

    `snapshots` are state dicts of the same generator taken along its training; the store is then filled
    from all of them (see GenerativeConfig.snapshots).
    """
    fs.save_torch({"format": FORMAT, "spec": {**asdict(spec), "image_shape": list(spec.image_shape)},
                "state_dict": model.state_dict(), "extra": extra or {}, "snapshots": list(snapshots or [])}, path)


def _read(path: str) -> dict[str, Any]:
    """The file's contents, with one clear line for a missing, unreadable or foreign file."""
    if not fs.exists(path):
        raise GeneratorError(f"generator file {path} does not exist; train one with dfkd synth --method adversarial|dafl")
    try:
        blob = fs.load_torch(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise GeneratorError(f"{path} is not a readable generator file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise GeneratorError(f"{path} is not a dfkd generator file; pass the *.generator.pt written by dfkd synth")
    return blob


def load_generator(path: str) -> tuple[nn.Module, GeneratorSpec, dict[str, Any]]:
    """Rebuild a generator from its file alone (weights_only: opening it never runs code)."""
    blob = _read(path)
    s = blob["spec"]
    spec = GeneratorSpec(s["arch"], int(s["latent_dim"]), tuple(int(v) for v in s["image_shape"]), int(s["width"]),
                         s.get("head", "tanh"))
    model = spec.build()
    model.load_state_dict(blob["state_dict"])
    return model, spec, blob.get("extra", {})


def load_snapshots(path: str) -> list[dict[str, torch.Tensor]]:
    """The state dicts a generator file holds from along its training (empty for a single generator)."""
    return list(_read(path).get("snapshots", []))
