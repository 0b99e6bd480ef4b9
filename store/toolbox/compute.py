"""Compute settings both stages share: the mixed-precision dtype for a device (on by default on CUDA only).
torch loads on first call, so the CLI can name AMP_MODES in --help without it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import DfkdError

if TYPE_CHECKING:
    import torch

AMP_MODES = ("auto", "off", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adam")  # what students, teachers and proxy students train with (SGD with momentum, or Adam)


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
