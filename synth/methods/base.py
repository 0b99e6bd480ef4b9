"""The method contract and registry: a method turns (teacher, target labels, generator) into images.

Everything else (seeds, units, resume, quantization, logits, progress, provenance, writing) is the
engine's. Hyper-parameters are dataclass fields, so every weight is exposed and recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...store.toolbox.augment import denormalize, normalize
from ...store.toolbox.declared import check_declared
from ...store.toolbox.errors import DfkdError
from ...store.toolbox.registry import Registry


class MethodError(DfkdError):
    """An unknown method, a bad hyper-parameter, or a teacher the method cannot serve."""


@dataclass
class SynthContext:
    """What a method may use: the frozen teacher, data geometry, normalization, optional record/student."""

    teacher: nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    teacher_fingerprint: str = ""
    record: Any = None          # a synth.record.TeacherStats (dfkd record), for stat/spectral matching of recorded layers
    student: nn.Module | None = None  # for ADI's competition term
    amp: torch.dtype | None = None  # autocast dtype on CUDA (bf16/fp16); None: full fp32
    cuda_graphs: bool = False  # inversion iterations replayed as CUDA graphs (CUDA, not with fp16)

    def autocast(self) -> Any:
        """Mixed precision for forward passes when enabled (loss statistics are still taken in fp32); its cache of
        cast weights is off under CUDA graphs, which cannot capture it."""
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                              cache_enabled=False if self.cuda_graphs else None)

    def stored_logits(self, images_u8: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 logits (on the CPU) of uint8 images exactly as the store holds them."""
        from ..teacher import teacher_labeller

        return teacher_labeller(self.teacher, self.mean, self.std, self.device)(images_u8)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Pixel space [0, 1] -> teacher input."""
        return normalize(x01, self.mean, self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher input -> pixel space [0, 1] (not clipped)."""
        return denormalize(x, self.mean, self.std)


class Method:
    """Base of every synthesis method; subclasses declare `Config` (a dataclass) and `synthesize`.

    The whole contract the engine and the jobs rely on is declared here (no `hasattr` probes): what a method is
    (the class flags), what it trains before sampling (`prepare` / `load_trained`), and the units it makes.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    trains_student: ClassVar[bool] = False  # a proxy student learns beside the method (--student names it)
    sequential: ClassVar[bool] = False  # a unit depends on every earlier unit of its chain, not on its seed alone
    units_in_flight: ClassVar[bool] = False  # `synthesize_units` makes several units in one batch, each as alone
    trains_before_sampling: ClassVar[bool] = False  # `prepare` trains something (a generator) before any unit
    labels_from_teacher: ClassVar[bool] = False  # a sample's stored label is the teacher's argmax, not its target
    saves_generator: ClassVar[bool] = False  # a trained generator is kept beside the store (side_files "generator")

    def __init__(self, ctx: SynthContext, config: Any) -> None:
        self.ctx, self.config = ctx, config

    def synthesize(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Images in pixel space [0, 1], B×C×H×W, for these target labels; plus final loss values."""
        raise NotImplementedError

    def synthesize_units(self, targets: list[torch.Tensor], gens: list[torch.Generator]
                         ) -> list[tuple[torch.Tensor, dict[str, float]]]:
        """Several units' `synthesize` (each its targets and generator); one at a time unless the method makes
        them side by side (`units_in_flight`), each then getting the images it gets alone (to float rounding)."""
        return [self.synthesize(t, g) for t, g in zip(targets, gens)]

    def prepare(self, store_path: str, *, resume: bool = False, seed: int = 0, show: bool | None = None) -> bool:
        """Train what the method samples from (`trains_before_sampling`), on rank 0; whether this run (re)wrote it."""
        return False

    def load_trained(self, store_path: str) -> None:
        """Load what `prepare` trained on rank 0 (the other ranks of a torchrun job)."""

    def begin_chain(self, store_path: str, state_path: str, units: list[int], done: Any, *, seed: int,
                    resume: bool, bank: tuple[str, ...] = ()) -> int:
        """A `sequential` method: start (or continue from `state_path`) the chain making `units` in order; returns
        how many of them it has made already. `end_unit` follows each unit's `synthesize`."""
        raise NotImplementedError(f"{self.name} is not sequential: it makes each unit from its seed alone")

    def end_unit(self, unit: int, images: torch.Tensor) -> None:
        """A `sequential` method: the unit's stored uint8 images, after it was written (its memory bank grows)."""

    def close(self) -> None:
        """Release hooks and anything else attached to the teacher."""

    def run_identity(self) -> dict[str, Any]:
        """What a training checkpoint of this method must match to be continued: method, settings, teacher,
        compute, and the proxy student's shapes (None without one)."""
        student = self.ctx.student
        return {"method": self.name, "config": dataclasses.asdict(self.config), "teacher": self.ctx.teacher_fingerprint,
                "compute": {"device": self.ctx.device.type, "amp": str(self.ctx.amp)},
                "student": None if student is None else [list(v.shape) for v in student.state_dict().values()]}


def layer_list(text: str, default: list[str]) -> list[str]:
    """Comma-separated layer paths from a hyper-parameter, or `default` when it is empty."""
    return [p.strip() for p in text.split(",") if p.strip()] or list(default)


_METHODS: Registry[type[Method]] = Registry("synthesis method", MethodError, key=lambda cls: cls.name)
register_method = _METHODS.register  # class decorator: a method available by its `name`


def list_methods() -> list[str]:
    return _METHODS.names()


def method_class(name: str) -> type[Method]:
    """The registered class of a method (unknown names get the registry's one-line error)."""
    return _METHODS.get(name)


def method_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The method's config with defaults, overridden by `overrides` (unknown keys refused)."""
    cls = _METHODS.get(name).Config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(fields))
    if bad:
        raise MethodError(f"method {name!r} has no hyper-parameter {bad[0]!r}; it takes {', '.join(fields)}")
    typed = {}
    for k, v in overrides.items():
        default = getattr(cls(), k)
        try:
            if isinstance(default, bool) and isinstance(v, str):
                if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(v)
                typed[k] = v.lower() in ("1", "true", "yes")
            elif isinstance(default, (int, float, str)) and not isinstance(v, type(default)):
                typed[k] = type(default)(v)
            else:
                typed[k] = v
        except (TypeError, ValueError):
            raise MethodError(f"{name}.{k} must be {type(default).__name__}, got {v!r}") from None
    config = cls(**typed)
    check_declared(config, lambda key, reason: MethodError(f"{name}.{key} {reason}"))  # choices, bounds, finite
    return config


def create_method(name: str, ctx: SynthContext, overrides: dict[str, Any] | None = None) -> Method:
    """Build a method by name for this context."""
    return method_class(name)(ctx, method_config(name, overrides))
