"""Compute settings both stages share: the mixed-precision dtype for a device (on by default on CUDA only).
torch loads on first call, so the CLI can name AMP_MODES in --help without it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import DfkdError

if TYPE_CHECKING:
    import torch

AMP_MODES = ("auto", "off", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adam")  # what students, teachers and proxy students train with (SGD with momentum, or Adam)
# The students' default peak rate per optimizer, measured with the default T 20 on Fashion-MNIST view stores.
DISTILL_LR = {"sgd": 0.02, "adam": 1e-3}
TEACHER_LR = {"sgd": 0.05, "adam": 1e-3}  # supervised training on real data


def make_optimizer(params: Any, kind: str, lr: float, weight_decay: float, *, nesterov: bool = True,
                   graph_device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer of a trained network (student, teacher, proxy student): SGD with momentum 0.9 or Adam; for CUDA
    graphs (`graph_device`) fused and capturable, the rate a device tensor the scheduler writes in place (a graph
    replays the rate it was captured with otherwise)."""
    import torch

    graphs: dict[str, Any] = {} if graph_device is None else {"fused": True}
    rate = lr if graph_device is None else torch.tensor(lr, device=graph_device)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=rate, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov, **graphs)
    if kind == "adam":
        return torch.optim.Adam(params, lr=rate, weight_decay=weight_decay, **graphs,
                                **({"capturable": True} if graphs else {}))
    raise DfkdError(f"unknown optimizer {kind!r}; choose {' or '.join(OPTIMIZERS)}")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job this process is part of; (0, 1) outside one."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def amp_dtype(mode: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device`, or None for full fp32.

    auto: bf16 where the GPU supports it, else fp16 (with a grad scaler); always off on CPU, where
    autocast buys nothing for these models.
    """
    import torch

    device = torch.device(device)
    if mode not in AMP_MODES:
        raise DfkdError(f"amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if mode == "off" or device.type != "cuda":
        if mode in ("bf16", "fp16") and device.type != "cuda":
            raise DfkdError(f"--amp {mode} needs a CUDA device; on {device.type} use --amp off (or auto)")
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16
